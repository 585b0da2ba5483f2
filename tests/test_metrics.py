"""Metrics without a kernel: router A's status as Prometheus reads it, from the textfile, GET /metrics and the CLI.

Every text is read back with prometheus_client's own parser, as Prometheus and node_exporter would read it.
The HTTP listener and the control socket are real sockets on this machine (loopback TCP, a Unix socket).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from greupd import metrics
from greupd.config import ConfigError, DaemonConfig, load_config_text
from greupd.control import request
from greupd.metrics import MetricsListener, MetricsPublisher, ReloadOutcome, render, write_atomically
from greupd.status import DaemonStatus, IpsecState
from tests.prometheus_oracle import render_by_prometheus_client
from tests.test_control import StandInDaemon, greupd, router_a, tunnel

REPO = Path(__file__).resolve().parent.parent
STARTED = 1764360000.0
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Samples:
    """Every sample of a scrape, by name and labels."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(text: str, name: str, **labels: str) -> float:
    return samples(text)[(name, frozenset(labels.items()))]


def router_a_with_a_dead_backup() -> DaemonStatus:
    status = router_a(generation=3)
    status["netlink_requests"] = 57
    backup = tunnel("to_c", "down", "keepalive-timeout", routes_installed=False)
    backup["keepalive"] = {"interval": 0.2, "retries": 3, "sent": 40, "received": 12, "missed_in_a_row": 5,
                           "last_rtt_ms": None}
    plain = tunnel("to_d", "error", "apply-failed", error="RTM_NEWLINK: File exists")
    plain["keepalive"] = None
    status["tunnels"] += [backup, plain]
    return status


# --- the rendering ------------------------------------------------------------------------------------------

def test_the_spec_names_carry_router_as_state() -> None:
    text = render(router_a_with_a_dead_backup(), ReloadOutcome(ok=True, last_success=STARTED))
    assert value(text, "greupd_build_info", version="0.1.0") == 1
    assert value(text, "greupd_config_generation") == 3
    assert value(text, "greupd_config_last_reload_success") == 1
    assert value(text, "greupd_config_last_reload_success_timestamp_seconds") == STARTED
    assert value(text, "greupd_netlink_requests_total") == 57
    assert value(text, "greupd_tunnel_up", tunnel="My_Tunnel") == 1
    assert value(text, "greupd_tunnel_up", tunnel="to_c") == 0
    assert value(text, "greupd_tunnel_state_changes_total", tunnel="My_Tunnel") == 2
    assert value(text, "greupd_drift_repairs_total", tunnel="My_Tunnel") == 1
    assert value(text, "greupd_keepalive_sent_total", tunnel="My_Tunnel") == 120
    assert value(text, "greupd_keepalive_received_total", tunnel="My_Tunnel") == 118
    assert value(text, "greupd_keepalive_rtt_seconds", tunnel="My_Tunnel") == pytest.approx(0.00024)
    assert value(text, "greupd_routes_installed", tunnel="My_Tunnel") == 1
    assert value(text, "greupd_routes_installed", tunnel="to_c") == 0
    assert value(text, "greupd_routes_configured", tunnel="to_c") == 1
    assert value(text, "greupd_keepalive_missed_in_a_row", tunnel="to_c") == 5
    assert value(text, "greupd_tunnel_info", tunnel="to_c", mode="gre", local="172.19.1.1",
                 remote="172.19.1.2") == 1
    assert value(text, "greupd_tunnel_last_change_timestamp_seconds", tunnel="to_c") == 1795551302  # since
    # One state per tunnel is 1: an alert on greupd_tunnel_state{state="error"} names the broken ones.
    assert {state: value(text, "greupd_tunnel_state", tunnel="to_d", state=state)
            for state in ("up", "down", "disabled", "error")} == {"up": 0, "down": 0, "disabled": 0, "error": 1}


def test_a_tunnel_without_keepalives_or_a_reply_yet_has_no_keepalive_samples() -> None:
    found = samples(render(router_a_with_a_dead_backup(), ReloadOutcome(ok=True, last_success=STARTED)))
    assert not [name for name, labels in found if name.startswith("greupd_keepalive") and ("tunnel", "to_d") in labels]
    assert ("greupd_keepalive_rtt_seconds", frozenset({("tunnel", "to_c")})) not in found  # no reply yet: no rtt


