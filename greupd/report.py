"""What the daemon says about its tunnels: one TunnelRecord each, updated after every pass.

`Reports.update` takes what a pass saw and did (the observation before and after, the plan, the kernel's
refusals) and the keepalive verdicts, and returns the tunnel state changes as journal events; the daemon
emits them. `statuses` is the tunnel part of `greupd status --json` and of systemd's STATUS= line.

Pure: no I/O, no kernel. The keepalive verdict itself lives in the keepalive engine (`is_up`); the sentence a
verdict came with (`LivenessChange.message`) is kept here until the pass that acts on it journals it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from greupd.config import Config, TunnelConfig
from greupd.events import TunnelChanged, tunnel_change_message
from greupd.keepalive.liveness import LivenessChange
from greupd.liveness.verdict import LivenessVerdict
from greupd.model import Observed, Plan, action_tunnel
from greupd.netlink.kernel import ApplyError
from greupd.status import KeepaliveStatus, TunnelState, TunnelStatus
from greupd.systemd import StatusBrief, status_line

# The reason a tunnel comes back up, by the reason it went down.
_RESTORED = {"keepalive-timeout": "keepalive-restored", "link-removed": "link-restored", "bfd-down": "bfd-restored",
             "dampened": "dampening-released"}


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class TunnelRecord:
    """What the daemon last reported about one tunnel."""

    state: TunnelState = "down"
    since: str = field(default_factory=now_iso)
    reason: str = "config"
    error: str | None = None
    ifindex: int | None = None
    link_present: bool = False
    link_works: bool = False  # owned, and up (or held down by us for a keepalive verdict, action = "link")
    reported: bool = False
    state_changes: int = 0  # transitions after the first reported state (greupd_tunnel_state_changes_total)
    drift_repairs: int = 0  # passes that acted on this tunnel because the kernel said it changed


class Reports:
    """Cheap per pass for a few tunnels among thousands (a drift repair): the bookkeeping of a scoped pass
    touches the tunnels it looked at only, and the STATUS= line and the answerable set are computed again
    only when some record changed."""

    def __init__(self, clock: Callable[[], str] = now_iso) -> None:
        self.records: dict[str, TunnelRecord] = {}
        self._clock = clock
        self._now: str | None = None  # the pass's time: one clock read per pass, not one per transition
        self._verdicts: dict[str, LivenessChange | LivenessVerdict] = {}  # the last flip per tunnel, for its sentence
        self._config: Config | None = None
        self._by_name: dict[str, TunnelConfig] = {}
        self._order: dict[str, int] = {}
        self._version = 0  # bumped whenever a record's state, reason, error or link_works changes
        self._answerable: tuple[int, list[str]] | None = None
        self._status_text: tuple[Config, int, str] | None = None  # for (config, version)
        self._tunnel_texts: dict[str, tuple[TunnelConfig, tuple[str, str, str, tuple[str, ...]]]] = {}

    def tunnels(self, config: Config) -> Mapping[str, TunnelConfig]:
        """`config`'s tunnels by name, in config order (built once per config)."""
        if config is not self._config:
            self._config, self._by_name = config, {t.name: t for t in config.tunnels}
            self._order = {name: i for i, name in enumerate(self._by_name)}
            for gone in set(self.records) - self._by_name.keys():
                del self.records[gone]
            for gone in set(self._verdicts) - self._by_name.keys():
                del self._verdicts[gone]
            for gone in set(self._tunnel_texts) - self._by_name.keys():
                del self._tunnel_texts[gone]
            self._version += 1
        return self._by_name

    def _looked_at(self, config: Config, observed: Observed) -> list[TunnelConfig]:
        """The configured tunnels `observed` covers, in config order."""
        by_name = self.tunnels(config)
        if observed.scope is None:
            return list(by_name.values())
        return sorted((by_name[n] for n in observed.scope if n in by_name), key=lambda t: self._order[t.name])

    def note_liveness(self, name: str, change: LivenessChange | LivenessVerdict) -> None:
        self._verdicts[name] = change

    def update(self, config: Config, before: Observed, plan: Plan, errors: Iterable[ApplyError], after: Observed,
               is_up: Callable[[str], bool], repairs: frozenset[str] = frozenset()) -> list[TunnelChanged]:
        """The state changes of one pass. before: the observation it planned from; after: the kernel once the
        plan was applied (as planned where acknowledged, observed again where refused); repairs: the tunnels
        kernel events marked for this pass (a drift repair where the plan acted on one of them)."""
        self._now = None
        changes = self._link_losses(config, before)
        acted_on = {t for a in plan.actions if (t := action_tunnel(a)) is not None}
        problems = {p.tunnel: p.message for p in plan.problems}
        reasons = {p.tunnel: p.reason for p in plan.problems}
        failures: dict[str, str] = {}
        for error in errors:
            if error.tunnel is not None:
                failures.setdefault(error.tunnel, str(error))
        for tunnel in self._looked_at(config, after):
            record = self._record(tunnel.name)
            if tunnel.name in acted_on and tunnel.name in repairs:
                record.drift_repairs += 1
            link = after.links.get(tunnel.name)
            record.ifindex = link.index if link is not None and link.owned else None
            record.link_present = link is not None and link.owned
            held_down = (tunnel.keepalive is not None and tunnel.keepalive.action == "link"
                         and not is_up(tunnel.name))
            works = record.link_present and link is not None and (link.up or held_down)
            if works != record.link_works:
                record.link_works = works
                self._version += 1
            if not tunnel.enabled:
                changes += self._transition(tunnel, "disabled", "config")
            elif tunnel.name in problems or tunnel.name in failures:
                message = problems.get(tunnel.name) or failures[tunnel.name]
                if record.error != message:
                    record.error = message
                    self._version += 1
                changes += self._transition(tunnel, "error", reasons[tunnel.name] if tunnel.name in problems
                                            else "apply-failed", error=message)
            elif not is_up(tunnel.name):
                record.error = None
                verdict = self._verdicts.get(tunnel.name)  # which detector decided (liveness/room.py)
                reason = verdict.reason if verdict is not None and not verdict.up else "keepalive-timeout"
                changes += self._transition(tunnel, "down", reason)
            elif record.link_present:
                record.error = None
                reason = _RESTORED.get(record.reason, "repaired" if record.state == "error" else "config")
                changes += self._transition(tunnel, "up", reason)
        return changes

    def answerable(self) -> list[str]:
        """The tunnels whose own end works, so that answer = "daemon" may reflect their peers' probes (#11 H5):
        an owned link that is up (or that we hold down for a dead peer: not answering then would keep two
        greupd ends with action = "link" down for ever), and no error (name clash, refused apply)."""
        if self._answerable is None or self._answerable[0] != self._version:
            names = [name for name, record in self.records.items() if record.link_works and record.state != "error"]
            self._answerable = (self._version, names)
        return list(self._answerable[1])

    def status_text(self, config: Config) -> str:
        """systemd's STATUS= line, computed again only when a record changed since the last time."""
        by_name = self.tunnels(config)
        if self._status_text is None or self._status_text[0] is not config or self._status_text[1] != self._version:
            unreported = TunnelRecord(since="")
            briefs: list[StatusBrief] = []
            for name in by_name:
                record = self.records.get(name) or unreported
                briefs.append({"name": name, "state": record.state, "reason": record.reason, "error": record.error})
            self._status_text = (config, self._version, status_line(briefs))
        return self._status_text[2]

    def statuses(self, config: Config, keepalive: Callable[[str], KeepaliveStatus | None],
                 window: slice = slice(None)) -> list[TunnelStatus]:
        """The tunnels' part of `greupd status --json`, in config order; `window`: of that slice of them only
        (status and metrics go a slice at a time: metrics.status_in_slices)."""
        statuses: list[TunnelStatus] = []
        unreported: TunnelRecord | None = None
        for tunnel in config.tunnels[window]:
            record = self.records.get(tunnel.name)
            if record is None:
                record = unreported = unreported or TunnelRecord()
            mode, local, remote, routes = self._texts(tunnel)
            statuses.append({
                "name": tunnel.name, "mode": mode, "local": local, "remote": remote, "state": record.state,
                "since": record.since, "reason": record.reason, "error": record.error, "ifindex": record.ifindex,
                "routes": list(routes), "routes_installed": record.state == "up" and bool(routes),
                "keepalive": keepalive(tunnel.name) if tunnel.keepalive else None,
                "state_changes": record.state_changes, "drift_repairs": record.drift_repairs,
            })
        return statuses

    def _texts(self, tunnel: TunnelConfig) -> tuple[str, str, str, tuple[str, ...]]:
        """A tunnel's config as status shows it, written once per config (str() of an address is not free)."""
        texts = self._tunnel_texts.get(tunnel.name)
        if texts is None or texts[0] is not tunnel:
            texts = self._tunnel_texts[tunnel.name] = (tunnel, (tunnel.mode, str(tunnel.local), str(tunnel.remote),
                                                                tuple(str(r) for r in tunnel.routes)))
        return texts[1]

    def _link_losses(self, config: Config, observed: Observed) -> list[TunnelChanged]:
        changes: list[TunnelChanged] = []
        for tunnel in self._looked_at(config, observed):
            record = self.records.get(tunnel.name)
            if record is None or not tunnel.enabled:
                continue
            if record.link_present and tunnel.name not in observed.links:
                changes += self._transition(tunnel, "down", "link-removed")
                record.link_present = False
        return changes

    def _transition(self, tunnel: TunnelConfig, state: TunnelState, reason: str,
                    error: str | None = None) -> list[TunnelChanged]:
        record = self._record(tunnel.name)
        # An error for another reason is news (an IPsec hold lifted, then the link refused): the rest is not.
        if record.reported and record.state == state and (state != "error" or record.reason == reason):
            return []
        previous = record.state if record.reported else None
        if previous is not None:
            record.state_changes += 1
        if self._now is None:
            self._now = self._clock()
        record.state, record.reason, record.since, record.reported = state, reason, self._now, True
        self._version += 1
        keepalive = tunnel.keepalive
        verdict = self._verdicts.get(tunnel.name)
        said = verdict.message if verdict is not None and verdict.reason == reason else None
        message = tunnel_change_message(
            tunnel.name, state, reason, routes=[str(r) for r in tunnel.routes] if state in ("up", "down") else (),
            keepalive_interval=keepalive.interval if keepalive else None,
            retries=keepalive.retries if keepalive else None,
            replies=keepalive.up_after if keepalive else None, error=error, cause=said)
        if state == "down" and keepalive is not None and keepalive.action == "link" and reason == "keepalive-timeout":
            message += ", link set down"
        return [TunnelChanged(tunnel.name, state, previous, reason, message)]

    def _record(self, name: str) -> TunnelRecord:
        record = self.records.get(name)
        if record is None:
            record = self.records[name] = TunnelRecord()
            self._version += 1
        return record
