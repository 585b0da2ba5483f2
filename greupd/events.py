"""The daemon's event log: one journal entry per tunnel state change, reload, rejection or error.

Under systemd each event is a structured journal entry (spec.md "journald"): SYSLOG_IDENTIFIER=greupd, a fixed
MESSAGE_ID per kind of event (explained by systemd/greupd.catalog under `journalctl -x`), GREUPD_* fields to
filter on (`journalctl -u greupd GREUPD_TUNNEL=My_Tunnel`), a syslog PRIORITY and a one-line MESSAGE. An event
about one tunnel also carries INTERFACE=<tunnel>, the field systemd-networkd uses, so `networkctl status
My_Tunnel` (and `journalctl INTERFACE=My_Tunnel`) shows greupd's events beside the kernel's and networkd's.
Elsewhere the same MESSAGE goes to stderr as one plain line.

Deciding what an event says (`message_of`, `journal_fields`, `stderr_line`) is pure; `EventLog` only sends.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Final, TextIO

from greupd.config import format_duration
from greupd.status import TunnelState

SYSLOG_IDENTIFIER: Final = "greupd"
JOURNAL_SOCKET: Final = Path("/run/systemd/journal/socket")


class EventKind(StrEnum):
    TUNNEL_UP = "tunnel-up"
    TUNNEL_DOWN = "tunnel-down"
    TUNNEL_DISABLED = "tunnel-disabled"
    TUNNEL_ERROR = "tunnel-error"
    CONFIG_RELOADED = "config-reloaded"
    CONFIG_REJECTED = "config-rejected"
    DAEMON_STARTED = "daemon-started"
    DAEMON_STOPPING = "daemon-stopping"
    DAEMON_ERROR = "daemon-error"
    IPSEC_UP = "ipsec-up"
    IPSEC_DOWN = "ipsec-down"


# Fixed forever: users filter on them (`journalctl MESSAGE_ID=...`) and systemd/greupd.catalog is
# keyed by them.
MESSAGE_IDS: Final[Mapping[EventKind, str]] = {
    EventKind.TUNNEL_UP: "d4f49aef516941b5849861850165daf6",
    EventKind.TUNNEL_DOWN: "192b74ac7d154bd0b74d026603e9f542",
    EventKind.TUNNEL_DISABLED: "8e5aa839516046e284d9802047857a11",
    EventKind.TUNNEL_ERROR: "280b598a659e47c681ff76b0582e347b",
    EventKind.CONFIG_RELOADED: "b43b5984ec4e48d8a4ff07f77c5ae603",
    EventKind.CONFIG_REJECTED: "ca7ef8cf496d4d17a31ded5339ad9218",
    EventKind.DAEMON_STARTED: "0d2e09c95fe64a51b61a2d5c9708c658",
    EventKind.DAEMON_STOPPING: "df3cf0edef044f7db10d85c34bb8da1a",
    EventKind.DAEMON_ERROR: "1b8eeb5f91e04de8a8efe5be95a94f1f",
    EventKind.IPSEC_UP: "b568771c4e18463e8a3f67c40aef7c2b",
    EventKind.IPSEC_DOWN: "3ec4b474b6aa49268cd4ace92d9a8911",
}

# syslog(3) priorities, as PRIORITY= wants them.
PRIORITY_ERR: Final = 3
PRIORITY_WARNING: Final = 4
PRIORITY_NOTICE: Final = 5
PRIORITY_INFO: Final = 6
_PRIORITY_NAMES: Final = {PRIORITY_ERR: "error", PRIORITY_WARNING: "warning", PRIORITY_NOTICE: "notice",
                          PRIORITY_INFO: "info"}

_TUNNEL_KINDS: Final[Mapping[TunnelState, EventKind]] = {
    "up": EventKind.TUNNEL_UP,
    "down": EventKind.TUNNEL_DOWN,
    "disabled": EventKind.TUNNEL_DISABLED,
    "error": EventKind.TUNNEL_ERROR,
}
_PRIORITIES: Final[Mapping[EventKind, int]] = {
    EventKind.TUNNEL_UP: PRIORITY_NOTICE,
    EventKind.TUNNEL_DOWN: PRIORITY_WARNING,
    EventKind.TUNNEL_DISABLED: PRIORITY_NOTICE,
    EventKind.TUNNEL_ERROR: PRIORITY_ERR,
    EventKind.CONFIG_RELOADED: PRIORITY_NOTICE,
    EventKind.CONFIG_REJECTED: PRIORITY_ERR,
    EventKind.DAEMON_STARTED: PRIORITY_NOTICE,
    EventKind.DAEMON_STOPPING: PRIORITY_NOTICE,
    EventKind.DAEMON_ERROR: PRIORITY_ERR,
    EventKind.IPSEC_UP: PRIORITY_NOTICE,
    EventKind.IPSEC_DOWN: PRIORITY_WARNING,
}


# --- the events -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TunnelChanged:
    tunnel: str
    state: TunnelState
    previous: TunnelState | None  # None: the tunnel's first state since the daemon started
    reason: str  # keepalive-timeout, keepalive-restored, link-removed, config, ...
    message: str  # the whole line, `tunnel NAME STATE: why, what happened to the routes`; "" for a default


@dataclass(frozen=True)
class ConfigReloaded:
    generation: int
    files: tuple[str, ...]


@dataclass(frozen=True)
class ConfigRejected:
    error: str  # every problem, one a line (str(ConfigError)) or an apply error
    generation: int | None = None  # the generation that stays in force
    at_start: bool = False  # rejected by `greupd run`: the last good config runs instead (newcomer-3 N16)


@dataclass(frozen=True)
class DaemonStarted:
    generation: int
    files: tuple[str, ...]
    tunnels: int | None = None
    last_good: str | None = None  # when it was saved, if the last good config runs instead of the file on disk


@dataclass(frozen=True)
class DaemonStopping:
    on_exit: str  # keep | remove


@dataclass(frozen=True)
class DaemonError:
    message: str
    tunnel: str | None = None


@dataclass(frozen=True)
class IpsecChanged:
    """A tunnel's ESP protection came up (established) or went away (connecting, down)."""

    tunnel: str
    state: str  # established | connecting | down
    previous: str | None
    message: str


