"""The daemon's nftables tables kept as the config renders them: applied when they differ, watched for changes.

The nftables side of the reconcile pass (render.py and ipsec.py render, table.py applies, watch.py listens); a
change someone else makes to a table only marks it (`on_change`), and the next pass puts it back.
Failures are reported through `on_error` and never stop the daemon (review round 3, H1: whatever the bindings
raise). The tunnels do not depend on the main table; those with `[tunnel.ipsec] require = true` depend on the
IPsec drops' table (ipsec.py), which is kept first, on its own, and read back: `guard` is the fact the daemon
feeds the planner (model.ipsec_held), and `on_guard` names the tunnels whose fate a change of it decides.
Each keep also looks at the other tables' forward hooks (foreign.py, review M9): a drop there that defeats
our forward accepts is a standing warning (`warnings`, in status), journalled through `on_error` once when
it appears.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

from greupd.config import Config
from greupd.gre import IPAddress
from greupd.model import IpsecGuard, ipsec_held, probed
from greupd.nft.fingerprint import NFPROTO_INET, FingerprintError, NftNetlink, parse_chain
from greupd.nft.foreign import (
    ForwardDrop,
    chain_json,
    forward_base_chains,
    forward_drops_of,
    observe_forward_drops,
    tunnels_with_accepts,
    warnings,
)
from greupd.nft.ipsec import ipsec_table, render_ipsec_ruleset, requiring
from greupd.nft.render import Ruleset, render_ruleset
from greupd.nft.table import NftError, NftTable
from greupd.nft.watch import ROUTED_FAMILIES, NftWatch, NftWatchError

log = logging.getLogger("greupd")

# Seconds between looks while tunnels wait for their IPsec drops: not every way a table frees up is announced
# (a table another process owned goes with that process's socket, without a transaction to watch).
IPSEC_RETRY = 5.0


@dataclass(frozen=True)
class _Rendered:
    """What a config asks of nftables, rendered once per config (a keep with the same config renders nothing)."""

    config: Config
    ruleset: Ruleset
    ipsec: Ruleset
    pairs: frozenset[tuple[IPAddress, IPAddress]]  # (local, remote) of the tunnels that require IPsec
    accepts: bool  # some tunnel has forward accepts that another table's drop could defeat


@dataclass(frozen=True)
class _Drops:
    """Other tables' forward drops as last seen: at which generation, from which chains (and rules)."""

    generation: int
    chains: tuple[tuple[str, bytes], ...]  # each forward base chain (as JSON) and the digest of its rules
    drops: list[ForwardDrop]


