"""nftables: greupd's table (MSS clamp, NAT, forward accepts), rendered purely and kept in place.

    Config --render_ruleset (pure, here)--> Ruleset --NftTable.apply (table.py, one transaction)--> kernel
    kernel --NftWatch (watch.py, nftables netlink events)--> "look again" --NftTable.matches--> re-apply if it differs

Everything goes through libnftables' JSON API (the `nftables` Python bindings, imported lazily so that a
config without MSS clamp, NAT or IPsec never needs them). greupd owns two tables, `inet <daemon.nft_table>`
(this one) and `inet <daemon.nft_table>_ipsec` (nft/ipsec.py), and touches no other: it replaces its own
tables as a whole, so other tables stay byte-identical.

A packet pays the same whatever the number of tunnels (code review M5): the tunnels are elements of named
sets and verdict maps (hash lookups), never one rule each in a chain every packet walks. What a tunnel
asks for, and where it lands:

    [tunnel.mss] clamp = 1436 | "pmtu"      map clamp (ifname : verdict): TUN : jump clamp_1436 | clamp_pmtu
                                            chain mss_clamp (filter, forward, priority mangle):
                                              tcp flags syn / syn,rst oifname vmap @clamp
                                              tcp flags syn / syn,rst iifname vmap @clamp
                                            chain clamp_1436: tcp option maxseg size set meta nfproto map
                                                              { ipv4 : 1436, ipv6 : 1416 }
                                            chain clamp_pmtu: tcp option maxseg size set rt mtu
    [tunnel.nat] into_tunnel = [P]          map forward_into: TUN : jump forward_into_TUN
                                            chain forward (filter, forward, priority filter):
                                              oifname vmap @forward_into
                                            chain forward_into_TUN: ip saddr P accept
                                            map masquerade_into: TUN : jump masquerade_into_TUN
                                            chain postrouting (nat, postrouting, priority srcnat):
                                              oifname vmap @masquerade_into
                                            chain masquerade_into_TUN: ip saddr P masquerade
    [tunnel.nat] from_tunnel = [IF]         set from_tunnel (ifname . ifname): TUN . IF
                                            chain forward:
                                              iifname . oifname @from_tunnel meta mark set meta mark | MARK accept
                                            set from_tunnel_out (ifname): IF
                                            chain postrouting:
                                              meta mark & MARK == MARK oifname @from_tunnel_out masquerade

Per packet: the forward hook does at most a SYN test and two map lookups in mss_clamp, one map lookup and one
set lookup in forward (then the rules of the one tunnel the packet leaves by); postrouting is consulted for
a connection's first packet only. Only the chains, sets and maps that have something in them are created: a
config with a clamp but no NAT registers no nat hook (and so does not switch conntrack on), and a config with
none of these has no table at all.

Same behaviour as the rule-per-tunnel table this replaces, with one difference in a corner: a packet that
leaves tunnel T1 by tunnel T2, where T1 lists T2 in from_tunnel and T2 lists the source in into_tunnel, is
accepted by T2's into_tunnel rule first now (it was config order), so it is masqueraded by that rule and
not marked; it is masqueraded either way.

The drops of `[tunnel.ipsec] require = true` are not here: they live in a table of their own (nft/ipsec.py),
applied first, so that nothing this table asks for (a NAT the kernel cannot do, say) can take them out.

Every comment is at most MAX_COMMENT characters (review round 3, H1): libnftables 1.0.6 packs a comment into
a 256-byte buffer and calls exit() when it overflows; `bounded` keeps each one well inside.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal

from greupd.config import Config, TunnelConfig
from greupd.gre import IPNetwork

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

# The longest comment greupd gives nftables, in characters (ASCII: tunnel and interface names, addresses).
# libnftables 1.0.6 stores a comment with its length in a 256-byte user-data buffer: 252 characters and the
# kernel refuses the whole transaction, 254 and libnftables calls exit() inside the daemon (review round 3, H1).
MAX_COMMENT = 128


def bounded(text: str, limit: int = MAX_COMMENT) -> str:
    """`text` cut to `limit` characters, saying so ("..."): for comments, whose content is only for people."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def names_comment(names: Iterable[str], limit: int = MAX_COMMENT) -> str:
    """Names for a comment, each once, in order: as many whole names as fit, then "+N more"."""
    unique = list(dict.fromkeys(names))
    for shown in range(len(unique), 0, -1):
        rest = len(unique) - shown
        text = ", ".join(unique[:shown]) + (f" +{rest} more" if rest else "")
        if len(text) <= limit:
            return text
    return bounded(f"{len(unique)} tunnels", limit)


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
    """A base chain (type, hook and priority given) or a regular chain, reached only by a jump (hook None)."""

    name: str
    type: Literal["filter", "nat"] | None = None
    hook: Literal["forward", "postrouting", "output", "input"] | None = None
    priority: int = 0

    @property
    def text(self) -> str | None:
        if self.hook is None:
            return None
        priority = PRIORITY_NAMES.get(self.priority, str(self.priority))
        return f"type {self.type} hook {self.hook} priority {priority}; policy accept;"

    @property
    def json(self) -> JsonObject:
        if self.hook is None:
            return {"name": self.name}
        return {"name": self.name, "type": self.type, "hook": self.hook, "prio": self.priority, "policy": "accept"}


