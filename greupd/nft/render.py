"""nftables: the one table greupd owns (MSS clamp, NAT, forward accepts), rendered purely and kept in place.

    Config --render_ruleset (pure, here)--> Ruleset --NftTable.apply (table.py, one transaction)--> kernel
    kernel --NftWatch (watch.py, nftables netlink events)--> "look again" --NftTable.matches--> re-apply if it differs

Everything goes through libnftables' JSON API (the `nftables` Python bindings, imported lazily so that a
config without MSS clamp or NAT never needs them). greupd owns exactly one table, `inet <daemon.nft_table>`,
and touches no other: it replaces its own table as a whole, so other tables stay byte-identical.

What a tunnel asks for, and the rules that carry it out:

    [tunnel.mss] clamp = 1436 | "pmtu"      chain mss_clamp (filter, forward, priority mangle):
                                              oifname TUN tcp flags syn / syn,rst tcp option maxseg size set N
                                              iifname TUN tcp flags syn / syn,rst tcp option maxseg size set N
                                              (N = 1436, or `rt mtu` for "pmtu")
    [tunnel.nat] into_tunnel = [P]          chain forward (filter, forward, priority filter):
                                              ip saddr P oifname TUN accept
                                            chain postrouting (nat, postrouting, priority srcnat):
                                              ip saddr P oifname TUN masquerade
    [tunnel.nat] from_tunnel = [IF]         chain forward:
                                              iifname TUN oifname IF meta mark set meta mark | MARK accept
                                            chain postrouting:
                                              meta mark & MARK == MARK oifname IF masquerade
    [tunnel.ipsec] require = true           chain ipsec_out (filter, output, priority filter):
                                              ip daddr REMOTE meta l4proto gre rt ipsec missing drop
                                            chain ipsec_in (filter, input, priority filter):
                                              ip saddr REMOTE meta l4proto gre meta ipsec missing drop

Only the chains that have rules are created: a config with a clamp but no NAT registers no nat hook (and
so does not switch conntrack on), and a config with neither has no table at all.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal

from greupd.config import Config, TunnelConfig
from greupd.gre import IPAddress, IPNetwork

Json = str | int | float | bool | None | list["Json"] | dict[str, "Json"]
JsonObject = dict[str, Json]

FAMILY = "inet"

# Base chain priorities as nft names them (`nft list` prints the names, JSON carries the numbers).
PRIORITY_NAMES: Mapping[int, str] = {-150: "mangle", 0: "filter", 100: "srcnat"}
MANGLE, FILTER, SRCNAT = -150, 0, 100

# The packet-mark bit the forward chain sets on what leaves a tunnel by one of its from_tunnel interfaces, and
# postrouting masquerades on (postrouting cannot rely on iifname). Why a mark, why the packet mark and not the
# conntrack mark, and why this bit: docs/nftables.md, "The from_tunnel mark".
FROM_TUNNEL_MARK = 0x20000000


# --- the ruleset: a frozen value -------------------------------------------------------------------------


@dataclass(frozen=True)
class Statement:
    """One piece of a rule, as `nft list` prints it and as libnftables JSON (kept as text: frozen)."""

    text: str
    json_text: str

    @property
    def json(self) -> Json:
        value: Json = json.loads(self.json_text)
        return value


def _statement(text: str, value: Json) -> Statement:
    return Statement(text, json.dumps(value, sort_keys=True))


@dataclass(frozen=True)
class Chain:
    name: str
    type: Literal["filter", "nat"]
    hook: Literal["forward", "postrouting", "output", "input"]
    priority: int

    @property
    def text(self) -> str:
        priority = PRIORITY_NAMES.get(self.priority, str(self.priority))
        return f"type {self.type} hook {self.hook} priority {priority}; policy accept;"


@dataclass(frozen=True)
class Rule:
    chain: str
    tunnel: str
    comment: str  # stored in the kernel with the rule, so `nft list ruleset` tells whose and why
    statements: tuple[Statement, ...]

    @property
    def text(self) -> str:
        return " ".join(s.text for s in self.statements) + f' comment "{self.comment}"'


@dataclass(frozen=True)
class Ruleset:
    """The whole desired content of greupd's table; no rules means "no table"."""

    table: str
    chains: tuple[Chain, ...] = ()
    rules: tuple[Rule, ...] = ()
    family: ClassVar[str] = FAMILY

    @property
    def wanted(self) -> bool:
        return bool(self.rules)

    def objects(self) -> list[JsonObject]:
        """Table, chains and rules as `nft -j list table` shows them (without handles); none if not wanted."""
        return table_objects(self.table, self.chains, self.rules) if self.wanted else []

    def commands(self) -> list[JsonObject]:
        """One libnftables transaction that makes the kernel hold exactly this ruleset.

        `add table; delete table; add table; add chain...; add rule...` in one batch: the add makes the
        delete valid when the table does not exist yet, the delete drops whatever was in it (ours from an
        older config, or anything someone added), and the kernel commits the batch atomically, so packets
        never meet a half-written table or a window without the clamp and NAT. With no rules the
        transaction is `add table; delete table`: remove ours if present, and no error if not.
        """
        return [*clear_commands(self.table), *add_commands(self.objects())]


