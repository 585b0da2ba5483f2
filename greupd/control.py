"""The control socket: how `greupd status`, `greupd metrics` and `greupd reload` talk to the running daemon.

Protocol: a Unix stream socket (mode 0660: the daemon's user and group; root, the daemon's own user and
members of its group may connect, and only the first two may reload; see _peer_access); each request is
one line of JSON, `{"command": "status"}`, `{"command": "reload"}` or `{"command": "metrics"}`, and each
answer one line of JSON, `{"ok": true, "result": ...}` (a DaemonStatus, a ReloadResult or a MetricsAnswer, see
greupd/status.py) or `{"ok": false, "error": "..."}` for a request the daemon could not serve. A rejected
config is not a protocol error: it is a ReloadResult with ok = false.

`control_socket` is the one place that says where the socket is, for the daemon and the CLI alike. The
tables people read are made from these answers by the CLI (greupd/cli_format.py), not here.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import inspect
import json
import os
import resource
import socket
import stat
import struct
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Final, Literal, Protocol, cast, overload

from greupd.config import DEFAULT_CONTROL_SOCKET, Config
from greupd.status import DaemonStatus, MetricsAnswer, ReloadResult, StatusOf, TunnelStatus, status_in_slices

COMMANDS: Final = ("status", "reload", "metrics")
# Seconds a client waits for the answer. A reload answers after the new config is applied to every tunnel and to
# nftables; `systemctl reload` (ExecReload=greupd reload) must not give up while the daemon is still at it.
DEFAULT_TIMEOUTS: Final[Mapping[str, float]] = {"status": 5.0, "reload": 120.0, "metrics": 5.0}
# A request is a few bytes; anything near this is not a greupd client.
_MAX_LINE: Final = 64 * 1024
# Connections waiting to be accepted; a client finding the queue full retries (connect) until its timeout.
_BACKLOG: Final = 128
# A client that connects and says nothing must not hold a connection open forever.
_IDLE_TIMEOUT: Final = 30.0
# Nor one that asks and never reads the answers (newcomer-3 Medium 5: `drain()` waited forever).
_WRITE_TIMEOUT: Final = 10.0
# Connections served at once, at most; fewer if the descriptor limit is low (a quarter of it: the rest is the
# daemon's own). When they are all taken, the one that has waited longest for a request is closed to make room:
# 1,100 idle clients ran the daemon out of descriptors (EMFILE for its own sysctl, state and textfile writes) and
# kept `greupd status` and `systemctl reload` out for their 30 s (newcomer-3 Medium 5).
_MAX_CONNECTIONS: Final = 256
# How long start() waits for an existing socket's daemon to answer before calling the socket stale.
_PROBE_TIMEOUT: Final = 1.0


class ControlUnavailable(Exception):
    """No daemon answers on the control socket: missing, refused, permission denied or timed out."""


class ControlError(Exception):
    """A daemon answered but refused the request (an unknown command: a client newer than the daemon)."""


class CannotServe(Exception):
    """The daemon cannot take up its place (its socket, its netns): it stops before touching the kernel."""


class ControlSocketBusy(CannotServe):
    """Another daemon already answers on the control socket: two greupd would fight over the same links."""


class ControlSocketUnusable(CannotServe):
    """The control socket cannot be created at its path (review L9: read-only under ProtectSystem=strict)."""


class AnotherDaemonHere(CannotServe):
    """Another greupd runs in this network namespace, whatever its control socket (review L7)."""


# One greupd per network namespace (review L7): a lock file per netns, named by the netns' inode, held with flock(2)
# while the daemon runs (the kernel drops it when the process dies: never stale after a crash). It lives where only
# root and greupd can create or open files (review M3, newcomer-3 High 3: the abstract name `\0greupd` used before
# could be bound first by any user in the netns, and the refusal, exit 1, is one systemd never retries).
# /run/greupd is greupd.service's RuntimeDirectory= (0750 greupd); greupd run as root makes it (0755) if missing.
LOCK_DIR: Final = Path("/run/greupd")


class NetnsLock:
    """This netns's greupd lock, held until close(). Two daemons in one netns would each delete the other's links as
    "not in the config" (the alias names no instance), also with different control sockets and configs."""

    def __init__(self, lock_dir: Path = LOCK_DIR) -> None:
        net = os.stat("/proc/thread-self/ns/net")
        self.path = lock_dir / f"netns-{net.st_dev}-{net.st_ino}.lock"
        try:
            _make_lock_dir(lock_dir)
            self._fd = self._take()
        except OSError as exc:
            raise CannotServe(f"cannot take this network namespace's greupd lock {self.path}: {exc.strerror or exc}"
                              " (greupd run needs root, or greupd.service, whose RuntimeDirectory= makes "
                              f"{lock_dir} for user greupd)") from exc

    def _take(self) -> int:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                os.close(fd)
                raise AnotherDaemonHere(
                    f"another greupd already runs in this network namespace{f' (pid {holder})' if holder else ''};"
                    " two would delete each other's tunnels. Stop that one first, or run this one in another netns"
                ) from None
            except BaseException:
                os.close(fd)
                raise
            # The holder before us unlinks the file as it stops: locking an unlinked file locks nothing. Try again.
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            os.close(fd)
        directory = os.stat(self.path.parent)
        if os.geteuid() == 0 and directory.st_uid != 0:
            os.fchown(fd, directory.st_uid, directory.st_gid)  # root's leftover must not lock user greupd out
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # for the message a second daemon gives
        return fd

    def close(self) -> None:
        if self._fd < 0:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()  # while still holding it: see _take
        os.close(self._fd)
        self._fd = -1


def _make_lock_dir(lock_dir: Path) -> None:
    with contextlib.suppress(FileExistsError):
        lock_dir.mkdir(mode=0o755)
    mode = os.stat(lock_dir).st_mode
    if mode & stat.S_IWOTH or not stat.S_ISDIR(mode):
        raise CannotServe(f"{lock_dir} must be a directory only root and greupd may write to (chmod o-w), or any user"
                          " could keep greupd from starting")


def control_socket(config: Config | Callable[[], Path] | None, override: str | Path | None = None) -> Path:
    """Where the daemon listens and the CLI asks: --socket, else $GREUPD_CONTROL_SOCKET, else the config's
    [daemon] control_socket, else the default. config may be a reader of that one key, called only when it is
    needed (the CLI's, which reads it without validating the config: review M10)."""
    given = override or os.environ.get("GREUPD_CONTROL_SOCKET")
    if given:
        return Path(given)
    if callable(config):
        return config()
    return config.daemon.control_socket if config is not None else DEFAULT_CONTROL_SOCKET


# --- the server ----------------------------------------------------------------------------------------------

class ControlServer:
    """Serves status, reload and metrics requests on a Unix socket, inside the daemon's asyncio loop."""

    def __init__(self, path: Path, status: StatusOf | Callable[[], DaemonStatus],
                 reload: Callable[[], Awaitable[ReloadResult]],
                 *, on_error: Callable[[str], None] | None = None,
                 metrics: Callable[[], str | Awaitable[str]] | None = None, netns_lock: bool = False) -> None:
        """status: Daemon.status, which gives a slice of the tunnels (then the answer is made a slice at a time,
        the loop running between slices), or a plain status of all of them; metrics: the Prometheus text
        (greupd/metrics.py), without it the command is refused. netns_lock: hold this netns's greupd lock
        (`claim_netns`) from start to close: the daemon's server does."""
        self._claims_netns = netns_lock
        self.path = path
        self._status = status
        self._sliced: StatusOf | None = status if inspect.signature(status).parameters else None  # type: ignore[assignment]
        self._reload = reload
        self._metrics = metrics
        self._on_error = on_error
        # Two `greupd reload` at once are two reloads, one after the other: the second asks once the first is
        # answered (a daemon runs each in one loop step; a coalesced pair would count as one generation).
        self._reload_lock = asyncio.Lock()
        self._server: asyncio.Server | None = None
        self._inode: int | None = None
        # Open connections, oldest first -> waiting for a request (idle: may be closed to make room).
        self._connections: dict[asyncio.StreamWriter, bool] = {}
        self._max_connections = min(_MAX_CONNECTIONS, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 4)
        self._netns_lock: NetnsLock | None = None

    async def start(self) -> None:
        """Take this netns's greupd lock, bind and listen. Raises AnotherDaemonHere when a greupd already runs
        in the netns, ControlSocketBusy when another daemon answers at the path, and ControlSocketUnusable when
        the path cannot hold a socket."""
        if self._claims_netns:
            self._netns_lock = NetnsLock()  # first: a second daemon here must not touch the kernel
        try:
            await self._start()
        except OSError as exc:
            raise ControlSocketUnusable(
                f"cannot create the control socket {self.path}: {exc.strerror or exc} (under greupd.service"
                " only /run/greupd is writable: put control_socket there, or add ReadWritePaths= in a drop-in)"
            ) from exc

    async def _start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_socket(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # The umask makes the socket 0660 from its first moment; a chmod after bind would leave a window. Its
            # group is the daemon's (greupd under greupd.service), whose members may ask for the status.
            previous_umask = os.umask(0o117)
            try:
                sock.bind(str(self.path))
            finally:
                os.umask(previous_umask)
            sock.listen(_BACKLOG)
            sock.setblocking(False)
            self._inode = os.stat(self.path).st_ino
            self._server = await asyncio.start_unix_server(self._serve_connection, sock=sock, limit=_MAX_LINE)
        except BaseException:
            sock.close()
            raise

    async def close(self) -> None:
        if self._netns_lock is not None:
            self._netns_lock.close()
            self._netns_lock = None
        if self._server is None:
            return
        self._server.close()
        await self._server.wait_closed()
        self._server = None
        # Remove the socket only if it is still ours: a successor may already have bound its own at the path.
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.path).st_ino == self._inode:
                self.path.unlink()

    def _make_room(self) -> bool:
        """Close the connection that has waited longest for a request; False if every one is being answered."""
        oldest = next((w for w, idle in self._connections.items() if idle), None)
        if oldest is None:
            return False
        del self._connections[oldest]
        oldest.transport.abort()
        return True

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._connections) >= self._max_connections and not self._make_room():
            writer.transport.abort()
            return
        self._connections[writer] = True
        try:
            access = _peer_access(writer.get_extra_info("socket"))
            if access is None:
                await _send(writer, {"ok": False, "error": "permission denied"})
                return
            while writer in self._connections:
                self._connections[writer] = True
                try:
                    async with asyncio.timeout(_IDLE_TIMEOUT):
                        line = await reader.readline()
                except ValueError:
                    # Over-long: the rest of it cannot be told apart from a next request, so say why and hang up.
                    await _send(writer, {"ok": False, "error": f"request longer than {_MAX_LINE} bytes; "
                                                               f"{command_error(None)}"})
                    return
                except (TimeoutError, ConnectionError):
                    return  # idle, or the client went away
                if not line or writer not in self._connections:
                    return  # the client is done, or we closed it to make room
                self._connections[writer] = False
                if not await _send(writer, await self._answer(line, may_reload=access == "all")):
                    return
        finally:
            self._connections.pop(writer, None)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _answer(self, line: bytes, may_reload: bool = True) -> dict[str, object] | bytes:
        command = parse_request(line)
        if command not in COMMANDS:
            return {"ok": False, "error": command_error(command)}
        if command == "reload" and not may_reload:
            return {"ok": False, "error": "permission denied: reload is for root and the daemon's own user"}
        try:
            if command == "status":
                if self._sliced is not None:
                    return await status_answer(self._sliced)
                return {"ok": True, "result": self._status()}  # type: ignore[call-arg]
            if command == "metrics":
                if self._metrics is None:
                    return {"ok": False, "error": "this daemon serves no metrics"}
                text = self._metrics()
                if inspect.isawaitable(text):
                    return await metrics_answer(await text)
                answer: MetricsAnswer = {"text": text}
                return {"ok": True, "result": answer}
            async with self._reload_lock:
                return {"ok": True, "result": await self._reload()}
        except Exception as exc:
            # A bug in the daemon's callback: the client learns of it, and the daemon logs it once, here.
            text = f"{command} failed: {type(exc).__name__}: {exc}"
            if self._on_error is not None:
                self._on_error(text)
            return {"ok": False, "error": text}


