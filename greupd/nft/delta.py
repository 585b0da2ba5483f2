"""The smallest transaction that turns one applied Ruleset into another, when only tunnels came or went (pure).

Tunnels live in set and map elements and in per-tunnel chains (render.py), so adding a tunnel to a running
table is a few element adds and, with into_tunnel, two chains: no need to rewrite 1000 tunnels' worth of
table for it. When more than that changed (a hooked chain's rules, which sets exist), there is no delta and
the caller replaces the table as a whole, as always.
"""

from __future__ import annotations

from collections.abc import Iterable

from greupd.nft.render import FAMILY, Chain, Element, Json, JsonObject, NamedSet, Rule, Ruleset, table_objects


def _regular(ruleset: Ruleset) -> dict[str, tuple[Rule, ...]]:
    return {c.name: tuple(r for r in ruleset.rules if r.chain == c.name) for c in ruleset.chains if c.hook is None}


def _hooked(ruleset: Ruleset) -> tuple[tuple[Chain, ...], tuple[Rule, ...]]:
    base = tuple(c for c in ruleset.chains if c.hook is not None)
    names = {c.name for c in base}
    return base, tuple(r for r in ruleset.rules if r.chain in names)


def _key(named: NamedSet, element: Element) -> Json:
    """What names an element when it is deleted: a map's key without its verdict, a set's value."""
    value = element.json
    if named.verdicts and isinstance(value, list):
        return value[0]
    if isinstance(value, dict) and isinstance(value.get("elem"), dict):
        return value["elem"].get("val")  # type: ignore[union-attr]
    return value


def _elements(verb: str, table: str, named: NamedSet, elements: Iterable[Element], keys: bool) -> list[JsonObject]:
    items = [_key(named, e) if keys else e.json for e in elements]
    if not items:
        return []
    return [{verb: {"element": {"family": FAMILY, "table": table, "name": named.name, "elem": items}}}]


def delta_commands(old: Ruleset, new: Ruleset) -> list[JsonObject] | None:
    """Commands for one transaction that make a kernel holding exactly `old` hold `new`; None if the hooked
    chains, their rules or the sets differ (then only a whole new table will do)."""
    if not (old.wanted and new.wanted) or old.table != new.table or _hooked(old) != _hooked(new):
        return None
    if [(s.name, s.key, s.verdicts) for s in old.sets] != [(s.name, s.key, s.verdicts) for s in new.sets]:
        return None
    table = new.table
    before, after = _regular(old), _regular(new)
    chains = {c.name: c for c in new.chains}

    def chain_ref(name: str) -> JsonObject:
        return {"family": FAMILY, "table": table, "name": name}

    def rules_of(name: str) -> list[JsonObject]:
        return [{"add": obj} for obj in table_objects(table, (), after[name])[1:]]

    commands: list[JsonObject] = []
    # Chains first: a map element's jump needs its chain to exist.
    for name in after:
        if name not in before:
            commands += [{"add": {"chain": {"family": FAMILY, "table": table, **chains[name].json}}},
                         *rules_of(name)]
        elif before[name] != after[name]:
            commands += [{"flush": {"chain": chain_ref(name)}}, *rules_of(name)]
    # Then the elements: deletions before additions, so an element whose verdict changed is replaced.
    removals, additions = [], []
    for was, now in zip(old.sets, new.sets, strict=True):
        had = {e.json_text: e for e in was.elements}
        has = {e.json_text: e for e in now.elements}
        removals += _elements("delete", table, was, (e for t, e in had.items() if t not in has), keys=True)
        additions += _elements("add", table, now, (e for t, e in has.items() if t not in had), keys=False)
    commands += removals + additions
    # Last the chains nothing jumps to any more.
    for name in before:
        if name not in after:
            commands += [{"flush": {"chain": chain_ref(name)}}, {"delete": {"chain": chain_ref(name)}}]
    return commands
