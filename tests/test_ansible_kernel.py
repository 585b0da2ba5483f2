"""contrib/ansible driving greupd on the seed's two routers, as a config-management run would.

Each router is a netns host of the lab with its own greupd; Ansible reaches them through its local
connection, with `greupd_command` = `ip netns exec <router> python -m greupd`. Check mode reports what would
change (from `greupd plan --detailed-exitcode`), a real run makes it so, a second check run is quiet, and a
config greupd would reject never lands. Only the real run and the check after it need GRE (the UML guest); the
rest runs on the host's kernel.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from lab.greupd_process import GreupdProcess
from lab.hosts import Lab, SeedTopology

REPO = Path(__file__).resolve().parent.parent
CONTRIB = REPO / "contrib" / "ansible"


def tunnel(local: str, remote: str, address: str, peer: str, lan: str) -> dict[str, Any]:
    return {"name": "My_Tunnel", "local": local, "remote": remote, "address": address, "peer": peer,
            "routes": [lan], "keepalive": {"interval": "1s", "retries": 3}}


# The interpreter Ansible runs its modules with, as on a router: they need the standard library only, and Debian's
# python3 starts without the venv's .pth files (an editable install's finder): in the UML guest, where a process
# start is dear, ~0.5 s less for each of the ~50 module runs of the three plays.
MODULE_PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable


def router_vars(greupd: GreupdProcess, spec: dict[str, Any]) -> dict[str, Any]:
    return {"ansible_connection": "local", "ansible_python_interpreter": MODULE_PYTHON,
            "greupd_command": f"ip netns exec {greupd.host.netns} {sys.executable} -m greupd",
            "greupd_config": str(greupd.config_path),
            "greupd_environment": {"GREUPD_CONTROL_SOCKET": str(greupd.socket), "PYTHONPATH": str(REPO)},
            "greupd_tunnels": [spec]}


def playbook(inventory: dict[str, Any], scratch: Path, *flags: str) -> tuple[int, dict[str, dict[str, int]], str]:
    """ansible-playbook on contrib's playbook; its exit status, the recap per host, and its output."""
    path = scratch / "inventory.json"
    path.write_text(json.dumps({"routers": {"hosts": inventory}}))
    # Ansible's temporary files (each module's AnsiballZ file, made, run and removed per task and host) under /tmp:
    # the guest's own tmpfs in the UML guest, instead of the checkout's .lab on the host's disk (hostfs).
    tmp = Path(tempfile.mkdtemp(prefix="greupd-ansible-"))
    env = {**os.environ, "ANSIBLE_ROLES_PATH": str(CONTRIB / "roles"), "ANSIBLE_LOCAL_TEMP": str(tmp / "local"),
           "ANSIBLE_REMOTE_TEMP": str(tmp / "remote"), "ANSIBLE_NOCOLOR": "1", "ANSIBLE_RETRY_FILES_ENABLED": "0",
           "ANSIBLE_HOME": str(tmp / "home")}
    try:
        done = subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(path),
                               str(CONTRIB / "playbook.yml"), *flags], capture_output=True, text=True, env=env,
                              timeout=900, check=False)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    recap = {m.group(1): {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(2))}
             for m in re.finditer(r"^(\S+)\s+: (ok=.*)$", done.stdout, re.MULTILINE)}
    return done.returncode, recap, done.stdout + done.stderr


def seed_inventory(a: GreupdProcess, b: GreupdProcess) -> dict[str, dict[str, Any]]:
    return {"a": router_vars(a, tunnel("172.19.1.1", "172.19.1.2", "192.168.8.1", "192.168.8.11", "20.10.1.0/24")),
            "b": router_vars(b, tunnel("172.19.1.2", "172.19.1.1", "192.168.8.11", "192.168.8.1", "10.10.1.0/24"))}


@pytest.mark.needs_root
def test_ansible_check_mode_reports_the_plan_and_changes_nothing(lab: Lab) -> None:
    """No GRE needed: check mode only plans (`greupd plan --detailed-exitcode`), so it runs on the host's kernel,
    where a play costs seconds, not the minute a UML guest takes (the apply is the next test's)."""
    a = GreupdProcess(lab.host("a"), "").start()
    b = GreupdProcess(lab.host("b"), "").start()
    rc, recap, out = playbook(seed_inventory(a, b), a.dir, "--check")
    assert rc == 0, out
    assert recap["a"]["changed"] == 2 and recap["b"]["changed"] == 2, out  # the plan and the file would change
    assert a.config_path.read_text() == "" and "My_Tunnel" not in a.host.ip("link", "show").stdout