def parse_request(line: bytes) -> str | None:
    """The command a request line asks for, or None when it is not a JSON object with a string command."""
    try:
        request = json.loads(line)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: "[[[[..." nested thousands deep
        return None
    if not isinstance(request, dict):
        return None
    command = request.get("command")
    return command if isinstance(command, str) else None


def command_error(command: str | None) -> str:
    if command is None:
        return 'a request is one line of JSON: {"command": "status"}, {"command": "reload"} or {"command": "metrics"}'
    return f"unknown command {command!r}; known: {', '.join(COMMANDS)}"


# What the answers of status and metrics begin with, so that the client may print the result without parsing
# 4 MB of JSON to write it out again (10,000 tunnels): `request_raw`.
_RESULT_PREFIX: Final = b'{"ok": true, "result": '


async def status_answer(status: StatusOf) -> bytes:
    """The status answer's JSON, made a slice of tunnels at a time (metrics.status_in_slices), encoded as it goes:
    the same object as json.dumps of the whole status would give, "tunnels" last."""
    pieces: list[str] = []
    head: list[DaemonStatus] = []

    def begin(first: DaemonStatus) -> None:
        head[:] = [first]
        pieces.clear()

    def each(tunnels: list[TunnelStatus]) -> None:
        if tunnels:
            pieces.append(json.dumps(tunnels)[1:-1])

    await status_in_slices(status, begin, each)
    fields = {k: v for k, v in head[0].items() if k != "tunnels"}
    return (_RESULT_PREFIX + json.dumps(fields)[:-1].encode() + b', "tunnels": [' + ", ".join(pieces).encode()
            + b"]}}")


