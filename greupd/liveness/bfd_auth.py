"""Meticulous keyed SHA1 for one session (RFC 5880 6.7.4): the sequence numbers we send and the ones we accept.

Pure: the caller gives the received bytes and the time. FRR's keychain SHA1 (PR #21678) is an HMAC over the
packet, not this construction, and discards what we send (FRR issue #23274); BIRD's `meticulous keyed sha1`
is RFC-shaped.
"""

from __future__ import annotations

import random

from greupd.liveness.bfd_codec import AuthSection, AuthType, ControlPacket, sha1_digest_ok, sha1_key

KEY_ID = 1  # spec.md: one key per tunnel, key id 1


class MeticulousSha1:
    def __init__(self, key: bytes, rng: random.Random, key_id: int = KEY_ID) -> None:
        sha1_key(key)  # raises for a key of the wrong size
        self.key = key
        self.key_id = key_id
        self._xmit_seq = rng.getrandbits(32)  # bfd.XmitAuthSeq: random, so a restart is no replay (6.8.1)
        self._rcv_seq = 0  # bfd.RcvAuthSeq
        self._seq_known = False  # bfd.AuthSeqKnown
        self._last_accepted: float | None = None

    @property
    def last_sequence(self) -> int:
        return self._xmit_seq

    def continue_from(self, sequence: int) -> None:
        """A resumed session goes on from the sequence number the previous greupd sent last: the peer accepts
        only numbers above the last it saw (meticulous)."""
        self._xmit_seq = sequence & 0xFFFFFFFF

    def next_section(self) -> AuthSection:
        """The section of the next packet: meticulous, so every packet has a new sequence number."""
        self._xmit_seq = (self._xmit_seq + 1) & 0xFFFFFFFF
        return AuthSection(AuthType.METICULOUS_KEYED_SHA1, self.key_id, self._xmit_seq)

    def accept(self, packet: ControlPacket, data: bytes, now: float, detect_time: float) -> bool:
        """6.7.4's reception checks, then remember the sequence number. A session that heard nothing for twice
        its detection time forgets it (6.8.1 bfd.AuthSeqKnown), so a peer that restarted gets back in."""
        auth = packet.auth
        if auth is None or auth.type != AuthType.METICULOUS_KEYED_SHA1 or auth.key_id != self.key_id:
            return False
        if self._last_accepted is not None and detect_time > 0 and now - self._last_accepted > 2 * detect_time:
            self._seq_known = False
        if self._seq_known:
            ahead = (auth.sequence - self._rcv_seq) & 0xFFFFFFFF
            if not 1 <= ahead <= 3 * packet.detect_mult:
                return False
        if not sha1_digest_ok(data, self.key):
            return False
        self._rcv_seq, self._seq_known, self._last_accepted = auth.sequence, True, now
        return True