def router_a_over_ipsec(c_state: IpsecState = "connecting", charon: bool = True) -> DaemonStatus:
    """My_Tunnel's ESP is up; the backup to C is still negotiating (or charon is gone); to_d has no [tunnel.ipsec]."""
    status = router_a_with_a_dead_backup()
    my_tunnel, to_c, _ = status["tunnels"]
    my_tunnel["ipsec"] = {"state": "established", "connection": "greupd-My_Tunnel", "ike_sa": "ESTABLISHED",
                          "child_sa": "INSTALLED", "charon": charon, "error": None}
    to_c["ipsec"] = {"state": c_state, "connection": "greupd-to_c", "ike_sa": "CONNECTING" if charon else None,
                     "child_sa": None, "charon": charon, "error": None if charon else "charon not reached yet"}
    return status


def everything_at_once() -> DaemonStatus:
    """Every family and every corner of the text format: odd names, counters past 1e7, no keepalive."""
    status = router_a_over_ipsec()
    status["netlink_requests"] = 12_345_678
    status["keepalive_socket"] = {"filter": "addresses", "remotes": 3, "drops": 7}
    first, second, third = status["tunnels"]
    first["name"] = 'we"ird\\na\nme'
    first["keepalive"] = {"interval": 0.1, "retries": 3, "sent": 98_765_432_101, "received": 1_000_000,
                          "missed_in_a_row": 999_999, "last_rtt_ms": 0.0123}
    first["bfd"] = {"state": "up", "remote_state": "up", "detect_time_ms": 300, "sent": 1, "received": 1,
                    "dropped": 0}
    first["liveness"] = {"down_by": ["dampening"]}
    first["path_mtu"] = {"bytes": 1276, "state": "measured", "measured_at": None, "ipv6": False}
    second["path_mtu"] = {"bytes": None, "state": "searching", "measured_at": None, "ipv6": None}
    third["keepalive"] = None
    third["liveness"] = {"down_by": []}
    return status


def test_the_text_is_byte_for_byte_what_prometheus_client_wrote() -> None:
    for status in (everything_at_once(), router_a_with_a_dead_backup(), router_a_over_ipsec("down", charon=False)):
        for reload in (ReloadOutcome(ok=True, last_success=STARTED), ReloadOutcome(ok=False, last_success=1.5e9)):
            assert render(status, reload) == render_by_prometheus_client(status, reload)


def test_ipsec_sa_state_per_tunnel() -> None:
    text = render(router_a_over_ipsec(), ReloadOutcome(ok=True, last_success=STARTED))
    assert value(text, "greupd_ipsec_sa_up", tunnel="My_Tunnel") == 1
    assert value(text, "greupd_ipsec_sa_up", tunnel="to_c") == 0
    assert value(text, "greupd_ipsec_state", tunnel="to_c", state="connecting") == 1
    assert value(text, "greupd_ipsec_state", tunnel="to_c", state="established") == 0
    assert value(text, "greupd_ipsec_state", tunnel="My_Tunnel", state="established") == 1
    assert value(text, "greupd_ipsec_charon_connected") == 1
    found = samples(text)
    assert not [name for name, labels in found if name.startswith("greupd_ipsec") and ("tunnel", "to_d") in labels]


def test_ipsec_follows_the_sas_and_charon() -> None:
    established = render(router_a_over_ipsec("established"), ReloadOutcome(ok=True, last_success=STARTED))
    assert value(established, "greupd_ipsec_sa_up", tunnel="to_c") == 1
    charon_gone = render(router_a_over_ipsec("down", charon=False), ReloadOutcome(ok=True, last_success=STARTED))
    assert value(charon_gone, "greupd_ipsec_sa_up", tunnel="to_c") == 0
    assert value(charon_gone, "greupd_ipsec_state", tunnel="to_c", state="down") == 1
    assert value(charon_gone, "greupd_ipsec_charon_connected") == 0


def test_without_ipsec_there_are_no_ipsec_metrics() -> None:
    found = samples(render(router_a_with_a_dead_backup(), ReloadOutcome(ok=True, last_success=STARTED)))
    assert not [name for name, _ in found if name.startswith("greupd_ipsec")]