async def metrics_answer(text: str, chunk: int = 1 << 18) -> bytes:
    """The metrics answer's JSON, its text (megabytes for 10,000 tunnels) escaped a chunk at a time."""
    pieces = []
    for start in range(0, len(text), chunk):
        pieces.append(json.dumps(text[start:start + chunk])[1:-1])
        await asyncio.sleep(0)
    return _RESULT_PREFIX + b'{"text": "' + "".join(pieces).encode() + b'"}}'


async def _send(writer: asyncio.StreamWriter, answer: Mapping[str, object] | bytes) -> bool:
    """Write one answer; False when the client is gone or has not read for _WRITE_TIMEOUT (then it is dropped)."""
    writer.write((answer if isinstance(answer, bytes) else json.dumps(answer).encode()) + b"\n")
    try:
        async with asyncio.timeout(_WRITE_TIMEOUT):
            await writer.drain()
    except TimeoutError:
        writer.transport.abort()
        return False
    except ConnectionError:
        return False
    return True


class _PeerSocket(Protocol):
    """socket.socket, or the asyncio TransportSocket that get_extra_info("socket") hands out."""

    def getsockopt(self, level: int, optname: int, buflen: int) -> bytes: ...
    def fileno(self) -> int: ...


# SO_PEERGROUPS (Linux 4.13): the peer's supplementary groups as the kernel saw them at connect(). Python 3.11
# has no name for it; 59 is its number in asm-generic/socket.h, which x86 and arm use.
_SO_PEERGROUPS: Final = getattr(socket, "SO_PEERGROUPS", 59)
_MAX_PEER_GROUPS: Final = 256  # Python's getsockopt() reads at most 1024 bytes: 256 gid_t
_NGROUPS_MAX: Final = 65536  # the kernel's limit (linux/limits.h)