@pytest.mark.needs_gre
def test_ansible_applies_then_a_check_run_stays_quiet(seed: SeedTopology) -> None:
    a = GreupdProcess(seed.a, "").start()
    b = GreupdProcess(seed.b, "").start()
    inventory = seed_inventory(a, b)
    for host in inventory.values():  # the play ends once both tunnels are up (status --check exits 0)
        host.update(greupd_check_tunnels=True, greupd_check_tunnels_timeout=60)
    rc, recap, out = playbook(inventory, a.dir)
    assert rc == 0, out
    assert a.tunnel("My_Tunnel")["state"] == "up" and b.tunnel("My_Tunnel")["state"] == "up"
    assert seed.lan_a.wait_ping("20.10.1.2", timeout=10)

    rc, recap, out = playbook(inventory, a.dir, "--check")
    assert rc == 0 and recap["a"]["changed"] == 0 and recap["b"]["changed"] == 0, out


@pytest.mark.needs_root
def test_ansible_never_installs_a_config_greupd_rejects(lab: Lab) -> None:
    """No GRE needed: the rejected file stops at `validate:`, before any plan, install or reload."""
    routers = {name: lab.host(name) for name in ("a", "b")}
    processes = {name: GreupdProcess(host, "") for name, host in routers.items()}
    inventory = {"a": router_vars(processes["a"], tunnel("172.19.1.1", "172.19.1.300", "192.168.8.1",
                                                         "192.168.8.11", "20.10.1.0/24")),
                 "b": router_vars(processes["b"], {"name": "My_Tunnel", "local": "172.19.1.2",
                                                   "remote": "172.19.1.1"})}
    inventory["b"]["greupd_reload_command"] = "true"  # no daemon in this test: b only shows the play goes on
    rc, recap, out = playbook(inventory, processes["a"].dir)
    assert rc != 0 and recap["a"]["failed"] == 1 and recap["b"]["failed"] == 0, out
    assert "tunnel[0].remote: '172.19.1.300' is not an IPv4 or IPv6 address" in out
    assert processes["a"].config_path.read_text() == ""
    assert 'remote = "172.19.1.1"' in processes["b"].config_path.read_text()


@pytest.mark.needs_root
def test_ansible_waits_for_the_tunnels_and_fails_a_router_whose_tunnel_stays_in_error(lab: Lab) -> None:
    """greupd_check_tunnels: the play ends on `greupd status --check` (exit 4 while a tunnel is down or in error).

    Any kernel: a static route holds the tunnel's prefix at metric 0, which greupd does not take (the kernel says
    File exists; on a kernel without ip_gre the link itself fails first): the plan has changes (exit 2), the
    config lands and is reloaded, and the tunnel stays in error.
    """
    router = lab.host("a")
    router.ip("link", "add", "lan0", "type", "veth", "peer", "name", "lan1")
    router.ip("link", "set", "lan0", "up")
    router.ip("route", "add", "20.10.1.0/24", "dev", "lan0", "metric", "0")
    greupd = GreupdProcess(router, "").start()
    inventory = {"a": {**router_vars(greupd, tunnel("172.19.1.1", "172.19.1.2", "192.168.8.1", "192.168.8.11",
                                                     "20.10.1.0/24")),
                       "greupd_check_tunnels": True, "greupd_check_tunnels_timeout": 4}}
    rc, recap, out = playbook(inventory, greupd.dir)
    assert rc != 0 and recap["a"]["failed"] == 1, out
    assert "Wait until no tunnel is down or in error" in out and '"rc": 4' in out, out
    assert greupd.tunnel("My_Tunnel")["state"] == "error"  # the config was installed and reloaded, then waited on

    inventory["a"]["greupd_tunnels"] = []  # no tunnel: none can be down
    rc, recap, out = playbook(inventory, greupd.dir)
    assert rc == 0 and recap["a"]["failed"] == 0, out
