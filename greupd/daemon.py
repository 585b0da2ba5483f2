"""The daemon: one asyncio loop that wires config, planner, kernel, keepalives, nftables, systemd and control.

Level-triggered: a netlink event, a keepalive transition or a reload only marks tunnels "dirty"; a single
reconcile pass then observes those tunnels, plans and applies. Start, reload, drift repair and restart all
run through that same pass.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from greupd.config import Config, ConfigError, TunnelConfig, load_config
from greupd.control import ControlServer, ControlSocketBusy
from greupd.events import EventLog, tunnel_change_message
from greupd.ipsec.connections import desired_connections
from greupd.ipsec.supervisor import IpsecChange, IpsecSupervisor
from greupd.keepalive import KeepaliveEngine, LivenessChange, targets_from_config
from greupd.model import Desired, Observed, Plan, action_tunnel, desired_state
from greupd.netlink import ApplyError, Kernel, KernelWatch
from greupd.nft import NftError, NftTable, NftWatch, describe_ruleset, render_ruleset
from greupd.plan import describe, plan_changes
from greupd.status import DaemonStatus, ReloadResult, TunnelState, TunnelStatus
from greupd.systemd import Notifier, status_line

log = logging.getLogger("greupd")

# A tunnel repaired more often than this is being fought over by another manager: back off instead of
# turning the fight into a busy loop.
FIGHT_REPAIRS = 10
FIGHT_WINDOW = 10.0
FIGHT_BACKOFF = (1.0, 60.0)
RETRY_AFTER = 1.0


def _now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class TunnelRecord:
    """What the daemon last reported about one tunnel."""

    state: TunnelState = "down"
    since: str = field(default_factory=_now_iso)
    reason: str = "config"
    error: str | None = None
    ifindex: int | None = None
    link_present: bool = False
    reported: bool = False
    repairs: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=FIGHT_REPAIRS))
    backoff: float = 0.0
    paused_until: float = 0.0


class Daemon:
    def __init__(self, config_path: Path, config: Config, socket_path: Path | None = None) -> None:
        self.config_path = config_path
        self.config = config
        self.socket_path = socket_path or config.daemon.control_socket
        self.generation = 1
        self.last_error: str | None = None
        self.records: dict[str, TunnelRecord] = {}
        self.alive: dict[str, bool] = {}
        self.events = EventLog()
        self.notifier = Notifier()
        self.kernel = Kernel()
        self.watch = KernelWatch(self._on_kernel_change)
        self.watch.own_portid = self.kernel.portid
        self.keepalive = KeepaliveEngine(self._on_liveness)
        self.ipsec = IpsecSupervisor(config.daemon.vici_socket, self._on_ipsec_change, self._fail)
        self.nft = NftTable(config.daemon.nft_table)
        self.nft_watch = NftWatch(self._on_nft_change, table=config.daemon.nft_table)
        self._dirty: set[str] = set()
        self._liveness_dirty: set[str] = set()  # dirty because of a keepalive verdict, not the kernel
        self._everything = False
        self._nft_dirty = True
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._reload_requested = False
        self._published_status = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        # One reconcile pass at a time: the control socket's reload runs beside the main loop's passes, and
        # the kernel refuses a second dump on a netlink socket while one is in progress (EBUSY).
        self._pass = asyncio.Lock()

    # --- inputs: each only marks what to look at again --------------------------------------------------

    def _on_kernel_change(self, names: set[str] | None) -> None:
        if names is None:
            self._everything = True
        else:
            self._dirty |= names
        self._wake.set()

    def _on_nft_change(self) -> None:
        self._nft_dirty = True
        self._wake.set()

    def _on_liveness(self, name: str, change: LivenessChange) -> None:
        self.alive[name] = change.up
        self._dirty.add(name)
        self._liveness_dirty.add(name)
        self._wake.set()

    def _on_ipsec_change(self, change: IpsecChange) -> None:
        self.events.ipsec_changed(change.tunnel, change.state, change.previous, change.message)

    def _request_reload(self) -> None:
        self._reload_requested = True
        self._wake.set()

    def _request_stop(self) -> None:
        self._stop.set()
        self._wake.set()

    # --- the loop -------------------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._loop = loop
        control = ControlServer(self.socket_path, self.status, self.reload, on_error=self.events.error)
        await control.start()
        self.watch.start(loop)
        self.keepalive.start(loop)
        for sig, handler in ((signal.SIGHUP, self._request_reload), (signal.SIGTERM, self._request_stop),
                             (signal.SIGINT, self._request_stop)):
            loop.add_signal_handler(sig, handler)
        self._configure_side_engines()
        # The nftables drops and charon's connections first, then the links: GRE that leaves before its ESP
        # policy exists is what [tunnel.ipsec] must prevent.
        await self._reconcile_nft()
        self.ipsec.start(loop)
        await self.ipsec.settled(timeout=3.0)
        await self._reconcile(None)
        self._start_nft_watch()
        self.notifier.ready(self._status_text())
        self.events.started(self.generation, self.config.files, len(self.config.tunnels))
        self._schedule_watchdog()
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if self._stop.is_set():
                    break
                if self._reload_requested:
                    self._reload_requested = False
                    await self.reload()
                    continue
                await self._reconcile_pending()
        finally:
            self.notifier.stopping()
            self.events.stopping(self.config.daemon.on_exit)
            await control.close()
            await self._shutdown()
        return 0

    async def _reconcile_pending(self) -> None:
        if self._everything:
            self._everything = False
            self._dirty.clear()
            await self._reconcile(None)
        elif self._dirty:
            now = time.monotonic()
            ready = {n for n in self._dirty if (r := self.records.get(n)) is None or r.paused_until <= now}
            self._dirty -= ready
            if ready:
                # Route changes that our own keepalive verdicts ask for are not a fight with anyone.
                repairs = frozenset(ready - self._liveness_dirty)
                self._liveness_dirty -= ready
                await self._reconcile(ready, repairs)
        if self._nft_dirty:
            await self._reconcile_nft()

    def _start_nft_watch(self) -> None:
        assert self._loop is not None
        try:
            self.nft_watch.start(self._loop)
        except NftError as exc:
            self._fail(f"nftables: cannot watch for changes, the table will not be repaired on its own: {exc}")

    def _schedule_watchdog(self) -> None:
        interval = self.notifier.watchdog_interval()
        if interval is None or self._loop is None:
            return
        loop = self._loop

        def ping() -> None:
            # Runs on the loop itself: if the loop is stuck, the pings stop and systemd restarts us.
            self.notifier.watchdog_ping()
            loop.call_later(interval / 2, ping)

        ping()

    # --- reconcile -----------------------------------------------------------------------------------

    def desired(self) -> Desired:
        return desired_state(self.config, self.alive)

    async def _reconcile(self, scope: Iterable[str] | None, repairs: frozenset[str] = frozenset()) -> None:
        async with self._pass:
            await self._reconcile_guarded(None if scope is None else frozenset(scope), repairs)

    async def _reconcile_guarded(self, names: frozenset[str] | None, repairs: frozenset[str] = frozenset()) -> None:
        try:
            await self._reconcile_locked(names, repairs)
        except OSError as exc:
            # Transient (a dump interrupted by a concurrent change, memory pressure): report it and look at
            # everything again shortly rather than die and take the watch with us.
            self._fail(f"cannot read or change the kernel's state: {exc}; retrying")
            assert self._loop is not None
            self._loop.call_later(RETRY_AFTER, self._on_kernel_change, None)

    async def _reconcile_locked(self, names: frozenset[str] | None, repairs: frozenset[str]) -> None:
        """Observe, plan, apply for `names` (None: everything), then update tunnel states.

        `repairs`: the names the kernel told us about; a tunnel that keeps needing repair is being fought over.
        """
        desired = self.desired()
        self.watch.watched = frozenset(t.name for t in self.config.tunnels)
        observed = await self.kernel.observe(desired, names)
        self._note_link_loss(observed)
        plan = plan_changes(desired, observed)
        errors = await self.kernel.apply(plan.actions) if plan.actions else []
        if plan.actions:
            log.debug("applied:\n%s", describe(plan))
        touched = frozenset(t for a in plan.actions if (t := action_tunnel(a)) is not None)
        refused = frozenset(e.tunnel for e in errors if e.tunnel is not None)
        # What the kernel acknowledged is as planned; look again only where it refused something.
        after = observed.updated(Observed.as_planned(desired, touched - refused,
                                                     self.kernel.indices(touched - refused)))
        if refused:
            after = after.updated(await self.kernel.observe(desired, refused))
        self._record_outcome(plan, errors, after)
        self._note_repairs(plan, repairs)

    def _note_link_loss(self, observed: Observed) -> None:
        for tunnel in self.config.tunnels:
            record = self.records.get(tunnel.name)
            if record is None or not observed.covers(tunnel.name) or not tunnel.enabled:
                continue
            if record.link_present and tunnel.name not in observed.links:
                self._transition(tunnel, "down", "link-removed")
                record.link_present = False

    def _note_repairs(self, plan: Plan, scope: frozenset[str]) -> None:
        """Back off from a tunnel that keeps needing repair: another program is fighting us over it."""
        now = time.monotonic()
        for name in {t for a in plan.actions if (t := action_tunnel(a)) is not None} & scope:
            record = self.records.get(name)
            if record is None:
                continue
            record.repairs.append(now)
            if len(record.repairs) == FIGHT_REPAIRS and now - record.repairs[0] < FIGHT_WINDOW:
                record.backoff = min(max(record.backoff * 2, FIGHT_BACKOFF[0]), FIGHT_BACKOFF[1])
                record.paused_until = now + record.backoff
                record.repairs.clear()
                self._fail(f"tunnel {name}: repaired {FIGHT_REPAIRS} times in {FIGHT_WINDOW:.0f} s, another "
                           f"program keeps changing it; next repair in {record.backoff:.0f} s")
                assert self._loop is not None
                self._loop.call_later(record.backoff, self._on_kernel_change, {name})
            elif now - record.repairs[0] > 4 * FIGHT_WINDOW:
                record.backoff = 0.0

    def _record_outcome(self, plan: Plan, errors: list[ApplyError], observed: Observed) -> None:
        self.watch.names_by_index = {link.index: name for name, link in observed.links.items() if link.owned} \
            if observed.scope is None else {
                **{i: n for i, n in self.watch.names_by_index.items() if n not in observed.links},
                **{link.index: name for name, link in observed.links.items() if link.owned}}
        problems = {p.tunnel: p.message for p in plan.problems}
        failures: dict[str, str] = {}
        for error in errors:
            if error.tunnel is None:
                self._fail(str(error))
            else:
                failures.setdefault(error.tunnel, str(error))
        for tunnel in self.config.tunnels:
            if not observed.covers(tunnel.name):
                continue
            record = self._record(tunnel.name)
            link = observed.links.get(tunnel.name)
            record.ifindex = link.index if link is not None and link.owned else None
            record.link_present = link is not None and link.owned
            if not tunnel.enabled:
                self._transition(tunnel, "disabled", "config")
            elif tunnel.name in problems or tunnel.name in failures:
                message = problems.get(tunnel.name) or failures[tunnel.name]
                record.error = message
                self._transition(tunnel, "error", "conflict" if tunnel.name in problems else "apply-failed",
                                 error=message)
            elif not self.alive.get(tunnel.name, True):
                record.error = None
                self._transition(tunnel, "down", "keepalive-timeout")
            elif record.link_present:
                record.error = None
                reason = {"keepalive-timeout": "keepalive-restored", "link-removed": "link-restored"}.get(
                    record.reason, "repaired" if record.state == "error" else "config")
                self._transition(tunnel, "up", reason)
        for gone in set(self.records) - {t.name for t in self.config.tunnels}:
            del self.records[gone]
        self._publish_status()

    def _transition(self, tunnel: TunnelConfig, state: TunnelState, reason: str, error: str | None = None) -> None:
        record = self._record(tunnel.name)
        if record.reported and record.state == state:
            return
        previous = record.state if record.reported else None
        record.state, record.reason, record.since, record.reported = state, reason, _now_iso(), True
        keepalive = tunnel.keepalive
        message = tunnel_change_message(
            tunnel.name, state, reason, routes=[str(r) for r in tunnel.routes] if state in ("up", "down") else (),
            keepalive_interval=keepalive.interval if keepalive else None,
            retries=keepalive.retries if keepalive else None,
            replies=keepalive.up_after if keepalive else None, error=error)
        if state == "down" and keepalive is not None and keepalive.action == "link" and reason == "keepalive-timeout":
            message += ", link set down"
        self.events.tunnel_changed(tunnel.name, state, previous, reason, message)

    def _record(self, name: str) -> TunnelRecord:
        record = self.records.get(name)
        if record is None:
            record = self.records[name] = TunnelRecord()
        return record

    def _fail(self, message: str) -> None:
        self.last_error = message
        self.events.error(message)

    async def _reconcile_nft(self) -> None:
        self._nft_dirty = False
        ruleset = render_ruleset(self.config)
        try:
            if not self.nft.matches(ruleset):
                self.nft.apply(ruleset)
        except NftError as exc:
            self._fail(f"nftables: {exc}")

    def _configure_side_engines(self) -> None:
        self.keepalive.configure(targets_from_config(self.config))
        self.ipsec.configure(desired_connections(self.config), self.config.daemon.vici_socket)
        keep = {t.name for t in self.config.tunnels if t.keepalive is not None and t.enabled}
        self.alive = {name: up for name, up in self.alive.items() if name in keep}
        for name in keep:
            self.alive.setdefault(name, self.keepalive.is_up(name))

    # --- reload, status, stop -------------------------------------------------------------------------

    async def reload(self) -> ReloadResult:
        try:
            config = load_config(self.config_path)
        except ConfigError as exc:
            self.last_error = f"reload rejected, previous config stays in force:\n{exc}"
            self.events.config_rejected(str(exc))
            self.notifier.status(self._status_text())
            return {"ok": False, "generation": self.generation, "error": str(exc)}
        self.notifier.reloading()
        async with self._pass:
            old_table = self.config.daemon.nft_table
            before = {t.name: t for t in self.config.tunnels}
            after = {t.name: t for t in config.tunnels}
            changed = frozenset(n for n in before.keys() | after.keys() if before.get(n) != after.get(n))
            self.config = config
            self.last_error = None
            if config.daemon.nft_table != old_table:
                self._remove_nft(old_table)
                self.nft = NftTable(config.daemon.nft_table)
                self.nft_watch.close()
                self.nft_watch = NftWatch(self._on_nft_change, table=config.daemon.nft_table)
                self._start_nft_watch()
            self._configure_side_engines()
            # Unchanged tunnels are not even looked at (no flap, and a reload of one tunnel among thousands
            # costs a few requests); drift on them is the watch's business.
            await self._reconcile_guarded(changed)
        await self._reconcile_nft()
        self.generation += 1
        self.events.config_reloaded(self.generation, [str(f) for f in config.files])
        self.notifier.ready(self._status_text())
        return {"ok": True, "generation": self.generation, "error": self.last_error}

    def _remove_nft(self, table: str) -> None:
        try:
            NftTable(table).remove()
        except NftError as exc:
            self._fail(f"nftables: {exc}")

    async def _shutdown(self) -> None:
        self.keepalive.close()
        # keep: charon keeps greupd's connections and SAs, so the tunnels stay encrypted across a restart.
        await self.ipsec.close(unload=self.config.daemon.on_exit == "remove")
        self.nft_watch.close()
        self.watch.close()
        if self.config.daemon.on_exit == "remove":
            empty = Desired({}, {})
            observed = await self.kernel.observe(empty)
            plan = plan_changes(empty, observed)
            for error in await self.kernel.apply(plan.actions):
                self._fail(str(error))
            self._remove_nft(self.config.daemon.nft_table)
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
        statuses: list[TunnelStatus] = []
        for tunnel in self.config.tunnels:
            record = self.records.get(tunnel.name, TunnelRecord())
            status: TunnelStatus = {
                "name": tunnel.name, "mode": tunnel.mode, "local": str(tunnel.local),
                "remote": str(tunnel.remote), "state": record.state, "since": record.since,
                "reason": record.reason, "error": record.error, "ifindex": record.ifindex,
                "routes": [str(r) for r in tunnel.routes],
                "routes_installed": record.state == "up" and bool(tunnel.routes),
                "keepalive": self.keepalive.status(tunnel.name) if tunnel.keepalive else None,
            }
            if (ipsec := self.ipsec.status(tunnel.name)) is not None:
                status["ipsec"] = ipsec
            statuses.append(status)
        return statuses

    def status(self) -> DaemonStatus:
        return {"config": str(self.config_path), "generation": self.generation, "last_error": self.last_error,
                "pid": os.getpid(), "netlink_requests": self.kernel.requests, "tunnels": self.tunnel_statuses()}


def run_daemon(config_path: Path, config: Config, socket_override: str | None = None) -> int:
    """Entry point of `greupd run`, with the config the CLI has just loaded and validated."""
    logging.basicConfig(level=os.environ.get("GREUPD_LOG_LEVEL", "INFO"), format="greupd: %(message)s")
    socket_path = Path(socket_override or os.environ.get("GREUPD_CONTROL_SOCKET") or config.daemon.control_socket)

    async def main() -> int:
        return await Daemon(config_path, config, socket_path).run()

    try:
        return asyncio.run(main())
    except ControlSocketBusy as exc:
        log.error("%s", exc)
        return 1


def describe_plan(config: Config) -> str:
    """What `greupd run` (or a reload) would change right now: kernel actions, then the nftables table."""

    async def observe() -> Plan:
        kernel = Kernel()
        try:
            desired = desired_state(config)
            return plan_changes(desired, await kernel.observe(desired))
        finally:
            kernel.close()

    plan = asyncio.run(observe())
    ruleset = render_ruleset(config)
    table = NftTable(config.daemon.nft_table)
    try:
        if table.matches(ruleset):
            nft_state = "unchanged"
        else:
            nft_state = "to be replaced" if table.present() else "to be created"
    except NftError as exc:
        nft_state = f"unknown ({exc})"
    return (f"# kernel\n{describe(plan)}\n\n# nftables table inet {config.daemon.nft_table} ({nft_state})\n"
            f"{describe_ruleset(ruleset)}")
