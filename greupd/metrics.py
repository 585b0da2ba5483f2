"""Prometheus metrics: the daemon's status as the text Prometheus scrapes (spec.md "Metrics").

Three outlets, one rendering, made by `prometheus_client` from the same status `greupd status --json` shows:
- `greupd metrics` asks the daemon over the control socket (command "metrics") and prints the text;
- `[daemon] metrics_textfile`: a file for node_exporter's textfile collector, replaced with rename(2) (a scrape
  never reads half a file) whenever its text changes: after each pass, reload and keepalive verdict (at most
  once per MIN_GAP: a burst of passes is one rewrite), and every REFRESH seconds for the keepalive counters,
  which move between passes;
- `[daemon] metrics_listen`: GET /metrics on a TCP address, a small HTTP server in the daemon's own loop.

The textfile holds greupd's own metrics only: node_exporter exports `process_*` of its own, and the same names
from a textfile would clash with them. Over HTTP and the control socket the daemon's `process_*` come too.

No threads and no global registry: `DaemonCollector` reads the status afresh at every collect(), on a private
CollectorRegistry, inside the loop. The publisher's task ends when the daemon's loop does (asyncio.run cancels
it); then the listener closes and the textfile is removed, so a stopped daemon leaves no stale `up` behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Final

from greupd import __version__
from greupd.config import DaemonConfig, listen_address
from greupd.state import StartConfig
from greupd.status import DaemonStatus, IpsecState, ReloadResult, TunnelState

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import GaugeMetricFamily, Metric

log = logging.getLogger("greupd.metrics")

# What generate_latest writes: the text exposition format 0.0.4.
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
# Seconds between rewrites of the textfile without a pass: keepalive counters move with every probe.
REFRESH: Final = 10.0
# greupd's metrics are rendered at most this often: with a thousand tunnels one rendering takes 0.1-0.5 s of the
# loop. A burst of passes (a reload, a thousand verdicts at once) becomes one textfile rewrite at its end, and
# scrapes within this time of a rendering share it (review M4: 16 scrapes at once were 16 renderings, ~7 s).
MIN_GAP: Final = 1.0
# A scrape request is a request line and a few headers; anything larger is not Prometheus.
_MAX_REQUEST: Final = 8192
# The whole request head must arrive within this (a total deadline, not per byte: slowloris).
_REQUEST_TIMEOUT: Final = 10.0
# A client that does not read the answer is dropped after this (review M4: one that never read held its slot).
_WRITE_TIMEOUT: Final = 10.0
# Prometheus scrapes one at a time. When all slots are taken, the connection that has waited longest for its
# request head is closed to make room (newcomer-3 Medium 7): a real scrape sends its head at once, so slow
# senders cannot starve it however many they are, and no per-address count is needed (one attacker has many
# addresses; several Prometheus may share one). Slots all busy answering: 503.
_MAX_CONNECTIONS: Final = 16
_STATES: Final[tuple[TunnelState, ...]] = ("up", "down", "disabled", "error")
_IPSEC_STATES: Final[tuple[IpsecState, ...]] = ("established", "connecting", "down")


@dataclass(frozen=True)
class ReloadOutcome:
    """The last config load (the start, then each reload): did it apply, and when did one last apply."""

    ok: bool
    last_success: float  # Unix time


class DaemonCollector:
    """The greupd_* metric families over the daemon's status, read afresh on every collect()."""

    def __init__(self, status: Callable[[], DaemonStatus], reload: Callable[[], ReloadOutcome],
                 version: str = __version__) -> None:
        self._status = status
        self._reload = reload
        self._version = version

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.metrics_core import CounterMetricFamily  # imported when first rendered: start-up

        status, reload = self._status(), self._reload()
        yield _gauge("greupd_build_info", "greupd's version; the value is always 1", 1, version=self._version)
        yield _gauge("greupd_config_generation", "Bumps on every applied config; 1 at start",
                     status["generation"])
        yield _gauge("greupd_config_last_reload_success",
                     "1 if the last config load (start or reload) applied, 0 if it was rejected", int(reload.ok))
        yield _gauge("greupd_config_last_reload_success_timestamp_seconds",
                     "When a config was last applied (start or reload)", reload.last_success)
        if "netlink_requests" in status:
            yield CounterMetricFamily("greupd_netlink_requests", "rtnetlink requests sent since the daemon started",
                                      status["netlink_requests"])
        yield from _tunnel_families(status)
        yield from _ipsec_families(status)
        yield from _keepalive_socket_families(status)
        yield from _liveness_families(status)
        yield from _path_mtu_families(status)


