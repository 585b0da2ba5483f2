"""`make demo`: the seed how-to's two routers, done by greupd, in one kernel with ip_gre and nftables inet.

Runs inside the qemu lab guest (see the Makefile and lab/README.md): routers A and B on an underlay, a LAN
behind each, greupd on both from two TOML files. The story, step by step as the seed tells it: ip_forward,
the tunnel, the routes, NAT both ways (the source address each side sees), a SYN's MSS 1460 arriving as 1436
on B's LAN; then a tunnel deleted by hand and put back, B dying and A withdrawing the route, B back; last an MTU
black hole that hangs a hand-made tunnel's transfer, measured by greupd (mtu = "probe": demo/black_hole.py).

Both daemons and every `greupd` command run as children forked from this process (lab/forked.py): the guest
emulates its CPU, and a new interpreter would pay greupd's imports again for each of them.
"""

from __future__ import annotations

import sys
import textwrap

import scapy.layers.inet
import scapy.layers.l2

import greupd.cli
import greupd.control
import greupd.daemon
import greupd.keepalive.codec
from demo import black_hole
from demo.telling import check, greupd_says, note, say, seconds_since_python_started, show, wait
from lab.forked import ForkedGreupd
from lab.hosts import Lab, seed_topology
from lab.traffic import handshake

# Everything the forked daemons and commands import (the keepalive codec's scapy layers lazily), imported once, here.
PRELOADED = (greupd.cli, greupd.control, greupd.daemon, greupd.keepalive.codec, scapy.layers.inet, scapy.layers.l2)

KEEPALIVE = """
[tunnel.keepalive]                   # fast, for the demo: B counts as dead after 3 x 200 ms unanswered
interval = "200ms"
retries = 3
"""
A_TOML = f"""\
[daemon]
ip_forward = true                    # seed step 1

[[tunnel]]
name = "My_Tunnel"
local = "172.19.1.1"
remote = "172.19.1.2"
address = "192.168.8.1"
peer = "192.168.8.11"
routes = ["20.10.1.0/24"]            # B's LAN
{KEEPALIVE}
[tunnel.mss]
clamp = 1436                         # the seed's `ip tcp adjust-mss 1436`

[tunnel.nat]                         # seed step 3
into_tunnel = ["10.10.1.0/24"]       # our LAN leaves through the tunnel as 192.168.8.1
from_tunnel = ["eth1"]               # B's side reaches our LAN as 10.10.1.1
"""
B_TOML = f"""\
[daemon]
ip_forward = true

[[tunnel]]
name = "My_Tunnel"
local = "172.19.1.2"
remote = "172.19.1.1"
address = "192.168.8.11"
peer = "192.168.8.1"
routes = ["10.10.1.0/24"]            # A's LAN
{KEEPALIVE}"""