def clear_commands(table: str) -> list[JsonObject]:
    name: JsonObject = {"family": FAMILY, "name": table}
    return [{"add": {"table": name}}, {"delete": {"table": name}}]


def add_commands(objects: Iterable[JsonObject]) -> list[JsonObject]:
    return [{"add": obj} for obj in objects]


def table_objects(table: str, chains: Iterable[Chain], rules: Iterable[Rule]) -> list[JsonObject]:
    objects: list[JsonObject] = [{"table": {"family": FAMILY, "name": table}}]
    for chain in chains:
        objects.append({"chain": {"family": FAMILY, "table": table, "name": chain.name, "type": chain.type,
                                  "hook": chain.hook, "prio": chain.priority, "policy": "accept"}})
    for rule in rules:
        objects.append({"rule": {"family": FAMILY, "table": table, "chain": rule.chain, "comment": rule.comment,
                                 "expr": [s.json for s in rule.statements]}})
    return objects


# --- rendering: Config -> Ruleset (pure) -----------------------------------------------------------------


def _match(left: Json, right: Json) -> JsonObject:
    return {"match": {"op": "==", "left": left, "right": right}}


def _meta(key: str) -> JsonObject:
    return {"meta": {"key": key}}


def _ifname(direction: Literal["iifname", "oifname"], name: str) -> Statement:
    return _statement(f'{direction} "{name}"', _match(_meta(direction), name))


# `tcp flags & (syn|rst) == syn`: SYNs and SYN-ACKs, the segments that carry an MSS option.
_SYN = _statement("tcp flags syn / syn,rst",
                  _match({"&": [{"payload": {"protocol": "tcp", "field": "flags"}}, ["syn", "rst"]]}, "syn"))


IPV6_HEADER_EXTRA = 20  # a 40-byte IPv6 header against IPv4's 20


def _clamp(clamp: int | Literal["pmtu"]) -> Statement:
    # The kernel never raises an MSS with this statement (nft_exthdr: "increase can cause connection to
    # stall"), so `set` is a clamp, like iptables' TCPMSS: a SYN that already asks for less keeps its value.
    # `rt mtu` is, like iptables' --clamp-mss-to-pmtu, the smaller of the route MTUs towards the packet's
    # destination and back towards its source (nft_rt's get_tcpmss), less the IP and TCP headers: a SYN
    # that crosses the tunnel in either direction is clamped to the tunnel's MTU.
    value: Json
    if clamp == "pmtu":
        value, text = {"rt": {"key": "mtu"}}, "rt mtu"
    else:
        # A fixed clamp is written for IPv4; an IPv6 header is 20 bytes longer, so IPv6 SYNs get 20 less
        # (review M6), from one rule: `set meta nfproto map { ipv4 : N, ipv6 : N-20 }`.
        v6 = clamp - IPV6_HEADER_EXTRA
        value = {"map": {"key": _meta("nfproto"), "data": {"set": [["ipv4", clamp], ["ipv6", v6]]}}}
        text = f"meta nfproto map {{ ipv4 : {clamp}, ipv6 : {v6} }}"
    return _statement(f"tcp option maxseg size set {text}",
                      {"mangle": {"key": {"tcp option": {"name": "maxseg", "field": "size"}}, "value": value}})


