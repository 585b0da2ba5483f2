"""Talking to systemd as the service manager: sd_notify(3) readiness, reload, stop, status and watchdog.

Every method is a no-op when the daemon was not started by systemd (no NOTIFY_SOCKET), so `greupd run`
in a terminal or a test behaves the same minus the notifications.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TypedDict

import systemd.daemon

from greupd.events import one_line
from greupd.status import TunnelState


class StatusBrief(TypedDict):
    """What the STATUS= line needs of a tunnel (a TunnelStatus is one, with more)."""

    name: str
    state: TunnelState
    reason: str
    error: str | None


# The order in which a status line counts states: the healthy first, the ones a person must look at last.
_STATE_ORDER: tuple[TunnelState, ...] = ("up", "down", "disabled", "error")
# STATUS= ends up in `systemctl status`; naming every broken tunnel of a large config would bury the line.
_NAMED_AT_MOST = 3


def _monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def watchdog_interval_from(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds within which systemd expects WATCHDOG=1, or None when no watchdog watches this process.

    The rules of sd_watchdog_enabled(3): WATCHDOG_USEC is the interval; WATCHDOG_PID, when set, names the one
    process meant (a child started from the service must not believe the watchdog is its own).
    """
    usec = environ.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    watched = environ.get("WATCHDOG_PID", "")
    if watched and (not watched.isdigit() or int(watched) != pid):
        return None
    return int(usec) / 1_000_000


class Notifier:
    """sd_notify(3) messages about this daemon's life.

    Errors from the notify socket (systemd gone, socket full) raise OSError, or, given `on_error`, are reported
    there (the daemon's: its last_error and journal): the service manager cannot see us, which is worth saying,
    but no reason to end the daemon or reject a reload (review L1).
    """

    def __init__(self, environ: Mapping[str, str] | None = None,
                 on_error: Callable[[str], None] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._on_error = on_error
        self._enabled = bool(env.get("NOTIFY_SOCKET"))
        self._watchdog = watchdog_interval_from(env, os.getpid()) if self._enabled else None
        self._published_status = ""

    @property
    def enabled(self) -> bool:
        return self._enabled

    def _send(self, *assignments: str) -> None:
        if self._enabled:
            # systemd.daemon.notify reads NOTIFY_SOCKET itself; one datagram carries every assignment.
            try:
                systemd.daemon.notify("\n".join(assignments))
            except OSError as exc:
                if self._on_error is None:
                    raise
                self._on_error(f"cannot notify systemd ({assignments[0]}): {exc}")

    def ready(self, status: str | None = None) -> None:
        """Start-up (or a reload) is complete: `systemctl start` and `systemctl reload` return now."""
        self._send("READY=1", *([f"STATUS={one_line(status)}"] if status is not None else []))

    def reloading(self) -> None:
        """A reload has begun; `ready()` ends it.

        MONOTONIC_USEC lets systemd >= 253 match this RELOADING=1 to the reload it asked for
        (Type=notify-reload); older systemd ignores the field.
        """
        self._send("RELOADING=1", f"MONOTONIC_USEC={_monotonic_usec()}")

    def stopping(self, status: str | None = None) -> None:
        self._send("STOPPING=1", *([f"STATUS={one_line(status)}"] if status is not None else []))

    def status(self, text: str) -> None:
        """The one line `systemctl status greupd` shows as Status:."""
        self._published_status = text
        self._send(f"STATUS={one_line(text)}")

    def status_if_changed(self, text: str) -> None:
        # A drift repair is no news to `systemctl status`, and every STATUS= is a blocking send to systemd.
        if text != self._published_status:
            self.status(text)

    def extend_timeout(self, seconds: float) -> None:
        """Ask for more time to start or stop than TimeoutStartSec= / TimeoutStopSec= gave."""
        self._send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def watchdog_interval(self) -> float | None:
        """Seconds between the deadlines of WatchdogSec=; ping at half of it. None: no watchdog."""
        return self._watchdog

    def watchdog_ping(self) -> None:
        if self._watchdog is not None:
            self._send("WATCHDOG=1")

    def start_watchdog(self, loop: asyncio.AbstractEventLoop, on_error: Callable[[str], None]) -> None:
        """Ping at half the watchdog interval, from `loop` itself: if the loop is stuck, the pings stop and
        systemd restarts us. A no-op without a watchdog.

        The next ping is scheduled before this one is sent, and a ping that fails (EAGAIN from a busy PID 1)
        is reported to `on_error`, not raised (review L2): one lost datagram must not end the chain, which
        would have systemd abort a healthy daemon a watchdog interval later.
        """
        interval = self._watchdog
        if interval is None:
            return

        def ping() -> None:
            loop.call_later(interval / 2, ping)
            try:
                self.watchdog_ping()
            except OSError as exc:
                on_error(f"cannot send the watchdog ping to systemd: {exc}; trying again in {interval / 2:g} s")

        ping()


def _trouble(tunnel: StatusBrief) -> str:
    if tunnel["state"] == "error" and tunnel.get("error"):
        return f"{tunnel['name']}: {tunnel['error']}"
    return f"{tunnel['name']}: {tunnel['reason'].replace('-', ' ')}"


def status_line(statuses: Sequence[StatusBrief]) -> str:
    """The STATUS= text: `3 tunnels: 2 up, 1 down (to-c: keepalive timeout)`."""
    count = len(statuses)
    head = f"{count} tunnel{'' if count == 1 else 's'}"
    if count == 0:
        return head
    counts = [(state, sum(1 for t in statuses if t["state"] == state)) for state in _STATE_ORDER]
    line = f"{head}: {', '.join(f'{n} {state}' for state, n in counts if n)}"
    troubled = [t for t in statuses if t["state"] in ("down", "error")]
    if troubled:
        named = [_trouble(t) for t in troubled[:_NAMED_AT_MOST]]
        more = len(troubled) - len(named)
        line += f" ({'; '.join(named)}{f'; {more} more' if more else ''})"
    return line