@dataclass(frozen=True)
class Rule:
    chain: str
    tunnel: str | None  # whose rule; None for a rule that serves every tunnel (a set or map lookup)
    comment: str  # stored in the kernel with the rule, so `nft list ruleset` tells whose and why
    statements: tuple[Statement, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "comment", bounded(self.comment))  # whoever builds a rule (H1)

    @property
    def text(self) -> str:
        return " ".join(s.text for s in self.statements) + f' comment "{self.comment}"'


@dataclass(frozen=True)
class Element:
    """One element of a named set or map, as `nft list` prints it and as libnftables JSON."""

    text: str
    json_text: str
    tunnel: str  # the (first) tunnel that asks for it, for error messages

    @property
    def json(self) -> Json:
        value: Json = json.loads(self.json_text)
        return value


@dataclass(frozen=True)
class NamedSet:
    """A named set (`type` a key) or verdict map (`verdicts`), looked up by one rule whatever its size."""

    name: str
    key: tuple[str, ...]  # the key's data types, several for a concatenation
    verdicts: bool
    elements: tuple[Element, ...]

    @property
    def kind(self) -> Literal["set", "map"]:
        return "map" if self.verdicts else "set"

    def json(self, table: str) -> JsonObject:
        body: JsonObject = {"family": FAMILY, "table": table, "name": self.name,
                            "type": self.key[0] if len(self.key) == 1 else list(self.key)}
        if self.verdicts:
            body["map"] = "verdict"
        if self.elements:
            body["elem"] = [e.json for e in self.elements]
        return {self.kind: body}

    @property
    def lines(self) -> list[str]:
        """As `nft list` prints it: ipv4 addresses two to a line, anything else one (nftables' calculate_delim)."""
        per_line = 2 if self.key == ("ipv4_addr",) and not self.verdicts else 1
        texts = [e.text for e in self.elements]
        rows = [", ".join(texts[i:i + per_line]) for i in range(0, len(texts), per_line)]
        type_text = " . ".join(self.key) + (" : verdict" if self.verdicts else "")
        return [f"\t{self.kind} {self.name} {{", f"\t\ttype {type_text}",
                "\t\telements = { " + ",\n\t\t\t     ".join(rows) + " }", "\t}"]


