"""The control socket over a real Unix socket: `greupd status` / `greupd reload` against a daemon stand-in.

The stand-in is a real ControlServer in a thread's asyncio loop; only its status and reload providers are
stubs (they answer what router A's daemon would), since what is under test is the socket, not the daemon.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from greupd.cli_format import format_status
from greupd.control import (
    ControlError,
    ControlServer,
    ControlSocketBusy,
    ControlUnavailable,
    metrics_answer,
    parse_request,
    request,
    status_answer,
)
from greupd.metrics import ReloadOutcome, render
from greupd.status import DaemonStatus, ReloadResult, TunnelState, TunnelStatus

REPO = Path(__file__).resolve().parent.parent


def tunnel(name: str = "My_Tunnel", state: TunnelState = "up", reason: str = "keepalive-restored",
           routes_installed: bool = True, error: str | None = None) -> TunnelStatus:
    return {"name": name, "mode": "gre", "local": "172.19.1.1", "remote": "172.19.1.2",
            "state": state, "since": "2026-11-24T20:15:02Z", "reason": reason, "error": error,
            "ifindex": 7, "routes": ["20.10.1.0/24"], "routes_installed": routes_installed,
            "keepalive": {"interval": 1.0, "retries": 3, "sent": 120, "received": 118,
                          "missed_in_a_row": 0, "last_rtt_ms": 0.24},
            "state_changes": 2, "drift_repairs": 1}


def router_a(generation: int = 1) -> DaemonStatus:
    return {"config": "/etc/greupd/tunnels.toml", "generation": generation, "last_error": None,
            "pid": 4242, "tunnels": [tunnel()]}


class StandInDaemon:
    """A ControlServer on its own loop in a thread, so the synchronous client can be called from the test."""

    def __init__(self, path: Path, reload: Callable[[], Awaitable[ReloadResult]] | None = None) -> None:
        self.path = path
        self.generation = 1
        self.reloads = 0
        self.errors: list[str] = []
        self._reload = reload or self._accept_reload
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.server = ControlServer(path, lambda: router_a(self.generation), self._reload,
                                    on_error=self.errors.append, metrics=self._metrics)

    def _metrics(self) -> str:
        return render(router_a(self.generation), ReloadOutcome(ok=True, last_success=1764360000.0))

    async def _accept_reload(self) -> ReloadResult:
        self.reloads += 1
        self.generation += 1
        return {"ok": True, "generation": self.generation, "error": None}

    def run(self, coro: Coroutine[object, object, None]) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    def __enter__(self) -> StandInDaemon:
        self._thread.start()
        self.run(self.server.start())
        return self

    def __exit__(self, *exc: object) -> None:
        self.run(self.server.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    # AF_UNIX paths are limited to 108 bytes; pytest's tmp_path can be long, so keep the name short.
    return tmp_path / "run" / "c.sock"


@pytest.fixture
def daemon(sock_path: Path) -> Iterator[StandInDaemon]:
    with StandInDaemon(sock_path) as d:
        yield d


def test_status_over_the_socket(daemon: StandInDaemon) -> None:
    status = request(daemon.path, "status")
    assert status == router_a()


def test_socket_is_for_the_daemons_user_and_group_and_its_dir_is_created(daemon: StandInDaemon) -> None:
    info = os.stat(daemon.path)
    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o660
    assert info.st_gid == os.getegid()  # greupd's group under greupd.service


def ask_as(uid: int, groups: str, path: Path, command: str) -> str:
    """One request from another user's process (setpriv), the way a monitoring agent would connect."""
    client = ("import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]);"
              "s.sendall(('{\"command\": \"%s\"}\\n' % sys.argv[2]).encode());"
              "print(s.makefile().readline(), end='')")
    done = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", f"--groups={groups}",
                           sys.executable, "-I", "-c", client, str(path), command],
                          capture_output=True, text=True, timeout=30)
    return done.stdout or done.stderr


