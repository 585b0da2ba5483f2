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

No threads and no global registry: greupd's metrics are written by metrics_text.py from the daemon's status, a
slice of tunnels at a time with the loop running between slices; prometheus_client makes only `process_*`.
The publisher's task ends when the daemon's loop does (asyncio.run cancels it); then the listener closes and
the textfile is removed, so a stopped daemon leaves no stale `up` behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import ipaddress
import logging
import os
import socket
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from greupd import __version__
from greupd.config import DaemonConfig, listen_address
from greupd.metrics_text import LabelCache, MetricsText, render_text
from greupd.state import StartConfig
from greupd.status import SLICE, DaemonStatus, ReloadResult, StatusOf, TunnelStatus, status_in_slices

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

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


@dataclass(frozen=True)
class ReloadOutcome:
    """The last config load (the start, then each reload): did it apply, and when did one last apply."""

    ok: bool
    last_success: float  # Unix time


def render(status: DaemonStatus, reload: ReloadOutcome, version: str = __version__) -> str:
    """The greupd_* metrics of one status, as the textfile holds them."""
    return render_text(status, reload.ok, reload.last_success, version)


# --- the daemon's side ---------------------------------------------------------------------------------------

class MetricsPublisher:
    """Keeps the textfile and the listener of `[daemon] metrics_*` in step with the daemon's status.

    status: the daemon's status (Daemon.status); settings: the [daemon] table in force (it changes on reload);
    start: how the daemon started (a config rejected at start is a failed load); on_error: problems an operator
    must see (a textfile that cannot be written, an address in use), each said once, not at every refresh.
    """

    def __init__(self, status: StatusOf | Callable[[], DaemonStatus], settings: Callable[[], DaemonConfig],
                 start: StartConfig | None, on_error: Callable[[str], None], min_gap: float = MIN_GAP) -> None:
        self._settings = settings
        self._on_error = on_error
        self._min_gap = min_gap
        self._rendered_at = -min_gap  # time.monotonic() of the last rendering of greupd's metrics
        self._rendered = ""  # that rendering, shared by the textfile, GET /metrics and `greupd metrics`
        self._stale = True  # a pass, reload or verdict since that rendering: the textfile wants a new one
        self._pending: asyncio.TimerHandle | None = None  # a rendering put off by MIN_GAP
        self._reload = ReloadOutcome(start is None or start.rejected is None, time.time())
        # Daemon.status takes a slice of the tunnels: then renderings go a slice at a time (a plain status, all
        # tunnels at once, is a test's).
        self._sliced: StatusOf | None = status if inspect.signature(status).parameters else None  # type: ignore[assignment]
        self._whole: Callable[[], DaemonStatus] = (lambda: self._sliced(slice(None))) if self._sliced else status  # type: ignore[assignment,misc]
        self._tunnels = -1  # in the last rendering (-1: none yet)
        self._labels = LabelCache()  # kept between renderings
        self._rendering: asyncio.Task[str] | None = None  # a sliced rendering under way: scrapes meanwhile share it
        self._process: CollectorRegistry | None = None  # process_*, which the control socket and GET /metrics add
        self._textfile: Path | None = None  # the file we wrote last, to remove when the setting changes
        self._written = ""
        self._said: str | None = None  # the last problem reported, so a refresh does not repeat it
        self._listener: MetricsListener | None = None
        self._refused: str | None = None  # an address that could not be bound, tried again at the next reload
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    def _process_text(self) -> str:
        # prometheus_client is imported here, not at start: a daemon without metrics_* settings never scraped
        # starts ~30 ms sooner (natively) without it.
        from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest

        if self._process is None:
            self._process = CollectorRegistry(auto_describe=False)
            ProcessCollector(registry=self._process)
        return generate_latest(self._process).decode()

    def _due(self, fresh: bool) -> bool:
        """Render again? If `fresh` is wanted and something changed since, or the last rendering is MIN_GAP old."""
        now = time.monotonic()
        return (fresh and self._stale) or now - self._rendered_at >= self._min_gap or not self._rendered

    def _greupd_text(self, fresh: bool) -> str:
        """greupd's metrics, all tunnels in one go (see _due); for a few tunnels, and tests."""
        if self._due(fresh):
            self._rendered_at, self._stale = time.monotonic(), False
            status = self._whole()
            text = MetricsText(status, self._reload.ok, self._reload.last_success, self._labels)
            text.add(status["tunnels"])
            self._rendered, self._tunnels = text.text(), len(status["tunnels"])
        return self._rendered

    async def _greupd_text_sliced(self, fresh: bool) -> str:
        """The same, a slice of tunnels at a time, the loop running between them; one rendering at a time."""
        if self._sliced is None:
            return self._greupd_text(fresh)
        if self._rendering is None and self._due(fresh):
            self._rendering = asyncio.get_running_loop().create_task(self._render_sliced(self._sliced))
        if self._rendering is None:
            return self._rendered
        return await asyncio.shield(self._rendering)

    async def _render_sliced(self, status: StatusOf) -> str:
        self._stale = False  # a pass from now on wants another rendering
        texts: list[MetricsText] = []
        count = 0

        def begin(head: DaemonStatus) -> None:
            nonlocal count
            texts[:] = [MetricsText(head, self._reload.ok, self._reload.last_success, self._labels)]
            count = 0

        def each(tunnels: list[TunnelStatus]) -> None:
            nonlocal count
            texts[0].add(tunnels)
            count += len(tunnels)

        try:
            await status_in_slices(status, begin, each)
            self._rendered, self._rendered_at, self._tunnels = texts[0].text(), time.monotonic(), count
        finally:
            self._rendering = None
        return self._rendered

    def _small(self) -> bool:
        """Render on the spot rather than in slices: a test's status, or few tunnels last time."""
        return self._sliced is None or 0 <= self._tunnels <= SLICE

    def text(self) -> str:
        """`greupd metrics` and GET /metrics, all at once: greupd's (shared, see _greupd_text), then the process'."""
        return self._greupd_text(fresh=False) + self._process_text()

    async def scrape(self) -> str:
        """The same, rendered a slice at a time (what the control socket and GET /metrics call)."""
        return await self._greupd_text_sliced(fresh=False) + self._process_text()

    def publish(self) -> None:
        """After a pass, a reload or a rejected one: rewrite the textfile if its text changed, and have the
        listener follow `metrics_listen`. The first call starts the task that refreshes and cleans up."""
        loop = asyncio.get_running_loop()
        self._stale = True
        if self._task is None:
            self._task = loop.create_task(self._run(), name="greupd metrics")
        wait = self._rendered_at + self._min_gap - time.monotonic()
        if wait <= 0 and not self._small():
            self._wake.set()  # the task renders it a slice at a time, then writes it
        elif wait <= 0:
            self._write_textfile(self._settings().metrics_textfile)
        elif self._pending is None:
            self._pending = loop.call_later(wait, self._write_pending)
        if self._settings().metrics_listen != self._listening_at():
            self._wake.set()

    def _write_pending(self) -> None:
        self._pending = None
        if self._small():
            self._write_textfile(self._settings().metrics_textfile)
        else:
            self._wake.set()

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
                    path = self._settings().metrics_textfile
                    if path is not None and not self._small():
                        await self._greupd_text_sliced(fresh=True)  # then written from what it rendered
                    self._write_textfile(path)
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
        listener = MetricsListener(wanted, self.scrape)
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
        text = self._greupd_text(fresh=True) if self._small() else self._rendered
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

    def __init__(self, address: str, text: Callable[[], str | Awaitable[str]]) -> None:
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
            status, body, extra = await self._answer(head)
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

    async def _answer(self, head: bytes) -> tuple[str, bytes, dict[str, str]]:
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return "400 Bad Request", b"a request line and headers of at most 8 KiB\n", {}
        method, target = parts[0], parts[1]
        if method not in (b"GET", b"HEAD"):
            return "405 Method Not Allowed", b"GET /metrics\n", {"Allow": "GET, HEAD"}
        if target.split(b"?", 1)[0] != b"/metrics":
            return "404 Not Found", b"greupd serves GET /metrics only\n", {}
        text = self._text()
        if inspect.isawaitable(text):
            text = await text
        return "200 OK", text.encode(), {"Content-Type": CONTENT_TYPE}


def _response(status: str, body: bytes, headers: dict[str, str]) -> bytes:
    fields = {"Content-Type": "text/plain; charset=utf-8", "Content-Length": str(len(body)), "Connection": "close",
              **headers}
    head = f"HTTP/1.1 {status}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items()) + "\r\n"
    return head.encode("ascii") + body