def main() -> int:
    took = seconds_since_python_started()
    print(f"demo: Python started and imported greupd, pyroute2, scapy, pydantic in {took:.1f} s", flush=True)
    with Lab("demo") as lab:
        seed = seed_topology(lab)
        for router in (seed.a, seed.b):  # fresh routers: forwarding is greupd's to turn on (seed step 1)
            router.sysctl("net.ipv4.ip_forward", 0)
        say("The seed's network: A 172.19.1.1 and B 172.19.1.2; LAN 10.10.1.0/24 behind A, 20.10.1.0/24 behind B")
        show(seed.a, "sysctl net.ipv4.ip_forward; ip -br addr show | grep -v '^lo\\|@NONE'")
        show(seed.lan_a, "ping -c 1 -W 1 20.10.1.2 | tail -2")

        say("A's /etc/greupd/tunnels.toml (B's is the mirror image, without NAT and clamp)")
        print(textwrap.indent(A_TOML, "    "))
        a = ForkedGreupd(seed.a, A_TOML)
        b = ForkedGreupd(seed.b, B_TOML)
        say("greupd check, then greupd plan on A: what it would change, changing nothing")
        greupd_says(a, "check")
        greupd_says(a, "plan")

        say("greupd run on A and B: forwarding, the tunnel, its address, the route, A's nftables table")
        # Both at once, as two machines would boot: A's keepalives then find B answering from the start.
        a.start(wait=False)
        b.start(wait=False)
        a.wait_ready()
        b.wait_ready()
        greupd_says(a, "status")
        show(seed.a, "sysctl net.ipv4.ip_forward")
        show(seed.a, "ip -d link show My_Tunnel | sed -n '1,3p'; ip addr show My_Tunnel | grep inet; "
                     "ip route show proto 222")
        show(seed.a, "nft list table inet greupd")

        say("A LAN host pings the far LAN through the tunnel")
        wait("a ping through the tunnel", lambda: seed.lan_a.ping("20.10.1.2"))
        show(seed.lan_a, "ping -c 3 -i 0.2 20.10.1.2 | tail -2")

        say("NAT into the tunnel, and the MSS clamp: lan_a (10.10.1.2) opens a TCP connection to lan_b")
        out = handshake(seed.lan_a, seed.lan_b, "20.10.1.2", 5001)
        note(f"SYN leaving lan_a's eth0:    source {out.syn_sent_source}, MSS {out.syn_sent_mss}\n"
             f"SYN arriving at lan_b's eth0: source {out.syn_source}, MSS {out.syn_mss}\n"
             f"lan_b's accept() saw:        {out.server_saw_peer}\n"
             f"SYN-ACK arriving at lan_a:   MSS {out.synack_mss}")
        check("lan_b sees A's tunnel address 192.168.8.1, not 10.10.1.2",
              (out.syn_source, out.server_saw_peer) == ("192.168.8.1", "192.168.8.1"))
        check("the SYN left with MSS 1460 and arrived with 1436", (out.syn_sent_mss, out.syn_mss) == (1460, 1436))

        say("NAT out of the tunnel: B (192.168.8.11) opens a TCP connection to lan_a (10.10.1.2)")
        back = handshake(seed.b, seed.lan_a, "10.10.1.2", 5002, client_addr="192.168.8.11", watch_client=False)
        note(f"SYN arriving at lan_a's eth0: source {back.syn_source}\nlan_a's accept() saw:         "
             f"{back.server_saw_peer}")
        check("lan_a sees A's LAN address 10.10.1.1, not 192.168.8.11",
              (back.syn_source, back.server_saw_peer) == ("10.10.1.1", "10.10.1.1"))

        say("Drift: someone deletes the tunnel by hand; greupd puts it back (link, address, route)")
        show(seed.a, "ip link del My_Tunnel")
        took = wait("the route back", lambda: "20.10.1.0/24" in seed.a.ip("route", "show", "proto", "222").stdout)
        note(f"restored within {took * 1000:.0f} ms")
        show(seed.a, "ip addr show My_Tunnel | grep inet; ip route show proto 222")
        wait("a ping through the tunnel", lambda: seed.lan_a.ping("20.10.1.2"))
        show(seed.lan_a, "ping -c 2 -i 0.2 20.10.1.2 | tail -2")

        say("B dies (its daemon killed, its tunnel down): A's keepalives go unanswered, A withdraws the route")
        b.kill()
        show(seed.b, "ip link set My_Tunnel down")
        a.wait_for("My_Tunnel", "down")
        show(seed.a, "ip route show proto 222; echo '(no greupd route)'")
        greupd_says(a, "status")

        say("B comes back: its keepalive replies return, A restores the route")
        b2 = ForkedGreupd(seed.b, B_TOML).start()
        a.wait_for("My_Tunnel", "up")
        show(seed.a, "ip route show proto 222")
        wait("a ping through the tunnel", lambda: seed.lan_a.ping("20.10.1.2"))
        show(seed.lan_a, "ping -c 2 -i 0.2 20.10.1.2 | tail -2")

        say("A's event log (under systemd this is `journalctl -u greupd GREUPD_TUNNEL=My_Tunnel`)")
        print(textwrap.indent(a.output().rstrip(), "    "))
        a.stop()
        b2.stop()
        black_hole.tell(lab)
    say("Done: ip_forward, tunnel, routes, NAT both ways, MSS 1460 -> 1436, drift repaired, failover and back;"
        " a black hole measured (1376) and the transfer it hung completes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