@pytest.fixture
def shared_daemon() -> Iterator[StandInDaemon]:
    """A stand-in whose socket other users can reach: pytest's tmp_path is under a 0700 folder of root's."""
    folder = Path(tempfile.mkdtemp(prefix="greupd-control-"))
    try:
        folder.chmod(0o755)
        with StandInDaemon(folder / "run" / "c.sock") as d:
            d.path.parent.chmod(0o755)  # as RuntimeDirectoryMode=0750 with group greupd
            yield d
    finally:
        shutil.rmtree(folder)


@pytest.mark.needs_root
def test_a_member_of_the_daemons_group_may_ask_for_the_status_but_not_reload(shared_daemon: StandInDaemon) -> None:
    daemon, nobody = shared_daemon, 65534
    # A member of the daemon's group (root's group here, greupd's under the unit) reads the status ...
    member = json.loads(ask_as(nobody, str(os.getegid()), daemon.path, "status"))
    assert member["ok"] and member["result"]["tunnels"][0]["name"] == "My_Tunnel"
    refused = json.loads(ask_as(nobody, str(os.getegid()), daemon.path, "reload"))
    assert refused == {"ok": False, "error": "permission denied: reload is for root and the daemon's own user"}
    assert daemon.reloads == 0
    # ... anyone else cannot even connect.
    assert "PermissionError" in ask_as(nobody, str(nobody), daemon.path, "status")


@pytest.mark.needs_root
def test_a_member_of_more_than_256_groups_gets_the_status(shared_daemon: StandInDaemon) -> None:
    """Review L8: Python's getsockopt() reads at most 256 groups, and a monitoring agent in 300 (LDAP) was refused
    although the daemon's group is among them; now the rest are read through libc."""
    many = ",".join([*(str(gid) for gid in range(20000, 20300)), str(os.getegid())])  # the daemon's group: 301st
    member = json.loads(ask_as(65534, many, shared_daemon.path, "status"))
    assert member["ok"] and member["result"]["tunnels"][0]["name"] == "My_Tunnel", member
    assert "PermissionError" in ask_as(65534, ",".join(str(gid) for gid in range(20000, 20300)), shared_daemon.path,
                                       "status")  # 300 groups, not the daemon's: the socket's mode keeps it out


def test_reload_accepted_bumps_generation(daemon: StandInDaemon) -> None:
    result = request(daemon.path, "reload")
    assert result == {"ok": True, "generation": 2, "error": None}
    assert request(daemon.path, "status")["generation"] == 2


def test_reload_rejected_is_an_answer_not_an_error(sock_path: Path) -> None:
    async def reject() -> ReloadResult:
        return {"ok": False, "generation": 1,
                "error": "/etc/greupd/tunnels.toml:31: tunnel[0].keepalive.interval: must be at least 0.05"}

    with StandInDaemon(sock_path, reload=reject) as d:
        result = request(d.path, "reload")
    assert result["ok"] is False
    assert "keepalive.interval" in str(result["error"])


def test_concurrent_reloads_run_one_after_the_other(sock_path: Path) -> None:
    running = 0
    overlapped = False

    async def slow_reload() -> ReloadResult:
        nonlocal running, overlapped
        running += 1
        overlapped = overlapped or running > 1
        await asyncio.sleep(0.05)
        running -= 1
        return {"ok": True, "generation": 2, "error": None}

    with StandInDaemon(sock_path, reload=slow_reload) as d:
        threads = [threading.Thread(target=request, args=(d.path, "reload")) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not overlapped


def test_unknown_command_is_refused(daemon: StandInDaemon) -> None:
    with pytest.raises(ControlError, match="unknown command 'restart'"):
        request(daemon.path, "restart")


def test_garbage_line_gets_a_readable_error(daemon: StandInDaemon) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(daemon.path))
        s.sendall(b"status please\n")
        answer = json.loads(s.makefile().readline())
    assert answer["ok"] is False
    assert '{"command": "status"}' in answer["error"]


def test_several_requests_on_one_connection(daemon: StandInDaemon) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(daemon.path))
        s.sendall(b'{"command": "status"}\n{"command": "reload"}\n')
        lines = s.makefile()
        first, second = json.loads(lines.readline()), json.loads(lines.readline())
    assert first["result"]["generation"] == 1
    assert second["result"] == {"ok": True, "generation": 2, "error": None}


