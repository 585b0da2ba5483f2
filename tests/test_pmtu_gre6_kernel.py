"""mtu = "probe" on ip6gre (issue #23, Build 4) on a real kernel (ip6_gre; the UML guest here): A and B over an
IPv6 underlay, through a middle router M whose link towards B carries 1400 bytes and which never tells A so
(its ICMPv6 Packet Too Big is dropped on the way out, as providers filter it): a black hole above 1400.

    A fd00:1::1 --1500-- fd00:1::fe M fd00:2::fe --1400-- fd00:2::2 B

greupd on A measures with padded GRE6 keepalives (MikroTik's format) against B's plain kernel reflecting them
(net.ipv6.conf.all.forwarding = 1, nothing else), finds 1348 (1400 less 40 IPv6 + 4 GRE + the 8-byte
encapsulation limit option greupd's link sends), and sets it on the link in place; a DF ping of 1348 bytes
then goes through the tunnel, where the kernel's default 1448 would have sent what M silently drops.
"""

from __future__ import annotations

import time

import pytest

from lab.greupd_process import GreupdProcess
from lab.hosts import Host, Lab
from lab.waiting import eventually

A, B = "fd00:1::1", "fd00:2::2"
A_INNER, B_INNER = "10.6.0.1", "10.6.0.2"
pytestmark = pytest.mark.needs_gre

CONFIG = f"""
[[tunnel]]
name = "Tunnel6"
mode = "ip6gre"
local = "{A}"
remote = "{B}"
address = "{A_INNER}"
peer = "{B_INNER}"
mtu = "probe"
keepalive = {{interval = 0.2, retries = 5}}
mtu_probe = {{every = "10s", timeout = "300ms"}}
"""


def df_ping(host: Host, address: str, size: int) -> bool:
    """One IPv4 ping of `size` bytes of IP packet, DF set (`ping -M do -s` takes the payload: 28 less)."""
    return host.sh(f"ping -n -q -c 1 -W 0.5 -M do -s {size - 28} {address}", check=False).returncode == 0


def test_greupd_measures_an_ip6gre_path_through_a_black_hole_against_a_plain_kernel_peer() -> None:
    with Lab("-pmtu6") as lab:
        a, m, b = lab.bare_hosts("a", "m", "b")
        a.ip_batch("link set lo up", f"link add eth0 type veth peer name eth0 netns {m.netns}",
                   f"addr add {A}/64 dev eth0 nodad", "link set eth0 up", "route add fd00:2::/64 via fd00:1::fe")
        m.ip_batch("link set lo up", f"link add eth1 type veth peer name eth0 netns {b.netns}",
                   "addr add fd00:1::fe/64 dev eth0 nodad", "link set eth0 up",
                   "addr add fd00:2::fe/64 dev eth1 nodad", "link set eth1 mtu 1400", "link set eth1 up")
        b.ip_batch("link set lo up", f"addr add {B}/64 dev eth0 nodad", "link set eth0 mtu 1400", "link set eth0 up",
                   "route add fd00:1::/64 via fd00:2::fe",
                   f"link add Tunnel6 type ip6gre local {B} remote {A}",
                   f"addr add {B_INNER} peer {A_INNER} dev Tunnel6", "link set Tunnel6 up")
        m.sysctl("net.ipv6.conf.all.forwarding", 1)
        b.sysctl("net.ipv6.conf.all.forwarding", 1)  # B's kernel reflects GRE6 keepalives
        # M's Packet Too Big (ICMPv6 type 2) never reaches A: dropped on M's way out towards A.
        m.sh("tc qdisc add dev eth0 clsact")
        m.sh("tc filter add dev eth0 egress protocol ipv6 prio 1 u32 match ip6 protocol 58 0xff"
             " match u8 2 0xff at 40 action drop")
        assert a.sh(f"ping -n -q -c 1 -W 2 -M do -s {1400 - 48} {B}", check=False).returncode == 0
        assert a.sh(f"ping -n -q -c 1 -W 0.5 -M do -s {1401 - 48} {B}", check=False).returncode != 0, \
            "M carries 1400, silently no more"

        began = time.monotonic()
        greupd = GreupdProcess(a, CONFIG).start()
        try:
            ifindex = greupd.wait_for("Tunnel6", "up")["ifindex"]
            eventually(lambda: (greupd.tunnel("Tunnel6").get("path_mtu") or {}).get("bytes") == 1348, timeout=40,
                       what="status path_mtu 1348", detail=greupd.output)
            eventually(lambda: " mtu 1348 " in a.ip("-o", "link", "show", "Tunnel6").stdout, timeout=10,
                       what="the link's MTU set", detail=greupd.output)
            print(f"pmtu6: 1348 set {time.monotonic() - began:.1f} s after greupd started")
            tunnel = greupd.tunnel("Tunnel6")
            assert tunnel["ifindex"] == ifindex == a.ifindex("Tunnel6"), "set in place"
            assert tunnel["path_mtu"]["state"] == "measured" and tunnel["path_mtu"]["ipv6"] is True
            assert tunnel["state"] == "up" and tunnel["state_changes"] == 0, "padded probes are not keepalives"
            # 1348 + 52 = 1400 on the wire, the encapsulation limit option included: the arithmetic is the kernel's
            assert df_ping(a, B_INNER, 1348)
        finally:
            greupd.stop()
