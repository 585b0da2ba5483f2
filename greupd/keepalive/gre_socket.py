"""The raw GRE sockets the keepalive engine reads (replies, requests): opened, filtered, their drops read.

Each socket's program (bpf.py) follows the configured tunnels and, for replies, the tokens the engine issued:
`AttachedProgram.attach` puts a new program on the socket when it differs from the one there (SO_ATTACH_FILTER
replaces the old one in one step, so no packet passes unfiltered meanwhile), and warns when a program had to
leave out what did not fit in the kernel's 4096 instructions.

What a socket dropped because its receive buffer was full (sk_drops, read with SO_MEMINFO) is what a flood
costs: a reply dropped there is a missed keepalive. `socket_drops` is reported in `greupd status` and metrics.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import socket
import struct
from collections.abc import Sequence

from greupd.keepalive.bpf import IPPROTO_GRE, MAX_INSTRUCTIONS, FilterKind, SocketFilter
from greupd.netlink.nlmsg import SO_RCVBUFFORCE

log = logging.getLogger("greupd.keepalive")

_SO_ATTACH_FILTER = 26  # <asm-generic/socket.h>; not exported by Python's socket module
_SO_MEMINFO = 55  # <asm-generic/socket.h>: u32 sk_meminfo[SK_MEMINFO_VARS]
_SK_MEMINFO_VARS, _SK_MEMINFO_DROPS = 9, 8  # <linux/sock_diag.h>
_SO_TIMESTAMPNS = 35
_RECEIVE_BUFFER = 1 << 20
_PROBE_TTL = 255  # the outer TTL of our probes, as Cisco's tunnels send them


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


_DROP_EVERYTHING: SocketFilter = ((0x06, 0, 0, 0),)  # RET 0


def open_gre_socket() -> socket.socket:
    """`socket(AF_INET, SOCK_RAW, IPPROTO_GRE)` as the engine reads it (needs CAP_NET_RAW). It drops every
    packet until a program is attached (AttachedProgram)."""
    receive = socket.socket(socket.AF_INET, socket.SOCK_RAW, IPPROTO_GRE)
    try:
        attach_socket_filter(receive, _DROP_EVERYTHING)
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


class AttachedProgram:
    """The program on one of the engine's sockets: attached again only when it changes."""

    def __init__(self, what: str, full: FilterKind) -> None:
        self.what = what  # "replies" or "requests", for the log
        self.full = full  # what the program checks when everything fits
        self.kind: FilterKind | None = None
        self._program: SocketFilter | None = None
        self._refused_from: int | None = None  # programs this long or longer: the kernel lacked memory for them

    def attach(self, sock: socket.socket, program: SocketFilter, kind: FilterKind, tunnels: int,
               fallbacks: Sequence[tuple[SocketFilter, FilterKind]] = ()) -> None:
        """Attach `program`, or the first of `fallbacks` (smaller ones, smallest last) the kernel takes: each
        program is charged to the socket's option memory (net.core.optmem_max: 20480 bytes on Linux 6.1, so a
        few hundred tunnels' tokens), and a refusal must cost precision, never the keepalives."""
        smallest = fallbacks[-1] if fallbacks else None
        for candidate, candidate_kind in ((program, kind), *fallbacks):
            if candidate == self._program:
                return
            last = smallest is not None and candidate is smallest[0]
            if self._refused_from is not None and len(candidate) >= self._refused_from and not last:
                continue
            try:
                self._put(sock, candidate, smallest)
            except OSError as exc:
                if exc.errno != errno.ENOMEM or last:
                    raise
                self._refused_from = len(candidate)
                log.warning("keepalive %s: the kernel has no memory for a socket filter of %d instructions"
                            " (net.core.optmem_max = %s): it checks less (sysctl -w net.core.optmem_max=131072"
                            " lets it check everything)", self.what, len(candidate), _optmem_max())
                continue
            self._note(candidate_kind, tunnels)
            self._program, self.kind = candidate, candidate_kind
            return

    def _put(self, sock: socket.socket, program: SocketFilter,
             smallest: tuple[SocketFilter, FilterKind] | None) -> None:
        try:
            attach_socket_filter(sock, program)
        except OSError as exc:
            # The old program stays charged while the new one goes in: try again through the smallest one.
            if exc.errno != errno.ENOMEM or smallest is None or self._program in (None, smallest[0]):
                raise
            attach_socket_filter(sock, smallest[0])
            self._program, self.kind = smallest
            attach_socket_filter(sock, program)

    def _note(self, kind: FilterKind, tunnels: int) -> None:
        if kind != self.full and kind != self.kind and self._refused_from is None:
            left_out = "the tokens issued" if kind == "addresses" else "the remotes' addresses"
            log.warning("keepalive %s: %d tunnels are too many for the socket filter (%d instructions at most):"
                        " it leaves out %s, so a flood that it would have dropped can cost replies",
                        self.what, tunnels, MAX_INSTRUCTIONS, left_out)

    def forget(self) -> None:
        """The socket was closed: the next attach attaches whatever it is given."""
        self._program = self.kind = self._refused_from = None


def _optmem_max() -> str:
    try:
        with open("/proc/sys/net/core/optmem_max") as limit:
            return limit.read().strip()
    except OSError:
        return "unknown"