class NftKeeper:
    def __init__(self, table: str, on_change: Callable[[], None], on_error: Callable[[str], None],
                 on_guard: Callable[[frozenset[str]], None] = lambda _: None) -> None:
        self._on_change = on_change
        self._on_error = on_error
        self._on_guard = on_guard
        self._loop: asyncio.AbstractEventLoop | None = None
        self.name = table
        self.netlink = NftNetlink()  # one socket, one chain dump per generation, for both tables
        self.table, self.ipsec = NftTable(table, self.netlink), NftTable(ipsec_table(table), self.netlink)
        self.watch = NftWatch(on_change, table=table)
        self.ipsec_watch = NftWatch(on_change, table=ipsec_table(table))
        self.warnings: list[str] = []  # other tables' forward drops that defeat our accepts, while they last
        self.guard = IpsecGuard()  # which tunnels' IPsec drops the kernel was seen holding: none yet
        self._waiting = False  # tunnels are held back for want of their drops: look again every IPSEC_RETRY
        self._ipsec_error: str | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._rendered: _Rendered | None = None
        self._drops: _Drops | None = None

    def _render(self, config: Config) -> _Rendered:
        if self._rendered is None or self._rendered.config is not config:
            self._rendered = _Rendered(config, render_ruleset(config), render_ipsec_ruleset(config),
                                       frozenset(requiring(config.tunnels)), bool(tunnels_with_accepts(config)))
        return self._rendered

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        try:
            self.watch.start(loop)
            self.ipsec_watch.start(loop)
        except NftWatchError as exc:
            self._on_error(f"nftables: cannot watch for changes, the table will not be repaired on its own: {exc}")
        self._retry_while_held()

    def keep(self, config: Config) -> None:
        """Make the tables what `config` renders, unless they already are (a compare, no transaction): the IPsec
        drops first, in their own transaction, so that no refusal of the other table can take them out."""
        self._keep_ipsec(config)
        ruleset = self._render(config).ruleset
        try:
            if not self.table.matches(ruleset):
                self.table.apply(ruleset)
        except NftError as exc:
            self._on_error(f"nftables: {exc}")
        except Exception as exc:  # whatever the bindings raise, the daemon goes on (H1)
            self._on_error(f"nftables: unexpected error: {exc!r}")
        self._look_for_forward_drops(config)

    def probed(self, config: Config) -> Config:
        """`config` for the keepalive engine: no probe for a tunnel held back for want of its IPsec drops."""
        return probed(config, ipsec_held(config, self.guard))

    def _keep_ipsec(self, config: Config) -> None:
        """Apply the IPsec drops where they differ, then read them back: `guard` says what the kernel holds."""
        rendered = self._render(config)
        ruleset, pairs = rendered.ipsec, rendered.pairs
        problem: str | None = None
        try:
            if not self.ipsec.holds(ruleset):
                self.ipsec.apply(ruleset)
                if not self.ipsec.holds(ruleset):
                    problem = f"table inet {self.ipsec.table} does not read back as applied"
        except NftError as exc:
            problem = str(exc)
        except Exception as exc:  # the same: reported, and the tunnels that need the drops stay held back
            problem = f"unexpected error: {exc!r}"
        guard = IpsecGuard(frozenset() if problem else pairs, problem)
        if problem is not None and problem != self._ipsec_error:
            self._on_error(f"nftables: the IPsec drops (table inet {self.ipsec.table}): {problem}")
        self._ipsec_error = problem
        self._waiting = bool(problem and pairs)
        self._retry_while_held()
        if guard != self.guard:
            changed = ipsec_held(config, self.guard).keys() ^ ipsec_held(config, guard).keys()
            first, self.guard = self.guard == IpsecGuard(), guard
            # Not for the first look: the daemon's start reads `guard` itself (probes, the first full pass), and
            # configuring the keepalive engine before it resumes the saved verdicts would lose them.
            if changed and not first:
                self._on_guard(frozenset(changed))

    def _retry_while_held(self) -> None:
        if self._waiting and self._loop is not None and self._retry is None:
            def look_again() -> None:
                self._retry = None
                self._on_change()

            self._retry = self._loop.call_later(IPSEC_RETRY, look_again)

    def _look_for_forward_drops(self, config: Config) -> None:
        found: list[str] = []
        if self._render(config).accepts:  # otherwise nothing of ours to defeat, and no need to ask nftables
            try:
                found = warnings(config, self._forward_drops())
            except NftError:
                return  # nftables cannot be asked: `keep` has said so if the config needs it; keep what we knew
            except Exception as exc:  # never the end of the daemon (H1)
                self._on_error(f"nftables: reading other tables' forward chains: unexpected error: {exc!r}")
                return
        for line in found:
            if line not in self.warnings:
                self._on_error(line)
        for line in self.warnings:
            if line not in found:
                log.info("no longer: %s", line)
        self.warnings = found

    def _forward_drops(self) -> list[ForwardDrop]:
        """Other tables' forward drops: asked of libnftables only when those chains or their rules changed
        (nf_tables' netlink says which: fingerprint.py), never while no transaction happened at all."""
        try:
            generation = self.netlink.generation()
            if self._drops is not None and self._drops.generation == generation:
                return self._drops.drops
            parsed = [parse_chain(raw) for (family, table), bodies in self.netlink.chain_dump().items()
                      if family in ROUTED_FAMILIES and (family, table) not in self._ours() for raw in bodies]
            objects = [chain_json(info) for info in parsed]
            family_of = {id(obj["chain"]): info.family for obj, info in zip(objects, parsed, strict=True)}
            listed = forward_base_chains(objects, self.name)
            chains = tuple((json.dumps(c, sort_keys=True),
                            self.netlink.rules_digest(family_of[id(c)], str(c["table"]), str(c["name"])))
                           for c in listed)
        except FingerprintError:
            return observe_forward_drops(self.table.query, self.name)  # libnftables the whole way
        if self._drops is not None and self._drops.chains == chains:
            drops = self._drops.drops
        else:
            drops = forward_drops_of(listed, self.table.query)
        self._drops = _Drops(generation, chains, drops)
        return drops

    def _ours(self) -> tuple[tuple[int, str], ...]:
        return (NFPROTO_INET, self.name), (NFPROTO_INET, self.ipsec.table)

    def rename(self, table: str, config: Config) -> None:
        """The config names another table: put `config`'s rules in the new one, then remove the old one (never
        a moment with neither: review L8), and keep (and watch) the new one from now on."""
        if table == self.name:
            return
        old = (self.table, self.ipsec)
        self.close()
        self.name, self._drops = table, None
        self.table, self.ipsec = NftTable(table, self.netlink), NftTable(ipsec_table(table), self.netlink)
        self.watch = NftWatch(self._on_change, table=table)
        self.ipsec_watch = NftWatch(self._on_change, table=ipsec_table(table))
        self.keep(config)
        for each in old:
            self._remove(each)
        if self._loop is not None:
            self.start(self._loop)

    def remove(self) -> None:
        """on_exit = "remove": both tables go (the drops last: nothing of ours is left to leak then)."""
        self._remove(self.table)
        self._remove(self.ipsec)

    def _remove(self, table: NftTable) -> None:
        try:
            table.remove()
        except NftError as exc:
            self._on_error(f"nftables: {exc}")
        except Exception as exc:
            self._on_error(f"nftables: unexpected error: {exc!r}")

    def close(self) -> None:
        self.netlink.close()
        self.watch.close()
        self.ipsec_watch.close()
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
