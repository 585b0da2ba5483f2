"""The daemon: one asyncio loop that wires config, planner, kernel, keepalives, nftables, systemd and control.

Level-triggered: a netlink event, a keepalive verdict, an nftables change, SIGHUP or `greupd reload` only
marks work in the queue (greupd/queue.py); one loop step then takes it and runs `reconcile(names)`: observe
those tunnels, plan, apply. Start, reload, drift repair and restart all run through that same pass, and the
pass is plain synchronous code (the kernel answers within the system call), so passes never overlap.
What the pass did becomes tunnel state changes in greupd/report.py, which this module journals.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

from greupd.config import Config, ConfigError, load_config
from greupd.control import CannotServe, ControlServer, control_socket
from greupd.doctor.runtime import HostWarnings
from greupd.events import EventLog, log_like_events
from greupd.ipsec.supervisor import IpsecSupervisor
from greupd.keepalive.restart import VerdictMemory
from greupd.liveness.room import LivenessRoom, LivenessVerdict
from greupd.loop_guard import describe, guard_loop, run_steps
from greupd.metrics import MetricsPublisher
from greupd.model import Desired, DesiredMemo
from greupd.netlink.kernel import Kernel, KernelWatch
from greupd.nft.keeper import NftKeeper
from greupd.queue import RESYNC_EVERY, RETRY_AFTER, Batch, Retry, WorkQueue, reload_scope, settle
from greupd.reconcile import reconcile_pass, remove_everything
from greupd.report import Reports
from greupd.state import StartConfig, last_good_saved
from greupd.status import DaemonStatus, ReloadResult, TunnelStatus
from greupd.systemd import Notifier

log = logging.getLogger("greupd")


class Daemon:
    def __init__(self, config_path: Path, config: Config, socket_path: Path | None = None,
                 start: StartConfig | None = None) -> None:
        self.config_path, self.config, self.generation = config_path, config, 1
        self.socket_path = socket_path or control_socket(config)
        self.start = start  # where the last good config is kept, and a rejection at start (#11 H4)
        self.last_error: str | None = start.rejection() if start is not None else None
        self.reports, self._desired = Reports(), DesiredMemo(lambda: self.nft.guard)  # the IPsec drops held (M1)
        self.events, self.notifier = EventLog(), Notifier(on_error=self._fail)
        self._wake, self._stop = asyncio.Event(), asyncio.Event()
        self.queue: WorkQueue[ReloadResult] = WorkQueue(self._wake.set)
        self.kernel, self.doctor = Kernel(), HostWarnings(self._fail)  # #24: doctor's run-time checks
        self.liveness = LivenessRoom(self._on_liveness, start.state.path if start else None, self.queue.mark_retry)
        self.watch = KernelWatch(self.kernel, self.queue.mark, self.liveness.keepalive.path_mtu.route_changed)  # #23
        self.nft = NftKeeper(config.daemon.nft_table, self.queue.mark_nft, self._fail, self._guarded)
        self.ipsec = IpsecSupervisor(config, self.events.ipsec_changed, self._fail)  # runs on its own (supervisor.py)
        self.metrics = MetricsPublisher(self.status, lambda: self.config.daemon, start, self._fail)  # metrics.py
        self._loop: asyncio.AbstractEventLoop | None = None
        self.verdicts = VerdictMemory(self.liveness.keepalive, start.state if start else None, self._fail)  # #11 H3

    def _on_liveness(self, name: str, change: LivenessVerdict) -> None:
        self.reports.note_liveness(name, change)
        self.queue.mark_liveness(name)
        self.verdicts.flipped(name)

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
        guard_loop(loop, self._fail, reload=self.queue.mark_reload, stop=self._request_stop)  # signals, I4
        control = ControlServer(self.socket_path, self.status, self.request_reload, on_error=self.events.error,
                                metrics=self.metrics.scrape, netns_lock=True)
        await control.start()
        self.watch.start(loop)
        self.liveness.start(loop, self.config)  # BFD and dampening; the keepalive verdicts are resumed below
        self.liveness.set_answerable([])  # nothing is known to work before the first pass (#11 H5)
        self.nft.keep(self.config)  # the tables (IPsec drops, clamp, NAT) before any route, link or probe (#11)
        self.verdicts.resume(self.nft.probed(self.config), lambda: self.kernel.observe(self.desired()))
        self.reconcile(Batch(None))
        self.nft.start(loop)
        self.notifier.ready(self.reports.status_text(self.config))
        if self.start is not None and self.start.rejected is not None:
            self.events.config_rejected(str(self.start.rejected), at_start=True)
        else:
            self._keep_as_last_good()
        self.events.started(self.generation, self.config.files, len(self.config.tunnels), last_good_saved(self.start))
        self.notifier.start_watchdog(loop, on_error=self._fail)
        loop.call_later(RESYNC_EVERY, self._resync)
        try:
            await run_steps(loop, self._wake, self._stop, self._step, self._fail, again=self.queue.mark_everything)
        finally:
            self.queue.cancel_reloads()
            self.notifier.stopping()
            self.events.stopping(self.config.daemon.on_exit)
            self._shutdown()
            await control.close()  # last: it holds the netns lock while _shutdown may remove our links
        return 0

    def _step(self) -> None:
        """One turn of the loop: a reload if one was asked for, then whatever is marked and not paused."""
        answers = self.queue.take_reload()
        if answers is not None:
            settle(answers, lambda: self.metrics.reloaded(self.reload()))
        # After a reload too: what was marked meanwhile is still to do, and the wake-up that said so is spent.
        batch = self.queue.take_ready(time.monotonic())
        if batch.nft:  # first: a repair may put routes back, and they need the table
            self.nft.keep(self.config)
        if batch.names is None or batch.names:
            self.reconcile(batch)
        self.verdicts.save_if_changed(self.config)

    def _resync(self) -> None:
        """The safety net (review M1): a full pass now and then, for what no event and no refusal told us."""
        assert self._loop is not None
        self.queue.mark_everything()
        self._loop.call_later(RESYNC_EVERY, self._resync)

    # --- the pass ------------------------------------------------------------------------------------

    def desired(self) -> Desired:
        return self._desired.of(self.config, self.liveness.alive(), self.liveness.keepalive.path_mtus())  # #23

    def _guarded(self, names: frozenset[str]) -> None:  # the IPsec drops in the kernel changed: link, probes (M1)
        self.liveness.configure_keepalive(self.nft.probed(self.config))
        self.queue.mark(names)

    def reconcile(self, batch: Batch) -> None:
        """A pass for `batch.names` (None: everything), then what changed (queue.Batch says what marked them)."""
        try:
            self._reconcile(batch)
        except OSError as exc:
            # Transient (a dump interrupted by a concurrent change, memory pressure): report it and look at
            # everything again shortly rather than die and take the watch with us.
            self._fail(f"cannot read or change the kernel's state: {exc}; retrying")
            assert self._loop is not None
            self._loop.call_later(RETRY_AFTER, self.queue.mark, None)

    def _reconcile(self, batch: Batch) -> None:
        done = reconcile_pass(self.kernel, self.desired(), batch.names, batch.liveness_only)
        for change in self.reports.update(self.config, done.observed, done.plan, done.errors, done.after,
                                          self.liveness.is_up, batch.repairs):
            self.events.emit(change)
        self.doctor.after_pass(self.config, batch.names, done.errors)  # errors no state change says; doctor's (#24)
        self.liveness.after_pass(self.reports.answerable(), done.observed, done.after)  # #11 H5, #21 M2
        self.notifier.status_if_changed(self.reports.status_text(self.config))
        self.metrics.publish()
        assert self._loop is not None
        applied = done.applied(self.reports.tunnels(self.config))
        fought = [n for n in done.touched & batch.repairs if n in self.reports.records]
        for wait in self.queue.after_pass(applied, sorted(done.refused), fought, time.monotonic()):
            (log.info if isinstance(wait, Retry) else self._fail)(str(wait))  # a fight is news, a retry is not
            self._loop.call_later(wait.seconds, self.queue.due, wait)

    def _fail(self, message: str) -> None:
        self.last_error = message
        self.events.error(message)

    # --- reload, status, stop -------------------------------------------------------------------------

    def reload(self) -> ReloadResult:
        """Whatever fails, ConfigError or not, rejects the reload, and the old config stays in force (review L1)."""
        old = self.config
        try:
            config = load_config(self.config_path)
            self.notifier.reloading()
            scope = self._take(config)
        except Exception as exc:
            why = str(exc) if isinstance(exc, ConfigError) else f"{self.config_path}: {describe(exc)}"
            if self.config is not old:  # failed while applying: the old config back in every part that took it
                log.error("reload failed while applying the new config", exc_info=True)
                self._take(old)
                why = f"{self.config_path}: valid, but cannot apply it ({describe(exc)}); the previous config is back"
            self.last_error = f"reload rejected, previous config stays in force:\n{why}"
            self.events.config_rejected(why)
            self.notifier.ready(self.reports.status_text(self.config))
            return {"ok": False, "generation": self.generation, "error": why}
        self.generation += 1
        self._keep_as_last_good()
        self.events.config_reloaded(self.generation, [str(f) for f in config.files])
        self.notifier.ready(self.reports.status_text(self.config))
        # Accepted, but the kernel may have refused some of it (review L8): say which tunnels, and why.
        refused = [f"tunnel {name}: {r.error}" for name in sorted(scope)
                   if (r := self.reports.records.get(name)) is not None and r.state == "error"]
        error = "\n".join(filter(None, [self.last_error, *refused])) or None
        return {"ok": True, "generation": self.generation, "error": error}

    def _take(self, config: Config) -> frozenset[str]:
        scope, both = reload_scope(self.config, config, (n for n, r in self.reports.records.items()
                                                          if r.state == "error"))
        self.config, self.last_error = config, None
        self.queue.forget(t.name for t in config.tunnels)
        self.nft.rename(config.daemon.nft_table, both)
        self.nft.keep(both)
        self.liveness.configure(config, self.nft.probed(config))
        self.ipsec.configure(config)
        # Unchanged tunnels are not even looked at (no flap, and a reload of one tunnel among thousands
        # costs a few requests); drift on them is the watch's business.
        self.reconcile(Batch(scope))
        self.nft.keep(config)
        return scope

    def _keep_as_last_good(self) -> None:
        """The config now in force is the one to start with if the file on disk stops validating (#11 H4)."""
        if self.start is not None and (problem := self.start.keep(self.config_path, self.config)):
            self._fail(problem)

    def _shutdown(self) -> None:
        self.verdicts.flush(self.config)  # a save put off to the end of a burst of flips (restart.py)
        self.liveness.close(admin_down=self.config.daemon.on_exit == "remove")  # BFD peers hear AdminDown
        self.nft.close()
        self.watch.close()
        if self.config.daemon.on_exit == "remove":
            for error in remove_everything(self.kernel):
                self._fail(str(error))
            self.nft.remove()
        self.kernel.close()

    def tunnel_statuses(self, of: slice = slice(None)) -> list[TunnelStatus]:  # of: a slice of them (metrics.py)
        return self.liveness.annotate(self.ipsec.annotate(self.reports.statuses(self.config, self.liveness.status, of)))

    def status(self, of: slice = slice(None)) -> DaemonStatus:
        return {"config": str(self.config_path), "generation": self.generation, "last_error": self.last_error,
                "pid": os.getpid(), "netlink_requests": self.kernel.requests, "tunnels": self.tunnel_statuses(of),
                "warnings": self.doctor.lines(self.nft), "keepalive_socket": self.liveness.keepalive.socket_status()}


def run_daemon(config_path: Path, config: Config, socket_override: str | None = None,
               start: StartConfig | None = None) -> int:
    """Entry point of `greupd run`, with the config the CLI has just loaded and validated."""
    log_like_events(os.environ.get("GREUPD_LOG_LEVEL", "INFO"))  # one format for every line (newcomer-3 Low 16)

    async def main() -> int:
        return await Daemon(config_path, config, control_socket(config, socket_override), start).run()

    try:
        return asyncio.run(main())
    except CannotServe as exc:
        log.error("%s", exc)
        return 1
