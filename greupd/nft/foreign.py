"""Other tables' forward hooks, where greupd's forward accepts cannot reach (code review M9).

nftables runs every base chain registered on a hook, table after table in priority order, and a verdict ends
only the chain that gave it: an `accept` in greupd's `forward` chain lets a packet on to the next table's
forward chain, and a drop there (Docker's or ufw's iptables-nft `FORWARD` with policy DROP, firewalld's
final `reject`) still drops it, whatever the two priorities are (an earlier drop never lets the packet reach
our accept; a later one overrides it). So the NAT'd tunnel traffic the seed let through with `FORWARD ACCEPT`
can be dropped while `greupd plan` shows the accepts in place.

greupd never edits another program's table; it finds those drops and says so (status `warnings`, the
journal, `greupd plan`), naming the tunnels whose accepts they defeat. What counts as a drop: a filter base
chain on the forward hook of family ip, ip6 or inet with policy drop, or whose last rule drops or rejects
everything (nothing to match before the verdict: firewalld's `reject with icmpx admin-prohibited`). Drops
that match some traffic only cannot be judged without the traffic, and are not reported.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from greupd.config import Config
from greupd.nft.fingerprint import ChainInfo
from greupd.nft.render import FAMILY, Json, JsonObject

# The families whose forward hook sees routed IP packets (bridge's sees bridged frames, netdev has none).
FAMILY_VERSIONS = {"ip": frozenset({4}), "ip6": frozenset({6}), "inet": frozenset({4, 6})}
# Statements that neither match nor decide: a rule of these and a verdict drops or rejects everything.
_PASSIVE = frozenset({"counter", "log", "limit"})


@dataclass(frozen=True)
class ForwardDrop:
    """A forward base chain of another table that drops what greupd's accepts let through."""

    family: str
    table: str
    chain: str
    priority: int
    how: str  # "policy drop", "ends with a drop", "ends with a reject"

    def __str__(self) -> str:
        where = f"table {self.family} {self.table} chain {self.chain}"
        return f"{where} (hook forward priority {self.priority}): {self.how}"


def _body(obj: Json, kind: str) -> dict[str, Json] | None:
    body = obj.get(kind) if isinstance(obj, dict) else None
    return body if isinstance(body, dict) else None


def forward_base_chains(listing: Iterable[Json], own_table: str) -> list[dict[str, Json]]:
    """The filter base chains on the forward hook (ip, ip6, inet) of `nft list chains`, our own table's left out."""
    chains = []
    for obj in listing:
        chain = _body(obj, "chain")
        if chain is None or chain.get("hook") != "forward" or chain.get("type") != "filter":
            continue
        if chain.get("family") not in FAMILY_VERSIONS or (chain.get("family"), chain.get("table")) == (FAMILY,
                                                                                                        own_table):
            continue
        chains.append(chain)
    return chains


def _last_rule_verdict(rules: Sequence[Json]) -> str | None:
    """'drop' or 'reject' if the chain's last rule is nothing but that verdict (counters and logs aside)."""
    bodies = [body for body in (_body(obj, "rule") for obj in rules) if body is not None]
    if not bodies or not isinstance(exprs := bodies[-1].get("expr"), list) or not exprs:
        return None
    *before, last = exprs
    if not all(isinstance(e, dict) and len(e) == 1 and next(iter(e)) in _PASSIVE for e in before):
        return None
    verdict = next(iter(last)) if isinstance(last, dict) and len(last) == 1 else None
    return verdict if verdict in ("drop", "reject") else None


def forward_drop(chain: dict[str, Json], rules: Sequence[Json]) -> ForwardDrop | None:
    """What `chain` (with its `rules`, as listed) does to everything it does not accept, if it drops it."""
    if chain.get("policy") == "drop":
        how = "policy drop"
    elif verdict := _last_rule_verdict(rules):
        how = f"ends with a {verdict} of everything"
    else:
        return None
    priority = chain.get("prio")
    return ForwardDrop(str(chain.get("family")), str(chain.get("table")), str(chain.get("name")),
                       priority if isinstance(priority, int) else 0, how)


def tunnels_with_accepts(config: Config) -> dict[str, frozenset[int]]:
    """The tunnels greupd puts forward accepts in for, with the IP versions those accepts are for."""
    found: dict[str, frozenset[int]] = {}
    for tunnel in config.tunnels:
        if not tunnel.enabled:
            continue
        versions = {prefix.version for prefix in tunnel.nat.into_tunnel}
        if tunnel.nat.from_tunnel:
            versions |= {4, 6}  # `iifname TUN oifname IF accept`: either family
        if versions:
            found[tunnel.name] = frozenset(versions)
    return found


def warnings(config: Config, drops: Iterable[ForwardDrop]) -> list[str]:
    """One line per drop that defeats some tunnel's accepts, naming those tunnels."""
    drops = list(drops)
    if not drops:
        return []  # the usual case, and no walk over thousands of tunnels for it
    accepting = tunnels_with_accepts(config)
    lines = []
    for drop in drops:
        names = sorted(n for n, versions in accepting.items() if versions & FAMILY_VERSIONS[drop.family])
        if names:
            lines.append(f"nftables: {drop}: the forward accepts greupd keeps for {', '.join(names)} ([tunnel.nat])"
                         " cannot override it, so that traffic is dropped there unless that table accepts it"
                         " itself (greupd never edits another table)")
    return lines


Query = Callable[[JsonObject], list[Json]]  # one libnftables `list` command -> its objects (NftTable.query)

_FAMILY_NAMES = {1: "inet", 2: "ip", 10: "ip6"}  # NFPROTO_*: the families whose forward hook routes IP
_HOOK_NAMES = {0: "prerouting", 1: "input", 2: "forward", 3: "output", 4: "postrouting"}  # NF_INET_*
_POLICY_NAMES = {0: "drop", 1: "accept"}  # NF_DROP, NF_ACCEPT


def chain_json(chain: ChainInfo) -> JsonObject:
    """A chain of nf_tables' own netlink dump (fingerprint.py) as libnftables' JSON lists it, for the above."""
    body: dict[str, Json] = {"family": _FAMILY_NAMES.get(chain.family, str(chain.family)), "table": chain.table,
                             "name": chain.name}
    if chain.hook is not None:
        body.update(type=chain.type, hook=_HOOK_NAMES.get(chain.hook, str(chain.hook)), prio=chain.priority,
                    policy="accept" if chain.policy is None else _POLICY_NAMES.get(chain.policy, str(chain.policy)))
    return {"chain": body}


def observe_forward_drops(query: Query, own_table: str) -> list[ForwardDrop]:
    """Ask the kernel (one `list chains`, then one `list chain` per forward base chain of another table)."""
    return forward_drops_of(forward_base_chains(query({"list": {"chains": {}}}), own_table), query)


def forward_drops_of(chains: Iterable[dict[str, Json]], query: Query) -> list[ForwardDrop]:
    """The drops among other tables' forward base chains, their rules asked for where the policy does not say."""
    drops = []
    for chain in chains:
        rules: list[Json] = []
        if chain.get("policy") != "drop":
            ref = {key: chain.get(key) for key in ("family", "table", "name")}
            rules = [obj for obj in query({"list": {"chain": ref}}) if _body(obj, "rule") is not None]
        if (drop := forward_drop(chain, rules)) is not None:
            drops.append(drop)
    return drops