@dataclass(frozen=True)
class Ruleset:
    """The whole desired content of greupd's table; no rules means "no table"."""

    table: str
    chains: tuple[Chain, ...] = ()
    rules: tuple[Rule, ...] = ()
    sets: tuple[NamedSet, ...] = ()
    family: ClassVar[str] = FAMILY

    @property
    def wanted(self) -> bool:
        return bool(self.rules)

    def objects(self) -> list[JsonObject]:
        """Table, chains, sets and rules as `nft -j list table` shows them (without handles); none if not wanted."""
        return table_objects(self.table, self.chains, self.rules, self.sets) if self.wanted else []

    def commands(self) -> list[JsonObject]:
        """One libnftables transaction that makes the kernel hold exactly this ruleset.

        `add table; delete table; add table; add chain...; add set...; add rule...` in one batch: the add
        makes the delete valid when the table does not exist yet, the delete drops whatever was in it (ours
        from an older config, or anything someone added), and the kernel commits the batch atomically, so
        packets never meet a half-written table or a window without the clamp and NAT. With no rules the
        transaction is `add table; delete table`: remove ours if present, and no error if not.
        """
        return [*clear_commands(self.table), *add_commands(self.objects())]


def clear_commands(table: str) -> list[JsonObject]:
    name: JsonObject = {"family": FAMILY, "name": table}
    return [{"add": {"table": name}}, {"delete": {"table": name}}]


def add_commands(objects: Iterable[JsonObject]) -> list[JsonObject]:
    return [{"add": obj} for obj in objects]


def table_objects(table: str, chains: Iterable[Chain], rules: Iterable[Rule],
                  sets: Iterable[NamedSet] = ()) -> list[JsonObject]:
    """In the order one transaction can add them: a map's `jump` needs its chain, a rule's `@set` its set."""
    objects: list[JsonObject] = [{"table": {"family": FAMILY, "name": table}}]
    for chain in chains:
        objects.append({"chain": {"family": FAMILY, "table": table, **chain.json}})
    objects += [named.json(table) for named in sets]
    for rule in rules:
        objects.append({"rule": {"family": FAMILY, "table": table, "chain": rule.chain, "comment": rule.comment,
                                 "expr": [s.json for s in rule.statements]}})
    return objects


# --- pieces of rules --------------------------------------------------------------------------------------


def _match(left: Json, right: Json) -> JsonObject:
    return {"match": {"op": "==", "left": left, "right": right}}


def _meta(key: str) -> JsonObject:
    return {"meta": {"key": key}}


def _ifname(direction: Literal["iifname", "oifname"], name: str) -> Statement:
    return _statement(f'{direction} "{name}"', _match(_meta(direction), name))


def _vmap(direction: Literal["iifname", "oifname"], named: str) -> Statement:
    return _statement(f"{direction} vmap @{named}", {"vmap": {"key": _meta(direction), "data": f"@{named}"}})


# `tcp flags & (syn|rst) == syn`: SYNs and SYN-ACKs, the segments that carry an MSS option.
_SYN = _statement("tcp flags syn / syn,rst",
                  _match({"&": [{"payload": {"protocol": "tcp", "field": "flags"}}, ["syn", "rst"]]}, "syn"))


IPV6_HEADER_EXTRA = 20  # a 40-byte IPv6 header against IPv4's 20


@functools.cache
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


@functools.cache  # 1000 tunnels often share one LAN prefix
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
BASE_CHAINS = (MSS_CHAIN, FORWARD_CHAIN, NAT_CHAIN)

CLAMP_MAP = "clamp"
FORWARD_INTO_MAP = "forward_into"
MASQUERADE_INTO_MAP = "masquerade_into"
FROM_TUNNEL_SET = "from_tunnel"
FROM_TUNNEL_OUT_SET = "from_tunnel_out"


def _jump(key: str, chain: str, tunnel: str) -> Element:
    return Element(f'"{key}" : jump {chain}', json.dumps([key, {"jump": {"target": chain}}]), tunnel)


def _name(key: str, tunnel: str) -> Element:
    return Element(f'"{key}"', json.dumps(key), tunnel)


