"""Value types of the reconciler: what should exist (Desired), what exists (Observed), and how to get there (Action).

Everything here is a frozen value; `desired_state` is the one pure translation from the user's config (plus
keepalive liveness) into kernel objects.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from greupd.gre import (
    DEFAULT_ENCAP_LIMIT,
    GRE_ATTRIBUTES,
    IPV6_MODES,
    EncapLimit,
    IPAddress,
    IPInterface,
    IPNetwork,
    KeptAttributes,
)
from greupd.ipsec.connections import default_ipsec_mtu

if TYPE_CHECKING:  # only read here: importing it would make the wire codec (rtnl imports model) load pydantic
    from greupd.config import Config, TunnelConfig

# rtnetlink protocol number on every route greupd installs (`ip route show proto 222`; named `greupd` by
# /etc/iproute2/rt_protos.d/greupd.conf). Routes with any other protocol are never touched.
ROUTE_PROTO = 222
# IFLA_IFALIAS on every link greupd creates (`ip link show` prints "alias greupd"). A link without it is
# foreign, whatever its name.
LINK_ALIAS = "greupd"

# ip_gre's TOS value meaning "inherit from the inner packet" (iproute2 writes `tos inherit` as 1).
TOS_INHERIT = 1
# The kernel stores an IPv6 route's metric 0 as 1024 (IP6_RT_PRIO_USER).
IPV6_DEFAULT_METRIC = 1024
IPV6_FORWARDING = "net/ipv6/conf/all/forwarding"


def accept_ra_key(ifname: str) -> str:
    return f"net/ipv6/conf/{ifname}/accept_ra"


@dataclass(frozen=True)
class LinkSpec:
    """A tunnel link's parameters, in the kernel's terms (ttl 0 = inherit)."""

    name: str
    kind: str
    local: IPAddress
    remote: IPAddress
    ikey: int | None = None
    okey: int | None = None
    ttl: int = 64
    tos: int | None = TOS_INHERIT  # None: not applicable (ip6 modes)
    pmtudisc: bool | None = True  # None: not applicable (ip6 modes)
    mtu: int | None = None  # None: whatever the kernel chose; not managed
    encap_limit: EncapLimit | None = None  # ip6 modes: 0..255 or "none" (no option); None: not applicable (IPv4)

    def differs_from(self, observed: LinkSpec) -> tuple[str, ...]:
        """Names of the fields where `observed` does not match this desired spec."""
        # One family's parameters at None on the other (tos, pmtudisc on ip6; encap_limit on IPv4) and mtu at None
        # are not managed; a None key means "no key" and is compared.
        fields = [a.field for a in GRE_ATTRIBUTES
                  if not ((a.ipv4_only or a.ipv6_only) and getattr(self, a.field) is None)]
        if self.mtu is not None:
            fields.append("mtu")
        return tuple(f for f in fields if getattr(self, f) != getattr(observed, f))


@dataclass(frozen=True)
class AddressSpec:
    ifname: str
    local: IPInterface
    peer: IPAddress | None = None

    def __str__(self) -> str:
        return f"{self.local.ip} peer {self.peer}" if self.peer else str(self.local)


@dataclass(frozen=True)
class RouteSpec:
    ifname: str
    dst: IPNetwork
    table: int = 254
    metric: int = 0
    gateway: IPAddress | None = None

    def __str__(self) -> str:
        via = f" via {self.gateway}" if self.gateway else ""
        table = "" if self.table == 254 else f" table {self.table}"
        return f"{self.dst}{via} dev {self.ifname} metric {self.metric}{table}"


@dataclass(frozen=True)
class TunnelIntent:
    """Everything one tunnel wants in the kernel."""

    link: LinkSpec
    up: bool
    addresses: frozenset[AddressSpec]
    routes: frozenset[RouteSpec]
    sysctls: Mapping[str, str] = field(default_factory=dict)
    adopt: bool = False  # take over a matching same-named link that is not ours, in place


@dataclass(frozen=True)
class Desired:
    tunnels: Mapping[str, TunnelIntent]
    sysctls: Mapping[str, str]
    # Enabled tunnels that get no link, route or probe now, and why: `[tunnel.ipsec] require = true` while the
    # kernel is not seen holding their cleartext drops (ipsec_held). The planner removes a link of theirs.
    held: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ObservedLink:
    index: int
    spec: LinkSpec  # kind and parameters as the kernel reports them (for a foreign link: its kind only)
    up: bool
    owned: bool
    # The parameters greupd does not manage (gre.KEPT_ON_CHANGE) as the kernel reported them, which a change in
    # place sends back. Not compared: they are not greupd's to judge, so never drift.
    kept: KeptAttributes = field(default=(), compare=False)


@dataclass(frozen=True)
class Observed:
    """A snapshot of the kernel. `scope` None: a full dump; else only these tunnel names were looked at."""

    links: Mapping[str, ObservedLink]
    addresses: Mapping[str, frozenset[AddressSpec]]  # global-scope addresses of owned links, by ifname
    routes: frozenset[RouteSpec]  # routes with protocol ROUTE_PROTO
    sysctls: Mapping[str, str | None]  # current values of the sysctls Desired names (None: absent)
    scope: frozenset[str] | None = None
    # Routes of any other protocol through a foreign link that a tunnel with `adopt` may take over (its
    # addresses are in `addresses` too): the candidates for a take-over in place.
    foreign_routes: frozenset[RouteSpec] = frozenset()
    # Interfaces the kernel configures from router advertisements now (accept_ra = 1, routes of protocol ra)
    # while IPv6 forwarding is off; looked for only when Desired switches forwarding on (review M4).
    ra_interfaces: frozenset[str] = frozenset()

    def covers(self, name: str) -> bool:
        return self.scope is None or name in self.scope

    @staticmethod
    def as_planned(desired: Desired, names: frozenset[str], indices: Mapping[str, int]) -> Observed:
        """What the kernel holds for `names` once every action for them was acknowledged: exactly `desired`.

        Trusting the kernel's ACKs spares a look-back at thousands of tunnels after a large apply.
        """
        links = {n: ObservedLink(indices[n], desired.tunnels[n].link, desired.tunnels[n].up, True)
                 for n in names if n in desired.tunnels and n in indices}
        return Observed(links, {n: desired.tunnels[n].addresses for n in links},
                        frozenset(r for n in links for r in desired.tunnels[n].routes), {}, names)

    def updated(self, newer: Observed) -> Observed:
        """This snapshot with the tunnels `newer` looked at replaced by what it saw."""
        seen = newer.scope if newer.scope is not None else frozenset(self.links) | frozenset(newer.links)
        return Observed(
            {**{n: link for n, link in self.links.items() if n not in seen}, **newer.links},
            {**{n: a for n, a in self.addresses.items() if n not in seen}, **newer.addresses},
            frozenset({r for r in self.routes if r.ifname not in seen} | newer.routes),
            {**self.sysctls, **newer.sysctls},
            self.scope,
            frozenset({r for r in self.foreign_routes if r.ifname not in seen} | newer.foreign_routes),
            newer.ra_interfaces,
        )


# --- actions ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SetSysctl:
    key: str  # path under /proc/sys, e.g. "net/ipv4/ip_forward"
    value: str

    def __str__(self) -> str:
        return f"sysctl {self.key.replace('/', '.')}={self.value}"


@dataclass(frozen=True)
class CreateLink:
    spec: LinkSpec
    up: bool = False  # created up (IFF_UP in the same request): one request, one kernel notification less

    def __str__(self) -> str:
        return f"create link {_describe_link(self.spec)}{', up' if self.up else ''}"


@dataclass(frozen=True)
class ChangeLink:
    spec: LinkSpec
    fields: tuple[str, ...]
    # What the kernel reported of the link's other parameters (ObservedLink.kept): the change sends them back,
    # because the kernel resets every parameter a change leaves out, also on a link adopted from someone else.
    kept: KeptAttributes = ()

    def __str__(self) -> str:
        changes = " ".join(f"{f} {_value(getattr(self.spec, f))}" for f in self.fields)
        return f"change link {self.spec.name}: {changes}"


@dataclass(frozen=True)
class DeleteLink:
    name: str
    reason: str

    def __str__(self) -> str:
        return f"delete link {self.name} ({self.reason})"


@dataclass(frozen=True)
class SetLinkUp:
    name: str
    up: bool

    def __str__(self) -> str:
        return f"set link {self.name} {'up' if self.up else 'down'}"


@dataclass(frozen=True)
class AddAddress:
    address: AddressSpec

    def __str__(self) -> str:
        return f"add address {self.address} dev {self.address.ifname}"


@dataclass(frozen=True)
class DeleteAddress:
    address: AddressSpec

    def __str__(self) -> str:
        return f"delete address {self.address} dev {self.address.ifname}"


@dataclass(frozen=True)
class AddRoute:
    route: RouteSpec

    def __str__(self) -> str:
        return f"add route {self.route}"


@dataclass(frozen=True)
class AdoptLink:
    """Mark a foreign link as greupd's (its alias), by the ifindex that was observed: never another link."""

    name: str
    index: int

    def __str__(self) -> str:
        return f"adopt link {self.name} (ifindex {self.index}): set alias {LINK_ALIAS}"


