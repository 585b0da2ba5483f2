"""Router A's greupd is asked rubbish on its control socket: malformed JSON, lines nested thousands deep, lines
longer than any request, half a line and a hang-up, a crowd of clients at once, commands it does not know.
Each gets a clear error, and the daemon goes on answering `status` and managing its tunnel (issue #11).

Runs the real daemon (`greupd run`) on the host kernel in a fresh netns: the tunnel itself may end in state
"error" where the kernel lacks ip_gre, which does not matter to the control socket.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from greupd.control import connect, request
from lab.greupd_process import GreupdProcess
from lab.hosts import Lab

pytestmark = pytest.mark.needs_root

CONFIG = """
[[tunnel]]
name = "My_Tunnel"
local = "172.19.1.1"
remote = "172.19.1.2"
address = "192.168.8.1"
peer = "192.168.8.11"
routes = ["20.10.1.0/24"]
"""
HOW = 'a request is one line of JSON: {"command": "status"}, {"command": "reload"} or {"command": "metrics"}'
MAX_LINE = 64 * 1024


@pytest.fixture(scope="module")
def daemon() -> Iterator[GreupdProcess]:
    with Lab() as lab:
        yield GreupdProcess(lab.host("a"), CONFIG).start()


def read_answer(sock: socket.socket) -> dict[str, object]:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    answer: dict[str, object] = json.loads(data)
    return answer


def ask(path: Path, line: bytes) -> dict[str, object]:
    with contextlib.closing(connect(path, 10)) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # it may hang up before reading it all
            sock.sendall(line)
        return read_answer(sock)


def still_serving(daemon: GreupdProcess) -> None:
    assert daemon.proc is not None and daemon.proc.poll() is None, daemon.output()
    status = request(daemon.socket, "status")
    assert [t["name"] for t in status["tunnels"]] == ["My_Tunnel"]
    assert "Traceback" not in daemon.output() and "Unhandled exception" not in daemon.output(), daemon.output()


# Anything on one line that is not a JSON object whose "command" is a known string.
not_a_request = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=200).map(str.encode),
    st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                 lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
                 max_leaves=20).map(lambda value: json.dumps(value).encode()),
    st.dictionaries(st.just("command"), st.integers() | st.none() | st.lists(st.text())).map(
        lambda value: json.dumps(value).encode()),
).map(lambda line: line.replace(b"\n", b" ")).filter(lambda line: b'"status"' not in line and b'"reload"' not in line)


def test_malformed_requests_get_a_clear_error_and_the_daemon_carries_on(daemon: GreupdProcess) -> None:
    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(line=not_a_request)
    def each(line: bytes) -> None:
        answer = ask(daemon.socket, line + b"\n")
        assert answer["ok"] is False
        assert answer["error"] == HOW or str(answer["error"]).startswith("unknown command "), answer

    each()
    still_serving(daemon)


@pytest.mark.parametrize("line", [
    b"[" * 50_000,  # nested deeper than Python's recursion limit
    b'{"command": ' * 5_000 + b'"status"' + b"}" * 5_000,
    b"\xff\xfe\x00{",
    b'{"command": "status"',
    b'{"command": "status"}{"command": "status"}',
], ids=["deep-list", "deep-object", "not-utf8", "unterminated", "two-objects"])
def test_nasty_lines_get_the_same_error(daemon: GreupdProcess, line: bytes) -> None:
    assert ask(daemon.socket, line + b"\n") == {"ok": False, "error": HOW}
    still_serving(daemon)


def test_unknown_commands_are_named_in_the_answer(daemon: GreupdProcess) -> None:
    for command in ("stop", "STATUS", "status ", "", "reload\n"):
        answer = ask(daemon.socket, json.dumps({"command": command}).encode() + b"\n")
        assert answer == {"ok": False, "error": f"unknown command {command!r}; known: status, reload, metrics"}
    still_serving(daemon)


def test_a_line_longer_than_any_request_is_refused_with_the_reason(daemon: GreupdProcess) -> None:
    for size in (MAX_LINE + 1, 4 * MAX_LINE, 16 << 20):
        answer = ask(daemon.socket, b'{"command": "' + b"x" * size + b'"}\n')
        assert answer["ok"] is False and str(answer["error"]).startswith(f"request longer than {MAX_LINE} bytes")
    still_serving(daemon)


def test_half_a_line_and_a_hang_up(daemon: GreupdProcess) -> None:
    for part in (b'{"comm', b'{"command": "reload"', b"x" * 70_000, b""):
        sock = connect(daemon.socket, 10)
        sock.sendall(part)
        sock.shutdown(socket.SHUT_WR)
        sock.close()
    # And one that says half a line and then waits: it does not hold up anyone else.
    with contextlib.closing(connect(daemon.socket, 10)) as waiting:
        waiting.sendall(b'{"command": "sta')
        still_serving(daemon)
    still_serving(daemon)
    assert request(daemon.socket, "status")["generation"] == 1  # no half-sent reload was taken as one


def test_a_crowd_of_clients_at_once_are_all_answered(daemon: GreupdProcess) -> None:
    idle = [connect(daemon.socket, 10) for _ in range(100)]  # connected, saying nothing
    answers: list[object] = []
    failures: list[BaseException] = []

    def client(n: int) -> None:
        try:
            line = b'{"command": "status"}\n' if n % 3 else b'{"command": "frobnicate"}\n'
            answers.append(ask(daemon.socket, line)["ok"])
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(300)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for sock in idle:
        sock.close()
    assert failures == []
    assert sorted(answers, key=str) == [False] * 100 + [True] * 200
    still_serving(daemon)
