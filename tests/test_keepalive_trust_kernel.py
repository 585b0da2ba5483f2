"""Keepalives a router's owner can trust (#11), with the whole daemon on a real kernel with ip_gre:

- H1: probes and answers take the tunnel's own data path. A has two uplinks; the tunnel's `local` is on
  uplink 2, selected by `ip rule from <local> lookup 100`, while main's default route leaves by uplink 1,
  which does not reach B. The keepalive sees B, B's probes are answered, and failing uplink 2 takes the
  tunnel down.
- H3: a restart keeps what keepalives learned. B is dead, A's tunnel down, A's daemon SIGKILLed (or
  stopped as an upgrade does) and started again: B's route never comes back meanwhile, no false "up";
  when B returns, the tunnel goes up.
- H5: answer = "daemon" answers only while our end of the tunnel works. A foreign link holds the tunnel's
  name (state error): a Cisco-style probe from B gets no answer; once the clash is gone, it does.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator

import pytest

from lab.greupd_process import GreupdProcess
from lab.hosts import Host, Lab, SeedTopology
from lab.waiting import eventually, wait_until
from tests.test_failover_kernel import SERVICE, plain_peer
from tests.test_keepalive_kernel import send_keepalives

pytestmark = pytest.mark.needs_gre

INTERVAL = 0.2
RETRIES = 3


def keepalive_tunnel(local: str, remote: str, answer: str = "off", routes: str = f'["{SERVICE}/32"]') -> str:
    return (f'[[tunnel]]\nname = "to_b"\nlocal = "{local}"\nremote = "{remote}"\n'
            f'address = "192.168.8.1"\npeer = "192.168.8.11"\nroutes = {routes}\n'
            f'[tunnel.keepalive]\ninterval = {INTERVAL}\nretries = {RETRIES}\nanswer = "{answer}"\n')


# --- H1: a source rule picks the uplink -------------------------------------------------------------------

A_UPLINK1, ISP1 = "10.1.0.2", "10.1.0.1"
A_UPLINK2, ISP2 = "10.2.0.2", "10.2.0.1"
B_ADDRESS = "192.0.2.2"


def two_uplinks(lab: Lab) -> tuple[Host, Host, Host]:
    """A with uplink 1 (eth1, main's default route, to an ISP that does not forward: it reaches nobody) and
    uplink 2 (eth2, to an ISP that reaches B, chosen only by `from 10.2.0.2 lookup 100`). Returns a, isp2, b."""
    a, isp1, isp2, b = (lab.host(name) for name in ("a", "isp1", "isp2", "b"))
    lab.link(a, isp1, f"{A_UPLINK1}/24", f"{ISP1}/24", if1="eth1", if2="eth0")
    lab.link(a, isp2, f"{A_UPLINK2}/24", f"{ISP2}/24", if1="eth2", if2="eth0")
    lab.link(isp2, b, "192.0.2.1/24", f"{B_ADDRESS}/24", if1="eth1", if2="wan0")
    isp2.sysctl("net.ipv4.ip_forward", 1)
    a.ip_batch(f"route add default via {ISP1}", f"route add default via {ISP2} table 100",
               f"rule add from {A_UPLINK2} lookup 100")
    b.ip("route", "add", "default", "via", "192.0.2.1")
    # B: a plain Linux peer whose kernel reflects A's keepalives (tests/test_failover_kernel.py)
    b.ip("tunnel", "add", "to_a", "mode", "gre", "local", B_ADDRESS, "remote", A_UPLINK2, "ttl", "64")
    b.ip("addr", "add", "192.168.8.11", "peer", "192.168.8.1", "dev", "to_a")
    b.ip("link", "set", "to_a", "up")
    for key, value in (("net.ipv4.ip_forward", 1), ("net.ipv4.conf.to_a.accept_local", 1),
                       ("net.ipv4.conf.to_a.rp_filter", 0), ("net.ipv4.conf.all.rp_filter", 0)):
        b.sysctl(key, value)
    return a, isp2, b


def test_probes_follow_the_source_rule_of_the_tunnels_local_address(lab: Lab) -> None:
    a_host, isp2, b = two_uplinks(lab)
    a = GreupdProcess(a_host, keepalive_tunnel(A_UPLINK2, B_ADDRESS, answer="daemon", routes="[]")).start()
    # The tunnel's own traffic takes uplink 2 (the kernel looks up saddr = local): so must its keepalives.
    assert a_host.wait_ping("192.168.8.11"), "the tunnel itself does not carry traffic"
    eventually(lambda: a.tunnel("to_b")["keepalive"]["received"] >= 5, timeout=10,
               what="replies from B over uplink 2", detail=lambda: f"{a.tunnel('to_b')}\n{a.output()}")
    assert a.tunnel("to_b")["state"] == "up"
    assert "down" not in re.findall(r"tunnel to_b (\w+)", a.output())
    # And so must A's answers to B's own (Cisco-style) probes, reflected exactly as B wrote them.
    assert send_keepalives(b, B_ADDRESS, A_UPLINK2, None, None, 5) == 5

    isp2.ip("link", "set", "eth0", "down")  # uplink 2 fails; uplink 1 is still there, and reaches nobody
    a.wait_for("to_b", "down", timeout=10)
    assert a.tunnel("to_b")["reason"] == "keepalive-timeout"
    isp2.ip("link", "set", "eth0", "up")
    a.wait_for("to_b", "up", timeout=10)


# --- H3: SIGKILL and restart while the peer is dead -------------------------------------------------------


@pytest.fixture
def dead_peer(seed: SeedTopology) -> Iterator[tuple[SeedTopology, GreupdProcess]]:
    plain_peer(seed.b, "192.168.8.11", "192.168.8.1")
    a = GreupdProcess(seed.a, keepalive_tunnel("172.19.1.1", "172.19.1.2")).start()
    a.wait_for("to_b", "up")
    assert wait_until(lambda: SERVICE in seed.a.ip("route", "show", "proto", "222").stdout, 5), a.output()
    seed.b.ip("link", "set", "to_a", "down")  # B dies
    a.wait_for("to_b", "down", timeout=10)
    assert wait_until(lambda: SERVICE not in seed.a.ip("route", "show", "proto", "222").stdout, 5), a.output()
    yield seed, a


class RouteWatch:
    """Polls A's routes every 50 ms in a thread and remembers whether SERVICE ever showed up."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.seen: list[str] = []
        self.polls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            routes = self.host.ip("route", "show", "proto", "222").stdout
            self.polls += 1
            if SERVICE in routes:
                self.seen.append(routes)
            self._stop.wait(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.mark.parametrize("stop", ["SIGKILL", "SIGTERM"])
def test_a_dead_peer_stays_down_across_a_restart(dead_peer: tuple[SeedTopology, GreupdProcess], stop: str) -> None:
    """SIGKILL: a crash (and a watchdog abort, which systemd follows with the same fresh start). SIGTERM:
    `systemctl restart`, as a package upgrade's postinst does it (on_exit = "keep" leaves the tunnels)."""
    seed, a = dead_peer
    before_restart = len(a.output())
    watch = RouteWatch(seed.a)
    try:
        if stop == "SIGKILL":
            a.kill()
        else:
            assert a.stop() == 0
        a.start()
        assert a.tunnel("to_b")["state"] == "down"
        time.sleep(3 * INTERVAL * RETRIES)  # the time a fresh "up" verdict would have lasted
        assert a.tunnel("to_b")["state"] == "down"
    finally:
        watch.stop()
    assert watch.polls >= 3  # it watched the whole restart (each `ip` costs a lot in a busy UML guest)
    assert watch.seen == [], f"the dead peer's route came back after the restart:\n{watch.seen[0]}"
    after = a.output()[before_restart:]
    assert not re.search(r"tunnel to_b up", after), after
    assert "keepalive verdicts resumed: to_b down" in after

    seed.b.ip("link", "set", "to_a", "up")  # B returns
    seed.b.ip("route", "replace", "10.10.1.0/24", "dev", "to_a")
    a.wait_for("to_b", "up", timeout=10)
    assert wait_until(lambda: SERVICE in seed.a.ip("route", "show", "proto", "222").stdout, 5), a.output()


# --- H5: no answers while our end does not work -----------------------------------------------------------


def test_answers_stop_while_a_foreign_link_holds_the_tunnels_name(seed: SeedTopology) -> None:
    plain_peer(seed.b, "192.168.8.11", "192.168.8.1")  # B's kernel answers A's own keepalives
    seed.a.ip("link", "add", "to_b", "type", "dummy")  # someone else's link, with our tunnel's name
    a = GreupdProcess(seed.a, keepalive_tunnel("172.19.1.1", "172.19.1.2", answer="daemon")).start()
    assert a.tunnel("to_b")["state"] == "error"

    def probes_answered() -> int:
        """B probes A the way a Cisco does (no keys): how many came back."""
        return send_keepalives(seed.b, "172.19.1.2", "172.19.1.1", None, None, 5)

    assert probes_answered() == 0, "answered for a tunnel whose link is someone else's"

    seed.a.ip("link", "del", "to_b")
    if not wait_until(lambda: a.tunnel("to_b")["state"] == "up", 5):
        a.reload()  # the daemon need not react to a foreign link's removal by itself
    a.wait_for("to_b", "up", timeout=10)
    eventually(lambda: probes_answered() == 5, timeout=10, what="answers once our end works",
               detail=a.output)
