"""Where the daemon meets every liveness detector: the Cisco keepalive engine (greupd/keepalive/), the BFD engine,
and dampening, combined into one verdict per tunnel (down while any says down, liveness/verdict.py).

The daemon asks `alive()` for desired_state, `is_up(name)` for the reports, and `annotate` for status; it
gets one `LivenessVerdict` per flip of a tunnel's combined verdict. A new detector is one more engine here
(its codec and state machine beside bfd_*), not a change to the daemon.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from greupd.config import Config
from greupd.keepalive.engine import KeepaliveEngine, LivenessChange
from greupd.keepalive.engine import targets_from_config as keepalive_targets
from greupd.liveness import bfd_memory
from greupd.liveness.bfd_engine import BfdEngine
from greupd.liveness.bfd_engine import targets_from_config as bfd_targets
from greupd.liveness.bfd_session import BfdChange
from greupd.liveness.dampening import DampeningSettings
from greupd.liveness.verdict import LivenessVerdict, VerdictChange, Verdicts
from greupd.model import Observed
from greupd.status import KeepaliveStatus, TunnelStatus

__all__ = ["LivenessRoom", "LivenessVerdict"]

log = logging.getLogger("greupd.liveness")

# The journal's reason for a tunnel a detector took down, and for its return.
DOWN_REASON = {"keepalive": "keepalive-timeout", "bfd": "bfd-down", "dampening": "dampened"}
UP_REASON = {"keepalive-timeout": "keepalive-restored", "bfd-down": "bfd-restored",
             "dampened": "dampening-released"}


class LivenessRoom:
    def __init__(self, on_change: Callable[[str, LivenessVerdict], None], state_dir: Path | None = None,
                 on_path_mtu: Callable[[str], None] | None = None) -> None:
        self._on_change = on_change
        self._state_dir = state_dir  # where BFD sessions are kept across a restart (bfd_memory.py)
        # on_path_mtu(name): a tunnel with mtu = "probe" measured a new MTU (#23)
        self.keepalive = KeepaliveEngine(self._keepalive_changed, on_path_mtu=None if on_path_mtu is None
                                         else lambda name, _: on_path_mtu(name))
        self.bfd = BfdEngine(self._bfd_changed)
        self._verdicts = Verdicts()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._down_reason: dict[str, str] = {}
        self._watched: dict[str, tuple[str, ...]] = {}  # tunnel -> the detectors configured for it
        self._alive: dict[str, bool] | None = None  # alive(), kept between configurations
        self._synced: dict[str, bool] = {}  # the keepalive verdict _sync last passed on, per tunnel
        self._alive_of = -1  # the keepalive engine's generation it was built for

    # --- the daemon's side ---------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop, config: Config) -> None:
        """The keepalive engine's first targets come from its restart memory (greupd/keepalive/restart.py,
        which configures it itself); BFD and dampening start from `config`."""
        self._loop = loop
        self.keepalive.start(loop)
        self.bfd.start(loop)
        if self._state_dir is not None:
            self.bfd.resume(bfd_memory.load(self._state_dir))
            try:  # used once: a crash later must not resume what is stale by then
                bfd_memory.save(self._state_dir, {})
            except OSError as exc:
                log.warning("cannot remove %s: %s", self._state_dir / bfd_memory.FILE, exc.strerror or exc)
        self._configure_others(config)

    def configure(self, config: Config, probed: Config | None = None) -> None:
        """Every detector from a new config (a reload); keepalives probe the tunnels of `probed` (default:
        `config`), which leaves out those held back for want of their IPsec drops (#21 M1)."""
        self.keepalive.configure(keepalive_targets(probed if probed is not None else config))
        self._configure_others(config)

    def configure_keepalive(self, probed: Config) -> None:
        """The IPsec drops in the kernel changed: keepalives probe the tunnels of `probed` now (#21 M1)."""
        self.keepalive.configure(keepalive_targets(probed))
        self._synced.clear()

    def after_pass(self, answerable: list[str], before: Observed, after: Observed) -> None:
        """What a reconcile pass tells the keepalive engine: whose own end works, and the links' underlay (#21 M2)."""
        self.keepalive.after_pass(answerable, before, after)

    def _configure_others(self, config: Config) -> None:
        self._alive = None
        self._synced.clear()
        targets = bfd_targets(config)
        self.bfd.configure(targets)
        with_bfd = {target.name for target in targets}
        for name in self._verdicts.names() - with_bfd:
            for change in self._verdicts.forget(name, ["bfd"]):
                self._emit(change, "bfd")
        self._watched = {t.name: tuple(d for d, on in (("keepalive", t.keepalive), ("bfd", t.bfd)) if on)
                         for t in config.tunnels if t.enabled and (t.keepalive or t.bfd)}
        for change in self._verdicts.configure_dampening({
                t.name: DampeningSettings(t.dampening.half_life, t.dampening.suppress, t.dampening.reuse,
                                          t.dampening.max_hold)
                for t in config.tunnels if t.enabled and t.dampening is not None}):
            self._emit(change, "dampening")
        self._arm()

    def status(self, name: str) -> KeepaliveStatus | None:
        return self.keepalive.status(name)

    def set_answerable(self, names: list[str]) -> None:
        self.keepalive.set_answerable(names)

    def is_up(self, name: str, now: float | None = None) -> bool:
        self._sync(name, now)
        return self._verdicts.is_up(name)

    def alive(self) -> dict[str, bool]:
        """Tunnel -> up, for every tunnel a detector watches (desired_state's `is_up`).

        Asked before every pass: built once per configuration of the detectors, then kept up to date by the
        verdicts' flips (_emit), so that a hub's pass for a few flipped tunnels does not walk ten thousand
        (#26). The keepalive engine is also configured from outside (its restart memory): its generation."""
        if self._alive is None or self._alive_of != self.keepalive.generation:
            self._synced.clear()
            names = set(self.keepalive.names()) | set(self.bfd.names()) | self._verdicts.names()
            now = self._now()  # once, not per tunnel: in the lab's UML every clock read is a system call
            self._alive = {name: self.is_up(name, now) for name in names}
            self._alive_of = self.keepalive.generation
        return dict(self._alive)

    def annotate(self, statuses: list[TunnelStatus]) -> list[TunnelStatus]:
        for status in statuses:
            name = status["name"]
            if name in self._watched:
                self._sync(name)
                status["liveness"] = {"down_by": list(self._verdicts.down_by(name))}
            bfd = self.bfd.status(name)
            if bfd is not None:
                status["bfd"] = bfd
        return self.keepalive.annotate(statuses)  # path_mtu (#23)

    def close(self, admin_down: bool = False) -> None:
        """Stop every detector. BFD peers hear AdminDown with admin_down (on_exit = "remove"); otherwise the
        Up sessions are kept in state_dir for the next greupd to carry on."""
        if self._state_dir is not None:
            try:
                bfd_memory.save(self._state_dir, {} if admin_down else self.bfd.snapshot())
            except OSError as exc:
                log.warning("cannot keep the BFD sessions in %s: %s", self._state_dir, exc.strerror or exc)
        self.keepalive.close()
        self.bfd.close(admin_down)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._loop = None

    # --- inside --------------------------------------------------------------------------------------

    def _now(self) -> float:
        return self._loop.time() if self._loop is not None else 0.0

    def _sync(self, name: str, now: float | None = None) -> None:
        """The keepalive verdict as it stands: one resumed at start (greupd/keepalive/restart.py) was set
        without a callback. BFD's come by callback only (a session starts up)."""
        if self.keepalive.watches(name):
            up = self.keepalive.is_up(name)
            if self._synced.get(name) != up:  # the clock only for news: in the lab's UML a read is a system call
                self._synced[name] = up
                self._verdicts.set(name, "keepalive", up, self._now() if now is None else now, "")
        else:
            self._verdicts.forget(name, ["keepalive"])

    def _keepalive_changed(self, name: str, change: LivenessChange) -> None:
        self._detector_changed(name, "keepalive", change.up, change.message)

    def _bfd_changed(self, name: str, change: BfdChange) -> None:
        self._detector_changed(name, "bfd", change.up, change.message)

    def _detector_changed(self, name: str, detector: str, up: bool, message: str) -> None:
        for change in self._verdicts.set(name, detector, up, self._now(), message):
            self._emit(change, detector)
        self._arm()

    def _emit(self, change: VerdictChange, detector: str) -> None:
        if self._alive is not None:
            self._alive[change.name] = change.up
        if change.up:
            reason = UP_REASON.get(self._down_reason.pop(change.name, ""), "keepalive-restored")
        else:
            decider = "dampening" if "dampening" in change.down_by else detector
            reason = self._down_reason[change.name] = DOWN_REASON[decider]
        message = change.message
        if len(self._watched.get(change.name, ())) > 1 or self._verdicts.dampening(change.name) is not None:
            message += f" (down by {', '.join(change.down_by)})" if change.down_by else " (every detector says up)"
        self._on_change(change.name, LivenessVerdict(change.up, reason, message, change.down_by))

    def _arm(self) -> None:
        """One timer for dampening's releases."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._loop is None:
            return
        when = self._verdicts.wake_at(self._now())
        if when is not None:
            self._timer = self._loop.call_at(when, self._release)

    def _release(self) -> None:
        self._timer = None
        for change in self._verdicts.tick(self._now()):
            self._emit(change, "dampening")
        self._arm()
