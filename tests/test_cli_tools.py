"""The commands config-management tools script against: check --json, plan --json/--detailed-exitcode, status NAME.

As a tool runs them: a process, its exit status, the JSON it prints.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.greupd_process import GreupdProcess
from lab.hosts import Lab
from tests.test_control import StandInDaemon

REPO = Path(__file__).resolve().parent.parent
SEED_A = """
[[tunnel]]
name = "My_Tunnel"
local = "172.19.1.1"
remote = "172.19.1.2"
address = "192.168.8.1"
peer = "192.168.8.11"
routes = ["20.10.1.0/24"]
"""


def greupd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "greupd", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})}, check=False)


def test_check_json_of_a_valid_config(tmp_path: Path) -> None:
    path = tmp_path / "tunnels.toml"
    path.write_text(SEED_A)
    result = greupd("check", "--json", str(path))
    assert result.returncode == 0
    assert json.loads(result.stdout) == {"valid": True, "errors": [], "files": [str(path)], "tunnels": ["My_Tunnel"],
                                         "warnings": []}


def test_check_json_names_file_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "tunnels.toml"
    path.write_text(SEED_A.replace('remote = "172.19.1.2"', 'remote = "172.19.1.300"'))
    result = greupd("check", "--json", "-c", str(path))
    assert result.returncode == 1
    answer = json.loads(result.stdout)
    assert answer["valid"] is False
    assert answer["errors"] == [{"file": str(path), "line": 5, "field": "tunnel[0].remote",
                                 "message": "'172.19.1.300' is not an IPv4 or IPv6 address"}]


def test_check_json_of_toml_that_does_not_parse(tmp_path: Path) -> None:
    path = tmp_path / "tunnels.toml"
    path.write_text("[[tunnel]\n")
    (error,) = json.loads(greupd("check", "--json", str(path)).stdout)["errors"]
    assert error["file"] == str(path) and error["line"] == 1 and error["message"].startswith("TOML syntax")


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[StandInDaemon]:
    with StandInDaemon(tmp_path / "run" / "c.sock") as d:
        yield d


def test_status_of_named_tunnels_and_an_unknown_name(daemon: StandInDaemon) -> None:
    env = {"GREUPD_CONTROL_SOCKET": str(daemon.path)}
    mine = greupd("status", "--json", "My_Tunnel", env=env)
    assert mine.returncode == 0, mine.stderr
    assert [t["name"] for t in json.loads(mine.stdout)["tunnels"]] == ["My_Tunnel"]
    unknown = greupd("status", "My_Tunnel", "Nope", env=env)
    assert unknown.returncode == 1 and "no tunnel named Nope" in unknown.stderr


@pytest.mark.needs_root
def test_plan_for_tools_in_an_empty_router(lab: Lab) -> None:
    """No GRE needed: plan only looks. Router A before anything exists: changes, so exit 2."""
    router = lab.host("a")
    router.sysctl("net.ipv4.ip_forward", 1)
    process = GreupdProcess(router, SEED_A)
    detailed = process.cli("plan", "--detailed-exitcode")
    assert detailed.returncode == 2, detailed.stderr
    assert "create link My_Tunnel" in detailed.stdout
    plan = json.loads(process.cli("plan", "--json").stdout)
    assert [(c["tunnel"], c["action"]) for c in plan["changes"]] == [
        ("My_Tunnel", "create-link"), ("My_Tunnel", "add-address"),
        ("My_Tunnel", "add-route")]
    assert plan["errors"] == []


@pytest.mark.needs_root
def test_plan_exit_1_when_a_foreign_link_holds_the_name(lab: Lab) -> None:
    router = lab.host("a")
    router.sysctl("net.ipv4.ip_forward", 1)
    router.ip("link", "add", "My_Tunnel", "type", "veth", "peer", "name", "other")  # no dummy in every kernel
    process = GreupdProcess(router, SEED_A)
    result = process.cli("plan", "--json", "--detailed-exitcode")
    assert result.returncode == 1
    (error,) = json.loads(result.stdout)["errors"]
    assert error["tunnel"] == "My_Tunnel" and "not greupd's" in error["message"]
