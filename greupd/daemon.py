"""The daemon: one asyncio loop that wires config, planner, kernel, keepalives, nftables, systemd and control.

Level-triggered: a netlink event, a keepalive verdict, an nftables change, SIGHUP or `greupd reload` only
marks work in the queue (greupd/queue.py); one loop step then takes it and runs `reconcile(names)`: observe
those tunnels, plan, apply. Start, reload, drift repair and restart all run through that same pass, and the
pass is plain synchronous code (the kernel answers within the system call), so passes never overlap.
What the pass did becomes tunnel state changes in greupd/report.py, which this module journals.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import time
from pathlib import Path

from greupd.config import Config, ConfigError, load_config
from greupd.control import AnotherDaemonHere, ControlServer, ControlSocketBusy, claim_netns, control_socket
from greupd.events import EventLog
from greupd.keepalive.engine import KeepaliveEngine, LivenessChange, targets_from_config
from greupd.model import Desired, Observed, action_tunnel, desired_state
from greupd.netlink.kernel import Kernel, KernelWatch
from greupd.nft.keeper import NftKeeper
from greupd.plan import describe, plan_changes
from greupd.queue import RESYNC_EVERY, RETRY_AFTER, WorkQueue, settle
from greupd.report import Reports
from greupd.state import StartConfig, StateError
from greupd.status import DaemonStatus, ReloadResult, TunnelStatus
from greupd.systemd import Notifier, status_line

log = logging.getLogger("greupd")


class ControlSocketUnusable(Exception):
    """The control socket cannot be created at its path (review L9: read-only under ProtectSystem=strict)."""


class Daemon:
    def __init__(self, config_path: Path, config: Config, socket_path: Path | None = None,
                 start: StartConfig | None = None) -> None:
        self.config_path = config_path
        self.config = config
        self.socket_path = socket_path or control_socket(config)
        self.generation = 1
        self.start = start  # where the last good config is kept, and a rejection at start (#11 H4)
        self.last_error: str | None = start.rejection() if start is not None else None
        self.reports = Reports()
        self.events = EventLog()
        self.notifier = Notifier()
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self.queue: WorkQueue[ReloadResult] = WorkQueue(self._wake.set)
        self.kernel = Kernel()
        self.watch = KernelWatch(self.kernel, self.queue.mark)
        self.keepalive = KeepaliveEngine(self._on_liveness)
        self.nft = NftKeeper(config.daemon.nft_table, self.queue.mark_nft, self._fail)
        self._published_status = ""
        self._loop: asyncio.AbstractEventLoop | None = None

    def _on_liveness(self, name: str, change: LivenessChange) -> None:
        self.reports.note_liveness(name, change)
        self.queue.mark_liveness(name)

    def request_reload(self) -> asyncio.Future[ReloadResult]:
        """SIGHUP, `systemctl reload` and `greupd reload` alike: the next loop step reloads and answers here."""
        assert self._loop is not None
        answer: asyncio.Future[ReloadResult] = self._loop.create_future()
        self.queue.mark_reload(answer)
        return answer

    def _request_stop(self) -> None:
        self._stop.set()
        self._wake.set()

    # --- the loop -------------------------------------------------------------------------------------

    async def run(self) -> int:
        loop = self._loop = asyncio.get_running_loop()
        netns_lock = claim_netns()  # before anything else: a second daemon here must not touch the kernel
        control = ControlServer(self.socket_path, self.status, self.request_reload, on_error=self.events.error)
        try:
            await control.start()
        except OSError as exc:  # review L9
            raise ControlSocketUnusable(
                f"cannot create the control socket {self.socket_path}: {exc.strerror or exc} (under greupd.service"
                " only /run/greupd is writable: put control_socket there, or add ReadWritePaths= in a drop-in)"
            ) from exc
        self.watch.start(loop)
        self.keepalive.start(loop)
        for sig, handler in ((signal.SIGHUP, self.queue.mark_reload), (signal.SIGTERM, self._request_stop),
                             (signal.SIGINT, self._request_stop)):
            loop.add_signal_handler(sig, handler)
        self.keepalive.configure(targets_from_config(self.config))
        # The table (clamp, NAT, forward accepts) before any route sends traffic into a tunnel (#11): its
        # rules match interface names, so they can go in before the links exist.
        self.nft.keep(self.config)
        self.reconcile(None)
        self.nft.start(loop)
        self.notifier.ready(self._status_text())
        if self.start is not None and self.start.rejected is not None:  # trust (#11 H4)
            self.events.config_rejected(str(self.start.rejected))
        else:
            self._keep_as_last_good()
        self.events.started(self.generation, self.config.files, len(self.config.tunnels))
        self.notifier.start_watchdog(loop, on_error=self._fail)
        loop.call_later(RESYNC_EVERY, self._resync)
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if self._stop.is_set():
                    break
                self._step()
        finally:
            self.queue.cancel_reloads()
            self.notifier.stopping()
            self.events.stopping(self.config.daemon.on_exit)
            await control.close()
            self._shutdown()
            netns_lock.close()
        return 0

    def _step(self) -> None:
        """One turn of the loop: a reload if one was asked for, then whatever is marked and not paused."""
        answers = self.queue.take_reload()
        if answers is not None:
            settle(answers, self.reload)
        # After a reload too: what was marked meanwhile is still to do, and the wake-up that said so is spent.
        batch = self.queue.take_ready(time.monotonic())
        if batch.nft:  # first: a repair may put routes back, and they need the table
            self.nft.keep(self.config)
        if batch.names is None or batch.names:
            self.reconcile(batch.names, batch.repairs)

    def _resync(self) -> None:
        """The safety net (review M1): a full pass now and then, for what no event and no refusal told us."""
        assert self._loop is not None
        self.queue.mark(None)
        self.queue.mark_nft()
        self._loop.call_later(RESYNC_EVERY, self._resync)

    # --- the pass ------------------------------------------------------------------------------------

    def desired(self) -> Desired:
        return desired_state(self.config, {name: self.keepalive.is_up(name) for name in self.keepalive.names()})

    def reconcile(self, names: frozenset[str] | None, repairs: frozenset[str] = frozenset()) -> None:
        """Observe, plan, apply for `names` (None: everything), then report what changed.

        `repairs`: the names the kernel told us about; a tunnel that keeps needing repair is being fought over.
        """
        try:
            self._reconcile(names, repairs)
        except OSError as exc:
            # Transient (a dump interrupted by a concurrent change, memory pressure): report it and look at
            # everything again shortly rather than die and take the watch with us.
            self._fail(f"cannot read or change the kernel's state: {exc}; retrying")
            assert self._loop is not None
            self._loop.call_later(RETRY_AFTER, self.queue.mark, None)

    def _reconcile(self, names: frozenset[str] | None, repairs: frozenset[str]) -> None:
        desired = self.desired()
        observed = self.kernel.observe(desired, names)
        plan = plan_changes(desired, observed)
        errors = self.kernel.apply(plan.actions) if plan.actions else []
        if plan.actions:
            log.debug("applied:\n%s", describe(plan))
        touched = frozenset(t for a in plan.actions if (t := action_tunnel(a)) is not None)
        refused = frozenset(e.tunnel for e in errors if e.tunnel is not None)
        # What the kernel acknowledged is as planned; look again only where it refused something.
        after = observed.updated(Observed.as_planned(desired, touched - refused,
                                                     self.kernel.indices(touched - refused)))
        if refused:
            after = after.updated(self.kernel.observe(desired, refused))
        for error in errors:
            if error.tunnel is None:
                self._fail(str(error))
        for change in self.reports.update(self.config, observed, plan, errors, after, self.keepalive.is_up):
            self.events.emit(change)
        self._publish_status()
        assert self._loop is not None
        # Refused actions are tried again (review M1): what held them (a foreign route on our prefix, memory
        # pressure) may go away without an event that concerns us.
        now = time.monotonic()
        self.queue.note_applied(t.name for t in self.config.tunnels if after.covers(t.name) and t.name not in refused)
        for retry in self.queue.note_refused(sorted(refused), now):
            log.info("tunnel %s: the kernel refused an action; trying again in %.0f s", retry.name, retry.seconds)
            self._loop.call_later(retry.seconds, self.queue.mark_retry, retry.name)
        fought = [n for n in touched & repairs if n in self.reports.records]
        for pause in self.queue.note_repairs(fought, time.monotonic()):
            self._fail(str(pause))
            self._loop.call_later(pause.seconds, self.queue.mark, {pause.name})

    def _fail(self, message: str) -> None:
        self.last_error = message
        self.events.error(message)

    # --- reload, status, stop -------------------------------------------------------------------------

    def reload(self) -> ReloadResult:
        try:
            config = load_config(self.config_path)
        except ConfigError as exc:
            self.last_error = f"reload rejected, previous config stays in force:\n{exc}"
            self.events.config_rejected(str(exc))
            self.notifier.status(self._status_text())
            return {"ok": False, "generation": self.generation, "error": str(exc)}
        self.notifier.reloading()
        before = {t.name: t for t in self.config.tunnels}
        after = {t.name: t for t in config.tunnels}
        changed = frozenset(n for n in before.keys() | after.keys() if before.get(n) != after.get(n))
        # Tunnels in error are looked at again too (review M1): a reload is how an admin says "try again".
        troubled = frozenset(n for n, r in self.reports.records.items() if r.state == "error" and n in after)
        # The table first with the rules of both configs, so a route the new one adds meets its clamp and
        # NAT, and a route the old one had keeps them until it is gone; then the table of the new one (#11).
        both = dataclasses.replace(config, tunnels=(*config.tunnels, *(t for n, t in before.items() if n in changed)))
        self.config = config
        self.last_error = None
        self.queue.forget(after)
        self.nft.rename(config.daemon.nft_table, both)
        self.nft.keep(both)
        self.keepalive.configure(targets_from_config(config))
        # Unchanged tunnels are not even looked at (no flap, and a reload of one tunnel among thousands
        # costs a few requests); drift on them is the watch's business.
        self.reconcile(changed | troubled)
        self.nft.keep(config)
        self.generation += 1
        self._keep_as_last_good()
        self.events.config_reloaded(self.generation, [str(f) for f in config.files])
        self.notifier.ready(self._status_text())
        # Accepted, but the kernel may have refused some of it (review L8): say which tunnels, and why.
        refused = [f"tunnel {r['name']}: {r['error']}" for r in self.tunnel_statuses()
                   if r["state"] == "error" and r["name"] in changed | troubled]
        error = "\n".join(filter(None, [self.last_error, *refused])) or None
        return {"ok": True, "generation": self.generation, "error": error}

    def _keep_as_last_good(self) -> None:
        """The config now in force is the one to start with if the file on disk stops validating (#11 H4)."""
        if self.start is None:
            return
        try:
            self.start.state.save_last_good(self.config_path, self.config)
        except StateError as exc:
            self._fail(f"{exc}; a restart with an invalid config on disk will not be able to fall back to this one")

    def _shutdown(self) -> None:
        self.keepalive.close()
        self.nft.close()
        self.watch.close()
        if self.config.daemon.on_exit == "remove":
            empty = Desired({}, {})
            for error in self.kernel.apply(plan_changes(empty, self.kernel.observe(empty)).actions):
                self._fail(str(error))
            self.nft.remove()
        self.kernel.close()

    def _publish_status(self) -> None:
        # Only when it changed: a drift repair is no news to `systemctl status`, and every STATUS= is a
        # blocking send to systemd.
        text = self._status_text()
        if text != self._published_status:
            self._published_status = text
            self.notifier.status(text)

    def _status_text(self) -> str:
        return status_line(self.tunnel_statuses())

    def tunnel_statuses(self) -> list[TunnelStatus]:
        return self.reports.statuses(self.config, self.keepalive.status)

    def status(self) -> DaemonStatus:
        return {"config": str(self.config_path), "generation": self.generation, "last_error": self.last_error,
                "pid": os.getpid(), "netlink_requests": self.kernel.requests, "tunnels": self.tunnel_statuses()}


def run_daemon(config_path: Path, config: Config, socket_override: str | None = None,
               start: StartConfig | None = None) -> int:
    """Entry point of `greupd run`, with the config the CLI has just loaded and validated."""
    logging.basicConfig(level=os.environ.get("GREUPD_LOG_LEVEL", "INFO"), format="greupd: %(message)s")

    async def main() -> int:
        return await Daemon(config_path, config, control_socket(config, socket_override), start).run()

    try:
        return asyncio.run(main())
    except (AnotherDaemonHere, ControlSocketBusy, ControlSocketUnusable) as exc:
        log.error("%s", exc)
        return 1
