"""HostFacts: what doctor read from this host, once, as plain values (read.py gathers it; checks.py judges it)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from greupd.doctor.pmtu import PathProbe
from greupd.gre import IPAddress
from greupd.model import ObservedLink
from greupd.status import DaemonStatus


@dataclass(frozen=True)
class TraceEvent:
    """One line of `nft monitor trace` about a traced packet: a rule that matched, or a chain's policy."""

    trace_id: str
    family: str
    table: str
    chain: str
    kind: str  # "rule" | "policy"
    rule: str  # the rule as nft prints it (without its counters' numbers); "" for a policy
    handle: int | None
    verdict: str  # accept, drop, reject, continue, jump ..., return, queue

    @property
    def where(self) -> str:
        return f"table {self.family} {self.table} chain {self.chain}"


@dataclass(frozen=True)
class TracedPacket:
    """A packet nftables traced: its direction, interfaces and addresses, and every verdict it met."""

    trace_id: str
    outgoing: bool  # our marked keepalive (hook output onwards); else GRE that came in from the remote
    iif: str | None
    oif: str | None
    saddr: str
    daddr: str
    events: tuple[TraceEvent, ...]

    @property
    def final(self) -> TraceEvent | None:
        """The event that decided its fate, if a table dropped or rejected it."""
        return next((e for e in self.events if e.verdict in ("drop", "reject")), None)


@dataclass(frozen=True)
class TunnelTrace:
    """What tracing one tunnel showed: our keepalives (sent: how many), and the GRE that came from its remote."""

    sent: int
    packets: tuple[TracedPacket, ...]
    reflected: int = 0  # our keepalives that came back (read on a raw GRE socket: delivered, past every hook)
    peer_sources: tuple[str, ...] = ()  # the peer's own keepalives: the inner source (this host as it knows it)

    @property
    def outgoing(self) -> tuple[TracedPacket, ...]:
        return tuple(p for p in self.packets if p.outgoing)

    @property
    def incoming(self) -> tuple[TracedPacket, ...]:
        return tuple(p for p in self.packets if not p.outgoing)


@dataclass(frozen=True)
class Rule:
    """A rule of a base chain, as `nft -j list ruleset` gives it, for the checks that read rule text."""

    family: str
    table: str
    chain: str
    hook: str | None  # the chain's hook if it is a base chain
    handle: int | None
    text: str  # readable form, for evidence
    matches_gre: bool  # it matches IP protocol 47 (`ip protocol gre`, `meta l4proto gre`, iptables -p gre)
    verdict: str | None  # accept, drop, reject, jump, goto, return or None
    iifname: str | None = None  # the interface it matches, if only that
    oifname: str | None = None
    only_interface: bool = False  # nothing but an interface match (and counters) before the verdict


@dataclass(frozen=True)
class Chain:
    family: str
    table: str
    name: str
    hook: str | None
    priority: int | None
    policy: str | None  # "accept" | "drop" for base chains
    rules: tuple[Rule, ...] = ()
    drops_everything: str | None = None  # forward chains: "has policy drop", "ends with a drop of everything"

    @property
    def where(self) -> str:
        return f"table {self.family} {self.table} chain {self.name}"

    @property
    def iptables(self) -> bool:
        """A chain iptables-nft made (`iptables -P FORWARD DROP` lands here): fixes are then iptables commands."""
        return self.family in ("ip", "ip6") and self.name.isupper()


@dataclass(frozen=True)
class XfrmPair:
    """The kernel's IPsec state for one tunnel's endpoints (`ip xfrm`): SAs each way, GRE policies each way.
    Each entry is the SA's or policy's summary line (never its keys)."""

    sas_out: tuple[str, ...]
    sas_in: tuple[str, ...]
    policies: tuple[str, ...]


@dataclass(frozen=True)
class HostFacts:
    """One snapshot of what the checks need. A part doctor could not read is None (and `notes` say why)."""

    links: Mapping[str, ObservedLink]  # every link, by name (GRE-family links with their parameters)
    addresses: Mapping[str, frozenset[IPAddress]]  # global addresses by interface
    sysctls: Mapping[str, str | None]  # path under /proc/sys -> value (None: absent)
    modules: frozenset[str] | None  # loaded or built in (/sys/module); None: unknown
    loadable: frozenset[str] | None  # what modprobe could load (modules.dep, modules.builtin); None: no modules
    chains: tuple[Chain, ...] | None  # every ip/ip6/inet chain with its rules; None: nftables unreadable
    routes_out: Mapping[str, str | None] = field(default_factory=dict)  # remote address -> oif of its route
    # (tunnel, iif) -> why the kernel would refuse GRE from the remote arriving there (`ip route get ... iif`)
    route_refusals: Mapping[tuple[str, str], str] = field(default_factory=dict)
    conntrack: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # tunnel -> its GRE conntrack entries
    traces: Mapping[str, TunnelTrace] | None = None  # by tunnel; None: not traced (notes say why)
    paths: Mapping[str, PathProbe] = field(default_factory=dict)  # by tunnel: padded keepalives' sizes
    learned_mtu: Mapping[str, int | None] = field(default_factory=dict)  # remote -> PMTU the kernel learnt (ICMP)
    # silent peers' own keepalives: tunnel -> the inner source addresses they came with (how the peer knows us)
    peer_keepalives: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    xfrm: Mapping[str, XfrmPair] | None = None  # tunnels with [tunnel.ipsec]; None: unreadable
    daemon: DaemonStatus | None = None  # the running daemon's status, if one answered
    own_table: str = "greupd"  # greupd's own nftables table (inet), whose drops are greupd's business
    notes: tuple[str, ...] = ()  # what could not be read, and what was inferred instead
