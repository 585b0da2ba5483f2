"""`greupd -n NETNS ...`: the greupd@NETNS instance's socket and config, as `ip -n NETNS` names a namespace.

The argument handling is plain (which paths -n picks, what it refuses); the last test asks a daemon stand-in
listening where greupd@ns1 would, and one enters a real netns for `plan`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from greupd.cli import _config_path, _socket_path, build_parser, main
from greupd.config import netns_instance
from lab.hosts import Lab
from tests.test_control import StandInDaemon

REPO = Path(__file__).resolve().parent.parent


def parsed(*argv: str) -> tuple[Path, Path | None]:
    args = build_parser().parse_args(argv)
    return _config_path(args), _socket_path(args) if hasattr(args, "socket") else None


@pytest.fixture(autouse=True)
def no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("GREUPD_CONFIG", "GREUPD_CONTROL_SOCKET", "GREUPD_STATE_DIR"):
        monkeypatch.delenv(name, raising=False)


def test_dash_n_asks_the_instance_of_that_netns() -> None:
    assert parsed("-n", "ns1", "status") == (Path("/etc/greupd/ns1/tunnels.toml"),
                                             Path("/run/greupd-netns/ns1/control.sock"))
    assert parsed("--netns", "ns1", "metrics")[1] == Path("/run/greupd-netns/ns1/control.sock")
    assert parsed("--netns=blue", "reload")[1] == Path("/run/greupd-netns/blue/control.sock")
    assert parsed("-n", "ns1", "check")[0] == Path("/etc/greupd/ns1/tunnels.toml")


def test_without_dash_n_nothing_changes() -> None:
    assert parsed("status") == (Path("/etc/greupd/tunnels.toml"), Path("/run/greupd/control.sock"))


def test_what_is_given_explicitly_wins_over_dash_n(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parsed("-n", "ns1", "status", "--socket", "/tmp/s")[1] == Path("/tmp/s")
    assert parsed("-n", "ns1", "check", "-c", "/tmp/t.toml")[0] == Path("/tmp/t.toml")
    # The environment is the weaker default: -n names an instance on purpose.
    monkeypatch.setenv("GREUPD_CONTROL_SOCKET", "/tmp/env.sock")
    monkeypatch.setenv("GREUPD_CONFIG", "/tmp/env.toml")
    assert parsed("-n", "ns1", "status") == (Path("/etc/greupd/ns1/tunnels.toml"),
                                             Path("/run/greupd-netns/ns1/control.sock"))


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../etc"])
def test_a_name_no_netns_can_have_is_a_usage_error(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["-n", name, "status"])
    assert stop.value.code == 64  # EX_USAGE (2 is plan --detailed-exitcode's "changes")
    assert "-n/--netns:" in capsys.readouterr().err
    with pytest.raises(ValueError, match="is not a network namespace name"):
        netns_instance(name)


def test_dash_n_does_not_run_a_daemon(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["-n", "ns1", "run"])
    assert stop.value.code == 64  # EX_USAGE (2 is plan --detailed-exitcode's "changes")
    assert "systemctl start greupd@ns1" in capsys.readouterr().err


def test_no_daemon_in_that_netns_names_its_socket(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-n", "greupd-test-nowhere", "status"]) == 3
    assert "/run/greupd-netns/greupd-test-nowhere/control.sock" in capsys.readouterr().err


def test_dash_n_status_reaches_a_daemon_on_the_instance_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    # greupd@ns1's socket, moved under tmp_path (/run/greupd-netns is root's): what -n computes is asked.
    sock = tmp_path / "greupd-netns" / "ns1" / "control.sock"
    real = netns_instance
    monkeypatch.setattr("greupd.cli.netns_instance",
                        lambda netns: replace(real(netns), control_socket=sock) if netns == "ns1" else real(netns))
    with StandInDaemon(sock):
        assert main(["-n", "ns1", "status", "--json"]) == 0
    assert [t["name"] for t in json.loads(capsys.readouterr().out)["tunnels"]] == ["My_Tunnel"]


@pytest.mark.needs_root
def test_dash_n_plan_reads_the_kernel_inside_that_netns(tmp_path: Path) -> None:
    """A link named My_Tunnel that is not greupd's exists in A's netns only: `greupd -n A plan` finds it there."""
    config = tmp_path / "tunnels.toml"
    config.write_text('[daemon]\nip_forward = false\n\n[[tunnel]]\nname = "My_Tunnel"\nmode = "gre"\n'
                      'local = "172.19.1.1"\nremote = "172.19.1.2"\nroutes = ["20.10.1.0/24"]\n')

    def plan(*global_args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "greupd", *global_args, "plan", "--json", "-c", str(config)],
                              cwd=REPO, capture_output=True, text=True, timeout=120, check=False)

    with Lab() as lab:
        a = lab.host("a")
        a.ip("link", "add", "My_Tunnel", "type", "veth", "peer", "name", "lan0")
        inside = plan("-n", a.netns)
        assert inside.returncode == 0, inside.stderr
        assert "My_Tunnel" in json.dumps(json.loads(inside.stdout)["errors"])  # a foreign link of that name
        outside = plan()
        assert outside.returncode == 0 and json.loads(outside.stdout)["errors"] == [], outside.stdout
    missing = plan("-n", "greupd-test-nowhere")
    assert missing.returncode == 1
    # --json: the reason is in the JSON (N10), changes unknown
    (error,) = json.loads(missing.stdout)["errors"]
    assert error["message"].startswith("cannot open network namespace 'greupd-test-nowhere'")
    assert json.loads(missing.stdout)["changes"] is None
