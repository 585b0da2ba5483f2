"""The packaged greupd.service as user greupd, under systemd as PID 1, in a kernel with nftables `inet`.

tests/test_systemd_lab.py runs the package in UML, whose nftables lack the inet family, so there the unit never
builds its table. These run in the vng-systemd lab guest: Debian's full kernel under qemu, systemd as PID 1 on an
overlay of the host's root (lab/guest.py). Router A of the seed is a netns; the packaged unit runs in it (a drop-in
adds NetworkNamespacePath=, nothing else), and router B is the plain Linux GRE peer of test_systemd_lab.py.
Python runs ~30-50x slower there than here: one boot, few tests, each telling a whole part of the story.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.hosts import Host, Lab, seed_topology
from tests.test_systemd_lab import (
    CONFIG,
    DROP_IN,
    a_config,
    as_user,
    eventually,
    installed,  # noqa: F401 (a fixture: dpkg -i of the package)
    plain_peer,
    sh,
    show,
)

pytestmark = [pytest.mark.needs_systemd_nft, pytest.mark.distro]  # the installed package: make install-test

# Seed step 3 and the Cisco side's `ip tcp adjust-mss 1436`, as tunnels.toml says them.
NFT_PART = '\n[tunnel.mss]\nclamp = 1436\n\n[tunnel.nat]\ninto_tunnel = ["10.10.1.0/24"]\nfrom_tunnel = ["eth1"]\n'
UP = "1 tunnel: 1 up"
SLOW = 600.0  # seconds for a start or a verdict: greupd imports and plans at emulated speed


def step(what: str) -> None:
    """A line in the guest's run dir (on the host at once): where a slow emulated run spends its time."""
    rundir = os.environ.get("GREUPD_LAB_RUNDIR")
    if rundir:
        with open(Path(rundir) / "progress", "a") as log:
            log.write(f"{time.monotonic():.1f} {what}\n")


class RouterA:
    def __init__(self, a: Host, b: Host) -> None:
        self.a, self.b = a, b

    def routes(self) -> str:
        return self.a.ip("route", "show", "proto", "greupd").stdout

    def table(self) -> str:
        return self.a.run("nft", "list", "table", "inet", "greupd", check=False).stdout


@pytest.fixture(scope="module")
def no_man_db_rebuild() -> None:
    """Before dpkg -i: man-db's trigger would re-index every manual page on the system at emulated speed (minutes).

    Its switch is this file (man-db's postinst and trigger test it); the guest's overlay drops it, the host keeps it.
    test_systemd_lab.py reads the installed man page already."""
    Path("/var/lib/man-db/auto-update").unlink(missing_ok=True)
    step("dpkg -i")


@pytest.fixture(scope="module")
def router_a(no_man_db_rebuild: None, installed: Path) -> Iterator[RouterA]:  # noqa: F811 (the imported fixture)
    step("installed; the seed topology")
    with Lab() as lab:
        seed = seed_topology(lab)
        plain_peer(seed.b)
        seed.a.sysctl("net.ipv4.ip_forward", 0)
        DROP_IN.parent.mkdir(parents=True, exist_ok=True)
        DROP_IN.write_text(f"[Service]\nNetworkNamespacePath=/run/netns/{seed.a.netns}\n"
                           # Emulated Python can take a minute to import and plan: more room to start and ping.
                           "WatchdogSec=5min\nTimeoutStartSec=15min\n")
        sh("systemctl", "daemon-reload")
        # Probes each second rather than test_systemd_lab's 0.2 s: a pass at emulated speed holds the loop longer.
        CONFIG.write_text(a_config().replace("interval = 0.2", "interval = 1.0") + NFT_PART)
        yield RouterA(seed.a, seed.b)
        sh("systemctl", "stop", "greupd", check=False, timeout=SLOW)
        DROP_IN.unlink()
        sh("systemctl", "daemon-reload")


def test_the_unit_runs_as_greupd_with_tunnel_routes_nftables_and_keepalives(router_a: RouterA) -> None:
    a, b = router_a.a, router_a.b
    step("systemctl start greupd")
    sh("systemctl", "start", "greupd", timeout=SLOW)  # Type=notify: back once the first pass is applied
    step("started")
    assert show("ActiveState") == "active"
    # User greupd, CAP_NET_ADMIN and CAP_NET_RAW only (ambient), no new privileges.
    proc_status = Path(f"/proc/{show('MainPID')}/status").read_text()
    uid = sh("id", "-u", "greupd").stdout.strip()
    assert re.search(rf"^Uid:\s+{uid}\s+{uid}\s+{uid}\s+{uid}$", proc_status, re.M), proc_status
    for caps in ("CapBnd", "CapEff", "CapAmb"):
        assert re.search(rf"^{caps}:\s+0000000000003000$", proc_status, re.M), proc_status
    assert a.sysctl_get("net.ipv4.ip_forward") == "1"
    assert "20.10.1.0/24 dev My_Tunnel" in router_a.routes()

    # The table inet greupd, built by an unprivileged daemon: the MSS clamp and both NAT rules of the seed.
    table = router_a.table()
    assert table.startswith("table inet greupd {"), table
    assert "maxseg size set" in table and "1436" in table, table
    assert "masquerade" in table and "10.10.1.0/24" in table and '"eth1"' in table, table
    # Flushed by someone else (`nft flush ruleset`): put back, as greupd's watch on nftables sees it go.
    step("nft flush ruleset")
    a.run("nft", "flush", "ruleset")
    eventually(lambda: "masquerade" in router_a.table(), timeout=SLOW, what="the table put back after a flush")

    # Keepalives: B answers, the tunnel is up and pings cross it; B dies, the route goes; B returns, it comes back.
    eventually(lambda: show("StatusText") == UP, timeout=SLOW, what=f"StatusText {UP!r}")
    assert a.wait_ping("192.168.8.11", timeout=60)
    step("B dies")
    b.ip("link", "set", "to_a", "down")
    eventually(lambda: "20.10.1.0/24" not in router_a.routes(), timeout=SLOW, what="the route withdrawn")
    eventually(lambda: show("StatusText").startswith("1 tunnel: 1 down"), timeout=SLOW, what="StatusText: down")
    step("B returns")
    b.ip("link", "set", "to_a", "up")
    eventually(lambda: "20.10.1.0/24 dev My_Tunnel" in router_a.routes(), timeout=SLOW, what="the route back")
    eventually(lambda: show("StatusText") == UP, timeout=SLOW, what=f"StatusText {UP!r} again")

    # A monitoring agent in group greupd reads the status; the table is still the one greupd rendered.
    step("greupd status as a member of group greupd")
    sh("useradd", "--system", "--no-create-home", "--groups", "greupd", "monitor")
    status = as_user("monitor", "/usr/bin/greupd", "status")
    assert status.returncode == 0, status.stderr
    assert re.search(r"My_Tunnel\s+up\s", status.stdout), status.stdout
    assert "maxseg size set" in router_a.table()
