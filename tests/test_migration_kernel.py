"""Moving to greupd with no outage: the seed's hand-made tunnel, imported and adopted while a ping runs.

Also each import source (kernel, netplan, networkd, ifupdown): the tunnels a file describes are made by hand
in a netns the way that file's tool would make them, then what `greupd import` prints must validate and
plan to nothing but the adoption itself.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from lab.greupd_process import GreupdProcess
from lab.hosts import Host, Lab, SeedTopology
from lab.waiting import eventually

pytestmark = pytest.mark.needs_gre

IMPORTS = Path(__file__).parent / "configs" / "import"
ADOPTION = {"adopt-link", "take-over-route"}  # the only changes a freshly imported file may plan


def seed_by_hand(router: Host, local: str, remote: str, address: str, peer: str, lan: str) -> None:
    """The seed's step 2, as its reader types it (no greupd)."""
    router.ip_batch(f"tunnel add My_Tunnel mode gre remote {remote} local {local}",
                    "link set My_Tunnel up",
                    f"addr add {address} peer {peer} dev My_Tunnel",
                    f"route add {lan} dev My_Tunnel")



def plan_json(greupd: GreupdProcess) -> dict[str, Any]:
    result = greupd.cli("plan", "--json")
    assert result.returncode == 0, result.stderr
    plan: dict[str, Any] = json.loads(result.stdout)
    return plan


def imported(greupd: GreupdProcess, *argv: str) -> str:
    """`greupd import ARGV` in the daemon's host, written as its config file."""
    result = greupd.cli("import", *argv)
    assert result.returncode == 0, result.stderr
    greupd.config_path.write_text(result.stdout)
    return result.stdout


def test_hand_made_seed_tunnel_is_adopted_without_losing_a_ping(seed: SeedTopology) -> None:
    seed_by_hand(seed.a, "172.19.1.1", "172.19.1.2", "192.168.8.1", "192.168.8.11", "20.10.1.0/24")
    seed_by_hand(seed.b, "172.19.1.2", "172.19.1.1", "192.168.8.11", "192.168.8.1", "10.10.1.0/24")
    assert seed.lan_a.wait_ping("20.10.1.2", timeout=10)
    index = seed.a.ifindex("My_Tunnel")
    ping = seed.lan_a.popen("ping", "-n", "-i", "0.05", "20.10.1.2", stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)

    a = GreupdProcess(seed.a, "")
    text = imported(a)
    assert 'name = "My_Tunnel"' in text and "adopt = true" in text and 'routes = ["20.10.1.0/24"]' in text
    assert a.cli("check").returncode == 0
    assert a.cli("plan", "--detailed-exitcode").returncode == 2
    assert {c["action"] for c in plan_json(a)["changes"]} == ADOPTION

    a.start()
    assert a.wait_for("My_Tunnel", "up")["ifindex"] == index
    assert seed.a.ifindex("My_Tunnel") == index
    assert "proto 222" in seed.a.ip("route", "show", "20.10.1.0/24").stdout
    assert "alias greupd" in seed.a.ip("-d", "link", "show", "My_Tunnel").stdout
    assert a.cli("plan", "--detailed-exitcode").returncode == 0

    ping.send_signal(signal.SIGINT)  # `ip netns exec` passes it on; ping prints its summary
    summary, _ = ping.communicate(timeout=20)
    sent, received = map(int, re.search(r"(\d+) packets transmitted, (\d+) received", summary).groups())  # type: ignore[union-attr]
    assert sent > 40 and received == sent, summary

    seed.a.ip("link", "del", "My_Tunnel")
    eventually(lambda: "proto 222" in seed.a.ip("route", "show", "20.10.1.0/24").stdout,
               what="My_Tunnel and its route put back after ip link del", detail=a.output)
    assert seed.lan_a.wait_ping("20.10.1.2", timeout=10)


def test_a_hand_made_tunnel_to_another_remote_is_not_adopted(seed: SeedTopology) -> None:
    seed_by_hand(seed.a, "172.19.1.1", "172.19.1.9", "192.168.8.1", "192.168.8.11", "20.10.1.0/24")
    before = seed.a.ip("-d", "link", "show", "My_Tunnel").stdout, seed.a.ip("route", "show").stdout
    config = ('[[tunnel]]\nname = "My_Tunnel"\nlocal = "172.19.1.1"\nremote = "172.19.1.2"\nttl = "inherit"\n'
              'tos = 0\naddress = "192.168.8.1"\npeer = "192.168.8.11"\nroutes = ["20.10.1.0/24"]\nadopt = true\n')
    a = GreupdProcess(seed.a, config)
    assert a.cli("plan", "--detailed-exitcode").returncode == 1
    a.start()
    mine = a.wait_for("My_Tunnel", "error")
    assert "remote 172.19.1.9, configured 172.19.1.2" in mine["error"]
    assert (seed.a.ip("-d", "link", "show", "My_Tunnel").stdout, seed.a.ip("route", "show").stdout) == before


