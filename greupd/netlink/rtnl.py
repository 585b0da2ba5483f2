"""The rtnetlink codec: model values to requests, kernel messages back to model values; and the request socket.

Both directions of every kernel attribute live here, the GRE ones in one table (gre.GRE_ATTRIBUTES) that the
encoder and the decoder walk. Attribute names are the kernel's (include/uapi/linux/if_link.h, rtnetlink.h).

Why requests are encoded by hand rather than with pyroute2: its request pipeline costs about 1 ms of Python
per request (measured: 1000 links with address and two routes took 6.9 s against 1.1 s for `ip -batch`),
while a request here is a few struct.pack calls. The kernel handles an rtnetlink request synchronously inside
sendmsg(), so a batch is one sendmsg() carrying many messages, after which every ACK is already waiting on the
socket: no round trip per request, and nothing to await. Reading (dumps, events) goes through pyroute2's
parser; the `*_from_message` functions turn its messages into model values.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from greupd.gre import GRE_ATTRIBUTES, IPV6_MODES, MODES, GreAttribute, IPAddress
from greupd.model import LINK_ALIAS, AddressSpec, LinkSpec, ObservedLink, RouteSpec
from greupd.netlink.nlmsg import (
    HEADER,
    NETLINK_CAP_ACK,
    NETLINK_EXT_ACK,
    NETLINK_GET_STRICT_CHK,
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_DUMP_INTR,
    NLM_F_EXCL,
    NLM_F_MULTI,
    NLM_F_REPLACE,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    SO_RCVBUFFORCE,
    SOL_NETLINK,
    attr,
    done_code,
    error_code,
    ext_ack_message,
    message,
    messages,
)

# message types
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
# attributes (the GRE ones: gre.GRE_ATTRIBUTES)
IFLA_IFNAME, IFLA_MTU, IFLA_LINKINFO, IFLA_IFALIAS = 3, 4, 18, 20
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY, RTA_TABLE = 1, 4, 5, 6, 15
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK = 0, 253
RTN_UNICAST = 1
RT_TABLE_COMPAT = 252  # rtm_table for ids that do not fit its byte; RTA_TABLE carries the real one
IFF_UP = 0x1
GRE_KEY = 0x2000

_IFINFO = struct.Struct("=BxHiII")
_IFADDR = struct.Struct("=BBBBI")
_RTMSG = struct.Struct("=BBBBBBBBI")

Message = Any  # a pyroute2 nlmsg: dict-like with get_attr(); untyped in pyroute2 itself


def _u8(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack("=B", value))


def _u32(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack("=I", value))


def _be16(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack(">H", value))


def _be32(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack(">I", value))


def _str(kind: int, value: str) -> bytes:
    return attr(kind, value.encode() + b"\0")


def _ip(kind: int, value: IPAddress) -> bytes:
    return attr(kind, value.packed)


@dataclass(frozen=True)
class Request:
    """One rtnetlink message without its header's length, seq and pid (filled in when sent)."""

    type: int
    flags: int
    body: bytes


# --- model values -> requests ------------------------------------------------------------------------------


def _gre_attribute(attribute: GreAttribute, value: Any) -> bytes:
    match attribute.codec:
        case "address":
            return _ip(attribute.number, value)
        case "u8":
            return _u8(attribute.number, value)
        case "flag":
            return _u8(attribute.number, int(value))
        case "key":
            return (_be16(attribute.flags_number, GRE_KEY if value is not None else 0)
                    + _be32(attribute.number, value or 0))


def _linkinfo(spec: LinkSpec) -> bytes:
    # IFLA_GRE_* numbering is shared by gre, gretap, ip6gre and ip6gretap; None: not applicable to the mode.
    data = b"".join(_gre_attribute(a, value) for a in GRE_ATTRIBUTES
                    if (value := getattr(spec, a.field)) is not None or a.codec == "key")
    return attr(IFLA_LINKINFO, _str(IFLA_INFO_KIND, spec.kind) + attr(IFLA_INFO_DATA, data))


def new_link(spec: LinkSpec) -> Request:
    body = _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + _str(IFLA_IFNAME, spec.name) + _linkinfo(spec)
    if spec.mtu is not None:
        body += _u32(IFLA_MTU, spec.mtu)
    return Request(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, body)


def change_link(index: int, spec: LinkSpec) -> Request:
    body = _IFINFO.pack(socket.AF_UNSPEC, 0, index, 0, 0) + _linkinfo(spec)
    if spec.mtu is not None:
        body += _u32(IFLA_MTU, spec.mtu)
    return Request(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, body)


def set_alias(index: int, alias: str) -> Request:
    # By ifindex, never by name: a name can be taken by someone else's link the moment our create fails
    # (review H2), while the kernel hands out a netns's ifindexes in turn and reuses none before 2^31 links.
    body = _IFINFO.pack(socket.AF_UNSPEC, 0, index, 0, 0) + _str(IFLA_IFALIAS, alias)
    return Request(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, body)