def _saddr(prefix: IPNetwork) -> Statement:
    protocol = "ip" if prefix.version == 4 else "ip6"
    # nft keeps a full-length prefix as a plain address; render it the way the kernel gives it back.
    right: Json
    if prefix.prefixlen == prefix.max_prefixlen:
        right, text = str(prefix.network_address), str(prefix.network_address)
    else:
        right, text = {"prefix": {"addr": str(prefix.network_address), "len": prefix.prefixlen}}, str(prefix)
    return _statement(f"{protocol} saddr {text}", _match({"payload": {"protocol": protocol, "field": "saddr"}},
                                                         right))


_ACCEPT = _statement("accept", {"accept": None})
_MASQUERADE = _statement("masquerade", {"masquerade": None})
_SET_MARK = _statement(f"meta mark set meta mark | {FROM_TUNNEL_MARK:#010x}",
                       {"mangle": {"key": _meta("mark"), "value": {"|": [_meta("mark"), FROM_TUNNEL_MARK]}}})
_HAS_MARK = _statement(f"meta mark & {FROM_TUNNEL_MARK:#010x} == {FROM_TUNNEL_MARK:#010x}",
                       _match({"&": [_meta("mark"), FROM_TUNNEL_MARK]}, FROM_TUNNEL_MARK))

MSS_CHAIN = Chain("mss_clamp", "filter", "forward", MANGLE)
FORWARD_CHAIN = Chain("forward", "filter", "forward", FILTER)
NAT_CHAIN = Chain("postrouting", "nat", "postrouting", SRCNAT)


def tunnel_rules(tunnel: TunnelConfig) -> list[Rule]:
    """The rules one tunnel asks for, in chain order; none for a disabled tunnel."""
    if not tunnel.enabled:
        return []
    name = tunnel.name
    rules: list[Rule] = []
    if tunnel.mss.clamp != "off":
        clamp = _clamp(tunnel.mss.clamp)
        # Both ways: SYNs (and SYN-ACKs) leaving through the tunnel tell the far side how big to send, and
        # those arriving from it tell our side; the peer may clamp nothing (a hand-made Linux tunnel).
        rules.append(Rule(MSS_CHAIN.name, name, f"{name}: clamp mss out",
                          (_ifname("oifname", name), _SYN, clamp)))
        rules.append(Rule(MSS_CHAIN.name, name, f"{name}: clamp mss in",
                          (_ifname("iifname", name), _SYN, clamp)))
    for prefix in tunnel.nat.into_tunnel:
        # The accepts stand for the seed's FORWARD ACCEPT rules. An accept ends only our own chain: a drop
        # in another table's forward chain still applies (nftables evaluates every base chain of a hook).
        rules.append(Rule(FORWARD_CHAIN.name, name, f"{name}: forward {prefix} into the tunnel",
                          (_saddr(prefix), _ifname("oifname", name), _ACCEPT)))
    for ifname in tunnel.nat.from_tunnel:
        rules.append(Rule(FORWARD_CHAIN.name, name, f"{name}: forward from the tunnel to {ifname}",
                          (_ifname("iifname", name), _ifname("oifname", ifname), _SET_MARK, _ACCEPT)))
    for prefix in tunnel.nat.into_tunnel:
        rules.append(Rule(NAT_CHAIN.name, name, f"{name}: masquerade {prefix} into the tunnel",
                          (_saddr(prefix), _ifname("oifname", name), _MASQUERADE)))
    for ifname in tunnel.nat.from_tunnel:
        rules.append(Rule(NAT_CHAIN.name, name, f"{name}: masquerade from the tunnel to {ifname}",
                          (_HAS_MARK, _ifname("oifname", ifname), _MASQUERADE)))
    return rules