@dataclass(frozen=True)
class TakeOverRoute:
    """Replace a foreign route with the same one of protocol ROUTE_PROTO, in one request (no gap)."""

    route: RouteSpec

    def __str__(self) -> str:
        return f"take over route {self.route}"


@dataclass(frozen=True)
class DeleteRoute:
    route: RouteSpec

    def __str__(self) -> str:
        return f"delete route {self.route}"


Action = (SetSysctl | CreateLink | ChangeLink | DeleteLink | SetLinkUp | AddAddress | DeleteAddress
          | AddRoute | DeleteRoute | AdoptLink | TakeOverRoute)


def action_tunnel(action: Action) -> str | None:
    """The tunnel (interface) an action belongs to; None for global sysctls."""
    match action:
        case CreateLink(spec) | ChangeLink(spec, _):
            return spec.name
        case DeleteLink(name, _) | SetLinkUp(name, _) | AdoptLink(name, _):
            return name
        case AddAddress(address) | DeleteAddress(address):
            return address.ifname
        case AddRoute(route) | DeleteRoute(route) | TakeOverRoute(route):
            return route.ifname
        case SetSysctl(key, _):
            parts = key.split("/")
            return parts[3] if len(parts) > 4 and parts[2] == "conf" and parts[3] not in ("all", "default") else None
    return None