def set_link_up(index: int, up: bool) -> Request:
    return Request(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK,
                   _IFINFO.pack(socket.AF_UNSPEC, 0, index, IFF_UP if up else 0, IFF_UP))


def del_link(index: int) -> Request:
    return Request(RTM_DELLINK, NLM_F_REQUEST | NLM_F_ACK, _IFINFO.pack(socket.AF_UNSPEC, 0, index, 0, 0))


def get_link(name: str) -> Request:
    return Request(RTM_GETLINK, NLM_F_REQUEST,
                   _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + _str(IFLA_IFNAME, name))


def address(add: bool, index: int, spec: AddressSpec) -> Request:
    local = spec.local
    family = socket.AF_INET6 if local.version == 6 else socket.AF_INET
    body = (_IFADDR.pack(family, local.network.prefixlen, 0, RT_SCOPE_UNIVERSE, index)
            + _ip(IFA_LOCAL, local.ip) + _ip(IFA_ADDRESS, spec.peer or local.ip))
    flags = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE | NLM_F_EXCL if add else 0)
    return Request(RTM_NEWADDR if add else RTM_DELADDR, flags, body)


def route(add: bool, index: int, spec: RouteSpec, protocol: int) -> Request:
    dst, gateway = spec.dst, spec.gateway
    family = socket.AF_INET6 if dst.version == 6 else socket.AF_INET
    # `ip route add P dev D` gives a device route link scope; one via a gateway is universe scope.
    scope = RT_SCOPE_UNIVERSE if gateway is not None or family == socket.AF_INET6 else RT_SCOPE_LINK
    body = (_RTMSG.pack(family, dst.prefixlen, 0, 0, spec.table if spec.table < 256 else RT_TABLE_COMPAT, protocol,
                        scope, RTN_UNICAST, 0)
            + _ip(RTA_DST, dst.network_address) + _u32(RTA_OIF, index) + _u32(RTA_PRIORITY, spec.metric)
            + _u32(RTA_TABLE, spec.table))
    if gateway is not None:
        body += _ip(RTA_GATEWAY, gateway)
    # A delete names the protocol too, so the kernel removes only a route of ours with this key.
    flags = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE | NLM_F_EXCL if add else 0)
    return Request(RTM_NEWROUTE if add else RTM_DELROUTE, flags, body)


# --- adoption (`adopt = true`): taking over a link and its routes in place ---------------------------------


def set_alias_by_index(index: int, alias: str) -> Request:
    """Mark an existing link by its ifindex, so a link renamed or replaced meanwhile is never marked."""
    body = _IFINFO.pack(socket.AF_UNSPEC, 0, index, 0, 0) + _str(IFLA_IFALIAS, alias)
    return Request(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, body)


def replace_route(index: int, spec: RouteSpec, protocol: int) -> Request:
    """`ip route replace`: the route with this prefix, table and metric becomes this one, with no gap."""
    body = route(True, index, spec, protocol).body
    return Request(RTM_NEWROUTE, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE, body)


def dump_addresses(index: int) -> Request:
    """Addresses of one device: with NETLINK_GET_STRICT_CHK the kernel filters by ifa_index itself."""
    return Request(RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, _IFADDR.pack(socket.AF_UNSPEC, 0, 0, 0, index))


def dump_routes(family: int, protocol: int, index: int | None = None) -> Request:
    """Routes of one protocol (and device), all tables, filtered by the kernel (strict checking)."""
    body = _RTMSG.pack(family, 0, 0, 0, 0, protocol, 0, 0, 0)
    if index is not None:
        body += _u32(RTA_OIF, index)
    return Request(RTM_GETROUTE, NLM_F_REQUEST | NLM_F_DUMP, body)


def dump_links() -> Request:
    return Request(RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0))


# --- kernel messages (parsed by pyroute2) -> model values --------------------------------------------------


def _flags_from_pyroute2(kind: str, flags: int) -> int:
    # IFLA_GRE_[IO]FLAGS are big-endian (__be16) for both families, but pyroute2 0.9 declares the ip6gre ones
    # as native uint16: swap them back, or an ip6gre key reads as absent.
    return socket.ntohs(flags) if kind in IPV6_MODES else flags


