"""Review M4: switching IPv6 forwarding on must not take away what the host learns from router advertisements.

With net.ipv6.conf.all.forwarding = 1 an interface with accept_ra = 1 ignores router advertisements, and the
switch itself purges the default routers they taught (rt6_purge_dflt_routers spares accept_ra = 2 only): an
ip6gre underlay configured by SLAAC would lose its default route, and the tunnel with it. greupd sets
accept_ra = 2 on the interfaces the kernel configures from RAs before it switches forwarding on.

Runs on the host kernel in netns (no GRE needed: the sysctls come before the links, and the tunnel's own
create may fail there): an ISP router sends real RAs (scapy) to router A's uplink.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

from lab.greupd_process import GreupdProcess
from lab.hosts import Host, Lab
from lab.waiting import wait_until

pytestmark = pytest.mark.needs_root

CONFIG = """
[daemon]
ip_forward = true

[[tunnel]]
name = "My_Tunnel"
local = "172.19.1.1"
remote = "172.19.1.2"
address = "192.168.8.1"
peer = "192.168.8.11"
routes = ["2001:db8:99::/64"]
"""

SEND_RA = """
import sys
from scapy.all import Ether, ICMPv6ND_RA, ICMPv6NDOptPrefixInfo, ICMPv6NDOptSrcLLAddr, IPv6, get_if_hwaddr, sendp
mac = get_if_hwaddr("eth0")
sendp(Ether(src=mac, dst="33:33:00:00:00:01") / IPv6(src="fe80::1", dst="ff02::1", hlim=255)
      / ICMPv6ND_RA(routerlifetime=1800) / ICMPv6NDOptSrcLLAddr(lladdr=mac)
      / ICMPv6NDOptPrefixInfo(prefix=sys.argv[1], prefixlen=64, validlifetime=86400, preferredlifetime=14400),
      iface="eth0", verbose=False)
"""


@pytest.fixture
def uplink() -> Iterator[tuple[Host, Host]]:
    """Router A (forwarding off, accept_ra 1: a fresh netns's defaults) with an uplink to an ISP router that
    advertises itself, and a LAN interface that hears no RAs."""
    with Lab() as lab:
        a, isp, lan = lab.host("a"), lab.host("isp"), lab.host("lan")
        lab.link(a, isp, "172.19.1.1/24", None, then2=["addr add fe80::1/64 dev eth0 nodad"])
        lab.link(a, lan, "10.10.1.1/24", "10.10.1.2/24", if1="lan0")
        yield a, isp


def advertise(isp: Host, prefix: str) -> None:
    isp.run(sys.executable, "-c", SEND_RA, prefix, timeout=120)


def default_route(a: Host) -> str:
    return a.ip("-6", "route", "show", "default").stdout


def test_switching_forwarding_on_keeps_the_default_router_and_slaac_of_the_uplink(uplink: tuple[Host, Host]) -> None:
    a, isp = uplink
    assert (a.sysctl_get("net.ipv6.conf.all.forwarding"), a.sysctl_get("net.ipv6.conf.eth0.accept_ra")) == ("0", "1")
    advertise(isp, "2001:db8:1::")
    assert wait_until(lambda: "via fe80::1 dev eth0 proto ra" in default_route(a), 10), default_route(a)

    daemon = GreupdProcess(a, CONFIG).start()

    assert a.sysctl_get("net.ipv6.conf.all.forwarding") == "1"
    assert "via fe80::1 dev eth0 proto ra" in default_route(a), "switching forwarding on purged the RA default route"
    assert a.sysctl_get("net.ipv6.conf.eth0.accept_ra") == "2"
    assert a.sysctl_get("net.ipv6.conf.lan0.accept_ra") == "1"  # no RAs there: left as it was
    # RAs still count: a new prefix is taken up by SLAAC while A forwards
    advertise(isp, "2001:db8:2::")
    assert wait_until(lambda: "2001:db8:2:" in a.ip("-6", "addr", "show", "dev", "eth0").stdout, 10), \
        a.ip("-6", "addr", "show", "dev", "eth0").stdout
    assert "accept_ra" not in daemon.cli("plan", check=True).stdout  # set once, at the switch; not re-planned
    assert daemon.stop() == 0
