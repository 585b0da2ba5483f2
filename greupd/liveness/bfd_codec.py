"""The BFD control packet (RFC 5880 section 4) and its meticulous keyed SHA1 section (4.4, 6.7.4): bytes in,
values out, nothing else. Intervals are microseconds on the wire and here, as the RFC counts them.

    0                   1                   2                   3
   |Vers |  Diag   |Sta|P|F|C|A|D|M|  Detect Mult  |    Length     |
   |                       My Discriminator                        |
   |                      Your Discriminator                       |
   |                    Desired Min TX Interval                    |
   |                   Required Min RX Interval                    |
   |                 Required Min Echo RX Interval                 |
   [ Auth Type | Auth Len | Key ID | Reserved | Sequence Number | SHA1 digest (20 bytes) ]
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import struct
from dataclasses import dataclass

VERSION = 1
HEADER = struct.Struct("!BBBBIIIII")  # 24 bytes: the mandatory section
SHA1_SECTION = struct.Struct("!BBBBI20s")  # 28 bytes: type, length, key id, reserved, sequence, digest
SHA1_KEY_SIZE = 20
MAX_PACKET = 64  # 24 + 28; anything longer carries a section we never speak


class State(enum.IntEnum):
    ADMIN_DOWN = 0
    DOWN = 1
    INIT = 2
    UP = 3

    @property
    def label(self) -> str:
        """As status --json says it: admin-down, down, init, up."""
        return self.name.lower().replace("_", "-")


class Diag(enum.IntEnum):
    NONE = 0
    DETECTION_TIME_EXPIRED = 1
    ECHO_FAILED = 2
    NEIGHBOR_DOWN = 3
    FORWARDING_RESET = 4
    PATH_DOWN = 5
    CONCATENATED_PATH_DOWN = 6
    ADMIN_DOWN = 7
    REVERSE_CONCATENATED_PATH_DOWN = 8

    @property
    def text(self) -> str:
        return _DIAG_TEXT.get(self, f"diagnostic {int(self)}")


_DIAG_TEXT = {
    Diag.NONE: "no diagnostic",
    Diag.DETECTION_TIME_EXPIRED: "control detection time expired",
    Diag.ECHO_FAILED: "echo function failed",
    Diag.NEIGHBOR_DOWN: "neighbor signaled session down",
    Diag.FORWARDING_RESET: "forwarding plane reset",
    Diag.PATH_DOWN: "path down",
    Diag.CONCATENATED_PATH_DOWN: "concatenated path down",
    Diag.ADMIN_DOWN: "administratively down",
    Diag.REVERSE_CONCATENATED_PATH_DOWN: "reverse concatenated path down",
}


class AuthType(enum.IntEnum):
    SIMPLE_PASSWORD = 1
    KEYED_MD5 = 2
    METICULOUS_KEYED_MD5 = 3
    KEYED_SHA1 = 4
    METICULOUS_KEYED_SHA1 = 5


class MalformedPacket(ValueError):
    """Bytes that are not a BFD control packet RFC 5880 6.8.6 would look at; the reason says why."""


@dataclass(frozen=True)
class AuthSection:
    """A received (or to be sent) authentication section; `digest` is what the packet carried."""

    type: int
    key_id: int
    sequence: int
    digest: bytes = bytes(SHA1_KEY_SIZE)


@dataclass(frozen=True)
class ControlPacket:
    state: State
    my_discriminator: int
    your_discriminator: int = 0
    desired_min_tx_us: int = 1_000_000
    required_min_rx_us: int = 1_000_000
    required_min_echo_rx_us: int = 0  # we have no echo function (RFC 5880 6.8.9: 0 says so)
    detect_mult: int = 3
    diag: Diag = Diag.NONE
    poll: bool = False
    final: bool = False
    control_plane_independent: bool = False
    demand: bool = False
    multipoint: bool = False
    auth: AuthSection | None = None
    version: int = VERSION


def encode(packet: ControlPacket, key: bytes | None = None) -> bytes:
    """The packet's bytes; with `auth` (keyed or meticulous keyed SHA1), `key` is the shared secret and the
    digest is computed as RFC 5880 6.7.4 says: SHA1 over the whole packet with the key, zero-padded to 20
    bytes, in the digest's place."""
    auth = packet.auth
    length = HEADER.size + (SHA1_SECTION.size if auth is not None else 0)
    flags = ((packet.state & 3) << 6 | packet.poll << 5 | packet.final << 4 | packet.control_plane_independent << 3
             | (auth is not None) << 2 | packet.demand << 1 | packet.multipoint)
    head = HEADER.pack((packet.version & 7) << 5 | (packet.diag & 31), flags, packet.detect_mult, length,
                       packet.my_discriminator, packet.your_discriminator, packet.desired_min_tx_us,
                       packet.required_min_rx_us, packet.required_min_echo_rx_us)
    if auth is None:
        return head
    if auth.type not in (AuthType.KEYED_SHA1, AuthType.METICULOUS_KEYED_SHA1):
        raise ValueError(f"greupd signs with keyed SHA1 only, not authentication type {auth.type}")
    if key is None:
        raise ValueError("a packet with an authentication section needs the key to sign it")
    unsigned = head + SHA1_SECTION.pack(auth.type, SHA1_SECTION.size, auth.key_id, 0, auth.sequence,
                                        sha1_key(key))
    return unsigned[:-SHA1_KEY_SIZE] + hashlib.sha1(unsigned).digest()


