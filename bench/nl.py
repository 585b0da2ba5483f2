"""Raw rtnetlink for the benchmarks: sockets opened inside a lab host's netns, events timestamped on arrival.

Why not pyroute2 or `ip`: drift repair takes a few milliseconds, and an `ip` process costs 100+ ms to start in
the UML guest, while pyroute2's parser would add its own (slow, in UML) time between the kernel's message and
our timestamp. So messages are read with `recv` on a plain socket, stamped with CLOCK_MONOTONIC at once, and
parsed by hand afterwards (only the few attributes the benchmarks look at), with greupd's own netlink framing
(greupd.netlink.nlmsg) and constants (greupd.netlink.rtnl).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from greupd.gre import IFLA_GRE_TTL
from greupd.netlink.nlmsg import (
    NLM_F_ACK,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    SO_RCVBUFFORCE,
    attr,
    attributes,
    error_code,
    message,
    messages,
)
from greupd.netlink.rtnl import (
    IFA_ADDRESS,
    IFA_LOCAL,
    IFF_UP,
    IFLA_IFNAME,
    IFLA_INFO_DATA,
    IFLA_LINKINFO,
    RTA_DST,
    RTA_OIF,
    RTA_TABLE,
    RTM_DELADDR,
    RTM_DELLINK,
    RTM_DELROUTE,
    RTM_GETADDR,
    RTM_GETLINK,
    RTM_GETROUTE,
    RTM_NEWADDR,
    RTM_NEWLINK,
    RTM_NEWROUTE,
)

__all__ = [  # what the benchmarks use, greupd's rtnetlink message types among them
    "RTM_DELROUTE",
    "RTM_GETADDR",
    "RTM_GETLINK",
    "RTM_GETROUTE",
    "RTM_NEWADDR",
    "RTM_NEWLINK",
    "RTM_NEWROUTE",
    "Event",
    "RouteCounter",
    "Rtnl",
    "Watch",
    "in_netns",
    "parse",
    "write_sysctl",
]

CLONE_NEWNET = 0x40000000
NETLINK_ROUTE = 0
RTMGRP_LINK, RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE = 0x1, 0x10, 0x40
RT_TABLE_MAIN = 254
RT_SCOPE_NOWHERE = 255

_IFINFOMSG = struct.Struct("=BxHiII")
_IFADDRMSG = struct.Struct("=BBBBI")
_RTMSG = struct.Struct("=BBBBBBBBI")

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"setns: {os.strerror(code)}")


@contextlib.contextmanager
def in_netns(netns: str) -> Iterator[None]:
    """Run the block in /run/netns/<netns> (or the netns file at that path, if it starts with "/").

    Sockets opened inside keep that netns after the block.

    setns changes the calling thread only: no other thread of ours opens sockets meanwhile.
    """
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(netns if netns.startswith("/") else f"/run/netns/{netns}", os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)


def write_sysctl(netns: str, key: str, value: str) -> None:
    """Write a sysctl of that netns from this process: no `sysctl` process to start (100+ ms in UML)."""
    with in_netns(netns), open("/proc/sys/" + key.replace(".", "/"), "w") as f:
        f.write(value + "\n")


def _attrs(data: bytes | None, offset: int = 0) -> dict[int, bytes]:
    return dict(attributes(data, offset)) if data is not None else {}


def _cstr(raw: bytes | None) -> str | None:
    return raw.split(b"\0", 1)[0].decode() if raw is not None else None


def _ipv4(raw: bytes | None) -> str | None:
    return socket.inet_ntop(socket.AF_INET, raw) if raw is not None and len(raw) == 4 else None


@dataclass(frozen=True)
class Event:
    """One rtnetlink message, with what the benchmarks need of it."""

    at: float  # time.monotonic() when the datagram carrying it was read
    kind: int  # RTM_*
    index: int = 0  # ifindex (links, addresses) or RTA_OIF (routes)
    name: str | None = None  # links
    up: bool = False  # links
    ttl: int | None = None  # GRE links
    address: str | None = None  # addresses: the local address
    dst: str | None = None  # routes: "a.b.c.d/len"
    proto: int = 0  # routes
    table: int = 0  # routes


def parse(data: bytes, at: float) -> list[Event]:
    events: list[Event] = []
    for kind, _flags, _seq, _pid, body, _raw in messages(data):
        if kind in (RTM_NEWLINK, RTM_DELLINK):
            _family, _type, index, flags, _change = _IFINFOMSG.unpack_from(body)
            attrs = _attrs(body, _IFINFOMSG.size)
            gre = _attrs(attrs.get(IFLA_LINKINFO)).get(IFLA_INFO_DATA)
            raw_ttl = _attrs(gre).get(IFLA_GRE_TTL)
            ttl = raw_ttl[0] if raw_ttl else None
            events.append(Event(at, kind, index, _cstr(attrs.get(IFLA_IFNAME)), bool(flags & IFF_UP), ttl))
        elif kind in (RTM_NEWADDR, RTM_DELADDR):
            family, _plen, _flags, _scope, index = _IFADDRMSG.unpack_from(body)
            if family == socket.AF_INET:
                attrs = _attrs(body, _IFADDRMSG.size)
                local = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
                events.append(Event(at, kind, index, address=_ipv4(local)))
        elif kind in (RTM_NEWROUTE, RTM_DELROUTE):
            family, dst_len, _src, _tos, table, proto, _scope, _type, _flags = _RTMSG.unpack_from(body)
            if family == socket.AF_INET:
                attrs = _attrs(body, _RTMSG.size)
                oif = attrs.get(RTA_OIF)
                raw_table = attrs.get(RTA_TABLE)
                events.append(Event(
                    at, kind, struct.unpack("=I", oif)[0] if oif else 0,
                    dst=f"{_ipv4(attrs.get(RTA_DST)) or '0.0.0.0'}/{dst_len}", proto=proto,
                    table=struct.unpack("=I", raw_table)[0] if raw_table else table))
    return events


class Watch:
    """rtnetlink multicast (links, IPv4 addresses and routes) of one netns, read as it arrives."""

    def __init__(self, netns: str, groups: int = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE) -> None:
        with in_netns(netns):
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, NETLINK_ROUTE)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)  # thousands of events at once
        self.sock.bind((0, groups))
        self.overruns = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read(self, timeout: float) -> list[Event]:
        """Whatever arrives within `timeout` seconds (returns as soon as something has arrived)."""
        ready, _, _ = select.select([self.sock], [], [], max(timeout, 0.0))
        if not ready:
            return []
        raw: list[tuple[bytes, float]] = []
        while True:
            try:
                data = self.sock.recv(1 << 20)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                self.overruns += 1
                continue
            raw.append((data, time.monotonic()))
        return [event for data, at in raw for event in parse(data, at)]

    def drain(self) -> None:
        while self.read(0):
            pass

    def until(self, done: object, timeout: float) -> list[Event]:
        """Read until `done(event)` is true for one event (returned last), or timeout (TimeoutError)."""
        assert callable(done)
        deadline = time.monotonic() + timeout
        seen: list[Event] = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no matching rtnetlink event within {timeout} s ({len(seen)} others)")
            for event in self.read(left):
                seen.append(event)
                if done(event):
                    return seen


class Rtnl:
    """A request socket in one netns: the few requests the benchmarks make themselves (as `ip` would)."""

    def __init__(self, netns: str) -> None:
        with in_netns(netns):
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        self.sock.bind((0, 0))
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def _request(self, kind: int, payload: bytes, flags: int = NLM_F_ACK) -> None:
        self.seq += 1
        self.sock.send(message(kind, NLM_F_REQUEST | flags, self.seq, 0, payload))
        while True:
            for msg_type, _f, seq, _pid, body, _raw in messages(self.sock.recv(65536)):
                if seq == self.seq and msg_type == NLMSG_ERROR:
                    code = error_code(body)
                    if code:
                        raise OSError(code, f"rtnetlink request {kind}: {os.strerror(code)}")
                    return

    def dump(self, kind: int, family: int = socket.AF_INET) -> list[Event]:
        """RTM_GETLINK/GETADDR/GETROUTE dump, parsed like events."""
        self.seq += 1
        if kind == RTM_GETLINK:
            body = _IFINFOMSG.pack(family, 0, 0, 0, 0)
        elif kind == RTM_GETADDR:
            body = _IFADDRMSG.pack(family, 0, 0, 0, 0)
        else:
            body = _RTMSG.pack(family, *[0] * 8)
        self.sock.send(message(kind, NLM_F_REQUEST | NLM_F_DUMP, self.seq, 0, body))
        events: list[Event] = []
        while True:
            data = self.sock.recv(1 << 20)
            now = time.monotonic()
            for msg_type, _f, _seq, _pid, reply, _raw in messages(data):
                if msg_type == NLMSG_DONE:
                    return events
                if msg_type == NLMSG_ERROR:
                    code = error_code(reply)
                    raise OSError(code, f"rtnetlink dump {kind}: {os.strerror(code)}")
            events += parse(data, now)

    def delete_route(self, dst: str, table: int = RT_TABLE_MAIN) -> None:
        """RTM_DELROUTE as `ip route del DST` sends it (protocol, scope and type left open)."""
        address, length = dst.split("/")
        body = _RTMSG.pack(socket.AF_INET, int(length), 0, 0, table, 0, RT_SCOPE_NOWHERE, 0, 0)
        self._request(RTM_DELROUTE, body + attr(RTA_DST, socket.inet_aton(address)))

    def delete_link(self, name: str) -> None:
        """RTM_DELLINK by name, as `ip link del NAME` sends it."""
        body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        self._request(RTM_DELLINK, body + attr(IFLA_IFNAME, name.encode() + b"\0"))

    def set_link(self, name: str, up: bool) -> None:
        """`ip link set NAME up|down`."""
        body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, IFF_UP if up else 0, IFF_UP)
        self._request(RTM_NEWLINK, body + attr(IFLA_IFNAME, name.encode() + b"\0"))


class RouteCounter:
    """Counts, on a thread of its own, the IPv4 route additions (or deletions) of one protocol in a netns, and
    when the last of `wanted` of them arrived: "the last route in the kernel" without dumping 20,000 routes
    every 250 ms. Only the fixed header of each message is read, so that the counting costs the guest's one
    CPU as little as possible, the same for every tool timed."""

    def __init__(self, netns: str, proto: int, wanted: int, kind: int = RTM_NEWROUTE) -> None:
        self._watch = Watch(netns, RTMGRP_IPV4_ROUTE)
        self.proto, self.wanted, self.kind = proto, wanted, kind
        self.count = 0
        self.last: float | None = None  # time.monotonic() of the message that made `wanted`
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="route-counter", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        sock = self._watch.sock
        while not self._stop and self.count < self.wanted:
            ready, _, _ = select.select([sock], [], [], 0.2)
            if not ready:
                continue
            while True:
                try:
                    data = sock.recv(1 << 20)
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno != errno.ENOBUFS:
                        raise
                    self._watch.overruns += 1
                    continue
                at = time.monotonic()
                for msg_type, _flags, _seq, _pid, body, _raw in messages(data):
                    if msg_type == self.kind and body[0] == socket.AF_INET and body[5] == self.proto:
                        self.count += 1
                if self.count >= self.wanted and self.last is None:
                    self.last = at

    @property
    def overruns(self) -> int:
        return self._watch.overruns

    def wait(self, timeout: float) -> float | None:
        """Until `wanted` were seen (then when the last came), or `timeout` (then None)."""
        self._thread.join(timeout)
        return self.last

    def close(self) -> None:
        self._stop = True
        self._thread.join(1)
        self._watch.close()