Event = IpsecChanged | TunnelChanged | ConfigReloaded | ConfigRejected | DaemonStarted | DaemonStopping | DaemonError


# --- what an event says (pure) -----------------------------------------------------------------------------

def tunnel_change_message(name: str, state: TunnelState, reason: str, *, routes: Sequence[str] = (),
                          keepalive_interval: float | None = None, retries: int | None = None,
                          replies: int | None = None, error: str | None = None, cause: str | None = None) -> str:
    """`tunnel My_Tunnel down: 3 keepalives missed (interval 1s), routes 20.10.1.0/24 withdrawn`.

    routes are the tunnel's configured prefixes: installed when it goes up, withdrawn otherwise. cause: what
    happened, as its source said it (a keepalive verdict's own sentence, `3 keepalives missed (interval 1s)`);
    without one, the sentence is made from the reason and the keepalive settings.
    """
    if error is not None:
        cause = error
    elif cause is None:
        cause = _cause_from_settings(reason, keepalive_interval, retries, replies)
    head = f"tunnel {name} {state}: {cause}"
    if not routes:
        return head
    return f"{head}, routes {' '.join(routes)} {'installed' if state == 'up' else 'withdrawn'}"


def _cause_from_settings(reason: str, keepalive_interval: float | None, retries: int | None,
                         replies: int | None) -> str:
    interval = f" (interval {format_duration(keepalive_interval)})" if keepalive_interval is not None else ""
    if reason == "keepalive-timeout":
        return f"{retries if retries is not None else 'too many'} keepalives missed{interval}"
    if reason == "keepalive-restored":
        count = f"{replies} keepalive repl{'y' if replies == 1 else 'ies'}" if replies else "keepalive replies"
        return f"{count} received{interval}"
    return reason.replace("-", " ")


def kind_of(event: Event) -> EventKind:
    match event:
        case TunnelChanged(state=state):
            return _TUNNEL_KINDS[state]
        case ConfigReloaded():
            return EventKind.CONFIG_RELOADED
        case ConfigRejected():
            return EventKind.CONFIG_REJECTED
        case DaemonStarted():
            return EventKind.DAEMON_STARTED
        case DaemonStopping():
            return EventKind.DAEMON_STOPPING
        case DaemonError():
            return EventKind.DAEMON_ERROR
        case IpsecChanged(state=state):
            return EventKind.IPSEC_UP if state == "established" else EventKind.IPSEC_DOWN


def _files(files: Iterable[str]) -> str:
    return " ".join(str(f) for f in files)


def _first_line_and_rest(text: str) -> tuple[str, int]:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[0] if lines else "unknown error"), max(len(lines) - 1, 0)