def _peer_access(sock: _PeerSocket | None) -> Literal["all", "status"] | None:
    """What the connecting process may ask: everything (root, the daemon's own user), the status (a member of
    the daemon's group, e.g. a monitoring agent in group greupd), or nothing.

    The 0660 mode already keeps others out; the credential check also holds if someone loosens the mode.
    """
    if sock is None:
        return None
    _pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                         struct.calcsize("3i")))  # struct ucred
    if uid in (0, os.geteuid()):
        return "all"
    if gid == os.getegid():
        return "status"
    try:
        groups = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, 4 * _MAX_PEER_GROUPS)
    except OSError as exc:
        if exc.errno != errno.ERANGE:
            return None  # ENOPROTOOPT: a kernel older than 4.13
        try:
            groups = peer_groups_beyond_256(sock.fileno())  # review L8: LDAP users are often in hundreds
        except OSError:
            return None
    if os.getegid() in struct.unpack(f"{len(groups) // 4}I", groups[: len(groups) // 4 * 4]):
        return "status"
    return None


def peer_groups_beyond_256(fd: int) -> bytes:
    """SO_PEERGROUPS with room for every group the kernel allows, through libc: Python's getsockopt() stops at
    1024 bytes. (Not /proc/<pid>/status: under greupd.service's ProtectProc=invisible user greupd cannot see a
    monitoring agent's process there, and a pid can be reused; SO_PEERGROUPS is what the peer was at connect().)"""
    libc = ctypes.CDLL(None, use_errno=True)
    buffer = ctypes.create_string_buffer(4 * _NGROUPS_MAX)
    length = ctypes.c_uint32(len(buffer))
    if libc.getsockopt(fd, socket.SOL_SOCKET, _SO_PEERGROUPS, buffer, ctypes.byref(length)) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))
    return buffer.raw[:length.value]