def test_a_failing_provider_is_reported_to_client_and_daemon(sock_path: Path) -> None:
    async def broken() -> ReloadResult:
        raise RuntimeError("netlink socket closed")

    with StandInDaemon(sock_path, reload=broken) as d:
        with pytest.raises(ControlError, match="reload failed: RuntimeError: netlink socket closed"):
            request(d.path, "reload")
        assert d.errors == ["reload failed: RuntimeError: netlink socket closed"]
        assert request(d.path, "status")["pid"] == 4242  # the server survives


def test_no_socket_means_no_daemon(tmp_path: Path) -> None:
    with pytest.raises(ControlUnavailable, match="no control socket"):
        request(tmp_path / "absent.sock", "status")


def test_stale_socket_is_refused_then_replaced(sock_path: Path) -> None:
    sock_path.parent.mkdir()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock_path))
    stale.close()  # bound, never listening: what a killed daemon leaves behind
    with pytest.raises(ControlUnavailable, match="refused"):
        request(sock_path, "status")
    with StandInDaemon(sock_path) as d:
        assert request(d.path, "status")["pid"] == 4242


def test_a_second_daemon_on_the_same_socket_refuses_to_start(daemon: StandInDaemon) -> None:
    second = ControlServer(daemon.path, router_a, daemon._accept_reload)
    with pytest.raises(ControlSocketBusy, match="another greupd already answers"):
        asyncio.run(second.start())
    assert request(daemon.path, "status")["pid"] == 4242  # the first keeps its socket


def test_a_regular_file_at_the_socket_path_is_not_deleted(sock_path: Path) -> None:
    sock_path.parent.mkdir()
    sock_path.write_text("not a socket")
    with pytest.raises(ControlSocketBusy, match="not a socket"):
        asyncio.run(ControlServer(sock_path, router_a, StandInDaemon(sock_path)._accept_reload).start())
    assert sock_path.read_text() == "not a socket"


def test_close_removes_the_socket(sock_path: Path) -> None:
    with StandInDaemon(sock_path):
        assert sock_path.exists()
    assert not sock_path.exists()


def test_silent_listener_times_out(sock_path: Path) -> None:
    sock_path.parent.mkdir()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as mute:
        mute.bind(str(sock_path))
        mute.listen(1)  # accepts into the backlog, never answers: a hung daemon
        with pytest.raises(ControlUnavailable, match=r"no answer within 0\.2s"):
            request(sock_path, "status", timeout=0.2)


# --- the CLI against a real socket --------------------------------------------------------------------------

def greupd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "greupd", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})})


def test_cli_status_exit_3_when_no_daemon_answers(tmp_path: Path) -> None:
    result = greupd("status", "--socket", str(tmp_path / "none.sock"))
    assert result.returncode == 3
    assert "no daemon answers" in result.stderr


def test_cli_status_table_and_json(daemon: StandInDaemon) -> None:
    table = greupd("status", "--socket", str(daemon.path))
    assert table.returncode == 0, table.stderr
    assert "My_Tunnel" in table.stdout and "20.10.1.0/24" in table.stdout
    as_json = greupd("status", "--json", env={"GREUPD_CONTROL_SOCKET": str(daemon.path)})
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout) == router_a()


def test_cli_reload_exit_codes(sock_path: Path) -> None:
    with StandInDaemon(sock_path) as d:
        ok = greupd("reload", "--socket", str(d.path))
    assert ok.returncode == 0, ok.stderr
    assert "generation 2" in ok.stdout

    async def reject() -> ReloadResult:
        return {"ok": False, "generation": 1, "error": "tunnels.toml:3: tunnel[0].remote: not an address"}

    with StandInDaemon(sock_path, reload=reject) as d:
        rejected = greupd("reload", "--socket", str(d.path))
    assert rejected.returncode == 1
    assert "tunnel[0].remote" in rejected.stderr


# --- pure parts ---------------------------------------------------------------------------------------------

def test_parse_request() -> None:
    assert parse_request(b'{"command": "status"}\n') == "status"
    assert parse_request(b'{"command": 3}') is None
    assert parse_request(b"[1]") is None
    assert parse_request(b"\xff") is None


