"""Many datagrams per system call: sendmmsg(2) and recvmmsg(2), which Python's socket module lacks, via ctypes.

The engine sends every probe due at a tick, and reads every reply queued, in one system call each instead of
one per packet: under user-mode Linux (the lab) each system call is a ptrace round trip, and with 1000
tunnels the calls themselves were ~80 % of the daemon's keepalive CPU. Each tunnel's message (`Datagram`:
destination, IP_PKTINFO source, and the probe's own buffer, which ProbeBytes rewrites in place) is built
once; a batch only copies the message headers into one array.

`batching_available()` is False where libc has no sendmmsg/recvmmsg; the engine then sends and reads one
packet per call as before.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
from collections.abc import Iterator, Sequence
from ipaddress import IPv4Address

_MSG_DONTWAIT = 0x40


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32),
                ("msg_iov", ctypes.POINTER(_Iovec)), ("msg_iovlen", ctypes.c_size_t),
                ("msg_control", ctypes.c_void_p), ("msg_controllen", ctypes.c_size_t),
                ("msg_flags", ctypes.c_int)]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _Msghdr), ("msg_len", ctypes.c_uint)]


def _libc() -> ctypes.CDLL | None:
    # The libc Python already runs on (dlopen(NULL)): find_library("c") would start `ldconfig -p` at every
    # daemon start (some 10-40 ms before READY), and glibc's and musl's file names differ anyway.
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    if not hasattr(libc, "sendmmsg") or not hasattr(libc, "recvmmsg"):
        return None
    libc.sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
    libc.sendmmsg.restype = ctypes.c_int
    libc.recvmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
    libc.recvmmsg.restype = ctypes.c_int
    return libc


_LIBC = _libc()


def batching_available() -> bool:
    return _LIBC is not None


def control_message(level: int, kind: int, data: bytes) -> bytes:
    """One struct cmsghdr with its data, padded to CMSG_SPACE: control messages laid end to end."""
    space = socket.CMSG_SPACE(len(data))
    return (struct.pack("@Nii", socket.CMSG_LEN(len(data)), level, kind) + data).ljust(space, b"\0")


class Datagram:
    """One tunnel's probe as a message: to `remote`, from `local` (IP_PKTINFO, with the underlay's `ifindex`,
    0 for any), with `mark` (SO_MARK; 0: none), carrying `payload`, a buffer that is rewritten in place for every
    probe (it must never be resized: the message points into it)."""

    __slots__ = ("_address", "_control", "_iovec", "_payload_view", "entry", "header")

    def __init__(self, payload: bytearray, local: IPv4Address, remote: IPv4Address, pktinfo: int,
                 ifindex: int = 0, mark: int = 0) -> None:
        self._address = ctypes.create_string_buffer(struct.pack("=HH4s8x", socket.AF_INET, 0, remote.packed), 16)
        control = control_message(socket.IPPROTO_IP, pktinfo,
                                  struct.pack("=I4s4s", ifindex, local.packed, bytes(4)))  # struct in_pktinfo
        if mark:
            control += control_message(socket.SOL_SOCKET, socket.SO_MARK, struct.pack("=I", mark))
        space = len(control)
        self._control = ctypes.create_string_buffer(control, space)
        self._payload_view = (ctypes.c_char * len(payload)).from_buffer(payload)
        self._iovec = _Iovec(ctypes.addressof(self._payload_view), len(payload))
        self.header = _Msghdr(ctypes.addressof(self._address), 16, ctypes.pointer(self._iovec), 1,
                              ctypes.addressof(self._control), space, 0)
        # The same as one struct mmsghdr's bytes (msg_len 0): a batch is these laid end to end, one memmove, not
        # a ctypes assignment per probe (#26). The pointers in it stay valid: this object owns what they point to.
        self.entry = bytes(_Mmsghdr(self.header, 0))


class Sender:
    """Sends a batch of Datagrams through one socket, one sendmmsg per batch (or per failing message)."""

    def __init__(self, sock: socket.socket) -> None:
        self._fd = sock.fileno()
        self._messages = (_Mmsghdr * 0)()

    def send(self, datagrams: Sequence[Datagram]) -> Iterator[tuple[int, OSError]]:
        """Send them all; yield (index, error) for each one the kernel refused (the others were sent)."""
        assert _LIBC is not None
        count = len(datagrams)
        if len(self._messages) < count:
            self._messages = (_Mmsghdr * max(count, 2 * len(self._messages)))()
        messages = self._messages
        entries = b"".join([datagram.entry for datagram in datagrams])
        ctypes.memmove(messages, entries, len(entries))
        start = 0
        while start < count:
            sent = _LIBC.sendmmsg(self._fd, ctypes.addressof(messages) + start * ctypes.sizeof(_Mmsghdr),
                                  count - start, 0)
            if sent > 0:
                start += sent
                continue
            code = ctypes.get_errno()
            if sent < 0 and code == errno.EINTR:
                continue
            # The message at `start` failed (sendmmsg reports the first failure as -1): skip it, go on.
            yield start, OSError(code, os.strerror(code))
            start += 1


_TIMESPEC_CMSG = struct.Struct("@Niiqq")  # struct cmsghdr + struct timespec (64-bit)


class Receiver:
    """Reads up to `batch` datagrams per recvmmsg into fixed slots, with their SO_TIMESTAMPNS control data."""

    def __init__(self, sock: socket.socket, batch: int, slot_size: int, timestamp_type: int) -> None:
        self._fd = sock.fileno()
        self._batch, self._slot_size, self._timestamp_type = batch, slot_size, timestamp_type
        self._space = socket.CMSG_SPACE(16)
        self._data = (ctypes.c_char * (batch * slot_size))()
        self._control = (ctypes.c_char * (batch * self._space))()
        self._iovecs = (_Iovec * batch)()
        self._messages = (_Mmsghdr * batch)()
        base, control = ctypes.addressof(self._data), ctypes.addressof(self._control)
        for i in range(batch):
            self._iovecs[i] = _Iovec(base + i * slot_size, slot_size)
            self._messages[i].msg_hdr = _Msghdr(None, 0, ctypes.pointer(self._iovecs[i]), 1,
                                                control + i * self._space, self._space, 0)
        self.data = memoryview(self._data).cast("B")
        self._control_view = memoryview(self._control).cast("B")

    def receive(self) -> list[tuple[memoryview, float | None]]:
        """What the socket holds, up to one batch: (packet, kernel receive time on the real-time clock or
        None); empty when nothing is queued. Raises OSError for a socket error other than EAGAIN."""
        assert _LIBC is not None
        messages = self._messages
        while True:
            count = _LIBC.recvmmsg(self._fd, ctypes.addressof(messages), self._batch, _MSG_DONTWAIT, None)
            if count >= 0:
                break
            code = ctypes.get_errno()
            if code in (errno.EAGAIN, errno.EWOULDBLOCK):
                return []
            if code != errno.EINTR:
                raise OSError(code, os.strerror(code))
        packets = []
        data, control, slot, space = self.data, self._control_view, self._slot_size, self._space
        for i in range(count):
            header = messages[i].msg_hdr
            received = None
            if header.msg_controllen >= _TIMESPEC_CMSG.size:
                _, level, kind, seconds, nanoseconds = _TIMESPEC_CMSG.unpack_from(control, i * space)
                if level == socket.SOL_SOCKET and kind == self._timestamp_type:
                    received = seconds + nanoseconds * 1e-9
            length = min(messages[i].msg_len, slot)  # a longer datagram was cut (MSG_TRUNC): the parser says so
            packets.append((data[i * slot:i * slot + length], received))
            header.msg_controllen = space
            header.msg_flags = 0
        return packets