def test_the_keepalive_sockets_drops_and_filter() -> None:
    status = router_a_with_a_dead_backup()
    status["keepalive_socket"] = {"filter": "addresses", "remotes": 2, "drops": 1234}
    text = render(status, ReloadOutcome(ok=True, last_success=STARTED))
    assert value(text, "greupd_keepalive_socket_drops_total") == 1234
    assert value(text, "greupd_keepalive_socket_filter_addresses") == 1
    status["keepalive_socket"] = {"filter": "protocol", "remotes": 5000, "drops": None}
    found = samples(render(status, ReloadOutcome(ok=True, last_success=STARTED)))
    assert found[("greupd_keepalive_socket_filter_addresses", frozenset())] == 0
    assert not any(name.startswith("greupd_keepalive_socket_drops") for name, _ in found)


def test_names_follow_the_prometheus_rules() -> None:
    families = list(text_string_to_metric_families(
        render(router_a_over_ipsec(), ReloadOutcome(ok=False, last_success=STARTED))))
    assert {"greupd_ipsec_sa_up", "greupd_ipsec_state", "greupd_ipsec_charon_connected"} <= {f.name for f in families}
    for family in families:
        assert re.fullmatch(r"greupd_[a-z0-9_]+", family.name), family.name
        assert family.documentation, family.name
        if family.type == "counter":
            assert all(s.name.endswith("_total") for s in family.samples), family.name
        for sample in family.samples:
            # Units in the name, base units only; no label but the tunnel's identity and its state.
            assert not re.search(r"_(ms|milliseconds|minutes)\b", sample.name)
            assert set(sample.labels) <= {"tunnel", "mode", "local", "remote", "state", "version"}


def test_label_values_are_escaped() -> None:
    status = router_a()
    status["tunnels"][0]["name"] = 'we"ird\\name'
    assert value(render(status, ReloadOutcome(True, STARTED)), "greupd_tunnel_up", tunnel='we"ird\\name') == 1


# --- the textfile ---------------------------------------------------------------------------------------------

def test_write_atomically_replaces_the_file_readable_by_node_exporter(tmp_path: Path) -> None:
    path = tmp_path / "greupd.prom"
    path.write_text("old\n")
    write_atomically(path, "greupd_config_generation 2\n")
    assert path.read_text() == "greupd_config_generation 2\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert os.listdir(tmp_path) == ["greupd.prom"]  # no temporary left behind


class RouterA:
    """The daemon's side of a publisher: a status that changes as router A's tunnel dies and comes back."""

    def __init__(self, settings: DaemonConfig, min_gap: float = 0.0) -> None:
        self.status = router_a()
        self.settings = settings
        self.errors: list[str] = []
        self.publisher = MetricsPublisher(lambda: self.status, lambda: self.settings, None, self.errors.append,
                                          min_gap)


def textfile_settings(tmp_path: Path) -> DaemonConfig:
    return DaemonConfig(metrics_textfile=tmp_path / "textfile" / "greupd.prom")


def test_textfile_follows_each_pass_and_a_rejected_reload_and_is_removed_at_exit(tmp_path: Path) -> None:
    (tmp_path / "textfile").mkdir()
    a = RouterA(textfile_settings(tmp_path))
    path = a.settings.metrics_textfile
    assert path is not None

    async def daemon_loop() -> None:
        a.publisher.publish()  # the first pass
        assert value(path.read_text(), "greupd_tunnel_up", tunnel="My_Tunnel") == 1
        written = path.stat().st_mtime_ns
        a.publisher.publish()  # a pass that changed nothing: the file stays as it was
        assert path.stat().st_mtime_ns == written
        a.status["tunnels"][0] = tunnel(state="down", reason="keepalive-timeout", routes_installed=False)
        a.status["tunnels"][0]["state_changes"] = 3  # the peer died
        a.publisher.publish()
        assert value(path.read_text(), "greupd_tunnel_up", tunnel="My_Tunnel") == 0
        assert value(path.read_text(), "greupd_tunnel_state_changes_total", tunnel="My_Tunnel") == 3
        a.publisher.reloaded({"ok": False, "generation": 1, "error": "tunnels.toml:3: tunnel[0].remote: ..."})
        assert value(path.read_text(), "greupd_config_last_reload_success") == 0
        assert "process_" not in path.read_text()  # node_exporter has process_* of its own
        assert "process_cpu_seconds_total" in a.publisher.text()  # the scrape has the daemon's

    asyncio.run(daemon_loop())
    assert not path.exists()  # the loop ended: a stopped daemon leaves no stale `up` behind
    assert a.errors == []