def message_of(event: Event) -> str:
    """The one line a person reads in `journalctl` or on stderr."""
    match event:
        case TunnelChanged(tunnel=name, state=state, reason=reason, message=message):
            # MESSAGE is one line by contract; the full text of multi-line errors goes in GREUPD_ERROR.
            return one_line(message) if message else f"tunnel {name} {state}: {reason.replace('-', ' ')}"
        case ConfigReloaded(generation=generation, files=files):
            return f"config reloaded: generation {generation} from {_files(files)}"
        case ConfigRejected(error=error, generation=generation, at_start=at_start):
            first, more = _first_line_and_rest(error)
            rest = f" (and {more} more problem{'s' if more != 1 else ''})" if more else ""
            if at_start:
                return f"config rejected at start, the last good config runs instead: {first}{rest}"
            kept = f"generation {generation}" if generation is not None else "the running config"
            return f"config rejected, {kept} stays in force: {first}{rest}"
        case DaemonStarted(generation=generation, files=files, tunnels=tunnels, last_good=last_good):
            count = f"{tunnels} tunnel{'s' if tunnels != 1 else ''} from " if tunnels is not None else ""
            which = f" with the last good config (saved {last_good}):" if last_good is not None else ":"
            return f"started{which} {count}{_files(files)} (generation {generation})"
        case DaemonStopping(on_exit=on_exit):
            what = "leaving tunnels and routes in place" if on_exit == "keep" else "removing tunnels and routes"
            return f"stopping: {what} (on_exit = {on_exit})"
        case DaemonError(message=message, tunnel=tunnel):
            first, _ = _first_line_and_rest(message)
            return f"tunnel {tunnel}: {first}" if tunnel else first
        case IpsecChanged(message=message):
            return one_line(message)


def priority_of(event: Event) -> int:
    return _PRIORITIES[kind_of(event)]


def journal_fields(event: Event) -> dict[str, str]:
    """Every field of the event's journal entry, as `systemd.journal.send` takes them."""
    kind = kind_of(event)
    fields = {
        "MESSAGE": message_of(event),
        "MESSAGE_ID": MESSAGE_IDS[kind],
        "PRIORITY": str(_PRIORITIES[kind]),
        "SYSLOG_IDENTIFIER": SYSLOG_IDENTIFIER,
        "GREUPD_EVENT": kind.value,
    }
    match event:
        case TunnelChanged():
            fields["GREUPD_TUNNEL"] = event.tunnel
            fields["INTERFACE"] = event.tunnel  # networkd's own field: `networkctl status NAME` shows the entry
            fields["GREUPD_STATE"] = event.state
            if event.previous is not None:
                fields["GREUPD_PREVIOUS_STATE"] = event.previous
            fields["GREUPD_REASON"] = event.reason
        case ConfigReloaded() | DaemonStarted():
            fields["GREUPD_GENERATION"] = str(event.generation)
            fields["GREUPD_CONFIG_FILES"] = _files(event.files)
        case ConfigRejected():
            if event.generation is not None:
                fields["GREUPD_GENERATION"] = str(event.generation)
            fields["GREUPD_ERROR"] = event.error  # all of it, one problem a line: MESSAGE holds the first
        case DaemonStopping():
            fields["GREUPD_ON_EXIT"] = event.on_exit
        case DaemonError():
            fields["GREUPD_ERROR"] = event.message
            if event.tunnel is not None:
                fields["GREUPD_TUNNEL"] = event.tunnel
                fields["INTERFACE"] = event.tunnel
        case IpsecChanged():
            fields["GREUPD_TUNNEL"] = fields["INTERFACE"] = event.tunnel
            fields["GREUPD_IPSEC_STATE"] = event.state
            if event.previous is not None:
                fields["GREUPD_IPSEC_PREVIOUS_STATE"] = event.previous
    return fields


def one_line(text: str) -> str:
    """Any text folded to one line: a journal MESSAGE and a systemd STATUS= are one line by contract."""
    return " ".join(text.split())


def stderr_line(event: Event, when: datetime) -> str:
    """`2026-11-24T20:15:02.120Z greupd warning: tunnel My_Tunnel down: ...`; no journal adds the time for us."""
    return stamped_line(priority_of(event), message_of(event), when)


def stamped_line(priority: int, message: str, when: datetime) -> str:
    """The one format of every line greupd's daemon writes to stderr: events and log records alike (newcomer-3
    Low 16: some lines were bare `greupd: ...`)."""
    stamp = when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"
    return f"{stamp} {SYSLOG_IDENTIFIER} {_PRIORITY_NAMES[priority]}: {message}"


def priority_of_level(level: int) -> int:
    """A logging level as a syslog priority (DEBUG is info: the journal's debug entries are hidden by default)."""
    if level >= logging.ERROR:
        return PRIORITY_ERR
    return PRIORITY_WARNING if level >= logging.WARNING else PRIORITY_INFO