def _pair(first: str, second: str, tunnel: str) -> Element:
    return Element(f'"{first}" . "{second}"', json.dumps({"concat": [first, second]}), tunnel)


def _clamp_chain(clamp: int | Literal["pmtu"]) -> str:
    return f"clamp_{clamp}"


def _clamp_comment(clamp: int | Literal["pmtu"]) -> str:
    if clamp == "pmtu":
        return "clamp mss to the route mtu"
    return f"clamp mss to {clamp} (ipv6: {clamp - IPV6_HEADER_EXTRA})"


class _Builder:
    """Collects chains, rules and set elements, tunnel by tunnel, in config order."""

    def __init__(self) -> None:
        self.chains: dict[str, Chain] = {}
        self.rules: list[Rule] = []
        self.elements: dict[str, dict[str, Element]] = {}  # set name -> element key -> element (no duplicates)

    def rule(self, chain: Chain, tunnel: str | None, comment: str, *statements: Statement) -> None:
        self.chains.setdefault(chain.name, chain)
        self.rules.append(Rule(chain.name, tunnel, comment, statements))

    def element(self, named: str, element: Element) -> None:
        # Keyed by what the kernel looks up (a map's key without its verdict): the same key twice with two
        # verdicts is EEXIST for the whole transaction. It happens in a reload's transitional table, which
        # holds a changed tunnel in its new version first and its old one after: the first one wins.
        self.elements.setdefault(named, {}).setdefault(element.text.split(" : ", 1)[0], element)

    def tunnel(self, tunnel: TunnelConfig) -> None:
        name = tunnel.name
        clamp = tunnel.mss.clamp
        if clamp != "off":
            # Both ways: SYNs (and SYN-ACKs) leaving through the tunnel tell the far side how big to send, and
            # those arriving from it tell our side; the peer may clamp nothing (a hand-made Linux tunnel).
            chain = _clamp_chain(clamp)
            if chain not in self.chains:
                self.rule(Chain(chain), None, _clamp_comment(clamp), _clamp(clamp))
            self.element(CLAMP_MAP, _jump(name, chain, name))
        if tunnel.nat.into_tunnel:
            forward, masquerade = Chain(f"forward_into_{name}"), Chain(f"masquerade_into_{name}")
            # The accepts stand for the seed's FORWARD ACCEPT rules. An accept ends only our own chain: a
            # drop in another table's forward chain still applies (nftables evaluates every base chain).
            for prefix in tunnel.nat.into_tunnel:
                self.rule(forward, name, f"{name}: forward {prefix} into the tunnel", _saddr(prefix), _ACCEPT)
            for prefix in tunnel.nat.into_tunnel:
                self.rule(masquerade, name, f"{name}: masquerade {prefix} into the tunnel", _saddr(prefix),
                          _MASQUERADE)
            self.element(FORWARD_INTO_MAP, _jump(name, forward.name, name))
            self.element(MASQUERADE_INTO_MAP, _jump(name, masquerade.name, name))
        for ifname in tunnel.nat.from_tunnel:
            self.element(FROM_TUNNEL_SET, _pair(name, ifname, name))
            self.element(FROM_TUNNEL_OUT_SET, _name(ifname, name))

    def base_rules(self) -> list[Rule]:
        """The rules of the hooked chains: one lookup each, whatever the number of tunnels."""
        has = self.elements.__contains__
        rules = []
        if has(CLAMP_MAP):
            rules += [Rule(MSS_CHAIN.name, None, "clamp the mss of syns leaving by a tunnel",
                           (_SYN, _vmap("oifname", CLAMP_MAP))),
                      Rule(MSS_CHAIN.name, None, "clamp the mss of syns arriving from a tunnel",
                           (_SYN, _vmap("iifname", CLAMP_MAP)))]
        if has(FORWARD_INTO_MAP):
            rules.append(Rule(FORWARD_CHAIN.name, None, "into_tunnel: the accepts of the tunnel the packet leaves by",
                              (_vmap("oifname", FORWARD_INTO_MAP),)))
        if has(FROM_TUNNEL_SET):
            pair = _statement(f"iifname . oifname @{FROM_TUNNEL_SET}",
                              _match({"concat": [_meta("iifname"), _meta("oifname")]}, f"@{FROM_TUNNEL_SET}"))
            rules.append(Rule(FORWARD_CHAIN.name, None,
                              "from_tunnel: mark what leaves a tunnel by one of its interfaces",
                              (pair, _SET_MARK, _ACCEPT)))
        if has(MASQUERADE_INTO_MAP):
            rules.append(Rule(NAT_CHAIN.name, None, "into_tunnel: the masquerades of the tunnel the packet leaves by",
                              (_vmap("oifname", MASQUERADE_INTO_MAP),)))
        if has(FROM_TUNNEL_OUT_SET):
            out = _statement(f"oifname @{FROM_TUNNEL_OUT_SET}", _match(_meta("oifname"), f"@{FROM_TUNNEL_OUT_SET}"))
            rules.append(Rule(NAT_CHAIN.name, None, "from_tunnel: masquerade what was marked",
                              (_HAS_MARK, out, _MASQUERADE)))
        return rules


