"""The IPv6 sockets of the keepalive engine (ip6gre tunnels, MikroTik's GRE6 format: gre6.py).

Opened only once a tunnel needs them (a host without IPv6 runs IPv4 keepalives all the same):

- replies: `socket(AF_INET6, SOCK_RAW, IPPROTO_GRE)`, a copy of every GRE packet the host gets over IPv6, behind
  bpf.reply_filter6 (configured remotes and locals, issued tokens). Probes leave by it too: the kernel builds the
  outer IPv6 header, IPV6_PKTINFO gives the tunnel's `local` as source and the underlay device, SO_MARK the link's
  fwmark, as for IPv4 (engine.py, review H1 and #21 M2). Hop limit 255.
- requests: the same kind of socket behind bpf.request_filter6 (remotes of tunnels with answer = "daemon").
- answers: `socket(AF_INET6, SOCK_RAW, IPPROTO_RAW)`, which takes the IPv6 header from us (IPV6_HDRINCL is
  implied, Linux 4.5+): a reflection leaves exactly as the peer wrote it, flow label (a greupd peer's token)
  and all.

A raw IPv6 socket reads from the GRE header on: the addresses come from recvmsg (source) and IPV6_PKTINFO
(destination), the flow label from IPV6_FLOWINFO, the receive time from SO_TIMESTAMPNS.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import struct
import time
from collections.abc import Callable, Sequence
from ipaddress import IPv6Address

from greupd.keepalive.bpf import IPPROTO_GRE, reply_fallbacks6, reply_filter6, request_fallbacks6, request_filter6
from greupd.keepalive.codec import Packet
from greupd.keepalive.gre_socket import _DROP_EVERYTHING, AttachedProgram, attach_socket_filter, socket_drops
from greupd.netlink.nlmsg import SO_RCVBUFFORCE

log = logging.getLogger("greupd.keepalive")

_IPV6_FLOWINFO = 11  # <linux/in6.h>: as a socket option, deliver each packet's flow info as a control message
_SO_TIMESTAMPNS = 35
_TIMESPEC = struct.Struct("@qq")
_RECEIVE_BUFFER = 1 << 20
_HOP_LIMIT = 255
_DRAIN_LIMIT = 512
_GRID = 0.01
_CONTROL_SPACE = (socket.CMSG_SPACE(_TIMESPEC.size) + socket.CMSG_SPACE(20) + socket.CMSG_SPACE(4))

# on_packet(data, source, destination, flow label, received on the loop's clock)
PacketHandler = Callable[[Packet, int, int, int, float], None]


def source_address6(local: IPv6Address, ifindex: int = 0, fwmark: int = 0) -> list[tuple[int, int, bytes]]:
    """engine.source_address for IPv6: IPV6_PKTINFO (struct in6_pktinfo: the source, the output device, 0 for
    any) and SO_MARK."""
    messages = [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, struct.pack("=16sI", local.packed, ifindex))]
    if fwmark:
        messages.append((socket.SOL_SOCKET, socket.SO_MARK, struct.pack("=I", fwmark)))
    return messages


def open_gre6_socket() -> socket.socket:
    """A raw IPv6 GRE socket that drops everything until a program is attached."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, IPPROTO_GRE)
    try:
        attach_socket_filter(sock, _DROP_EVERYTHING)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, _HOP_LIMIT)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_FLOWINFO, 1)
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, _RECEIVE_BUFFER)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RECEIVE_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def read_control(control: list[tuple[int, int, bytes]], now: float, real_minus_loop: float) -> tuple[int, int, float]:
    """(destination, flow label, receive time on the loop's clock) from a packet's control messages."""
    destination = flow = 0
    received = now
    for level, kind, data in control:
        if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO and len(data) >= 16:
            destination = int.from_bytes(data[:16])
        elif level == socket.IPPROTO_IPV6 and kind == _IPV6_FLOWINFO and len(data) >= 4:
            flow = int.from_bytes(data[:4]) & 0xFFFFF  # network order, as in the header
        elif level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS and len(data) >= _TIMESPEC.size:
            seconds, nanoseconds = _TIMESPEC.unpack_from(data)
            received = seconds + nanoseconds * 1e-9 - real_minus_loop
    return destination, flow, received


class Gre6Sockets:
    """The engine's three IPv6 sockets, registered with its loop, and their programs."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_packet: PacketHandler) -> None:
        self._loop, self._on_packet = loop, on_packet
        self.answers = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
        try:
            self.answers.setblocking(False)
            self.replies = open_gre6_socket()
            try:
                self.requests = open_gre6_socket()
            except OSError:
                self.replies.close()
                raise
        except OSError:
            self.answers.close()
            raise
        self._view = memoryview(bytearray(65535))
        self._paused: set[int] = set()
        self.reply_program = AttachedProgram("IPv6 replies", "tokens")
        self.request_program = AttachedProgram("IPv6 requests", "addresses")
        for sock in (self.replies, self.requests):
            loop.add_reader(sock.fileno(), self._readable, sock)

    def follow(self, remotes: Sequence[int], locals_: Sequence[int], tokens: Sequence[int],
               answered: Sequence[tuple[int, int]]) -> None:
        """The programs for these tunnels' addresses and tokens, and the remotes/locals of those that answer."""
        program, kind = reply_filter6(remotes, locals_, tokens)
        self.reply_program.attach(self.replies, program, kind, len(remotes), reply_fallbacks6(remotes, locals_))
        program, kind = request_filter6([r for r, _ in answered], [loc for _, loc in answered])
        self.request_program.attach(self.requests, program, kind, len(answered), request_fallbacks6())

    def _readable(self, sock: socket.socket) -> None:
        """Read up to _DRAIN_LIMIT packets; if more are queued (a flood), leave the socket alone until the next
        point of the grid, as the IPv4 requests socket does."""
        now = self._loop.time()
        real_minus_loop = time.time() - time.monotonic()  # the loop's clock is time.monotonic()
        view = self._view
        for _ in range(_DRAIN_LIMIT):
            try:
                size, control, _, address = sock.recvmsg_into([view], _CONTROL_SPACE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("reading an IPv6 GRE socket: %s", exc.strerror or exc)
                return
            destination, flow, received = read_control(control, now, real_minus_loop)
            source = int(IPv6Address(address[0].split("%")[0]))
            self._on_packet(view[:size], source, destination, flow, received)
        fd = sock.fileno()
        self._loop.remove_reader(fd)
        self._paused.add(fd)
        self._loop.call_at((math.floor(now / _GRID) + 1) * _GRID, self._resume, sock)

    def _resume(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        if fd in self._paused and fd >= 0:
            self._paused.discard(fd)
            self._loop.add_reader(fd, self._readable, sock)

    def drops(self) -> int | None:
        counts = [socket_drops(self.replies), socket_drops(self.requests)]
        return None if None in counts else sum(c for c in counts if c is not None)

    def close(self) -> None:
        for sock in (self.replies, self.requests):
            if sock.fileno() >= 0 and sock.fileno() not in self._paused:
                self._loop.remove_reader(sock.fileno())
        self._paused.clear()
        for sock in (self.answers, self.replies, self.requests):
            sock.close()