def journald_attached(environ: Mapping[str, str], stderr_fd: int = 2) -> bool:
    """True when stderr is the journal stream systemd connected us to.

    JOURNAL_STREAM is `device:inode` of that stream (systemd.exec(5)); checking it against stderr tells a
    service apart from a child whose stderr was redirected elsewhere but inherited the variable.
    """
    value = environ.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        st = os.fstat(stderr_fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (int(device), int(inode))


# --- the sender ---------------------------------------------------------------------------------------------

class EventLog:
    """Sends each event to the journal (under systemd) or as a line to stderr.

    journal=None decides by JOURNAL_STREAM; True/False forces it (tests, `--log-target` style options).
    Without a journald socket on the machine every event goes to stderr.
    """

    def __init__(self, *, journal: bool | None = None, stream: TextIO | None = None) -> None:
        wanted = journald_attached(os.environ) if journal is None else journal
        # sd_journal_send(3) drops entries silently when journald's socket is absent: send to stderr instead.
        self._journal = wanted and JOURNAL_SOCKET.exists()
        self._stream = stream

    @property
    def to_journal(self) -> bool:
        return self._journal

    def emit(self, event: Event) -> None:
        if self._journal:
            try:
                _journal_send(journal_fields(event))
                return
            except OSError as exc:
                # The journal socket is gone (journald restarting, or journal=True outside systemd): the event
                # must still be seen somewhere, and stderr is where systemd would collect it anyway.
                self._write(f"{SYSLOG_IDENTIFIER}: journal unavailable ({exc}), writing to stderr")
        self._write(stderr_line(event, datetime.now(UTC)))

    def _write(self, line: str) -> None:
        stream = self._stream if self._stream is not None else sys.stderr
        stream.write(line + "\n")
        stream.flush()

    def tunnel_changed(self, name: str, state: TunnelState, previous: TunnelState | None, reason: str,
                       message: str = "") -> None:
        """message: the whole one-line MESSAGE (report.Reports builds one); "" for a plain default."""
        self.emit(TunnelChanged(name, state, previous, reason, message))

    def config_reloaded(self, generation: int, files: Iterable[Path | str]) -> None:
        self.emit(ConfigReloaded(generation, tuple(str(f) for f in files)))

    def config_rejected(self, error: str, generation: int | None = None, at_start: bool = False) -> None:
        self.emit(ConfigRejected(error, generation, at_start))

    def started(self, generation: int, files: Iterable[Path | str], tunnels: int | None = None,
                last_good: str | None = None) -> None:
        self.emit(DaemonStarted(generation, tuple(str(f) for f in files), tunnels, last_good))

    def stopping(self, on_exit: str) -> None:
        self.emit(DaemonStopping(on_exit))

    def error(self, message: str, tunnel: str | None = None) -> None:
        self.emit(DaemonError(message, tunnel))

    def ipsec_changed(self, tunnel: str, state: str, previous: str | None, message: str) -> None:
        self.emit(IpsecChanged(tunnel, state, previous, message))


class LogRecords(logging.Handler):
    """Log records (the keepalive engine's, nftables', a traceback) where the events go and as they look: a journal
    entry with PRIORITY under journald, else a stamped line on stderr (a traceback's lines follow its first)."""

    def __init__(self, *, journal: bool | None = None, stream: TextIO | None = None) -> None:
        super().__init__()
        self._events = EventLog(journal=journal, stream=stream)
        self.setFormatter(logging.Formatter("%(message)s"))  # level and name are in the line's own format

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message, priority = self.format(record), priority_of_level(record.levelno)
            if self._events.to_journal:
                try:
                    _journal_send({"MESSAGE": message, "PRIORITY": str(priority),
                                   "SYSLOG_IDENTIFIER": SYSLOG_IDENTIFIER})
                    return
                except OSError:
                    pass  # as EventLog: stderr is where systemd collects it anyway
            self._events._write(stamped_line(priority, message, datetime.now(UTC)))
        except Exception:
            self.handleError(record)


def log_like_events(level: str | int = logging.INFO) -> None:
    """The daemon's logging: every record through LogRecords (the CLI's own messages are not logging's)."""
    logging.basicConfig(level=level, handlers=[LogRecords()], force=True)


def _journal_send(fields: Mapping[str, str]) -> None:
    # Imported here: the systemd bindings open nothing at import, but keeping them out of the stderr path means
    # a plain `greupd run` in a terminal never depends on libsystemd behaving.
    import systemd.journal  # this form: mypy sees the repo's systemd/ folder (unit files) as a namespace package

    # sendv, not send: send() adds CODE_FILE/CODE_LINE/CODE_FUNC, which would name this function for every event.
    systemd.journal.sendv(*(f"{key}={value}" for key, value in fields.items()))