def render_ruleset(config: Config) -> Ruleset:
    """The table greupd should hold for this config; `wanted` is False when no enabled tunnel needs one."""
    enabled = [t for t in config.tunnels if t.enabled]
    builder = _Builder()
    for tunnel in enabled:
        builder.tunnel(tunnel)
    sets = [NamedSet(name, ("ifname", "ifname") if name == FROM_TUNNEL_SET else ("ifname",),
                     name in (CLAMP_MAP, FORWARD_INTO_MAP, MASQUERADE_INTO_MAP), tuple(elements.values()))
            for name, elements in builder.elements.items()]
    rules = [*builder.base_rules(), *builder.rules]
    # Chains in reading order: each hooked chain, then the chains it jumps to.
    jumped = list(builder.chains.values())
    order = [MSS_CHAIN, *(c for c in jumped if c.name.startswith("clamp_")),
             FORWARD_CHAIN, *(c for c in jumped if c.name.startswith("forward_into_")),
             NAT_CHAIN, *(c for c in jumped if c.name.startswith("masquerade_into_"))]
    by_chain: dict[str, list[Rule]] = {}
    for rule in rules:
        by_chain.setdefault(rule.chain, []).append(rule)
    chains = tuple(c for c in order if c.name in by_chain)
    ordered = tuple(r for c in chains for r in by_chain[c.name])
    set_order = [CLAMP_MAP, FORWARD_INTO_MAP, FROM_TUNNEL_SET, MASQUERADE_INTO_MAP, FROM_TUNNEL_OUT_SET]
    named = tuple(sorted(sets, key=lambda s: set_order.index(s.name)))
    return Ruleset(config.daemon.nft_table, chains, ordered, named)


def describe_ruleset(ruleset: Ruleset) -> str:
    """The ruleset in nft syntax, as `nft list table inet <name>` prints it once applied (nft lists a set's
    elements in the kernel's hash order; here they are in config order)."""
    if not ruleset.wanted:
        return (f"# no table {ruleset.family} {ruleset.table}: no enabled tunnel asks for an MSS clamp, NAT"
                " or IPsec\n")
    blocks = ["\n".join(named.lines) for named in ruleset.sets]
    for chain in ruleset.chains:
        lines = [f"\tchain {chain.name} {{", *([f"\t\t{chain.text}"] if chain.text else [])]
        lines += [f"\t\t{rule.text}" for rule in ruleset.rules if rule.chain == chain.name]
        blocks.append("\n".join([*lines, "\t}"]))
    return f"table {ruleset.family} {ruleset.table} {{\n" + "\n\n".join(blocks) + "\n}\n"
