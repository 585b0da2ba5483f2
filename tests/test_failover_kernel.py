"""A dead peer and a failover, with the whole daemon: the seed's pain point 2 ("one end is down and the other
does not know").

Router A runs greupd with a primary tunnel to B (metric 0) and a backup tunnel to C (metric 100), both
carrying B's LAN prefix. B and C are plain Linux routers (no greupd) that reflect A's keepalives the way
kernel-lab.md describes, and both serve the same address 20.10.1.100 (anycast). lan_a pings it: through B
while B answers, through C while B is dead, through B again once B is back.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from lab.greupd_process import GreupdProcess
from lab.hosts import Host, Lab, SeedTopology, seed_topology
from lab.waiting import wait_until

pytestmark = pytest.mark.needs_gre

INTERVAL = 0.2
RETRIES = 3
SERVICE = "20.10.1.100"


def a_config(up_after: int = 1) -> str:
    def tunnel(name: str, remote: str, address: str, peer: str, metric: int) -> str:
        return (f'[[tunnel]]\nname = "{name}"\nlocal = "172.19.1.1"\nremote = "{remote}"\naddress = "{address}"\n'
                f'peer = "{peer}"\nroutes = ["{SERVICE}/32"]\nmetric = {metric}\n'
                f"[tunnel.keepalive]\ninterval = {INTERVAL}\nretries = {RETRIES}\nup_after = {up_after}\n\n")
    return tunnel("to_b", "172.19.1.2", "192.168.8.1", "192.168.8.11", 0) + \
        tunnel("to_c", "172.19.1.3", "192.168.9.1", "192.168.9.11", 100)


def plain_peer(host: Host, address: str, peer: str) -> None:
    """A Linux router without greupd: a GRE tunnel back to A that reflects A's keepalives in the kernel."""
    host.ip("tunnel", "add", "to_a", "mode", "gre", "local", host_wan(host), "remote", "172.19.1.1", "ttl", "64")
    host.ip("addr", "add", address, "peer", peer, "dev", "to_a")
    host.ip("link", "set", "to_a", "up")
    host.ip("route", "add", "10.10.1.0/24", "dev", "to_a")
    host.ip("link", "add", "svc", "type", "dummy")
    host.ip("addr", "add", f"{SERVICE}/32", "dev", "svc")
    host.ip("link", "set", "svc", "up")
    # The reflected keepalive is routed back out with the router's own address as source: a martian unless
    # accept_local is on and rp_filter off (kernel-lab.md).
    for key, value in (("net.ipv4.ip_forward", 1), ("net.ipv4.conf.to_a.accept_local", 1),
                       ("net.ipv4.conf.to_a.rp_filter", 0), ("net.ipv4.conf.all.rp_filter", 0)):
        host.sysctl(key, value)


def host_wan(host: Host) -> str:
    match = re.search(r"inet (\S+)/", host.ip("addr", "show", "wan0").stdout)
    assert match
    return match.group(1)


@dataclass
class Failover:
    seed: SeedTopology
    c: Host
    a: GreupdProcess


@pytest.fixture
def failover() -> Iterator[Failover]:
    with Lab() as lab:
        seed = seed_topology(lab)
        c = seed.add_router("c", "172.19.1.3")
        plain_peer(seed.b, "192.168.8.11", "192.168.8.1")
        plain_peer(c, "192.168.9.11", "192.168.9.1")
        a = GreupdProcess(seed.a, a_config()).start()
        yield Failover(seed, c, a)


def route_to_service(a: Host) -> str:
    return a.ip("route", "get", SERVICE).stdout


def test_dead_primary_fails_over_to_the_backup_and_comes_back(failover: Failover) -> None:
    seed, a = failover.seed, failover.a
    assert a.wait_for("to_b", "up")["keepalive"]["received"] >= 0
    assert wait_until(lambda: a.tunnel("to_b")["keepalive"]["received"] > 2, 10), a.output()
    assert "dev to_b" in route_to_service(seed.a)
    assert seed.lan_a.wait_ping(SERVICE)

    # B dies: its tunnel stops, so it neither reflects keepalives nor carries traffic.
    killed = time.time()
    seed.b.ip("link", "set", "to_a", "down")
    # The link went down somewhere in the `ip` command's run, which a busy UML guest stretches past a second.
    command = time.time() - killed
    a.wait_for("to_b", "down", timeout=10)
    went_down = a.logged_at(r"tunnel to_b down: 3 keepalives missed", killed - 1)
    assert went_down is not None, a.output()
    assert went_down - killed <= INTERVAL * (RETRIES + 1) + 0.5 + command, \
        f"detection took {went_down - killed:.2f}s, of which `ip link set down` {command:.2f}s"
    assert "dev to_c" in route_to_service(seed.a)
    assert "20.10.1.100 dev to_b" not in seed.a.ip("route", "show").stdout
    assert seed.lan_a.wait_ping(SERVICE, timeout=5)
    status = a.tunnel("to_b")
    assert status["reason"] == "keepalive-timeout" and not status["routes_installed"]
    assert a.tunnel("to_c")["state"] == "up"

    # B comes back: its replies return, and so does the primary route.
    seed.b.ip("link", "set", "to_a", "up")
    seed.b.ip("route", "replace", "10.10.1.0/24", "dev", "to_a")
    a.wait_for("to_b", "up", timeout=10)
    assert a.tunnel("to_b")["reason"] == "keepalive-restored"
    assert wait_until(lambda: "dev to_b" in route_to_service(seed.a), 5)
    assert seed.lan_a.wait_ping(SERVICE)
    assert re.search(r"tunnel to_b up: .*routes 20.10.1.100/32 installed", a.output())


def test_action_link_sets_the_dead_tunnel_down_and_back_up(failover: Failover) -> None:
    seed, a = failover.seed, failover.a
    a.reload(a_config().replace(f"retries = {RETRIES}\n", f'retries = {RETRIES}\naction = "link"\n', 1))
    a.wait_for("to_b", "up")
    seed.b.ip("link", "set", "to_a", "down")
    a.wait_for("to_b", "down", timeout=10)
    assert wait_until(lambda: ",UP" not in seed.a.ip("link", "show", "to_b").stdout, 5)
    assert "dev to_c" in route_to_service(seed.a)
    # Probing goes on over the underlay while the tunnel link is down.
    seed.b.ip("link", "set", "to_a", "up")
    a.wait_for("to_b", "up", timeout=10)
    assert wait_until(lambda: ",UP" in seed.a.ip("link", "show", "to_b").stdout, 5)
    assert wait_until(lambda: "dev to_b" in route_to_service(seed.a), 5)