@dataclass(frozen=True)
class PlanProblem:
    """A tunnel the planner will not touch, and why (e.g. its name belongs to a foreign link)."""

    tunnel: str
    message: str
    reason: str = "conflict"  # the tunnel's status reason while the problem lasts


@dataclass(frozen=True)
class Plan:
    actions: tuple[Action, ...]
    problems: tuple[PlanProblem, ...] = ()


def _value(value: object) -> str:
    return "none" if value is None else str(value)


def _describe_link(spec: LinkSpec) -> str:
    text = f"{spec.name} type {spec.kind}"
    keyed = spec.ikey is not None or spec.okey is not None
    for attribute in GRE_ATTRIBUTES:
        if attribute.shown == "always" or (attribute.shown == "keyed" and keyed):
            value = getattr(spec, attribute.field)
            text += f" {attribute.field} {attribute.zero if value == 0 and attribute.zero else _value(value)}"
    if spec.mtu:
        text += f" mtu {spec.mtu}"
    return text


# --- [tunnel.ipsec] require = true: fail closed ------------------------------------------------------------


@dataclass(frozen=True)
class IpsecGuard:
    """The fact nft/keeper.py keeps: the (local, remote) pairs whose cleartext GRE drops the kernel was seen
    holding (applied, then read back), or why it holds none. Before the first look: none."""

    pairs: frozenset[tuple[IPAddress, IPAddress]] = frozenset()
    problem: str | None = "not applied yet"


IPSEC_HELD = "ipsec-unprotected"  # the status reason of a tunnel held back by ipsec_held


