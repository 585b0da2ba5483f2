"""The kernel side of the reconciler over rtnetlink (pyroute2's asyncio API): observe, apply, and watch.

Thin by design: each action is one rtnetlink request with the kernel's own attribute names; nothing here
decides anything (that is plan.py's job).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import (
    RTMGRP_IPV4_IFADDR,
    RTMGRP_IPV4_ROUTE,
    RTMGRP_IPV6_IFADDR,
    RTMGRP_IPV6_ROUTE,
    RTMGRP_LINK,
)
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

from greupd.config import IPV6_MODES
from greupd.model import (
    LINK_ALIAS,
    ROUTE_PROTO,
    Action,
    AddAddress,
    AddressSpec,
    AddRoute,
    ChangeLink,
    CreateLink,
    DeleteAddress,
    DeleteLink,
    DeleteRoute,
    Desired,
    LinkSpec,
    Observed,
    ObservedLink,
    RouteSpec,
    SetLinkUp,
    SetSysctl,
    action_tunnel,
)

log = logging.getLogger(__name__)

GRE_KEY = 0x2000  # GRE header flag: key present (include/uapi/linux/if_tunnel.h)
IFF_UP = 0x1
RT_SCOPE_UNIVERSE = 0
RTM_NEWLINK, RTM_DELLINK = 16, 17
RTM_NEWADDR, RTM_DELADDR = 20, 21
RTM_NEWROUTE, RTM_DELROUTE = 24, 25
SYSCTL_ROOT = Path("/proc/sys")
_TUNNEL_KINDS = frozenset({"gre", "ip6gre", "gretap", "ip6gretap"})

Message = Any  # a pyroute2 nlmsg: dict-like with get_attr(); untyped in pyroute2 itself


@dataclass(frozen=True)
class ApplyError:
    """One action the kernel refused, with its errno text."""

    tunnel: str | None
    action: Action
    message: str

    def __str__(self) -> str:
        return f"{self.action}: {self.message}"


# --- reading kernel messages into model values -----------------------------------------------------------


def _gre_prefix(kind: str) -> str:
    return "IFLA_IP6GRE_" if kind in IPV6_MODES else "IFLA_GRE_"


def link_from_message(msg: Message) -> tuple[str, ObservedLink] | None:
    name = msg.get_attr("IFLA_IFNAME")
    if name is None:
        return None
    info = msg.get_attr("IFLA_LINKINFO")
    kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
    owned = msg.get_attr("IFLA_IFALIAS") == LINK_ALIAS and kind in _TUNNEL_KINDS
    up = bool(msg["flags"] & IFF_UP)
    mtu = msg.get_attr("IFLA_MTU")
    if kind not in _TUNNEL_KINDS or info is None:
        foreign = LinkSpec(name, kind or "unknown", ipaddress.ip_address("0.0.0.0"), ipaddress.ip_address("0.0.0.0"))
        return name, ObservedLink(msg["index"], foreign, up, False)
    data = info.get_attr("IFLA_INFO_DATA")
    p = _gre_prefix(kind)

    def attr(key: str) -> Any:
        return data.get_attr(p + key) if data is not None else None

    def key(direction: str) -> int | None:
        flags = _flags_from_pyroute2(kind, attr(f"{direction}FLAGS") or 0)
        return int(attr(f"{direction}KEY") or 0) if flags & GRE_KEY else None

    unspecified = "::" if kind in IPV6_MODES else "0.0.0.0"
    ip6 = kind in IPV6_MODES
    spec = LinkSpec(
        name=name,
        kind=kind,
        local=ipaddress.ip_address(attr("LOCAL") or unspecified),
        remote=ipaddress.ip_address(attr("REMOTE") or unspecified),
        ikey=key("I"),
        okey=key("O"),
        ttl=int(attr("TTL") or 0),
        tos=None if ip6 else int(attr("TOS") or 0),
        pmtudisc=None if ip6 else bool(attr("PMTUDISC")),
        mtu=int(mtu) if mtu is not None else None,
    )
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


# --- sysctls ----------------------------------------------------------------------------------------------


def read_sysctl(key: str) -> str | None:
    try:
        return (SYSCTL_ROOT / key).read_text().strip()
    except OSError:
        return None


def write_sysctl(key: str, value: str) -> None:
    (SYSCTL_ROOT / key).write_text(value + "\n")


# --- the rtnetlink session --------------------------------------------------------------------------------


class Kernel:
    """One rtnetlink request socket: observe() snapshots, apply() executes actions in order."""

    def __init__(self) -> None:
        self._ipr = AsyncIPRoute()
        self.requests = 0  # rtnetlink requests sent, for benchmarks and `greupd status`
        # ifindex by name, from the last observation and our own creations: an action's request names its
        # device by index, and looking each one up again would double the requests of a large apply.
        self._indices: dict[str, int] = {}

    def close(self) -> None:
        self._ipr.close()

    async def _dump(self, kind: str, **filters: Any) -> list[Message]:
        self.requests += 1
        method = getattr(self._ipr, kind)
        return [msg async for msg in await method("dump", **filters)]

    async def observe(self, desired: Desired, scope: Iterable[str] | None = None) -> Observed:
        """A snapshot of the links, addresses and owned routes that matter to `desired`.

        With `scope`, only those tunnel names are looked at (a few requests instead of full dumps).
        """
        names = None if scope is None else frozenset(scope)
        links: dict[str, ObservedLink] = {}
        if names is None:
            for msg in await self._dump("link"):
                found = link_from_message(msg)
                if found and (found[1].owned or found[0] in desired.tunnels):
                    links[found[0]] = found[1]
        else:
            for name in names:
                self.requests += 1
                try:
                    msgs = await self._ipr.link("get", ifname=name)
                except NetlinkError as exc:
                    if exc.code == errno.ENODEV:
                        continue
                    raise
                for msg in msgs:
                    found = link_from_message(msg)
                    if found:
                        links[found[0]] = found[1]

        if names is None:
            self._indices = {name: link.index for name, link in links.items()}
        else:
            for name in names:
                self._indices.pop(name, None)
            self._indices.update((name, link.index) for name, link in links.items())
        owned = {link.index: name for name, link in links.items() if link.owned}
        addresses: dict[str, set[AddressSpec]] = {name: set() for name in owned.values()}
        routes: set[RouteSpec] = set()
        if owned:
            if names is None or len(owned) > 8:
                addr_msgs = await self._dump("addr")
            else:
                addr_msgs = [m for index in owned for m in await self._dump("addr", index=index)]
            route_msgs = [m for family in (socket.AF_INET, socket.AF_INET6)
                          for m in await self._dump("route", family=family)]
            for msg in addr_msgs:
                if msg["index"] in owned:
                    address = address_from_message(msg, owned[msg["index"]])
                    if address is not None:
                        addresses[address.ifname].add(address)
            for msg in route_msgs:
                if msg["proto"] == ROUTE_PROTO:
                    route = route_from_message(msg, owned)
                    if route is not None:
                        routes.add(route)

        keys = set(desired.sysctls)
        for name, intent in desired.tunnels.items():
            if names is None or name in names:
                keys |= set(intent.sysctls)
        sysctls = {key: read_sysctl(key) for key in keys}
        return Observed(links, {k: frozenset(v) for k, v in addresses.items()}, frozenset(routes), sysctls,
                        names)

    async def apply(self, actions: Iterable[Action]) -> list[ApplyError]:
        """Execute actions in order. A refused action skips the rest of its tunnel's actions, not others'."""
        errors: list[ApplyError] = []
        failed: set[str | None] = set()
        for action in actions:
            tunnel = action_tunnel(action)
            if tunnel is not None and tunnel in failed:
                continue
            try:
                await self._execute(action)
            except (NetlinkError, OSError) as exc:
                if tunnel is not None:
                    self._indices.pop(tunnel, None)  # maybe stale: look it up again next time
                text = exc.args[1] if isinstance(exc, NetlinkError) and len(exc.args) > 1 else \
                    (exc.strerror or str(exc))
                errors.append(ApplyError(tunnel, action, f"{text} (errno {exc.args[0] if exc.args else '?'})"))
                failed.add(tunnel)
        return errors

    async def _index(self, name: str) -> int:
        if name in self._indices:
            return self._indices[name]
        self.requests += 1
        found = await self._ipr.link_lookup(ifname=name)
        if not found:
            raise OSError(errno.ENODEV, f"no interface {name}")
        self._indices[name] = int(found[0])
        return self._indices[name]

    async def _execute(self, action: Action) -> None:
        match action:
            case SetSysctl(key, value):
                write_sysctl(key, value)
                return
            case CreateLink(spec):
                self.requests += 2
                await self._ipr.link("add", ifname=spec.name, kind=spec.kind, **_link_attributes(spec))
                # The marker is set by a second request: RTM_NEWLINK ignores IFLA_IFALIAS on creation.
                await self._ipr.link("set", ifname=spec.name, ifalias=LINK_ALIAS)
            case ChangeLink(spec, _):
                self.requests += 1
                await self._ipr.link("set", index=await self._index(spec.name), kind=spec.kind,
                                     **_link_attributes(spec))
            case DeleteLink(name, _):
                self.requests += 1
                await self._ipr.link("del", index=await self._index(name))
                del self._indices[name]
            case SetLinkUp(name, up):
                self.requests += 1
                await self._ipr.link("set", index=await self._index(name), state="up" if up else "down")
            case AddAddress(address) | DeleteAddress(address):
                self.requests += 1
                command = "add" if isinstance(action, AddAddress) else "del"
                kwargs: dict[str, Any] = {"local": str(address.local.ip), "prefixlen": address.local.network.prefixlen,
                                          "address": str(address.peer or address.local.ip)}
                await self._ipr.addr(command, index=await self._index(address.ifname), **kwargs)
            case AddRoute(route) | DeleteRoute(route):
                self.requests += 1
                # "add", not "replace": replace would silently take over a foreign route with the same key.
                command = "add" if isinstance(action, AddRoute) else "del"
                extra: dict[str, Any] = {"gateway": str(route.gateway)} if route.gateway else {}
                await self._ipr.route(command, dst=str(route.dst), oif=await self._index(route.ifname),
                                      table=route.table, priority=route.metric, proto=ROUTE_PROTO,
                                      family=socket.AF_INET6 if route.dst.version == 6 else socket.AF_INET,
                                      **extra)


def _flags_to_pyroute2(kind: str, flags: int) -> int:
    # IFLA_GRE_[IO]FLAGS are big-endian (__be16) for both families, but pyroute2 0.9 declares the ip6gre ones
    # as native uint16: swap them ourselves, or an ip6gre key is silently dropped (and read back wrong).
    return socket.htons(flags) if kind in IPV6_MODES else flags


def _flags_from_pyroute2(kind: str, flags: int) -> int:
    return socket.ntohs(flags) if kind in IPV6_MODES else flags


def _link_attributes(spec: LinkSpec) -> dict[str, Any]:
    p = "ip6gre_" if spec.kind in IPV6_MODES else "gre_"
    attrs: dict[str, Any] = {
        p + "local": str(spec.local),
        p + "remote": str(spec.remote),
        p + "ttl": spec.ttl,
        p + "iflags": _flags_to_pyroute2(spec.kind, GRE_KEY if spec.ikey is not None else 0),
        p + "oflags": _flags_to_pyroute2(spec.kind, GRE_KEY if spec.okey is not None else 0),
        p + "ikey": spec.ikey or 0,
        p + "okey": spec.okey or 0,
    }
    if spec.tos is not None:
        attrs[p + "tos"] = spec.tos
    if spec.pmtudisc is not None:
        attrs[p + "pmtudisc"] = int(spec.pmtudisc)
    if spec.mtu is not None:
        attrs["mtu"] = spec.mtu
    return attrs


# --- watching: "look again" signals from rtnetlink multicast ---------------------------------------------


class KernelWatch:
    """Turns rtnetlink notifications into the names of tunnels to look at again.

    Only names are passed on, never what the message said changed: the reconciler re-observes and re-plans.
    `on_change(None)` means "look at everything" (the socket overflowed and events were lost).
    """

    GROUPS = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE

    def __init__(self, on_change: Callable[[set[str] | None], None]) -> None:
        self._on_change = on_change
        self._marshal = MarshalRtnl()
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK,
                                   socket.NETLINK_ROUTE)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self._sock.bind((0, self.GROUPS))
        self._loop: asyncio.AbstractEventLoop | None = None
        self.names_by_index: dict[int, str] = {}  # the reconciler keeps this current
        self.watched: frozenset[str] = frozenset()  # tunnel names that matter
        self.overruns = 0

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_reader(self._sock.fileno(), self._readable)

    def close(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()

    def _readable(self) -> None:
        names: set[str] = set()
        while True:
            try:
                data = self._sock.recv(1 << 20)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    # The kernel dropped notifications: nothing we know is trustworthy; look at everything.
                    self.overruns += 1
                    log.warning("rtnetlink event queue overflowed; resynchronising everything")
                    self._on_change(None)
                    return
                raise
            for msg in self._marshal.parse(data):
                name = self._tunnel_of(msg)
                if name is not None:
                    names.add(name)
        if names:
            self._on_change(names)

    def _tunnel_of(self, msg: Message) -> str | None:
        kind = msg["header"]["type"]
        if kind in (RTM_NEWLINK, RTM_DELLINK):
            name = msg.get_attr("IFLA_IFNAME")
            if name in self.watched:
                return str(name)
            return self.names_by_index.get(msg["index"])
        # Link-local addresses and routes of other protocols (IPv6 autoconfiguration, multicast) come and go
        # on our links without concerning us: no need to look again for those.
        if kind in (RTM_NEWADDR, RTM_DELADDR) and msg["scope"] == RT_SCOPE_UNIVERSE:
            return self.names_by_index.get(msg["index"])
        if kind in (RTM_NEWROUTE, RTM_DELROUTE) and msg["proto"] == ROUTE_PROTO:
            return self.names_by_index.get(msg.get_attr("RTA_OIF"))
        return None