def test_a_burst_of_passes_is_one_rewrite_at_most_once_a_second(tmp_path: Path) -> None:
    (tmp_path / "textfile").mkdir()
    a = RouterA(textfile_settings(tmp_path), min_gap=1.0)
    path = a.settings.metrics_textfile
    assert path is not None

    async def daemon_loop() -> None:
        a.publisher.publish()  # the first pass is written at once
        assert value(path.read_text(), "greupd_config_generation") == 1
        for generation in range(2, 30):  # passes in a burst, each changing what the file would say
            a.status["generation"] = generation
            a.publisher.publish()
        assert value(path.read_text(), "greupd_config_generation") == 1
        await asyncio.sleep(1.2)
        assert value(path.read_text(), "greupd_config_generation") == 29  # the burst's end, one rewrite

    asyncio.run(daemon_loop())


def test_a_textfile_that_cannot_be_written_is_said_once_and_nothing_stops(tmp_path: Path) -> None:
    a = RouterA(textfile_settings(tmp_path))  # its directory does not exist

    async def daemon_loop() -> None:
        a.publisher.publish()
        a.publisher.publish()
        assert "greupd_tunnel_up" in a.publisher.text()

    asyncio.run(daemon_loop())
    [error] = a.errors
    assert error.startswith(f"metrics_textfile = '{tmp_path}/textfile/greupd.prom': cannot write it:")


def test_a_reload_that_moves_the_textfile_removes_the_old_one(tmp_path: Path) -> None:
    (tmp_path / "textfile").mkdir()
    a = RouterA(textfile_settings(tmp_path))
    old = a.settings.metrics_textfile
    assert old is not None

    async def daemon_loop() -> None:
        a.publisher.publish()
        a.settings = DaemonConfig(metrics_textfile=tmp_path / "moved.prom")
        a.publisher.reloaded({"ok": True, "generation": 2, "error": None})
        assert not old.exists() and (tmp_path / "moved.prom").exists()

    asyncio.run(daemon_loop())


# --- GET /metrics -------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def http(port: int, request_bytes: bytes) -> tuple[str, dict[str, str], str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request_bytes)
    await writer.drain()
    answer = await reader.read()
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    status, *fields = head.decode().split("\r\n")
    headers = dict(f.split(": ", 1) for f in fields)
    return status, headers, body.decode()


async def until_listening(a: RouterA) -> int:
    """The port of the listener at metrics_listen, once the publisher's task has followed the setting."""
    a.publisher.publish()
    for _ in range(100):
        listener = a.publisher._listener
        if listener is not None and listener.address == a.settings.metrics_listen and listener.port is not None:
            return listener.port
        await asyncio.sleep(0.01)
    raise AssertionError(f"no listener: {a.errors}")


@pytest.fixture
def listening() -> Iterator[RouterA]:
    yield RouterA(DaemonConfig(metrics_listen=f"127.0.0.1:{free_port()}"))


