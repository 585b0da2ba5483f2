"""The whole daemon keeps its nftables table: installed at start, put back after `nft flush ruleset` and
`nft delete table`, changed by reload, deleted at stop with on_exit = "remove"; a firewall's own table beside
it stays byte-identical throughout.

Runs on the host kernel in a fresh netns (nftables, no GRE needed): the tunnels themselves may fail to come
up where the kernel lacks ip_gre, but the table does not depend on them (rules match interface names).
"""

from __future__ import annotations

import select
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.greupd_process import GreupdProcess
from lab.hosts import Host, Lab
from lab.waiting import wait_until

pytestmark = pytest.mark.needs_root

SHIPPED = (Path(__file__).resolve().parents[1] / "etc" / "greupd" / "tunnels.toml").read_text()
CONFIG = SHIPPED.replace('on_exit = "keep"', 'on_exit = "remove"')
FIREWALL = """
table inet filter {
    chain forward { type filter hook forward priority filter; policy accept;
        ct state established,related accept
        iifname "eth1" tcp dport 25 drop comment "no smtp out"
    }
}
"""


@pytest.fixture
def router() -> Iterator[Host]:
    with Lab() as lab:
        a = lab.host("a")
        a.run("nft", "-f", "-", input=FIREWALL)
        yield a



def greupd_table(host: Host) -> str:
    return host.run("nft", "list", "table", "inet", "greupd", check=False).stdout


def test_the_table_is_kept_in_place_and_the_firewall_is_left_alone(router: Host) -> None:
    firewall = router.run("nft", "-a", "list", "table", "inet", "filter").stdout
    daemon = GreupdProcess(router, CONFIG).start()
    table = greupd_table(router)
    assert "maxseg size set meta nfproto map { ipv4 : 1436, ipv6 : 1416 }" in table and "masquerade" in table, table
    assert router.run("nft", "-a", "list", "table", "inet", "filter").stdout == firewall

    router.run("nft", "flush", "ruleset")
    assert wait_until(lambda: "ipv4 : 1436, ipv6 : 1416" in greupd_table(router), 10), daemon.output()
    router.run("nft", "delete", "table", "inet", "greupd")
    assert wait_until(lambda: "ipv4 : 1436, ipv6 : 1416" in greupd_table(router), 10), daemon.output()

    # The firewall was flushed with everything else above: put it back as the admin would, then check that
    # greupd's start, reload and stop leave it exactly as it is.
    router.run("nft", "delete", "table", "inet", "filter", check=False)
    router.run("nft", "-f", "-", input=FIREWALL)
    firewall = router.run("nft", "-a", "list", "table", "inet", "filter").stdout

    assert daemon.reload(CONFIG.replace("clamp = 1436", 'clamp = "pmtu"')).returncode == 0
    assert wait_until(lambda: "maxseg size set rt mtu" in greupd_table(router), 10)
    assert router.run("nft", "-a", "list", "table", "inet", "filter").stdout == firewall

    assert daemon.stop() == 0
    assert greupd_table(router) == ""
    assert router.run("nft", "-a", "list", "table", "inet", "filter").stdout == firewall


def test_renaming_the_table_puts_the_new_one_in_before_the_old_one_goes(router: Host) -> None:
    """Review L8: never a moment with neither table (no clamp, no NAT). `nft monitor` reports the kernel's
    commits in their order, on one socket."""
    daemon = GreupdProcess(router, CONFIG).start()
    monitor = router.popen("nft", "monitor", "tables", stdout=subprocess.PIPE, text=True)
    assert monitor.stdout is not None
    # Listening once it reports a table of the test's own.
    router.run("nft", "add", "table", "inet", "probe")
    while select.select([monitor.stdout], [], [], 0.2)[0] == []:
        router.run("nft", "delete", "table", "inet", "probe")
        router.run("nft", "add", "table", "inet", "probe")
    router.run("nft", "delete", "table", "inet", "probe")
    assert daemon.reload(CONFIG.replace("[daemon]\n", '[daemon]\nnft_table = "greupd_lan"\n', 1)).returncode == 0
    assert wait_until(lambda: "ipv4 : 1436" in router.run("nft", "list", "table", "inet", "greupd_lan",
                                                           check=False).stdout, 10), daemon.output()
    assert greupd_table(router) == ""
    monitor.terminate()
    events = [line.split(" {")[0].strip() for line in monitor.communicate(timeout=10)[0].splitlines()
              if "table inet" in line]
    added = events.index("add table inet greupd_lan")
    assert "delete table inet greupd" in events[added:], events
    assert "delete table inet greupd" not in events[:added], events


DOCKER_FORWARD = """
table ip filter {
    chain FORWARD { type filter hook forward priority filter; policy accept;
        counter
    }
}
"""


def test_another_tables_forward_drop_that_defeats_the_nat_accepts_is_reported_while_it_lasts(router: Host) -> None:
    """Review M9: an accept in greupd's forward chain cannot override a drop in another table's forward chain
    (Docker's iptables-nft `FORWARD` policy DROP). greupd says so, naming the tunnel, and never edits that
    table; the policy change is a chain event another process commits, seen by the watch."""
    daemon = GreupdProcess(router, CONFIG).start()

    def warned() -> list[str]:  # nftables' (not doctor's: this kernel may have no ip_gre, greupd(8) status)
        status = daemon.status(check=False)
        return [w for w in status.get("warnings", []) if w.startswith("nftables: ")] if status else []

    assert warned() == []
    router.run("nft", "-f", "-", input=DOCKER_FORWARD)
    router.run("nft", "chain", "ip", "filter", "FORWARD", "{ policy drop; }")  # `iptables -P FORWARD DROP`
    docker = router.run("nft", "-a", "list", "table", "ip", "filter").stdout

    assert wait_until(lambda: bool(warned()), 10), daemon.output()
    (warning,) = warned()
    assert warning.startswith("nftables: table ip filter chain FORWARD (hook forward priority 0): policy drop:"
                              " the forward accepts greupd keeps for My_Tunnel ([tunnel.nat]) cannot override it")
    assert warning in daemon.output()  # journalled (here: stderr) once it appeared
    assert "warning: nftables: table ip filter chain FORWARD" in daemon.cli("status", check=True).stdout
    assert "# warning: nftables: table ip filter chain FORWARD" in daemon.cli("plan", check=True).stdout
    assert router.run("nft", "-a", "list", "table", "ip", "filter").stdout == docker  # never edited

    router.run("nft", "delete", "table", "ip", "filter")
    assert wait_until(lambda: not warned(), 10), daemon.output()
    assert f"no longer: {warning}" in daemon.output()
    assert daemon.stop() == 0
