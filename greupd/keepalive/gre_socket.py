"""The raw GRE socket the keepalive engine reads (and sends its probes from): opened, filtered, its drops read.

The filter (bpf.py) follows the configured tunnels: `GreSocketFilter.follow` compiles the remotes and locals
of the tunnels with keepalives and attaches the program again whenever that set changes (a reload); SO_ATTACH_FILTER
replaces the old program in one step, so no packet passes unfiltered meanwhile. Above the kernel's 4096
instructions, the protocol program alone is attached, with a warning.

What the socket dropped because its receive buffer was full (sk_drops, read with SO_MEMINFO) is what a flood
costs: a reply dropped there is a missed keepalive. `socket_drops` is reported in `greupd status` and metrics.
"""

from __future__ import annotations

import ctypes
import logging
import socket
import struct
from collections.abc import Collection
from typing import Literal

from greupd.keepalive.bpf import GRE_PROTOCOL_PROGRAM, IPPROTO_GRE, MAX_INSTRUCTIONS, SocketFilter, socket_filter
from greupd.netlink.nlmsg import SO_RCVBUFFORCE
from greupd.status import KeepaliveSocketStatus

log = logging.getLogger("greupd.keepalive")

_SO_ATTACH_FILTER = 26  # <asm-generic/socket.h>; not exported by Python's socket module
_SO_MEMINFO = 55  # <asm-generic/socket.h>: u32 sk_meminfo[SK_MEMINFO_VARS]
_SK_MEMINFO_VARS, _SK_MEMINFO_DROPS = 9, 8  # <linux/sock_diag.h>
_SO_TIMESTAMPNS = 35
_RECEIVE_BUFFER = 1 << 20
_PROBE_TTL = 255  # the outer TTL of our probes, as Cisco's tunnels send them

FilterKind = Literal["addresses", "protocol"]
SocketStatus = KeepaliveSocketStatus


def attach_socket_filter(sock: socket.socket, program: SocketFilter) -> None:
    """SO_ATTACH_FILTER takes a struct sock_fprog, which points at the instructions: build both with ctypes."""

    class SockFilter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                    ("k", ctypes.c_uint32)]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(SockFilter))]

    instructions = (SockFilter * len(program))(*(SockFilter(*insn) for insn in program))
    fprog = SockFprog(len(program), instructions)
    sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, ctypes.string_at(ctypes.addressof(fprog),
                                                                           ctypes.sizeof(fprog)))


def open_gre_socket() -> socket.socket:
    """`socket(AF_INET, SOCK_RAW, IPPROTO_GRE)` as the engine reads it (needs CAP_NET_RAW). It drops every
    packet until `GreSocketFilter.follow` attaches the tunnels' program."""
    receive = socket.socket(socket.AF_INET, socket.SOCK_RAW, IPPROTO_GRE)
    try:
        attach_socket_filter(receive, socket_filter((), ()) or GRE_PROTOCOL_PROGRAM)
        receive.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, _PROBE_TTL)  # probes leave on this socket
        try:
            # Thousands of tunnels answer in bursts; the default limit (rmem_max) would drop some.
            receive.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, _RECEIVE_BUFFER)
        except PermissionError:  # without CAP_NET_ADMIN, as much as rmem_max allows
            receive.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RECEIVE_BUFFER)
        receive.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
        receive.setblocking(False)
    except OSError:
        receive.close()
        raise
    return receive


def socket_drops(sock: socket.socket) -> int | None:
    """What the kernel dropped at this socket since it was opened (sk_drops: receive buffer full), or None
    where SO_MEMINFO is unknown (before Linux 4.6)."""
    try:
        meminfo = sock.getsockopt(socket.SOL_SOCKET, _SO_MEMINFO, 4 * _SK_MEMINFO_VARS)
    except OSError:
        return None
    if len(meminfo) < 4 * _SK_MEMINFO_VARS:
        return None
    drops: int = struct.unpack_from("=I", meminfo, 4 * _SK_MEMINFO_DROPS)[0]
    return drops


class GreSocketFilter:
    """The program attached to the engine's GRE socket, following the configured remotes and locals."""

    def __init__(self) -> None:
        self._addresses: tuple[frozenset[int], frozenset[int]] | None = None
        self.kind: FilterKind = "addresses"
        self.remotes = 0

    def follow(self, sock: socket.socket, remotes: Collection[int], locals_: Collection[int]) -> None:
        """Attach the program for these addresses to `sock`, unless it is attached already."""
        addresses = frozenset(remotes), frozenset(locals_)
        if addresses == self._addresses:
            return
        program = socket_filter(*addresses)
        if program is None:
            if self.kind != "protocol":
                log.warning("%d keepalive remotes are too many for the socket filter (%d instructions at most):"
                            " GRE from any source reaches the engine, and a flood can cost replies",
                            len(addresses[0]), MAX_INSTRUCTIONS)
            program, self.kind = GRE_PROTOCOL_PROGRAM, "protocol"
        else:
            self.kind = "addresses"
        attach_socket_filter(sock, program)
        self._addresses, self.remotes = addresses, len(addresses[0])

    def forget(self) -> None:
        """The socket was closed: the next follow attaches again."""
        self._addresses = None
