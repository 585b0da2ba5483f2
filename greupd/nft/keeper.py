"""The daemon's nftables table kept as the config renders it: applied when it differs, watched for changes.

The nftables side of the reconcile pass (render.py renders, table.py applies, watch.py listens); a
change someone else makes to the table only marks it (`on_change`), and the next pass puts it back.
Failures are reported through `on_error` and never stop the daemon: the tunnels do not depend on the table.
Each keep also looks at the other tables' forward hooks (foreign.py, review M9): a drop there that defeats
our forward accepts is a standing warning (`warnings`, in status), journalled through `on_error` once when
it appears.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from greupd.config import Config
from greupd.nft.foreign import observe_forward_drops, tunnels_with_accepts, warnings
from greupd.nft.render import render_ruleset
from greupd.nft.table import NftError, NftTable
from greupd.nft.watch import NftWatch, NftWatchError

log = logging.getLogger("greupd")


class NftKeeper:
    def __init__(self, table: str, on_change: Callable[[], None], on_error: Callable[[str], None]) -> None:
        self._on_change = on_change
        self._on_error = on_error
        self._loop: asyncio.AbstractEventLoop | None = None
        self.name = table
        self.table = NftTable(table)
        self.watch = NftWatch(on_change, table=table)
        self.warnings: list[str] = []  # other tables' forward drops that defeat our accepts, while they last

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        try:
            self.watch.start(loop)
        except NftWatchError as exc:
            self._on_error(f"nftables: cannot watch for changes, the table will not be repaired on its own: {exc}")

    def keep(self, config: Config) -> None:
        """Make the table what `config` renders, unless it already is (one dry-run compare, no transaction)."""
        ruleset = render_ruleset(config)
        try:
            if not self.table.matches(ruleset):
                self.table.apply(ruleset)
        except NftError as exc:
            self._on_error(f"nftables: {exc}")
        self._look_for_forward_drops(config)

    def _look_for_forward_drops(self, config: Config) -> None:
        found: list[str] = []
        if tunnels_with_accepts(config):  # otherwise nothing of ours to defeat, and no need to ask nftables
            try:
                found = warnings(config, observe_forward_drops(self.table.query, self.name))
            except NftError:
                return  # nftables cannot be asked: `keep` has said so if the config needs it; keep what we knew
        for line in found:
            if line not in self.warnings:
                self._on_error(line)
        for line in self.warnings:
            if line not in found:
                log.info("no longer: %s", line)
        self.warnings = found

    def rename(self, table: str, config: Config) -> None:
        """The config names another table: put `config`'s rules in the new one, then remove the old one (never
        a moment with neither: review L8), and keep (and watch) the new one from now on."""
        if table == self.name:
            return
        old = self.table
        self.watch.close()
        self.name, self.table, self.watch = table, NftTable(table), NftWatch(self._on_change, table=table)
        self.keep(config)
        try:
            old.remove()
        except NftError as exc:
            self._on_error(f"nftables: {exc}")
        if self._loop is not None:
            self.start(self._loop)

    def remove(self) -> None:
        try:
            self.table.remove()
        except NftError as exc:
            self._on_error(f"nftables: {exc}")

    def close(self) -> None:
        self.watch.close()