def sha1_key(key: bytes) -> bytes:
    if not 1 <= len(key) <= SHA1_KEY_SIZE:
        raise ValueError(f"a keyed SHA1 key is 1 to {SHA1_KEY_SIZE} bytes, not {len(key)}")
    return key.ljust(SHA1_KEY_SIZE, b"\0")


def decode(data: bytes) -> ControlPacket:
    """A control packet, checked as RFC 5880 6.8.6's first paragraphs say (version, lengths, detect mult,
    multipoint, my discriminator); what depends on a session is the session's to check."""
    if len(data) < HEADER.size:
        raise MalformedPacket(f"{len(data)} bytes, shorter than a control packet (24)")
    (vers_diag, flags, detect_mult, length, my_disc, your_disc, tx, rx, echo) = HEADER.unpack_from(data)
    version = vers_diag >> 5
    if version != VERSION:
        raise MalformedPacket(f"version {version}, not 1")
    has_auth = bool(flags & 0x04)
    if length < (HEADER.size + 2 if has_auth else HEADER.size):
        raise MalformedPacket(f"length field {length} is too short")
    if length > len(data):
        raise MalformedPacket(f"length field {length} is more than the {len(data)} bytes received")
    if detect_mult == 0:
        raise MalformedPacket("detect multiplier 0")
    if flags & 0x01:
        raise MalformedPacket("multipoint bit set")
    if my_disc == 0:
        raise MalformedPacket("my discriminator 0")
    auth = None
    if has_auth:
        auth = _decode_auth(data[HEADER.size:length])
    diag_value = vers_diag & 31
    return ControlPacket(
        state=State(flags >> 6), my_discriminator=my_disc, your_discriminator=your_disc,
        desired_min_tx_us=tx, required_min_rx_us=rx, required_min_echo_rx_us=echo, detect_mult=detect_mult,
        diag=Diag(diag_value) if diag_value in Diag._value2member_map_ else Diag.NONE,
        poll=bool(flags & 0x20), final=bool(flags & 0x10), control_plane_independent=bool(flags & 0x08),
        demand=bool(flags & 0x02), multipoint=False, auth=auth, version=version)


def _decode_auth(section: bytes) -> AuthSection:
    auth_type, auth_len = section[0], section[1]
    if auth_len > len(section) or auth_len < 2:
        raise MalformedPacket(f"authentication length {auth_len} does not fit the packet")
    if auth_type in (AuthType.KEYED_SHA1, AuthType.METICULOUS_KEYED_SHA1):
        if auth_len != SHA1_SECTION.size:
            raise MalformedPacket(f"keyed SHA1 section of {auth_len} bytes, not 28")
        _, _, key_id, _, sequence, digest = SHA1_SECTION.unpack_from(section)
        return AuthSection(auth_type, key_id, sequence, digest)
    key_id = section[2] if auth_len > 2 else 0
    return AuthSection(auth_type, key_id, 0, b"")


def sha1_digest_ok(data: bytes, key: bytes) -> bool:
    """Is the SHA1 digest of this received packet (decode() accepted it, with a SHA1 section) the one `key`
    makes? RFC 5880 6.7.4: the digest's place holds the key, zero-padded, while the hash is computed."""
    length = data[3]
    digest_at = length - SHA1_KEY_SIZE
    received = data[digest_at:length]
    expected = hashlib.sha1(data[:digest_at] + sha1_key(key)).digest()
    return hmac.compare_digest(received, expected)
