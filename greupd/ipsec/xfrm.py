"""The kernel's IPsec state (XFRM), as far as greupd needs it: "something was deleted", and "is this one there?".

charon installs SAs and policies in the kernel and then believes them there: it never hears of an
`ip xfrm state flush` or `ip xfrm policy flush` (issue #21, I2: the tunnel stayed dead for over a minute,
charon was never told). This module listens for that and answers the one question the supervisor asks after
it; what to do about a loss (terminate, reload, initiate through VICI) is the supervisor's.

- `XfrmWatch`: the XFRM netlink multicast groups for SAs and policies (XFRMGRP_SA, XFRMGRP_POLICY). Only the
  message *type* of each notification is read (the generic netlink header, greupd/netlink/nlmsg.py): a
  deletion, a flush, or a lost notification (ENOBUFS) calls `on_loss(flushed)`, "look again". Nothing of an XFRM
  message's body is decoded: pyroute2 0.9.7 has no XFRM decoder, and greupd writes none.
- `XfrmQuery`: XFRM_MSG_GETSA by (destination, SPI) and XFRM_MSG_GETPOLICY by selector and direction, the
  kernel's own exact lookups; the answer is known from the reply's type alone (a NEW* message: there; an
  error ENOENT/ESRCH: not there). The request bodies are the two fixed uapi structs below.

Both need CAP_NET_ADMIN in the daemon's netns (the unit grants it); without it the supervisor says so once and
does without.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import struct
from collections.abc import Callable

from greupd.gre import IPAddress
from greupd.netlink.nlmsg import NLM_F_REQUEST, NLMSG_ERROR, SO_RCVBUFFORCE, error_code, message, messages

NETLINK_XFRM = 6
# include/uapi/linux/xfrm.h
XFRM_MSG_NEWSA, XFRM_MSG_DELSA, XFRM_MSG_GETSA = 0x10, 0x11, 0x12
XFRM_MSG_NEWPOLICY, XFRM_MSG_DELPOLICY, XFRM_MSG_GETPOLICY = 0x13, 0x14, 0x15
XFRM_MSG_FLUSHSA, XFRM_MSG_FLUSHPOLICY = 0x1C, 0x1D
XFRMGRP_SA, XFRMGRP_POLICY = 4, 8  # the legacy group bits bind() takes
XFRM_POLICY_IN, XFRM_POLICY_OUT = 0, 1
FLUSHES = frozenset({XFRM_MSG_FLUSHSA, XFRM_MSG_FLUSHPOLICY})
LOSSES = FLUSHES | {XFRM_MSG_DELSA, XFRM_MSG_DELPOLICY}
IPPROTO_ESP, IPPROTO_GRE = 50, 47

# struct xfrm_usersa_id: xfrm_address_t daddr; __be32 spi; __u16 family; __u8 proto; (pad)
_USERSA_ID = struct.Struct("=16s4sHBx")
# struct xfrm_selector: daddr, saddr; __be16 dport, dport_mask, sport, sport_mask; __u16 family;
# __u8 prefixlen_d, prefixlen_s, proto; (pad); int ifindex; __kernel_uid32_t user
_SELECTOR = struct.Struct("=16s16s8sHBBB3xiI")
# struct xfrm_userpolicy_id: struct xfrm_selector sel; __u32 index; __u8 dir; (pad)
_USERPOLICY_ID = struct.Struct(f"={_SELECTOR.size}sIB3x")
_RECEIVE_BUFFER = 1 << 20


def _address(address: IPAddress) -> tuple[bytes, int]:
    """xfrm_address_t (16 bytes, an IPv4 address in the first 4) and the family."""
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    return address.packed.ljust(16, b"\0"), family


def sa_request(daddr: IPAddress, spi: int, protocol: int = IPPROTO_ESP) -> bytes:
    """The body of XFRM_MSG_GETSA for the SA with this destination and SPI."""
    packed, family = _address(daddr)
    return _USERSA_ID.pack(packed, spi.to_bytes(4, "big"), family, protocol)


def policy_request(src: IPAddress, dst: IPAddress, direction: int, protocol: int = IPPROTO_GRE) -> bytes:
    """The body of XFRM_MSG_GETPOLICY for the policy of host-to-host traffic of `protocol`, any ports, as charon
    installs it for `local_ts = remote_ts = dynamic[gre]` (kernel_netlink_ipsec.c ts2selector; the kernel
    compares the whole selector, so every field is what charon writes, and the padding zero)."""
    daddr, family = _address(dst)
    saddr, _ = _address(src)
    bits = 32 if family == socket.AF_INET else 128
    selector = _SELECTOR.pack(daddr, saddr, b"\0" * 8, family, bits, bits, protocol, 0, 0)
    return _USERPOLICY_ID.pack(selector, 0, direction)


class XfrmQuery:
    """Exact lookups in the kernel's SA and policy databases, on a socket of the calling netns."""

    def __init__(self) -> None:
        self._socket: socket.socket | None = None
        self._seq = 0

    def _ask(self, kind: int, body: bytes) -> bool:
        if self._socket is None:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_XFRM)
            sock.settimeout(2.0)
            sock.bind((0, 0))
            self._socket = sock
        self._seq += 1
        self._socket.send(message(kind, NLM_F_REQUEST, self._seq, 0, body))
        while True:
            for reply in messages(self._socket.recv(65536)):
                if reply.seq != self._seq:
                    continue  # the answer to an earlier request that timed out
                if reply.kind != NLMSG_ERROR:
                    return True  # XFRM_MSG_NEWSA / NEWPOLICY: the kernel holds it
                code = error_code(reply.body)
                if code in (errno.ENOENT, errno.ESRCH):
                    return False
                raise OSError(code, f"xfrm lookup: {errno.errorcode.get(code, code)}")

    def has_sa(self, daddr: IPAddress, spi: int) -> bool:
        return self._ask(XFRM_MSG_GETSA, sa_request(daddr, spi))

    def has_policy(self, src: IPAddress, dst: IPAddress, direction: int) -> bool:
        return self._ask(XFRM_MSG_GETPOLICY, policy_request(src, dst, direction))

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


class XfrmWatch:
    """Calls `on_loss(flushed)` on the loop whenever an SA or a policy is deleted or flushed (by anyone: charon's
    own deletions too, which the supervisor's look then finds to be charon's), or notifications were lost;
    `flushed`: a flush was among them (charon never flushes)."""

    def __init__(self, on_loss: Callable[[bool], None]) -> None:
        self._on_loss = on_loss
        self._socket: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Join the groups; raises OSError if the kernel refuses (no XFRM, or no CAP_NET_ADMIN)."""
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, NETLINK_XFRM)
        try:
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, _RECEIVE_BUFFER)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RECEIVE_BUFFER)
            sock.bind((0, XFRMGRP_SA | XFRMGRP_POLICY))
        except OSError:
            sock.close()
            raise
        self._socket, self._loop = sock, loop
        loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        assert self._socket is not None
        lost = flushed = False
        while True:
            try:
                data = self._socket.recv(1 << 16)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:  # notifications overran the buffer: some may have been losses
                    lost = True
                    continue
                raise
            kinds = {m.kind for m in messages(data)}
            lost |= bool(kinds & LOSSES)
            flushed |= bool(kinds & FLUSHES)
        if lost:
            self._on_loss(flushed)

    def close(self) -> None:
        if self._socket is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._socket.fileno())
            self._socket.close()
            self._socket = None
