"""BFD through every tunnel mode but gre (tests/test_bfd_lab_kernel.py has that one): ip6gre (BFD over IPv6
inside), gretap (IPv4 over an Ethernet tunnel), ip6gretap (IPv4 over Ethernet over IPv6), between two greupd
daemons on routers A and B joined by one underlay link (issue #22, build 4).

One story per mode: the sessions come up and A routes B's prefix through the tunnel; B is killed (no
AdminDown, only silence) and A withdraws the route within the detect time and a tick; B starts again and the
route comes back; B stops with on_exit = "remove" and A hears AdminDown (build 4: a stopping greupd that removes
its tunnels tells its peers first).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from lab.greupd_process import GreupdProcess
from lab.hosts import Host, Lab
from lab.waiting import eventually

pytestmark = pytest.mark.needs_gre

INTERVAL_MS, MULTIPLIER = 200, 3
DETECT = INTERVAL_MS * MULTIPLIER / 1000
SLACK = 0.6  # a tick of A's loop, and a busy UML guest between our clock reads and the daemons'


@dataclass(frozen=True)
class Mode:
    mode: str
    a_wan: str
    b_wan: str
    a_inner: str
    b_inner: str
    b_prefix: str  # routed by A through the tunnel

    def config(self, local: str, remote: str, address: str, peer: str, route: str, name: str) -> str:
        return (f'[[tunnel]]\nname = "{name}"\nmode = "{self.mode}"\nlocal = "{local}"\nremote = "{remote}"\n'
                f'address = "{address}"\npeer = "{peer}"\nroutes = ["{route}"]\n'
                f'[tunnel.bfd]\ninterval = "{INTERVAL_MS}ms"\nmultiplier = {MULTIPLIER}\n')

    @property
    def a_config(self) -> str:
        return self.config(self.a_wan, self.b_wan, self.a_inner, self.b_inner, self.b_prefix, "to_b")

    @property
    def b_config(self) -> str:
        prefix = "2001:db8:10::/64" if ":" in self.b_prefix else "10.10.1.0/24"
        return '[daemon]\non_exit = "remove"\n' + self.config(self.b_wan, self.a_wan, self.b_inner, self.a_inner,
                                                             prefix, "to_a")


MODES = [
    Mode("ip6gre", "2001:db8:ff::1", "2001:db8:ff::2", "fd00:8::1", "fd00:8::11", "2001:db8:20::/64"),
    Mode("gretap", "172.19.1.1", "172.19.1.2", "192.168.2.1", "192.168.2.2", "20.10.2.0/24"),
    Mode("ip6gretap", "2001:db8:ff::1", "2001:db8:ff::2", "192.168.4.1", "192.168.4.2", "20.10.4.0/24"),
]


@pytest.fixture
def routers() -> Iterator[tuple[Host, Host]]:
    with Lab() as lab:
        a, b = lab.bare_hosts("a", "b")
        lab.link(a, b, "172.19.1.1/24", "172.19.1.2/24", "wan0", "wan0",
                 then1=["addr add 2001:db8:ff::1/64 dev wan0 nodad", "link set lo up"],
                 then2=["addr add 2001:db8:ff::2/64 dev wan0 nodad", "link set lo up"])
        yield a, b


@pytest.mark.parametrize("mode", MODES, ids=[m.mode for m in MODES])
def test_bfd_through_the_tunnel_withdraws_and_restores_the_route(routers: tuple[Host, Host], mode: Mode) -> None:
    host_a, host_b = routers
    a = GreupdProcess(host_a, mode.a_config).start()
    b = GreupdProcess(host_b, mode.b_config).start()

    def routed() -> bool:
        family = "-6" if ":" in mode.b_prefix else "-4"
        return "dev to_b" in host_a.ip(family, "route", "show", mode.b_prefix).stdout

    def bfd(daemon: GreupdProcess, name: str) -> dict[str, object]:
        session: dict[str, object] = daemon.tunnel(name)["bfd"]
        return session

    eventually(lambda: bfd(a, "to_b")["state"] == "up" and bfd(b, "to_a")["state"] == "up", 20,
               f"both sessions up through {mode.mode}", lambda: f"{a.output()}\n{b.output()}")
    eventually(lambda: bfd(a, "to_b")["detect_time_ms"] == DETECT * 1000, 10, "fast timers negotiated", a.output)
    a.wait_for("to_b", "up")
    eventually(routed, 5, "B's prefix routed through the tunnel", lambda: host_a.ip("route").stdout)

    stopped = time.time()
    b.kill()
    a.wait_for("to_b", "down", timeout=10)
    went_down = a.logged_at(r"tunnel to_b down: BFD session", stopped - 1)
    assert went_down is not None, a.output()
    print(f"{mode.mode}: withdrawn {went_down - stopped:.3f}s after B was killed")
    assert went_down - stopped <= DETECT + SLACK, a.output()
    tunnel = a.tunnel("to_b")
    assert (tunnel["reason"], tunnel["liveness"]) == ("bfd-down", {"down_by": ["bfd"]}), tunnel
    assert not routed()

    b.start()
    a.wait_for("to_b", "up", timeout=20)
    assert a.tunnel("to_b")["reason"] == "bfd-restored"
    eventually(routed, 5, "B's prefix routed again", lambda: host_a.ip("route").stdout)

    # B stops with on_exit = "remove": its tunnel says AdminDown before it goes, and A takes that at once
    # (Diag 3, neighbor signaled session down), not after its detect time.
    eventually(lambda: bfd(b, "to_a")["state"] == "up", 10, "B's session up", b.output)
    stopping = time.time()
    assert b.stop() == 0, b.output()
    a.wait_for("to_b", "down", timeout=10)
    heard = a.logged_at(r"BFD session up -> down \(neighbor signaled session down\)", stopping)
    assert heard is not None, a.output()
    assert not routed()
    a.stop()