# --- [tunnel.ipsec] require = true: no GRE in cleartext to or from the remote ------------------------------
# ESP in transport mode is applied after the output hook and removed before the input hook, so there GRE is
# seen in clear with the verdict attached: on the way out, `rt ipsec` says the route is an IPsec bundle (the
# packet will be encrypted); on the way in, `meta ipsec` (secpath) says it was decrypted. GRE without it is
# what leaks while SAs are negotiated, rekeyed or lost, or while charon is gone: dropped.
# `meta l4proto` rather than `ip6 nexthdr`: ip6gre's encapsulation limit option comes before the GRE header.
IPSEC_OUT_CHAIN = Chain("ipsec_out", "filter", "output", FILTER)
IPSEC_IN_CHAIN = Chain("ipsec_in", "filter", "input", FILTER)
_GRE = _statement("meta l4proto gre", _match(_meta("l4proto"), "gre"))
_NOT_ENCRYPTED = _statement("rt ipsec missing", _match({"rt": {"key": "ipsec"}}, False))
_NOT_DECRYPTED = _statement("meta ipsec missing", _match(_meta("ipsec"), False))
_DROP = _statement("drop", {"drop": None})


def _address(field: Literal["saddr", "daddr"], address: IPAddress) -> Statement:
    protocol = "ip" if address.version == 4 else "ip6"
    return _statement(f"{protocol} {field} {address}",
                      _match({"payload": {"protocol": protocol, "field": field}}, str(address)))


def ipsec_rules(tunnel: TunnelConfig) -> list[Rule]:
    """The drops that keep a tunnel's GRE inside ESP; none unless it has [tunnel.ipsec] with require."""
    if not tunnel.enabled or tunnel.ipsec is None or not tunnel.ipsec.require:
        return []
    name, remote = tunnel.name, tunnel.remote
    return [
        Rule(IPSEC_OUT_CHAIN.name, name, f"{name}: no cleartext GRE to {remote}",
             (_address("daddr", remote), _GRE, _NOT_ENCRYPTED, _DROP)),
        Rule(IPSEC_IN_CHAIN.name, name, f"{name}: no cleartext GRE from {remote}",
             (_address("saddr", remote), _GRE, _NOT_DECRYPTED, _DROP)),
    ]


def render_ruleset(config: Config) -> Ruleset:
    """The table greupd should hold for this config; `wanted` is False when no enabled tunnel needs one."""
    rules = [rule for tunnel in config.tunnels for rule in (*tunnel_rules(tunnel), *ipsec_rules(tunnel))]
    every_chain = (MSS_CHAIN, FORWARD_CHAIN, NAT_CHAIN, IPSEC_OUT_CHAIN, IPSEC_IN_CHAIN)
    chains = tuple(c for c in every_chain if any(r.chain == c.name for r in rules))
    ordered = tuple(r for c in chains for r in rules if r.chain == c.name)
    return Ruleset(config.daemon.nft_table, chains, ordered)


def describe_ruleset(ruleset: Ruleset) -> str:
    """The ruleset in nft syntax, as `nft list table inet <name>` prints it once applied."""
    if not ruleset.wanted:
        return (f"# no table {ruleset.family} {ruleset.table}: no enabled tunnel asks for an MSS clamp, NAT"
                " or IPsec\n")
    blocks = []
    for chain in ruleset.chains:
        lines = [f"\tchain {chain.name} {{", f"\t\t{chain.text}"]
        lines += [f"\t\t{rule.text}" for rule in ruleset.rules if rule.chain == chain.name]
        blocks.append("\n".join([*lines, "\t}"]))
    return f"table {ruleset.family} {ruleset.table} {{\n" + "\n\n".join(blocks) + "\n}\n"
