"""`[tunnel.ipsec] require = true`: no GRE in cleartext between the tunnel's local and remote, in a table of its own.

    set ipsec_v4 (ipv4_addr . ipv4_addr; v6: ipsec_v6): LOCAL . REMOTE
    chain ipsec_out (filter, output, priority filter):
      meta l4proto gre ip saddr . ip daddr @ipsec_v4 rt ipsec missing drop
    chain ipsec_in (filter, input, priority filter):
      meta l4proto gre ip daddr . ip saddr @ipsec_v4 meta ipsec missing drop

ESP in transport mode is applied after the output hook and removed before the input hook, so there GRE is
seen in clear with the verdict attached: on the way out, `rt ipsec` says the route is an IPsec bundle (the
packet will be encrypted); on the way in, `meta ipsec` (the secpath) says it was decrypted. GRE without it is
what leaks while SAs are negotiated, rekeyed or lost, or while charon is gone: dropped. (nft 1.0.6 accepts
`meta ipsec` in input, forward and prerouting chains only; `rt ipsec` in output.) On the way in, the drop
comes before any socket sees the packet: a keepalive answered in cleartext never reaches greupd's raw socket,
so it never counts (issue #21, I3).

Why a table of its own (review round 3, M1): one nftables transaction is all or nothing, so with the clamp,
NAT and forward rules in the same table any refusal of those (a kernel without NAT, say) took the drops out
too, and the tunnels went up anyway. This table holds nothing else, is applied before the other one, and is
read back: a tunnel that requires IPsec gets its link only while the kernel is seen holding its drop
(model.ipsec_held, from the fact nft/keeper.py keeps).

Keyed on (local . remote), not the remote alone (review round 3, L7): a plain GRE tunnel to the same remote
from another local address is not covered by the IPsec tunnel's traffic selectors (`dynamic[gre]`), and a
drop keyed by the remote alone would have blackholed it.

`meta l4proto` rather than `ip6 nexthdr`: ip6gre's encapsulation limit option comes before the GRE header.
Tested first, so every other packet this host sends or receives stops at one comparison.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Literal

from greupd.config import Config, TunnelConfig
from greupd.gre import IPAddress
from greupd.nft.render import (
    FILTER,
    Chain,
    Element,
    Json,
    NamedSet,
    Rule,
    Ruleset,
    Statement,
    _match,
    _meta,
    _statement,
    names_comment,
)

IPSEC_OUT_CHAIN = Chain("ipsec_out", "filter", "output", FILTER)
IPSEC_IN_CHAIN = Chain("ipsec_in", "filter", "input", FILTER)
_GRE = _statement("meta l4proto gre", _match(_meta("l4proto"), "gre"))
_NOT_ENCRYPTED = _statement("rt ipsec missing", _match({"rt": {"key": "ipsec"}}, False))
_NOT_DECRYPTED = _statement("meta ipsec missing", _match(_meta("ipsec"), False))
_DROP = _statement("drop", {"drop": None})
# family -> (set name, address type, nft protocol)
IPSEC_SETS = {4: ("ipsec_v4", "ipv4_addr", "ip"), 6: ("ipsec_v6", "ipv6_addr", "ip6")}

Pair = tuple[IPAddress, IPAddress]  # (local, remote)


def ipsec_table(table: str) -> str:
    """The drops' table, named after greupd's other one (`[daemon] nft_table`)."""
    return f"{table}_ipsec"


def requiring(tunnels: Iterable[TunnelConfig]) -> dict[Pair, list[str]]:
    """The (local, remote) pairs whose GRE must come and go inside ESP, each with its tunnels (once each)."""
    pairs: dict[Pair, list[str]] = {}
    for tunnel in tunnels:
        if tunnel.enabled and tunnel.ipsec is not None and tunnel.ipsec.require:
            names = pairs.setdefault((tunnel.local, tunnel.remote), [])
            if tunnel.name not in names:  # a reload's transitional config holds a changed tunnel twice
                names.append(tunnel.name)
    return pairs


def _sets(pairs: dict[Pair, list[str]]) -> list[NamedSet]:
    sets = []
    for version, (name, key, _) in IPSEC_SETS.items():
        elements = []
        for (local, remote), names in pairs.items():
            if remote.version != version:
                continue
            comment = names_comment(names)
            value = {"concat": [str(local), str(remote)]}
            elements.append(Element(f'{local} . {remote} comment "{comment}"',
                                    json.dumps({"elem": {"val": value, "comment": comment}}), names[0]))
        if elements:
            sets.append(NamedSet(name, (key, key), False, tuple(elements)))
    return sets


def _pair(named: NamedSet, protocol: str, first: Literal["saddr", "daddr"], second: Literal["saddr", "daddr"]
          ) -> Statement:
    left: list[Json] = [{"payload": {"protocol": protocol, "field": f}} for f in (first, second)]
    return _statement(f"{protocol} {first} . {protocol} {second} @{named.name}",
                      _match({"concat": left}, f"@{named.name}"))


def _rules(sets: Iterable[NamedSet]) -> list[Rule]:
    rules = []
    for named in sets:
        protocol = next(p for n, _, p in IPSEC_SETS.values() if n == named.name)
        rules += [Rule(IPSEC_OUT_CHAIN.name, None, "ipsec require: no cleartext GRE from these locals to their remotes",
                       (_GRE, _pair(named, protocol, "saddr", "daddr"), _NOT_ENCRYPTED, _DROP)),
                  Rule(IPSEC_IN_CHAIN.name, None, "ipsec require: no cleartext GRE from these remotes to their locals",
                       (_GRE, _pair(named, protocol, "daddr", "saddr"), _NOT_DECRYPTED, _DROP))]
    return rules


def render_ipsec_ruleset(config: Config) -> Ruleset:
    """The drops' table for this config; `wanted` is False when no enabled tunnel has `require = true`."""
    sets = _sets(requiring(config.tunnels))
    rules = _rules(sets)
    chains = tuple(c for c in (IPSEC_OUT_CHAIN, IPSEC_IN_CHAIN) if any(r.chain == c.name for r in rules))
    ordered = tuple(r for c in chains for r in rules if r.chain == c.name)
    return Ruleset(ipsec_table(config.daemon.nft_table), chains, ordered, tuple(sets))