def _gre_value(attribute: GreAttribute, data: Message | None, kind: str) -> Any:
    """One LinkSpec field from IFLA_INFO_DATA, as pyroute2 decoded it (names IFLA_GRE_* or IFLA_IP6GRE_*)."""
    ip6 = kind in IPV6_MODES
    if attribute.ipv4_only and ip6:
        return None
    prefix = "IFLA_IP6GRE_" if ip6 else "IFLA_GRE_"

    def get(name: str) -> Any:
        return data.get_attr(prefix + name) if data is not None else None

    match attribute.codec:
        case "address":
            return ipaddress.ip_address(get(attribute.name) or ("::" if ip6 else "0.0.0.0"))
        case "u8":
            return int(get(attribute.name) or 0)
        case "flag":
            return bool(get(attribute.name))
        case "key":
            flags = _flags_from_pyroute2(kind, get(attribute.flags_name) or 0)
            return int(get(attribute.name) or 0) if flags & GRE_KEY else None


def link_from_message(msg: Message) -> tuple[str, ObservedLink] | None:
    name = msg.get_attr("IFLA_IFNAME")
    if name is None:
        return None
    info = msg.get_attr("IFLA_LINKINFO")
    kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
    owned = msg.get_attr("IFLA_IFALIAS") == LINK_ALIAS and kind in MODES
    up = bool(msg["flags"] & IFF_UP)
    mtu = msg.get_attr("IFLA_MTU")
    if kind not in MODES or info is None:
        foreign = LinkSpec(name, kind or "unknown", ipaddress.ip_address("0.0.0.0"), ipaddress.ip_address("0.0.0.0"))
        return name, ObservedLink(msg["index"], foreign, up, False)
    data = info.get_attr("IFLA_INFO_DATA")
    parameters = {a.field: _gre_value(a, data, kind) for a in GRE_ATTRIBUTES}
    spec = LinkSpec(name=name, kind=kind, **parameters, mtu=int(mtu) if mtu is not None else None)
    return name, ObservedLink(msg["index"], spec, up, owned)


def address_from_message(msg: Message, ifname: str) -> AddressSpec | None:
    if msg["scope"] != RT_SCOPE_UNIVERSE:
        return None  # link-local (fe80::/64 the kernel adds to every link) is the kernel's, not ours
    address = msg.get_attr("IFA_ADDRESS")
    local = msg.get_attr("IFA_LOCAL") or address
    if local is None:
        return None
    peer = ipaddress.ip_address(address) if address and address != local else None
    return AddressSpec(ifname, ipaddress.ip_interface(f"{local}/{msg['prefixlen']}"), peer)


def route_from_message(msg: Message, names: Mapping[int, str]) -> RouteSpec | None:
    oif = msg.get_attr("RTA_OIF")
    if oif not in names:
        return None
    dst = msg.get_attr("RTA_DST") or ("::" if msg["family"] == socket.AF_INET6 else "0.0.0.0")
    gateway = msg.get_attr("RTA_GATEWAY")
    return RouteSpec(
        ifname=names[oif],
        dst=ipaddress.ip_network(f"{dst}/{msg['dst_len']}"),
        table=int(msg.get_attr("RTA_TABLE") or msg["table"]),
        metric=int(msg.get_attr("RTA_PRIORITY") or 0),
        gateway=ipaddress.ip_address(gateway) if gateway else None,
    )


# --- the socket -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """The kernel's answer to one request: errno 0 and any messages it sent back, or the error."""

    errno: int
    message: str = ""
    replies: tuple[bytes, ...] = ()
    interrupted: bool = False  # a dump the kernel flagged NLM_F_DUMP_INTR: the replies may miss entries

    def __str__(self) -> str:
        text = os.strerror(self.errno)
        return f"{text}: {self.message}" if self.message else text