# --- round trips: the files' meaning made by hand, then import -> check -> plan ---------------------------

# What each tool runs for the test files under tests/configs/import/ (ifupdown's inet.defn, networkd, netplan).
BY_HAND = {
    "ifupdown": [
        "tunnel add My_Tunnel mode gre remote 172.19.1.2 local 172.19.1.1",
        "link set My_Tunnel up",
        "addr add 192.168.8.1/32 dev My_Tunnel peer 192.168.8.11",
        "route add 20.10.1.0/24 dev My_Tunnel",
        "tunnel add Backup mode gre remote 172.19.1.3 local 172.19.1.1 ttl 255",
        "link set Backup up mtu 1400",
        "addr add 192.168.9.1/30 dev Backup",
        "route add 20.10.1.0/24 dev Backup metric 100",
    ],
    "networkd": [
        "link add My_Tunnel mtu 1400 type gre local 172.19.1.1 remote 172.19.1.2 key 42 ttl 64",
        "link set My_Tunnel up",
        "addr add 192.168.8.1/32 peer 192.168.8.11/32 dev My_Tunnel",
        "route add 20.10.1.0/24 dev My_Tunnel metric 10 proto static",
        "route add 20.10.2.0/24 dev My_Tunnel metric 10 proto static",
        "link add Tap type gretap local 172.19.1.1 remote 172.19.1.4 ikey 7 okey 8",
        "link set Tap up",
        "addr add 192.168.10.1/24 dev Tap",
    ],
    "netplan": [
        "link add My_Tunnel mtu 1400 type gre local 172.19.1.1 remote 172.19.1.2 key 42 ttl 64",
        "link set My_Tunnel up",
        "addr add 192.168.8.1/30 dev My_Tunnel",
        "route add 20.10.1.0/24 dev My_Tunnel metric 10 proto static",
        "route add 20.10.2.0/24 dev My_Tunnel metric 10 proto static",
        "link add Backup_v6 type ip6gre local 2001:db8:1::1 remote 2001:db8:1::2",
        "link set Backup_v6 up",
        "addr add fd00:8::1/64 dev Backup_v6 nodad",
        "route add 2001:db8:20::/64 dev Backup_v6 proto static",
    ],
}
BY_HAND["kernel"] = BY_HAND["ifupdown"]
TUNNELS = {"ifupdown": {"My_Tunnel", "Backup"}, "networkd": {"My_Tunnel", "Tap"},
           "netplan": {"My_Tunnel", "Backup_v6"}, "kernel": {"My_Tunnel", "Backup"}}


@pytest.mark.parametrize("source", ["kernel", "netplan", "networkd", "ifupdown"])
def test_import_round_trip_plans_only_the_adoption(lab: Lab, source: str) -> None:
    router = lab.host("a")
    router.sysctl("net.ipv4.ip_forward", 1)  # a router, as in the seed's step 1
    router.sysctl("net.ipv6.conf.all.forwarding", 1)
    router.ip_batch(*BY_HAND[source])
    greupd = GreupdProcess(router, "")
    text = imported(greupd, "--from", source, *([] if source == "kernel" else [str(IMPORTS / source)]))
    assert {m for m in re.findall(r'^name = "(.+)"$', text, re.MULTILINE)} == TUNNELS[source], text

    check = json.loads(greupd.cli("check", "--json").stdout)
    assert check["valid"] and check["errors"] == [], check
    plan = plan_json(greupd)
    assert plan["errors"] == []
    assert {c["action"] for c in plan["changes"]} <= ADOPTION, f"{text}\n{json.dumps(plan, indent=1)}"
    assert {c["tunnel"] for c in plan["changes"] if c["action"] == "adopt-link"} == TUNNELS[source]


def test_import_of_a_name_that_does_not_exist_exits_1(lab: Lab) -> None:
    router = lab.host("a")
    router.ip_batch(*BY_HAND["kernel"])
    result = GreupdProcess(router, "").cli("import", "My_Tunnel", "Nope")
    assert result.returncode == 1 and "Nope" in result.stderr
