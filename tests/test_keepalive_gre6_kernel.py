"""Keepalives on ip6gre in MikroTik's GRE6 format, on a real kernel (ip6_gre; the UML guest here).

Two routers joined by a veth: A fd00:1::1, B fd00:1::2.

One story, greupd on A with an ip6gre tunnel (format "mikrotik", the mode's default):

- (i) against a plain Linux peer B: B's kernel decapsulates the probe and routes the inner packet back
  (net.ipv6.conf.all.forwarding = 1, nothing else). The tunnel is up with its route; B's tunnel down -> A's
  route goes; B's tunnel back -> it returns.
- (ii) against a MikroTik made with scapy on B (this test process, its sockets in B's netns; B's kernel no
  longer forwards): the "MikroTik" sends RouterOS's GRE6 probes and counts the reflections greupd sends back,
  and reflects A's probes the way RouterOS routes them; when it stops reflecting, A's route goes, and returns.
"""

from __future__ import annotations

import select
import socket
import threading
import time

import pytest
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import GRE

from lab.greupd_process import GreupdProcess
from lab.hosts import Host, Lab, in_netns
from lab.waiting import eventually

A, B = "fd00:1::1", "fd00:1::2"
pytestmark = pytest.mark.needs_gre


def joined(lab: Lab, b_forwards: bool) -> tuple[Host, Host]:
    """A and B on a veth, and B's hand-made ip6gre tunnel to A (B forwards IPv6 only if `b_forwards`)."""
    a, b = lab.bare_hosts("a", "b")
    a.ip_batch("link set lo up", f"link add eth0 type veth peer name eth0 netns {b.netns}",
               f"addr add {A}/64 dev eth0 nodad", "link set eth0 up")
    b.ip_batch("link set lo up", f"addr add {B}/64 dev eth0 nodad", "link set eth0 up",
               f"link add Tunnel6 type ip6gre local {B} remote {A}",
               "addr add 10.6.0.2/30 dev Tunnel6", "link set Tunnel6 up")
    b.sysctl("net.ipv6.conf.all.forwarding", 1 if b_forwards else 0)
    return a, b


A_CONFIG = f"""
[[tunnel]]
name = "Tunnel6"
mode = "ip6gre"
local = "{A}"
remote = "{B}"
address = "10.6.0.1/30"
routes = ["10.99.0.0/24"]
table = 100
keepalive = {{interval = 0.1, retries = 3}}
"""


def routes_of(host: Host) -> str:
    return host.ip("route", "show", "table", "100").stdout


class ScapyMikrotik:
    """A RouterOS peer as far as GRE6 keepalives go, on B: every `interval` a probe to A in RouterOS's layout
    (no key, inner GRE protocol 0x86DD, no payload); A's probes reflected as RouterOS routes them (the inner
    IPv6 packet sent on as it is) while `reflecting`. Counts what came back of its own probes."""

    def __init__(self, host: Host, interval: float = 0.1) -> None:
        with in_netns(host):
            self.gre = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_GRE)
            self.raw = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
        self.interval = interval
        self.reflecting = True
        self.probes_sent = self.answers = self.reflected = 0
        self.others: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        # built once, by scapy: the GRE part; B's kernel adds the outer IPv6 header B -> A
        self._probe = bytes(GRE(proto=0x86DD) / IPv6(src=A, dst=B, nh=47, hlim=255) / GRE(proto=0x86DD))

    def __enter__(self) -> ScapyMikrotik:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.gre.close()
        self.raw.close()

    def _run(self) -> None:
        next_probe = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_probe:
                self.gre.sendto(self._probe, (A, 0))
                self.probes_sent += 1
                next_probe = now + self.interval
            ready, _, _ = select.select([self.gre], [], [], max(0.0, next_probe - time.monotonic()))
            if ready:
                data, (source, *_) = self.gre.recvfrom(65535)
                if source == A:
                    self._handle(data)

    def _handle(self, data: bytes) -> None:
        gre = GRE(data)
        inner = gre.payload
        if gre.proto != 0x86DD:
            self.others.append(data)
        elif isinstance(inner, IPv6) and inner.nh == 47 and GRE in inner and inner[GRE].proto == 0x86DD:
            if self.reflecting:  # A's probe: route its inner packet on, to its destination (A)
                self.raw.sendto(bytes(inner), (inner.dst, 0))
                self.reflected += 1
        elif not isinstance(inner, IPv6):
            self.answers += 1  # our probe's inner part, sent back by A's engine
        else:
            self.others.append(data)


def test_greupd_on_ip6gre_against_a_plain_kernel_then_a_mikrotik_takes_the_routes_down_and_back() -> None:
    with Lab() as lab:
        a, b = joined(lab, b_forwards=True)
        greupd = GreupdProcess(a, A_CONFIG).start()
        greupd.wait_for("Tunnel6", "up")
        eventually(lambda: greupd.tunnel("Tunnel6")["keepalive"]["received"] >= 5, what="replies from B's kernel",
                   detail=greupd.output)
        assert "10.99.0.0/24" in routes_of(a)

        # (i) the plain kernel peer dies and comes back
        b.ip("link", "set", "Tunnel6", "down")  # B's kernel no longer decapsulates
        greupd.wait_for("Tunnel6", "down", timeout=10)
        eventually(lambda: "10.99.0.0/24" not in routes_of(a), what="the route withdrawn")
        b.ip("link", "set", "Tunnel6", "up")
        greupd.wait_for("Tunnel6", "up", timeout=10)
        eventually(lambda: "10.99.0.0/24" in routes_of(a), what="the route back")

        # (ii) B becomes a MikroTik: the scapy one reflects A's probes and probes A; B's kernel no longer forwards
        with ScapyMikrotik(b) as mikrotik:
            b.sysctl("net.ipv6.conf.all.forwarding", 0)
            received = greupd.tunnel("Tunnel6")["keepalive"]["received"]
            eventually(lambda: mikrotik.reflected >= 5 and mikrotik.answers >= 5
                       and greupd.tunnel("Tunnel6")["keepalive"]["received"] >= received + 5,
                       what="A's probes reflected by the MikroTik, and its probes answered by greupd")
            assert greupd.tunnel("Tunnel6")["state"] == "up" and not mikrotik.others

            mikrotik.reflecting = False
            greupd.wait_for("Tunnel6", "down", timeout=10)
            eventually(lambda: "10.99.0.0/24" not in routes_of(a), what="the route withdrawn")
            answers = mikrotik.answers
            eventually(lambda: mikrotik.answers >= answers + 3, what="greupd still answers the MikroTik")

            mikrotik.reflecting = True
            greupd.wait_for("Tunnel6", "up", timeout=10)
            eventually(lambda: "10.99.0.0/24" in routes_of(a), what="the route back")