def ipsec_held(config: Config, guard: IpsecGuard | None) -> dict[str, str]:
    """The enabled tunnels with `require = true` whose drops the kernel is not seen holding, and why (pure).

    Such a tunnel gets no link, no route and no keepalive probe (review round 3, M1: fail closed): without the
    drops, its GRE and its probes would leave in cleartext whenever charon has no policy for them (charon not
    started yet, or dead, or its policies flushed). None: the caller does not know (`greupd plan`): hold none.
    """
    if guard is None:
        return {}
    why = guard.problem or "not in the kernel"
    return {t.name: f"ipsec require = true, but the kernel does not hold its cleartext GRE drops ({why}):"
                    " no link, route or keepalive until it does"
            for t in config.tunnels
            if t.enabled and t.ipsec is not None and t.ipsec.require and (t.local, t.remote) not in guard.pairs}


def probed(config: Config, held: Mapping[str, str]) -> Config:
    """`config` as the keepalive engine should see it: the tunnels held back send no probe."""
    if not held:
        return config
    tunnels = tuple(t.model_copy(update={"keepalive": None}) if t.name in held else t for t in config.tunnels)
    return dataclasses.replace(config, tunnels=tunnels)


# --- config -> desired ------------------------------------------------------------------------------------


def link_mtu(tunnel: TunnelConfig, path_mtu: int | None = None) -> int | None:
    """The link's MTU: as configured; with mtu = "probe", the measured one (`path_mtu`, None before the first
    result: the kernel's or IPsec's default, until measured); None: whatever the kernel chose."""
    if isinstance(tunnel.mtu, int):
        return tunnel.mtu
    if tunnel.mtu == "probe" and path_mtu is not None:
        return path_mtu
    # Under IPsec the kernel's default (underlay MTU less GRE's header) would not leave room for ESP.
    return default_ipsec_mtu(tunnel) if tunnel.ipsec is not None else None


def link_spec(tunnel: TunnelConfig, path_mtu: int | None = None) -> LinkSpec:
    ip6 = tunnel.mode in IPV6_MODES
    return LinkSpec(
        name=tunnel.name,
        kind=tunnel.mode,
        local=tunnel.local,
        remote=tunnel.remote,
        ikey=tunnel.input_key,
        okey=tunnel.output_key,
        ttl=0 if tunnel.ttl == "inherit" else tunnel.ttl,
        tos=None if ip6 else (TOS_INHERIT if tunnel.tos == "inherit" else tunnel.tos),
        pmtudisc=None if ip6 else tunnel.pmtudisc,
        encap_limit=(DEFAULT_ENCAP_LIMIT if tunnel.encap_limit is None else tunnel.encap_limit) if ip6 else None,
        mtu=link_mtu(tunnel, path_mtu),
    )


def tunnel_intent(tunnel: TunnelConfig, alive: bool, path_mtu: int | None = None) -> TunnelIntent:
    """What one enabled tunnel wants; `alive` False (keepalive down) withdraws its routes (and link);
    `path_mtu`: the measured MTU, with mtu = "probe"."""
    addresses: frozenset[AddressSpec] = frozenset()
    if tunnel.address is not None:
        addresses = frozenset({AddressSpec(tunnel.name, tunnel.address, tunnel.peer)})
    routes: frozenset[RouteSpec] = frozenset()
    if alive:
        # Ethernet-carrying modes need a next hop to resolve by ARP/ND; a GRE link is point-to-point.
        gateway = tunnel.peer if tunnel.mode in ("gretap", "ip6gretap") else None
        routes = frozenset(
            RouteSpec(tunnel.name, dst, tunnel.table,
                      IPV6_DEFAULT_METRIC if dst.version == 6 and tunnel.metric == 0 else tunnel.metric,
                      gateway if gateway is not None and gateway.version == dst.version else None)
            for dst in tunnel.routes)
    sysctls: dict[str, str] = {}
    if tunnel.keepalive is not None and tunnel.keepalive.answer == "kernel" and tunnel.mode == "gre":
        # A Linux peer reflects a Cisco keepalive by routing the decapsulated inner packet (source: its own
        # address) back out; the kernel drops that as a martian unless accept_local is on and rp_filter is
        # off on the tunnel (rp_filter's effective value is the max of `all` and the device). IPv6 (ip6gre's
        # GRE6 keepalive) has neither check: forwarding alone reflects it.
        sysctls[f"net/ipv4/conf/{tunnel.name}/accept_local"] = "1"
        sysctls[f"net/ipv4/conf/{tunnel.name}/rp_filter"] = "0"
    up = alive or tunnel.keepalive is None or tunnel.keepalive.action != "link"
    return TunnelIntent(link_spec(tunnel, path_mtu), up, addresses, routes, sysctls, tunnel.adopt)