def test_get_metrics_answers_the_scrape_and_nothing_else(listening: RouterA) -> None:
    async def prometheus() -> None:
        port = await until_listening(listening)
        status, headers, body = await http(port, b"GET /metrics HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n\r\n")
        assert status == "HTTP/1.1 200 OK"
        assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        assert int(headers["Content-Length"]) == len(body.encode())
        assert value(body, "greupd_tunnel_up", tunnel="My_Tunnel") == 1
        assert value(body, "process_open_fds") > 0
        listening.status["tunnels"][0]["state"] = "down"  # each scrape reads the status afresh
        assert value((await http(port, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"))[2], "greupd_tunnel_up",
                     tunnel="My_Tunnel") == 0
        head = await http(port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
        assert head[0] == "HTTP/1.1 200 OK" and head[2] == "" and int(head[1]["Content-Length"]) > 0
        assert (await http(port, b"GET / HTTP/1.1\r\n\r\n"))[0] == "HTTP/1.1 404 Not Found"
        assert (await http(port, b"POST /metrics HTTP/1.1\r\n\r\n"))[0] == "HTTP/1.1 405 Method Not Allowed"
        assert (await http(port, b"hello\r\n\r\n"))[0] == "HTTP/1.1 400 Bad Request"
        huge = b"GET /metrics HTTP/1.1\r\nX-Pad: " + b"x" * 20000 + b"\r\n\r\n"
        assert (await http(port, huge))[0] == "HTTP/1.1 400 Bad Request"
        # Clients that connect and say nothing: beyond 16 at once, the one that has waited longest is closed to
        # make room (newcomer-3 Medium 7), and a scrape still gets in while they are there.
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(20)]
        assert [await r.read() for r, _ in idle[:4]] == [b""] * 4
        assert (await http(port, b"GET /metrics HTTP/1.1\r\n\r\n"))[0] == "HTTP/1.1 200 OK"
        for _, w in idle:
            w.close()
        await asyncio.sleep(0.1)
        assert (await http(port, b"GET /metrics HTTP/1.1\r\n\r\n"))[0] == "HTTP/1.1 200 OK"

    asyncio.run(prometheus())
    assert listening.errors == []


def test_a_scrape_that_never_reads_is_dropped_and_its_slot_freed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Review M4: 16 clients that sent GET /metrics and never read held every slot forever, once the answer was
    larger than the socket buffers (about 100 tunnels or more); now each is dropped after _WRITE_TIMEOUT."""
    monkeypatch.setattr(metrics, "_WRITE_TIMEOUT", 0.5, raising=False)  # 10 s in the daemon
    body = "# a large scrape\n" * 200_000  # 3.4 MB: far more than the socket buffers hold
    listener = MetricsListener(f"127.0.0.1:{free_port()}", lambda: body)

    async def prometheus() -> None:
        await listener.serve()
        port = listener.port
        assert port is not None
        loop = asyncio.get_running_loop()
        silent = []
        for _ in range(16):
            client = socket.socket()
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.setblocking(False)
            await loop.sock_connect(client, ("127.0.0.1", port))
            await loop.sock_sendall(client, b"GET /metrics HTTP/1.1\r\n\r\n")
            silent.append(client)
        answered = ""
        for _ in range(100):  # 503 (before: a reset) while they hold the slots, then 200
            with contextlib.suppress(ConnectionError):
                answered = (await http(port, b"GET /metrics HTTP/1.1\r\n\r\n"))[0]
            if answered == "HTTP/1.1 200 OK":
                break
            await asyncio.sleep(0.1)
        assert answered == "HTTP/1.1 200 OK"
        for client in silent:
            client.close()
        listener.close()

    asyncio.run(prometheus())


def test_scrapes_within_a_second_share_one_rendering() -> None:
    """Review M4: every scrape rendered every tunnel (0.5 s for a thousand) in the daemon's loop; now one rendering
    serves every scrape (and the textfile) for MIN_GAP, passes or not."""
    a = RouterA(DaemonConfig(), min_gap=60.0)
    renderings = []

    def status() -> DaemonStatus:
        renderings.append(a.status["generation"])
        return a.status

    a.publisher = MetricsPublisher(status, lambda: a.settings, None, a.errors.append, 60.0)

    async def daemon_loop() -> None:
        for generation in range(2, 18):  # 16 scrapes, with passes between them
            assert value(a.publisher.text(), "greupd_config_generation") == 1
            a.status["generation"] = generation
            a.publisher.publish()
        assert renderings == [1]

    asyncio.run(daemon_loop())


def test_an_address_in_use_is_reported_and_a_reload_tries_again(listening: RouterA) -> None:
    wanted = listening.settings.metrics_listen
    assert wanted is not None
    port = int(wanted.rsplit(":", 1)[1])

    async def daemon_loop() -> None:
        squatter = await asyncio.start_server(lambda r, w: None, "127.0.0.1", port)
        listening.publisher.publish()
        for _ in range(100):
            if listening.errors:
                break
            await asyncio.sleep(0.01)
        assert "greupd_tunnel_up" in listening.publisher.text()  # the daemon carries on
        squatter.close()
        await squatter.wait_closed()
        listening.publisher.reloaded({"ok": True, "generation": 2, "error": None})
        assert await until_listening(listening) == port

    asyncio.run(daemon_loop())
    [error] = listening.errors
    assert error.startswith(f"metrics_listen = '127.0.0.1:{port}': cannot listen:")


def test_the_listener_moves_with_a_reload(listening: RouterA) -> None:
    async def daemon_loop() -> None:
        first = await until_listening(listening)
        listening.settings = DaemonConfig(metrics_listen=f"127.0.0.1:{free_port()}")
        listening.publisher.reloaded({"ok": True, "generation": 2, "error": None})
        second = await until_listening(listening)
        assert second != first
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", first)

    asyncio.run(daemon_loop())


# --- greupd metrics -----------------------------------------------------------------------------------------

def test_metrics_over_the_control_socket_and_the_cli(tmp_path: Path) -> None:
    with StandInDaemon(tmp_path / "run" / "c.sock") as d:
        assert value(request(d.path, "metrics")["text"], "greupd_config_generation") == 1
        printed = greupd("metrics", "--socket", str(d.path))
    assert printed.returncode == 0, printed.stderr
    assert value(printed.stdout, "greupd_keepalive_sent_total", tunnel="My_Tunnel") == 120


def test_cli_metrics_exit_3_when_no_daemon_answers(tmp_path: Path) -> None:
    result = greupd("metrics", env={"GREUPD_CONTROL_SOCKET": str(tmp_path / "none.sock")})
    assert result.returncode == 3
    assert "no daemon answers" in result.stderr


# --- the config ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("line", "message"), [
    ('metrics_listen = "localhost:9474"', "'localhost' is not an IP address (host names are not resolved)"),
    ('metrics_listen = "::1:9474"', 'an IPv6 address is written in brackets, e.g. "[::1]:9474"'),
    ('metrics_listen = "127.0.0.1:0"', "'0' is not a TCP port: 1..65535"),
    ('metrics_listen = "127.0.0.1"', "'127.0.0.1' is not HOST:PORT"),
    ('metrics_listen = "[::1]"', "'[::1]' is not HOST:PORT"),
    ("metrics_listen = 9474", "9474 is not an address and port"),
    ('metrics_textfile = "greupd.prom"', "'greupd.prom' is a relative path: write it from /"),
])
def test_bad_metrics_settings_name_file_line_and_field(line: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config_text(f'[daemon]\non_exit = "keep"\n{line}\n', Path("/etc/greupd/tunnels.toml"))
    [problem] = error.value.problems
    field = line.split(" ", 1)[0]
    assert (str(problem.file), problem.line, problem.field) == ("/etc/greupd/tunnels.toml", 3, f"daemon.{field}")
    assert message in problem.message


def test_metrics_settings_as_the_spec_writes_them() -> None:
    config = load_config_text('[daemon]\nmetrics_textfile = "/var/lib/prometheus/node-exporter/greupd.prom"\n'
                              'metrics_listen = "127.0.0.1:9474"\n')
    assert config.daemon.metrics_textfile == Path("/var/lib/prometheus/node-exporter/greupd.prom")
    assert config.daemon.metrics_listen == "127.0.0.1:9474"
    assert load_config_text('[daemon]\nmetrics_listen = "[::1]:9474"\n').daemon.metrics_listen == "[::1]:9474"
    assert load_config_text("").daemon.metrics_listen is None


# --- the Grafana dashboard -------------------------------------------------------------------------------------

def test_the_grafana_dashboard_graphs_only_what_greupd_exports() -> None:
    dashboard = json.loads((REPO / "contrib" / "grafana" / "greupd.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in dashboard["annotations"]["list"] if "expr" in a]
    used = {name for expr in exprs for name in re.findall(r"\bgreupd_[a-z0-9_]+", expr)}
    exported = {name for name, _ in samples(render(router_a_with_a_dead_backup(), ReloadOutcome(True, STARTED)))}
    assert used and used <= exported, used - exported
    # What the issue asks to see: up/down, state changes, drift repairs, keepalive RTT and rates, reloads.
    assert {"greupd_tunnel_up", "greupd_tunnel_state_changes_total", "greupd_drift_repairs_total",
            "greupd_keepalive_rtt_seconds", "greupd_keepalive_sent_total", "greupd_keepalive_received_total",
            "greupd_config_last_reload_success"} <= used
    assert all(p["datasource"]["uid"] == "${datasource}" for p in dashboard["panels"] if "datasource" in p)
