"""Keepalives follow the tunnel link's underlay device, fwmark and VRF (#21 M2), with the whole daemon on a kernel
with ip_gre.

A has three uplinks. Main's default route leaves by uplink 1, to an ISP that forwards nothing: it reaches nobody.
B is reachable by uplinks 2 and 3 only, and three hand-made tunnels to B, which greupd adopts, say so the way an
operator pins a tunnel to an uplink:
- `by_dev`: `dev eth2` (IFLA_GRE_LINK): the kernel's lookup has oif = eth2, which picks main's second default route;
- `by_mark`: `fwmark 7` (IFLA_GRE_FWMARK) and `ip rule fwmark 7 lookup 100`, whose default leaves by uplink 2;
- `by_vrf`: `dev blue`, a VRF whose member is uplink 3 (table 200).
No rule matches the tunnels' source addresses, so a probe without the link's device or mark follows main to
uplink 1 and is lost (dac2a7b: false down on all three). With them, probes get replies and answers reach B.
"""

from __future__ import annotations

import re

import pytest

from lab.greupd_process import GreupdProcess
from lab.hosts import Host, Lab
from lab.waiting import eventually
from tests.test_keepalive_kernel import send_keepalives

pytestmark = pytest.mark.needs_gre

INTERVAL, RETRIES = 0.2, 3
UPLINK2, UPLINK3, B_ADDRESS = "10.2.0.2", "10.3.0.2", "192.0.2.2"
TUNNELS = {  # name: (A's local address, key, what pins it to its uplink)
    "by_dev": (UPLINK2, 1, "dev eth2"),
    "by_mark": (UPLINK2, 2, "fwmark 7"),
    "by_vrf": (UPLINK3, 3, "dev blue"),
}


def config() -> str:
    return "".join(
        f'[[tunnel]]\nname = "{name}"\nlocal = "{local}"\nremote = "{B_ADDRESS}"\nkey = {key}\nttl = 64\n'
        f'adopt = true\nkeepalive = {{interval = {INTERVAL}, retries = {RETRIES}, answer = "daemon"}}\n\n'
        for name, (local, key, _) in TUNNELS.items())


def three_uplinks(lab: Lab) -> tuple[Host, Host]:
    a, isp1, isp2, b = (lab.host(name) for name in ("a", "isp1", "isp2", "b"))
    lab.link(a, isp1, "10.1.0.2/24", "10.1.0.1/24", if1="eth1", if2="eth0")
    lab.link(a, isp2, f"{UPLINK2}/24", "10.2.0.1/24", if1="eth2", if2="eth0")
    lab.link(a, isp2, None, "10.3.0.1/24", if1="eth3", if2="eth2")
    lab.link(isp2, b, "192.0.2.1/24", f"{B_ADDRESS}/24", if1="eth1", if2="wan0")
    isp2.sysctl("net.ipv4.ip_forward", 1)
    a.ip_batch(
        "route add default via 10.1.0.1",  # main: uplink 1, which reaches nobody
        "route add default via 10.2.0.1 dev eth2 metric 100",  # taken only by a lookup bound to eth2
        "route add default via 10.2.0.1 dev eth2 table 100", "rule add fwmark 7 lookup 100",
        "link add blue type vrf table 200", "link set blue up", "link set eth3 master blue",
        f"addr add {UPLINK3}/24 dev eth3", "route add default via 10.3.0.1 dev eth3 table 200",
        *(f"link add {name} type gre local {local} remote {B_ADDRESS} key {key} ttl 64 {pin}"
          for name, (local, key, pin) in TUNNELS.items()),
        *(f"link set {name} up" for name in TUNNELS),
    )
    # Replies come back by uplinks 2 and 3 while main's route to B leaves by uplink 1: a multihomed router
    # runs loose reverse-path filtering.
    a.sysctl("net.ipv4.conf.all.rp_filter", 2)
    # B: a plain Linux peer whose kernel reflects A's keepalives, one tunnel per key.
    b.ip("route", "add", "default", "via", "192.0.2.1")
    for name, (local, key, _) in TUNNELS.items():
        b.ip("tunnel", "add", name, "mode", "gre", "local", B_ADDRESS, "remote", local, "key", str(key), "ttl", "64")
        b.ip("link", "set", name, "up")
        b.sysctl(f"net.ipv4.conf.{name}.accept_local", 1)
        b.sysctl(f"net.ipv4.conf.{name}.rp_filter", 0)
    b.sysctl("net.ipv4.ip_forward", 1)
    b.sysctl("net.ipv4.conf.all.rp_filter", 0)
    return a, b


def test_probes_and_answers_follow_the_links_device_fwmark_and_vrf(lab: Lab) -> None:
    a_host, b = three_uplinks(lab)
    for name, (_, _, pin) in TUNNELS.items():
        assert pin.replace("fwmark 7", "fwmark 0x7") in a_host.link_details(name), a_host.link_details(name)
    a = GreupdProcess(a_host, config()).start()

    def replies() -> dict[str, int]:
        return {name: a.tunnel(name)["keepalive"]["received"] for name in TUNNELS}

    eventually(lambda: min(replies().values()) >= 3 * RETRIES, timeout=15,
               what="replies from B on every tunnel", detail=lambda: f"{replies()}\n{a.output()}")
    assert re.findall(r"tunnel (\w+) down", a.output()) == [], a.output()  # dac2a7b: all three false down
    assert all(a.tunnel(name)["state"] == "up" for name in TUNNELS)
    for name in TUNNELS:  # the adopted links kept what pins them to their uplinks
        assert TUNNELS[name][2].replace("fwmark 7", "fwmark 0x7") in a_host.link_details(name)
    status = a.status()
    assert status is not None
    assert status["keepalive_socket"] == {"filter": "tokens", "remotes": 1, "drops": 0}  # (#21 M6)

    # A's answers to B's own (Cisco-style) probes leave the same way.
    for name, (local, key, _) in TUNNELS.items():
        answered = send_keepalives(b, B_ADDRESS, local, key, key, 5)
        assert answered == 5, f"{name}: {answered} of 5 answered\n{a.output()}"