def _remove_stale_socket(path: Path) -> None:
    """Unlink a socket left by a daemon that died; refuse if a daemon answers there, or if it is no socket."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ControlSocketBusy(f"{path} exists and is not a socket; not removing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(_PROBE_TIMEOUT)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)  # nobody listens: left over from a daemon that did not stop cleanly
        return
    except OSError as exc:
        raise ControlSocketBusy(f"cannot tell whether another daemon owns {path}: {exc}") from exc
    finally:
        probe.close()
    raise ControlSocketBusy(f"another greupd already answers on {path}")


# --- the client --------------------------------------------------------------------------------------------------

@overload
def request(path: Path, command: Literal["status"], timeout: float | None = None) -> DaemonStatus: ...
@overload
def request(path: Path, command: Literal["reload"], timeout: float | None = None) -> ReloadResult: ...
@overload
def request(path: Path, command: Literal["metrics"], timeout: float | None = None) -> MetricsAnswer: ...
@overload
def request(path: Path, command: str, timeout: float | None = None) -> Mapping[str, object]: ...
def request(path: Path, command: str,
            timeout: float | None = None) -> Mapping[str, object] | DaemonStatus | ReloadResult | MetricsAnswer:
    """Send one command to the daemon and return its result.

    Raises ControlUnavailable when nothing answers within `timeout` seconds (default: DEFAULT_TIMEOUTS, long for
    reload, which answers once the new config is applied), ControlError when the daemon refuses the request.
    """
    return _result(_exchange(path, command, timeout))


def request_raw(path: Path, command: str, timeout: float | None = None) -> bytes:
    """The same, the result as the daemon wrote it (JSON, one line), not parsed: `greupd status --json` prints
    10,000 tunnels' status without reading 4 MB of JSON only to write it out again."""
    reply = _exchange(path, command, timeout)
    if reply.startswith(_RESULT_PREFIX) and reply.endswith(b"}"):
        return reply[len(_RESULT_PREFIX):-1]
    return json.dumps(_result(reply)).encode()


def _exchange(path: Path, command: str, timeout: float | None) -> bytes:
    if timeout is None:
        timeout = DEFAULT_TIMEOUTS.get(command, DEFAULT_TIMEOUTS["status"])
    sock = connect(path, timeout)
    try:
        try:
            sock.sendall(json.dumps({"command": command}).encode() + b"\n")
            reply = _read_line(sock)
        except TimeoutError as exc:
            raise ControlUnavailable(f"no answer within {timeout:g}s") from exc
        except OSError as exc:
            raise ControlUnavailable(str(exc)) from exc
    finally:
        sock.close()
    return reply


def _result(reply: bytes) -> Mapping[str, object]:
    if not reply:
        raise ControlUnavailable("the daemon closed the connection without answering")
    try:
        answer = json.loads(reply)
    except ValueError as exc:
        raise ControlError(f"unreadable answer: {reply[:200]!r}") from exc
    if not isinstance(answer, dict) or not answer.get("ok"):
        error = answer.get("error") if isinstance(answer, dict) else None
        raise ControlError(str(error or f"unexpected answer: {reply[:200]!r}"))
    result = answer.get("result")
    if not isinstance(result, dict):
        raise ControlError(f"answer without a result: {reply[:200]!r}")
    # The daemon is the same program: its JSON has the shapes of greupd.status by construction.
    return cast(Mapping[str, object], result)


def connect(path: Path, timeout: float) -> socket.socket:
    """A client socket connected to the daemon (its timeout set), or ControlUnavailable saying why not.

    A Unix socket with a timeout does not wait for a place in a full accept queue (a crowd of clients at once):
    connect() fails with EAGAIN at once. That is waited out here, up to `timeout`.
    """
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
            return sock
        except BlockingIOError:
            sock.close()
            if time.monotonic() >= deadline:
                raise ControlUnavailable(f"the daemon's connection queue stayed full for {timeout:g}s") from None
            time.sleep(0.01)
        except OSError as exc:
            sock.close()
            if isinstance(exc, FileNotFoundError):
                raise ControlUnavailable("no control socket") from exc
            if isinstance(exc, ConnectionRefusedError):
                raise ControlUnavailable("connection refused (stale socket)") from exc
            if isinstance(exc, PermissionError):
                raise ControlUnavailable("permission denied (the control socket is root's)") from exc
            raise ControlUnavailable(str(exc)) from exc


def _read_line(sock: socket.socket) -> bytes:
    chunks: list[bytes] = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        newline = chunk.find(b"\n")
        if newline >= 0:
            chunks.append(chunk[:newline])
            return b"".join(chunks)
        chunks.append(chunk)