class RtnlSocket:
    """A NETLINK_ROUTE socket for requests: blocking, pipelined, with extended ACK messages."""

    # Per sendmsg. Everything the kernel answers to one batch waits in the receive buffer until we read it,
    # and a link reply is ~1.5 KiB: 256 of them fit the 4 MiB buffer with room to spare.
    BATCH_BYTES = 64 << 10
    REPLY_TIMEOUT = 4.0  # seconds one receive may wait: below half the unit's WatchdogSec=10s
    BATCH_COUNT = 256
    DUMP_ATTEMPTS = 5

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        try:  # root may go past net.core.rmem_max
            self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 4 << 20)
        except PermissionError:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        for option in (NETLINK_EXT_ACK, NETLINK_GET_STRICT_CHK, NETLINK_CAP_ACK):
            self._sock.setsockopt(SOL_NETLINK, option, 1)
        # A hung kernel answer must not hang the daemon: it becomes an OSError (TimeoutError), which the pass
        # reports and retries, well before systemd's watchdog (WatchdogSec=10s) would abort us (review M8).
        self._sock.settimeout(self.REPLY_TIMEOUT)
        self._sock.bind((0, 0))
        self.portid: int = self._sock.getsockname()[0]
        self._seq = 0
        self.sent = 0

    def close(self) -> None:
        self._sock.close()

    def transact(self, requests: Sequence[Request]) -> list[Outcome]:
        """Send every request (pipelined) and return the kernel's answer to each, in order."""
        outcomes: list[Outcome] = []
        start = 0
        while start < len(requests):
            chunk: list[Request] = []
            size = 0
            while start + len(chunk) < len(requests) and (
                    not chunk or (size < self.BATCH_BYTES and len(chunk) < self.BATCH_COUNT)):
                request = requests[start + len(chunk)]
                chunk.append(request)
                size += HEADER.size + len(request.body)
            outcomes += self._transact_chunk(chunk)
            start += len(chunk)
        return outcomes

    def _transact_chunk(self, chunk: Sequence[Request]) -> list[Outcome]:
        data = bytearray()
        seqs: list[int] = []
        for request in chunk:
            self._seq = next_seq(self._seq)
            seqs.append(self._seq)
            data += message(request.type, request.flags, self._seq, self.portid, request.body)
        self._sock.sendall(bytes(data))
        self.sent += len(chunk)
        answers = Answers(seqs, chunk)
        while not answers.complete:
            answers.feed(self._sock.recv(1 << 20))
        return answers.outcomes()

    def dump(self, request: Request) -> list[bytes]:
        """Every reply of a dump. A dump that failed part-way raises; one the kernel says was interrupted by
        a concurrent change (and may have skipped an entry) is asked again, a few times (review M2)."""
        for _ in range(self.DUMP_ATTEMPTS):
            (outcome,) = self.transact([request])
            if outcome.errno:
                raise OSError(outcome.errno, str(outcome))
            if not outcome.interrupted:
                return list(outcome.replies)
        raise OSError(errno.EAGAIN, f"dump interrupted by concurrent changes {self.DUMP_ATTEMPTS} times in a row")


def next_seq(seq: int) -> int:
    """The sequence number after `seq`: nlmsg_seq is 32 bits, and 0 is what notifications carry (review L1)."""
    return seq % 0xFFFFFFFF + 1


class Answers:
    """The kernel's answers to one chunk of requests, gathered from the datagrams as they arrive. Pure.

    Plain requests end with an ACK (NLMSG_ERROR, error 0 or -errno); a get without ACK ends with its one
    reply; a dump ends with NLMSG_DONE, which carries an errno of its own when the dump failed part-way.
    """

    def __init__(self, seqs: Sequence[int], chunk: Sequence[Request]) -> None:
        self._seqs = list(seqs)
        self._ack = {seq: bool(r.flags & NLM_F_ACK) and not (r.flags & NLM_F_DUMP)
                     for seq, r in zip(self._seqs, chunk, strict=True)}
        self._pending = set(self._seqs)
        self._replies: dict[int, list[bytes]] = {}
        self._results: dict[int, tuple[int, str]] = {}
        self._interrupted: set[int] = set()

    @property
    def complete(self) -> bool:
        return not self._pending

    def feed(self, data: bytes) -> None:
        for kind, flags, seq, _, body, raw in messages(data):
            if seq not in self._pending:
                continue
            if flags & NLM_F_DUMP_INTR:
                self._interrupted.add(seq)
            if kind == NLMSG_ERROR:
                code = error_code(body)
                self._results[seq] = (code, ext_ack_message(body) if code else "")
                self._pending.discard(seq)
            elif kind == NLMSG_DONE:
                self._results.setdefault(seq, done_code(body))
                self._pending.discard(seq)
            else:
                self._replies.setdefault(seq, []).append(raw)
                if not self._ack[seq] and not flags & NLM_F_MULTI:
                    self._results.setdefault(seq, (0, ""))
                    self._pending.discard(seq)

    def outcomes(self) -> list[Outcome]:
        return [Outcome(*self._results[seq], tuple(self._replies.get(seq, ())), seq in self._interrupted)
                for seq in self._seqs]


def link_index(reply: bytes) -> int:
    """ifi_index of an RTM_NEWLINK message (header included)."""
    index: int = _IFINFO.unpack_from(reply, HEADER.size)[2]
    return index


def may_concern_us(kind: int, raw: bytes, protocol: int) -> bool:
    """A cheap look at a notification's fixed header, before any attribute is decoded.

    After a large start-up the kernel announces thousands of link-local addresses and IPv6 routes of its
    own on our links; they concern nobody here, and decoding each one with pyroute2 costs more than all
    the rest of an idle daemon's work.
    """
    if kind in (RTM_NEWADDR, RTM_DELADDR):
        return len(raw) > HEADER.size + 3 and raw[HEADER.size + 3] == RT_SCOPE_UNIVERSE  # ifa_scope
    if kind in (RTM_NEWROUTE, RTM_DELROUTE):
        return len(raw) > HEADER.size + 5 and raw[HEADER.size + 5] == protocol  # rtm_protocol
    return kind in (RTM_NEWLINK, RTM_DELLINK)
