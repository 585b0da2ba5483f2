"""What a restarted daemon believes about its peers before its first probe is answered (review H3).

A keepalive verdict lives in the daemon's memory. Starting every tunnel "up" would, after a crash, a watchdog
abort or a package upgrade, re-install the routes of a tunnel whose peer is dead (the backup loses its traffic
for `retries` intervals) and journal a false "up". So a tunnel starts with what is known of it:

1. the verdict saved in state_dir (`keepalive.json`, written at every flip), if it is of this boot and for the
   tunnel's current endpoints;
2. else what the kernel shows greupd left behind: an owned link whose routes are all gone (action "routes"),
   or that is administratively down (action "link"), was withdrawn for a dead peer;
3. else up, as before: a tunnel seen for the first time keeps its routes until keepalives prove it dead.

A tunnel started down comes up after `up_after` replies, like any other. `initial_verdicts` is pure;
`VerdictMemory` is the daemon's side: it resumes them at start and saves them (through greupd/state.py) once per
loop step after they flip.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence

from greupd.config import Config
from greupd.keepalive.engine import KeepaliveEngine, KeepaliveTarget, targets_from_config
from greupd.model import Observed
from greupd.report import now_iso
from greupd.state import KeepaliveVerdict, StateDir, StateError, endpoints_of

__all__ = ["VerdictMemory", "initial_verdicts", "target_endpoints"]
log = logging.getLogger("greupd")

SAVE_EVERY = 1.0  # s: the verdicts are written at most this often (VerdictMemory)


def target_endpoints(target: KeepaliveTarget) -> str:
    """What a saved verdict is about: it says nothing about a tunnel whose endpoints or keys changed since."""
    return endpoints_of(target.local, target.remote, target.okey, target.ikey)


def initial_verdicts(targets: Sequence[KeepaliveTarget], saved: Mapping[str, KeepaliveVerdict], config: Config,
                     observed: Observed | None) -> dict[str, bool]:
    """Tunnel name -> up, for every target (see the module's docstring for the order of trust)."""
    tunnels = {tunnel.name: tunnel for tunnel in config.tunnels}
    verdicts: dict[str, bool] = {}
    for target in targets:
        kept = saved.get(target.name)
        if kept is not None and kept.endpoints == target_endpoints(target):
            verdicts[target.name] = kept.up
            continue
        tunnel = tunnels.get(target.name)
        link = observed.links.get(target.name) if observed is not None else None
        up = True
        if tunnel is not None and tunnel.keepalive is not None and link is not None and link.owned:
            if tunnel.keepalive.action == "link":
                up = link.up
            elif tunnel.routes:
                up = any(route.ifname == target.name for route in observed.routes) if observed else True
        verdicts[target.name] = up
    return verdicts


class VerdictMemory:
    """The keepalive verdicts a restart resumes: when each last flipped, saved once per loop step, and at most
    once per SAVE_EVERY: each save writes every tunnel's verdict (and syncs it to disk), and when a hub's
    uplink fails ten thousand verdicts flip over a second or more, loop step after loop step (#26). A flip
    after a quiet second is saved at once; a crash within a burst resumes what was saved at most
    SAVE_EVERY earlier (those tunnels are then declared down again after `retries` intervals)."""

    def __init__(self, engine: KeepaliveEngine, state: StateDir | None, fail: Callable[[str], None]) -> None:
        self.engine = engine
        self.state = state  # None: nothing is kept (a daemon run without a state_dir, as in some tests)
        self._fail = fail
        self._since: dict[str, str] = {}
        self._changed = False
        self._saved_at = -SAVE_EVERY
        self._config: Config | None = None  # the latest, for a save put off to the end of a burst
        self._later: asyncio.TimerHandle | None = None
        # The targets of the config last saved for, and each one's endpoints text (made once per config).
        self._targets: tuple[Config | None, list[KeepaliveTarget], dict[str, str]] = (None, [], {})

    def flipped(self, name: str) -> None:
        self._since[name] = now_iso()
        self._changed = True  # saved by save_if_changed: a thousand tunnels may flip in one loop step

    def resume(self, config: Config, observe: Callable[[], Observed]) -> None:
        """Configure the engine with what a previous run learned; `observe` is asked only if it is needed."""
        targets = targets_from_config(config)
        saved: dict[str, KeepaliveVerdict] = {}
        if self.state is not None:
            try:
                saved = self.state.verdicts()
            except StateError as exc:
                self._fail(f"{exc}; keepalives start from what the kernel shows")
        observed = None
        if any(target_endpoints(t) != (saved[t.name].endpoints if t.name in saved else None) for t in targets):
            try:
                observed = observe()
            except OSError as exc:
                self._fail(f"cannot read the kernel's state to resume keepalive verdicts: {exc}")
        verdicts = initial_verdicts(targets, saved, config, observed)
        self._since = {name: saved[name].since if name in saved and saved[name].up == up else now_iso()
                       for name, up in verdicts.items()}
        self.engine.configure(targets, verdicts)
        down = sorted(name for name, up in verdicts.items() if not up)
        if down:
            log.info("keepalive verdicts resumed: %s down until their peers answer", ", ".join(down))
        self._save(targets)

    def save_if_changed(self, config: Config) -> None:
        # After the pass that acted on the flips; a crash in between is covered by reading the kernel at start.
        if not self._changed:
            return
        now = time.monotonic()
        if now < self._saved_at + SAVE_EVERY:
            self._config = config
            if self._later is None:
                try:
                    loop = asyncio.get_running_loop()
                except RuntimeError:  # no loop (a test): save now
                    pass
                else:
                    self._later = loop.call_later(self._saved_at + SAVE_EVERY - now, self._save_later)
                    return
        self._changed = False
        if self._targets[0] is not config:
            targets = targets_from_config(config)
            self._targets = (config, targets, {t.name: target_endpoints(t) for t in targets})
        self._save(self._targets[1], self._targets[2])
        # The next no sooner than SAVE_EVERY, nor than ten times what this one took: a save of ten thousand
        # verdicts takes seconds in the lab's UML, and must not become most of what the loop does.
        took = time.monotonic() - now
        self._saved_at = now + max(0.0, 10 * took - SAVE_EVERY)

    def flush(self, config: Config) -> None:
        """Save now what a burst put off (the daemon stops)."""
        if self._later is not None:
            self._later.cancel()
            self._later = None
        if self._changed:
            self._saved_at = -SAVE_EVERY
            self.save_if_changed(config)

    def _save_later(self) -> None:
        self._later = None
        if self._config is not None:
            self.save_if_changed(self._config)

    def _save(self, targets: Sequence[KeepaliveTarget], endpoints: Mapping[str, str] | None = None) -> None:
        if self.state is None:
            return
        if endpoints is None:
            endpoints = {t.name: target_endpoints(t) for t in targets}
        now = now_iso()
        verdicts = {name: KeepaliveVerdict(self.engine.is_up(name), self._since.get(name) or now, endpoints[name])
                    for name in self.engine.names() if name in endpoints}
        try:
            self.state.save_verdicts(verdicts)
        except StateError as exc:
            self._fail(f"{exc}; a restart will not know which peers were dead")