def desired_state(config: Config, alive: Mapping[str, bool] | None = None, guard: IpsecGuard | None = None,
                  path_mtus: Mapping[str, int] | None = None) -> Desired:
    """The kernel state `config` asks for, given which tunnels' keepalives are currently answered, which
    IPsec drops the kernel holds (None: not known, as in `greupd plan`: hold nothing back) and the path MTUs
    measured (mtu = "probe")."""
    alive, path_mtus = alive or {}, path_mtus or {}
    held = ipsec_held(config, guard)
    tunnels = {t.name: tunnel_intent(t, alive.get(t.name, True), path_mtus.get(t.name)) for t in config.tunnels
               if t.enabled and t.name not in held}
    sysctls: dict[str, str] = {}
    if config.daemon.ip_forward:
        sysctls["net/ipv4/ip_forward"] = "1"
        if any(t.mode in IPV6_MODES or (t.address is not None and t.address.version == 6)
               or any(r.version == 6 for r in t.routes) for t in config.tunnels if t.enabled):
            sysctls[IPV6_FORWARDING] = "1"
    if any(t.keepalive is not None and t.keepalive.answer == "kernel" and t.mode == "gre"
           for t in config.tunnels if t.enabled):
        sysctls["net/ipv4/conf/all/rp_filter"] = "0"
    return Desired(tunnels, sysctls, held)


class DesiredMemo:
    """desired_state kept between passes: a drift repair of one tunnel among thousands need not rebuild the
    intent of every tunnel. Built again for a new config; for a keepalive flip, only the flipped tunnels."""

    def __init__(self, guard: Callable[[], IpsecGuard | None] = lambda: None) -> None:
        self._guard_now = guard  # the daemon's NftKeeper.guard: which IPsec drops the kernel holds
        self._config: Config | None = None
        self._by_name: dict[str, TunnelConfig] = {}
        self._alive: dict[str, bool] = {}
        self._guard: IpsecGuard | None = None
        self._path_mtus: dict[str, int] = {}
        self._desired = Desired({}, {})

    def of(self, config: Config, alive: Mapping[str, bool], path_mtus: Mapping[str, int] | None = None) -> Desired:
        path_mtus = path_mtus or {}
        guard = self._guard_now()
        if config is not self._config or guard != self._guard:
            self._config, self._by_name, self._guard = config, {t.name: t for t in config.tunnels}, guard
            self._alive, self._path_mtus = dict(alive), dict(path_mtus)
            self._desired = desired_state(config, alive, guard, path_mtus)
        elif alive != self._alive or path_mtus != self._path_mtus:
            tunnels = dict(self._desired.tunnels)
            # Only the names whose entries differ (set operations in C): a hub's pass for a few flipped verdicts
            # must not walk ten thousand tunnels in Python (#26).
            differ = {n for n, _ in alive.items() ^ self._alive.items()} | {
                n for n, _ in path_mtus.items() ^ self._path_mtus.items()}
            for name in differ:
                tunnel = self._by_name.get(name)
                changed = (alive.get(name, True) != self._alive.get(name, True)
                           or path_mtus.get(name) != self._path_mtus.get(name))
                if changed and tunnel is not None and tunnel.enabled and name not in self._desired.held:
                    tunnels[name] = tunnel_intent(tunnel, alive.get(name, True), path_mtus.get(name))
            self._alive, self._path_mtus = dict(alive), dict(path_mtus)
            self._desired = Desired(tunnels, self._desired.sysctls, self._desired.held)
        return self._desired