def _gauge(name: str, documentation: str, value: float, **labels: str) -> GaugeMetricFamily:
    from prometheus_client.metrics_core import GaugeMetricFamily

    family = GaugeMetricFamily(name, documentation, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


def _tunnel_families(status: DaemonStatus) -> Iterator[Metric]:
    from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

    tunnel = ["tunnel"]
    info = GaugeMetricFamily("greupd_tunnel_info", "A configured tunnel; the value is always 1",
                             labels=["tunnel", "mode", "local", "remote"])
    up = GaugeMetricFamily("greupd_tunnel_up", "1 if the tunnel is up (link present, keepalives answered)",
                           labels=tunnel)
    state = GaugeMetricFamily("greupd_tunnel_state", "1 for the state the tunnel is in, 0 for the others",
                              labels=["tunnel", "state"])
    changes = CounterMetricFamily("greupd_tunnel_state_changes", "State transitions after the tunnel's first "
                                  "state (flaps: keepalive timeouts and returns, removed links, errors)",
                                  labels=tunnel)
    since = GaugeMetricFamily("greupd_tunnel_last_change_timestamp_seconds",
                              "When the tunnel entered its current state", labels=tunnel)
    repairs = CounterMetricFamily("greupd_drift_repairs", "Passes that put back what another program changed "
                                  "or removed on the tunnel (link, address, route)", labels=tunnel)
    installed = GaugeMetricFamily("greupd_routes_installed", "The tunnel's routes greupd has installed "
                                  "(0 while it is down)", labels=tunnel)
    configured = GaugeMetricFamily("greupd_routes_configured", "The routes the config gives the tunnel",
                                   labels=tunnel)
    sent = CounterMetricFamily("greupd_keepalive_sent", "Keepalive probes sent", labels=tunnel)
    received = CounterMetricFamily("greupd_keepalive_received", "Keepalive replies received", labels=tunnel)
    missed = GaugeMetricFamily("greupd_keepalive_missed_in_a_row",
                               "Probes unanswered since the last reply; `retries` of them take the tunnel down",
                               labels=tunnel)
    rtt = GaugeMetricFamily("greupd_keepalive_rtt_seconds", "Round-trip time of the last keepalive reply",
                            labels=tunnel)
    interval = GaugeMetricFamily("greupd_keepalive_interval_seconds", "Seconds between keepalive probes",
                                 labels=tunnel)
    for t in status["tunnels"]:
        name = [t["name"]]
        info.add_metric([t["name"], t["mode"], t["local"], t["remote"]], 1)
        up.add_metric(name, int(t["state"] == "up"))
        for each in _STATES:
            state.add_metric([t["name"], each], int(t["state"] == each))
        changes.add_metric(name, t["state_changes"])
        since.add_metric(name, _timestamp(t["since"]))
        repairs.add_metric(name, t["drift_repairs"])
        installed.add_metric(name, len(t["routes"]) if t["routes_installed"] else 0)
        configured.add_metric(name, len(t["routes"]))
        keepalive = t["keepalive"]
        if keepalive is None:
            continue
        sent.add_metric(name, keepalive["sent"])
        received.add_metric(name, keepalive["received"])
        missed.add_metric(name, keepalive["missed_in_a_row"])
        interval.add_metric(name, keepalive["interval"])
        if keepalive["last_rtt_ms"] is not None:
            rtt.add_metric(name, keepalive["last_rtt_ms"] / 1000)
    yield from (info, up, state, changes, since, repairs, installed, configured, sent, received, missed, rtt,
                interval)


def _keepalive_socket_families(status: DaemonStatus) -> Iterator[Metric]:
    """The keepalive socket's drops: replies a flood pushed out of its receive buffer count as misses (#21 M6)."""
    from prometheus_client.metrics_core import CounterMetricFamily

    keepalive_socket = status.get("keepalive_socket")
    if keepalive_socket is None:
        return
    yield _gauge("greupd_keepalive_socket_filter_addresses", "1 if the kernel passes keepalive packets from "
                 "configured remotes only, 0 if from any source (too many remotes for the filter)",
                 int(keepalive_socket["filter"] != "protocol"))
    yield _gauge("greupd_keepalive_socket_filter_tokens", "1 if the kernel passes only replies that carry a "
                 "token greupd issued, 0 if any reply from a configured remote (too many tunnels for the filter)",
                 int(keepalive_socket["filter"] == "tokens"))
    if keepalive_socket["drops"] is not None:
        yield CounterMetricFamily("greupd_keepalive_socket_drops", "Packets the kernel dropped at the keepalive "
                                  "socket because its receive buffer was full", keepalive_socket["drops"])


def _liveness_families(status: DaemonStatus) -> Iterator[Metric]:
    """BFD sessions and dampening (greupd/liveness/): absent for tunnels without them."""
    from prometheus_client.metrics_core import GaugeMetricFamily

    bfd = GaugeMetricFamily("greupd_bfd_session_up", "1 while the tunnel's BFD session is Up", labels=["tunnel"])
    dampened = GaugeMetricFamily("greupd_tunnel_dampened", "1 while dampening holds the flapping tunnel down",
                                 labels=["tunnel"])
    for t in status["tunnels"]:
        if "bfd" in t:
            bfd.add_metric([t["name"]], int(t["bfd"]["state"] == "up"))
        if "liveness" in t:
            dampened.add_metric([t["name"]], int("dampening" in t["liveness"]["down_by"]))
    yield from (bfd, dampened)


def _ipsec_families(status: DaemonStatus) -> Iterator[Metric]:
    """Tunnels with [tunnel.ipsec]: is ESP there (IKE_SA established, CHILD_SA installed), and is charon reached.

    Absent without [tunnel.ipsec] anywhere: a dashboard tells "no IPsec configured" from "charon unreachable".
    """
    with_ipsec = [(t["name"], t["ipsec"]) for t in status["tunnels"] if "ipsec" in t]
    if not with_ipsec:
        return
    from prometheus_client.metrics_core import GaugeMetricFamily  # imported when first rendered: start-up

    tunnel = ["tunnel"]
    sa_up = GaugeMetricFamily("greupd_ipsec_sa_up", "1 if the tunnel's IPsec SAs are established "
                              "(IKE_SA established, CHILD_SA installed): its GRE travels in ESP", labels=tunnel)
    state = GaugeMetricFamily("greupd_ipsec_state", "1 for the tunnel's IPsec state (established, connecting, "
                              "down), 0 for the others", labels=["tunnel", "state"])
    charon = GaugeMetricFamily("greupd_ipsec_charon_connected",
                               "1 if greupd holds a VICI session with charon ([daemon] vici_socket)")
    for name, ipsec in with_ipsec:
        sa_up.add_metric([name], int(ipsec["state"] == "established"))
        for each in _IPSEC_STATES:
            state.add_metric([name, each], int(ipsec["state"] == each))
    # One session serves every tunnel; each tunnel's status carries the same flag.
    charon.add_metric([], int(any(ipsec["charon"] for _, ipsec in with_ipsec)))
    yield from (sa_up, state, charon)


def _path_mtu_families(status: DaemonStatus) -> Iterator[Metric]:
    """Tunnels with mtu = "probe" (#23): the MTU measured end to end and set on the link; absent before a result."""
    measured = [(t["name"], t["path_mtu"]) for t in status["tunnels"] if "path_mtu" in t]
    if not measured:
        return
    from prometheus_client.metrics_core import GaugeMetricFamily  # imported when first rendered: start-up

    size = GaugeMetricFamily("greupd_tunnel_path_mtu_bytes", "The tunnel's MTU measured end to end by padded "
                             "keepalives and set on its link (the floor when even that did not come back)",
                             labels=["tunnel"])
    failed = GaugeMetricFamily("greupd_tunnel_path_mtu_failed", "1 if not even the floor came back (a black "
                               "hole below it)", labels=["tunnel"])
    ipv6 = GaugeMetricFamily("greupd_tunnel_path_mtu_ipv6", "1 if the MTU carries IPv6 (1280 or more, RFC 8200)",
                             labels=["tunnel"])
    for name, path_mtu in measured:
        if path_mtu["bytes"] is None:
            continue
        size.add_metric([name], path_mtu["bytes"])
        failed.add_metric([name], int(path_mtu["state"] == "failed"))
        ipv6.add_metric([name], int(path_mtu["bytes"] >= 1280))
    yield from (size, failed, ipv6)


def _timestamp(iso: str) -> float:
    # status' `since` is ISO 8601 UTC with a Z (report.now_iso); fromisoformat reads the Z from Python 3.11 on.
    return datetime.fromisoformat(iso).timestamp()


def render(status: DaemonStatus, reload: ReloadOutcome, version: str = __version__) -> str:
    """The greupd_* metrics of one status, as the textfile holds them."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonCollector(lambda: status, lambda: reload, version))
    return generate_latest(registry).decode()


# --- the daemon's side ---------------------------------------------------------------------------------------

class MetricsPublisher:
    """Keeps the textfile and the listener of `[daemon] metrics_*` in step with the daemon's status.

    status: the daemon's status (Daemon.status); settings: the [daemon] table in force (it changes on reload);
    start: how the daemon started (a config rejected at start is a failed load); on_error: problems an operator
    must see (a textfile that cannot be written, an address in use), each said once, not at every refresh.
    """

    def __init__(self, status: Callable[[], DaemonStatus], settings: Callable[[], DaemonConfig],
                 start: StartConfig | None, on_error: Callable[[str], None], min_gap: float = MIN_GAP) -> None:
        self._settings = settings
        self._on_error = on_error
        self._min_gap = min_gap
        self._rendered_at = -min_gap  # time.monotonic() of the last rendering of greupd's metrics
        self._rendered = ""  # that rendering, shared by the textfile, GET /metrics and `greupd metrics`
        self._stale = True  # a pass, reload or verdict since that rendering: the textfile wants a new one
        self._pending: asyncio.TimerHandle | None = None  # a rendering put off by MIN_GAP
        self._reload = ReloadOutcome(start is None or start.rejected is None, time.time())
        self._collector = DaemonCollector(status, lambda: self._reload)
        # (greupd_*, the textfile's; process_*, which the control socket and GET /metrics add)
        self._registries: tuple[CollectorRegistry, CollectorRegistry] | None = None  # made when first needed
        self._textfile: Path | None = None  # the file we wrote last, to remove when the setting changes
        self._written = ""
        self._said: str | None = None  # the last problem reported, so a refresh does not repeat it
        self._listener: MetricsListener | None = None
        self._refused: str | None = None  # an address that could not be bound, tried again at the next reload
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    def _registry(self, process: bool) -> CollectorRegistry:
        # prometheus_client is imported here, not at start: a daemon without metrics_* settings never scraped
        # starts ~30 ms sooner (natively) without it.
        if self._registries is None:
            from prometheus_client import CollectorRegistry, ProcessCollector

            own, processes = CollectorRegistry(auto_describe=False), CollectorRegistry(auto_describe=False)
            own.register(self._collector)
            ProcessCollector(registry=processes)
            self._registries = own, processes
        return self._registries[1 if process else 0]

    def _greupd_text(self, fresh: bool) -> str:
        """greupd's metrics, rendered anew only if `fresh` is wanted and something changed since, or the last
        rendering is MIN_GAP old. One loop, synchronous rendering: never two at a time."""
        from prometheus_client import generate_latest

        now = time.monotonic()
        if (fresh and self._stale) or now - self._rendered_at >= self._min_gap or not self._rendered:
            self._rendered_at, self._stale = now, False
            self._rendered = generate_latest(self._registry(process=False)).decode()
        return self._rendered

    def text(self) -> str:
        """What `greupd metrics` and GET /metrics answer: greupd's (shared, see _greupd_text), then the process'."""
        from prometheus_client import generate_latest

        return self._greupd_text(fresh=False) + generate_latest(self._registry(process=True)).decode()

    def publish(self) -> None:
        """After a pass, a reload or a rejected one: rewrite the textfile if its text changed, and have the
        listener follow `metrics_listen`. The first call starts the task that refreshes and cleans up."""
        loop = asyncio.get_running_loop()
        self._stale = True
        if self._task is None:
            self._task = loop.create_task(self._run(), name="greupd metrics")
        wait = self._rendered_at + self._min_gap - time.monotonic()
        if wait <= 0:
            self._write_textfile(self._settings().metrics_textfile)
        elif self._pending is None:
            self._pending = loop.call_later(wait, self._write_pending)
        if self._settings().metrics_listen != self._listening_at():
            self._wake.set()

    def _write_pending(self) -> None:
        self._pending = None
        self._write_textfile(self._settings().metrics_textfile)

    def reloaded(self, result: ReloadResult) -> ReloadResult:
        """Wraps Daemon.reload's answer: the reload counts, applied or rejected. An applied one binds
        metrics_listen at once, and a failure to is part of the answer (newcomer-3 Low 15: `greupd reload` said
        "reloaded" while the journal said the port was in use)."""
        self._reload = ReloadOutcome(result["ok"], time.time() if result["ok"] else self._reload.last_success)
        self._refused, self._said = None, None  # a reload is how an admin says "try again" (the port may be free)
        problem = self._follow_listen(self._settings().metrics_listen) if result["ok"] else None
        self.publish()
        if problem is None:
            return result
        return {**result, "error": "\n".join(filter(None, [result["error"], f"{problem} (tried again at the next"
                                                                           " reload)"]))}

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                # A timer rather than wait_for: Python 3.11's wait_for can swallow the cancellation that ends
                # the daemon's loop when the event is set at the same moment, and asyncio.run would wait forever.
                refresh = loop.call_later(REFRESH, self._wake.set)
                try:
                    await self._wake.wait()
                finally:
                    refresh.cancel()
                self._wake.clear()
                try:
                    self._follow_listen(self._settings().metrics_listen)
                    if self._listener is not None and not self._listener.serving:
                        await self._listener.serve()
                    self._write_textfile(self._settings().metrics_textfile)
                except Exception as exc:
                    # A bug here must not end the refreshes silently, nor reach the daemon's loop.
                    self._say(f"metrics: {type(exc).__name__}: {exc}")
        finally:
            if self._pending is not None:
                self._pending.cancel()
            if self._listener is not None:
                self._listener.close()
            if self._textfile is not None:
                with contextlib.suppress(OSError):
                    self._textfile.unlink(missing_ok=True)

    def _listening_at(self) -> str | None:
        return self._listener.address if self._listener is not None else self._refused

    def _follow_listen(self, wanted: str | None) -> str | None:
        """Bind `metrics_listen` if it changed (synchronously: a reload's answer says when it cannot); the task
        then serves it. Returns the problem, if any."""
        if self._listening_at() == wanted:
            return None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self._refused = None
        if wanted is None:
            return None
        listener = MetricsListener(wanted, self.text)
        try:
            listener.bind()
        except OSError as exc:
            # Metrics are not worth a tunnel: the daemon carries on, and tries again at the next reload.
            problem = f"metrics_listen = {wanted!r}: cannot listen: {exc.strerror or exc}"
            self._say(problem)
            self._refused = wanted
            return problem
        self._listener = listener
        self._wake.set()  # the task starts serving it
        log.info("metrics: serving GET /metrics on %s", wanted)
        return None

    def _write_textfile(self, path: Path | None) -> None:
        """Never raises: it runs inside the daemon's pass, and a metrics problem must not look like the kernel's."""
        try:
            self._replace_textfile(path)
        except Exception as exc:
            self._say(f"metrics: {type(exc).__name__}: {exc}")

    def _replace_textfile(self, path: Path | None) -> None:
        if path != self._textfile and self._textfile is not None:
            with contextlib.suppress(OSError):
                self._textfile.unlink(missing_ok=True)  # the setting moved or went away: ours, not to leave
            self._written = ""
        self._textfile = path
        if path is None:
            return
        text = self._greupd_text(fresh=True)
        if text == self._written:
            return
        try:
            write_atomically(path, text)
        except OSError as exc:
            self._say(f"metrics_textfile = {str(path)!r}: cannot write it: {exc.strerror or exc} (under"
                      " greupd.service its directory must be writable by user greupd, and in ReadWritePaths= of a"
                      " drop-in)")
            return
        self._written = text
        self._said = None

    def _say(self, problem: str) -> None:
        if problem != self._said:
            self._said = problem
            self._on_error(problem)


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` with `text`: a temporary file beside it, then rename(2), so readers see the old or the new.

    The temporary name does not end in .prom: node_exporter reads only *.prom, never a file still being written.
    """
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.chmod(temporary, 0o644)  # node_exporter runs as a user of its own; mkstemp made it 0600
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


# --- GET /metrics --------------------------------------------------------------------------------------------

class MetricsListener:
    """A minimal HTTP/1.x server for Prometheus: GET (or HEAD) /metrics, 404 for any other path, one request per
    connection. Inside the daemon's loop, no threads."""

    def __init__(self, address: str, text: Callable[[], str]) -> None:
        self.address = address
        self._text = text
        self._socket: socket.socket | None = None
        self._server: asyncio.Server | None = None
        self._starting = self._closed = False
        # Open connections, oldest first -> still waiting for its request head (evictable, see _MAX_CONNECTIONS).
        self._slots: dict[asyncio.StreamWriter, bool] = {}

    def bind(self) -> None:
        """Bind and listen now (raises OSError: an address in use, not ours); serve() then answers."""
        host, port = listen_address(self.address)
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's start_server
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # "[::]" is IPv6's, as asyncio does
            sock.bind((host, port))
            sock.listen(100)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._socket = sock

    @property
    def serving(self) -> bool:
        return self._server is not None or self._starting

    async def serve(self) -> None:
        if self._socket is None:
            self.bind()
        self._starting = True
        try:
            server = await asyncio.start_server(self._serve, sock=self._socket, limit=_MAX_REQUEST)
        finally:
            self._starting = False
        if self._closed:  # a reload moved metrics_listen while the server was being set up: the server closes it
            server.close()
            return
        self._server = server

    @property
    def port(self) -> int | None:
        """The bound TCP port (tests listen on port 0)."""
        if self._socket is None or self._closed:
            return None
        port: int = self._socket.getsockname()[1]
        return port

    def close(self) -> None:
        self._closed = True
        if self._server is not None:
            self._server.close()
            self._server = None
        elif self._socket is not None and not self._starting:
            self._socket.close()  # (while starting, the loop has it registered: serve() closes it through its server)

    def _make_room(self) -> bool:
        """Close the connection that has waited longest for its request head; False if every slot is answering."""
        oldest = next((w for w, reading in self._slots.items() if reading), None)
        if oldest is None:
            return False
        del self._slots[oldest]
        oldest.transport.abort()
        return True

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._slots) >= _MAX_CONNECTIONS and not self._make_room():
            writer.write(_response("503 Service Unavailable", b"every connection is busy answering\n",
                                   {"Retry-After": "1"}))
            writer.close()  # a few hundred bytes: they fit in the socket buffer, nothing to wait for
            return
        self._slots[writer] = True
        try:
            try:
                async with asyncio.timeout(_REQUEST_TIMEOUT):
                    head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
                head = b""  # incomplete, too large or too slow: not a scrape
            if writer not in self._slots:
                return  # closed to make room for a newer connection
            self._slots[writer] = False
            status, body, extra = self._answer(head)
            if head.startswith(b"HEAD "):
                extra["Content-Length"] = str(len(body))
                body = b""
            writer.write(_response(status, body, extra))
            try:
                async with asyncio.timeout(_WRITE_TIMEOUT):
                    await writer.drain()
            except TimeoutError:
                writer.transport.abort()  # it does not read: its slot is worth more to the next scrape
            except ConnectionError:
                pass
        finally:
            self._slots.pop(writer, None)
            writer.close()

    def _answer(self, head: bytes) -> tuple[str, bytes, dict[str, str]]:
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return "400 Bad Request", b"a request line and headers of at most 8 KiB\n", {}
        method, target = parts[0], parts[1]
        if method not in (b"GET", b"HEAD"):
            return "405 Method Not Allowed", b"GET /metrics\n", {"Allow": "GET, HEAD"}
        if target.split(b"?", 1)[0] != b"/metrics":
            return "404 Not Found", b"greupd serves GET /metrics only\n", {}
        return "200 OK", self._text().encode(), {"Content-Type": CONTENT_TYPE}


def _response(status: str, body: bytes, headers: dict[str, str]) -> bytes:
    fields = {"Content-Type": "text/plain; charset=utf-8", "Content-Length": str(len(body)), "Connection": "close",
              **headers}
    head = f"HTTP/1.1 {status}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items()) + "\r\n"
    return head.encode("ascii") + body