def test_format_status_table() -> None:
    status = router_a(3)
    status["tunnels"].append(tunnel("to-c", "down", "keepalive-timeout", routes_installed=False))
    text = format_status(status, now=datetime(2026, 11, 24, 20, 20, 2, tzinfo=UTC))
    lines = text.splitlines()
    assert lines[0] == "greupd pid 4242, config /etc/greupd/tunnels.toml, generation 3"
    assert lines[1].split() == ["NAME", "STATE", "SINCE", "REASON", "REMOTE", "KEEPALIVE", "sent/recv", "ROUTES"]
    assert lines[2].split() == ["My_Tunnel", "up", "5m00s", "ago", "keepalive-restored", "172.19.1.2",
                                "1sx3", "120/118", "rtt", "0.24ms", "20.10.1.0/24"]
    assert lines[3].endswith("20.10.1.0/24 (withdrawn)")
    # Columns line up: every row's STATE starts where the header's does.
    assert {line.index(word) for line, word in zip(lines[1:], ("STATE", "up", "down"), strict=True)} == {
        lines[1].index("STATE")}


def test_format_status_shows_errors() -> None:
    status = router_a()
    status["last_error"] = "nftables: Operation not supported"
    status["tunnels"] = [tunnel(state="error", reason="apply-failed", error="RTM_NEWLINK: File exists")]
    text = format_status(status, now=datetime(2026, 11, 24, 20, 15, 2, tzinfo=UTC))
    assert "last error: nftables: Operation not supported" in text
    assert text.splitlines()[-1] == "My_Tunnel: RTM_NEWLINK: File exists"


def test_format_status_without_tunnels() -> None:
    status = router_a()
    status["tunnels"] = []
    assert format_status(status).endswith("no tunnels configured")


def test_cli_finds_the_socket_named_in_the_config(tmp_path: Path) -> None:
    sock = tmp_path / "elsewhere.sock"
    config = tmp_path / "tunnels.toml"
    config.write_text(f'[daemon]\ncontrol_socket = "{sock}"\n')
    env = {k: v for k, v in os.environ.items() if k != "GREUPD_CONTROL_SOCKET"}
    result = subprocess.run([sys.executable, "-m", "greupd", "status", "-c", str(config)], cwd=REPO,
                            capture_output=True, text=True, timeout=60, env=env, check=False)
    assert result.returncode == 3
    assert str(sock) in result.stderr


# --- answers made a slice of tunnels at a time (issue #26: 10,000 tunnels never hold the loop long) -----------

class SlicedDaemon:
    """Daemon.status's shape: the daemon's fields and a slice of its tunnels; a reload may come between slices."""

    def __init__(self, count: int, reload_at_call: int | None = None) -> None:
        self.tunnels = [tunnel(f"t{i}") for i in range(count)]
        self.generation, self.calls, self._reload_at = 1, 0, reload_at_call

    def status(self, of: slice = slice(None)) -> DaemonStatus:
        self.calls += 1
        if self.calls == self._reload_at:
            self.generation += 1
            self.tunnels = self.tunnels[1:]  # the reload removed one tunnel
        return {**router_a(self.generation), "tunnels": self.tunnels[of], "warnings": ["w"]}


def test_a_status_answered_in_slices_is_the_whole_status_and_never_mixes_two_configs() -> None:
    calm = SlicedDaemon(601)
    answer = json.loads(asyncio.run(status_answer(calm.status)))
    assert answer == {"ok": True, "result": calm.status()}
    assert calm.calls == 4  # three slices of 250, then the check above

    reloaded = SlicedDaemon(601, reload_at_call=2)
    answer = json.loads(asyncio.run(status_answer(reloaded.status)))
    assert answer["result"]["generation"] == 2 and len(answer["result"]["tunnels"]) == 600


def test_a_metrics_answer_escaped_a_chunk_at_a_time_reads_back_as_the_text() -> None:
    text = 'greupd_tunnel_up{tunnel="we\\"ird"} 1.0\n' * 50 + "é\t\x01"
    assert json.loads(asyncio.run(metrics_answer(text, chunk=7))) == {"ok": True, "result": {"text": text}}
