"""Every tunnel mode and link parameter round-trips through the kernel: what greupd creates, it reads back as
matching, so a running daemon never churns (no repeated changes, no growing request count)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from lab.greupd_process import GreupdProcess
from lab.hosts import Host, Lab

pytestmark = pytest.mark.needs_gre

MODES = """
[[tunnel]]
name = "t_gre"
mode = "gre"
local = "172.19.1.1"
remote = "172.19.1.2"
ikey = 1
okey = "0.0.0.2"
ttl = "inherit"
tos = 16
pmtudisc = false
mtu = 1400
address = "192.168.1.1/30"
routes = ["40.0.1.0/24", "2001:db8:1::/64"]
metric = 7
table = 100

[[tunnel]]
name = "t_gretap"
mode = "gretap"
local = "172.19.1.1"
remote = "172.19.1.3"
key = 9
address = "192.168.2.1"
peer = "192.168.2.2"
routes = ["40.0.2.0/24"]

[[tunnel]]
name = "t_ip6gre"
mode = "ip6gre"
local = "2001:db8:ff::1"
remote = "2001:db8:ff::2"
ttl = 32
address = "2001:db8:8::1/64"
routes = ["2001:db8:9::/64", "40.0.3.0/24"]

[[tunnel]]
name = "t_ip6gretap"
mode = "ip6gretap"
local = "2001:db8:ff::1"
remote = "2001:db8:ff::3"
key = 5
address = "192.168.4.1"
peer = "192.168.4.2"
routes = ["40.0.4.0/24"]
"""


@pytest.fixture
def router() -> Iterator[Host]:
    with Lab() as lab:
        a = lab.host("a")
        a.ip("link", "add", "wan0", "type", "dummy")
        a.ip("addr", "add", "172.19.1.1/24", "dev", "wan0")
        a.ip("addr", "add", "2001:db8:ff::1/64", "dev", "wan0", "nodad")
        a.ip("link", "set", "wan0", "up")
        yield a


def test_all_modes_are_created_as_configured_and_then_left_alone(router: Host) -> None:
    daemon = GreupdProcess(router, MODES).start()
    status = daemon.status()
    assert status is not None
    assert {t["name"]: t["state"] for t in status["tunnels"]} == {
        "t_gre": "up", "t_gretap": "up", "t_ip6gre": "up", "t_ip6gretap": "up"}, daemon.output()

    gre = router.ip("-d", "link", "show", "t_gre").stdout
    for fragment in ("mtu 1400", "ttl inherit", "tos 0x10", "nopmtudisc", "ikey 0.0.0.1", "okey 0.0.0.2",
                     "alias greupd"):
        assert fragment in gre, (fragment, gre)
    # A device route gets link scope, as `ip route add P dev D` gives it.
    assert "40.0.1.0/24 dev t_gre proto 222 scope link metric 7" in router.ip("route", "show", "table", "100").stdout
    assert "2001:db8:1::/64 dev t_gre proto 222 metric 7" in router.ip("-6", "route", "show", "table", "100").stdout
    assert "gretap" in router.ip("-d", "link", "show", "t_gretap").stdout
    assert "40.0.2.0/24 via 192.168.2.2 dev t_gretap proto 222" in router.ip("route", "show").stdout
    assert "hoplimit 32" in router.ip("-d", "link", "show", "t_ip6gre").stdout
    assert "2001:db8:9::/64 dev t_ip6gre proto 222 metric 1024" in router.ip("-6", "route", "show").stdout

    # Steady state: nothing more to do, and nothing is being done.
    plan = daemon.cli("plan").stdout
    assert plan.startswith("# kernel\nnothing to change"), plan
    settled = daemon.status()
    assert settled is not None
    time.sleep(2)
    after = daemon.status()
    assert after is not None and after["netlink_requests"] == settled["netlink_requests"], daemon.output()
