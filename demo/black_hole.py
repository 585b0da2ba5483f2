"""`make demo`, last part: an MTU black hole, and greupd measuring the tunnel's path through it (issue #23).

    lan_a2 -- A2 10.0.1.1 --1500-- M --1400-- 10.0.2.2 B2 -- lan_b2

M's link towards B2 carries 1400 bytes, and M's ICMP "fragmentation needed" never reaches A2 (dropped on its
way out, as providers filter it). A hand-made GRE tunnel takes the kernel's 1476: its full-size packets are
1500 bytes on the wire and vanish at M, so a TCP transfer from LAN to LAN through it hangs while pings pass. greupd with
mtu = "probe" sends keepalives padded to the size under test, which B2's plain kernel reflects, finds 1376
(1400 less GRE's 24 bytes), sets it on the link, and the same transfer completes.

Run on its own (a kernel with ip_gre is enough: the UML guest will do):
    .venv/bin/python -m lab run --guest uml -- .venv/bin/python -m demo.black_hole
"""

from __future__ import annotations

import socket
import struct
import sys
import time
from collections.abc import Callable

from demo.telling import check, note, say, show, wait
from lab.forked import ForkedGreupd, spawn
from lab.hosts import Host, Lab

A, B = "10.0.1.1", "10.0.2.2"
A_INNER, B_INNER = "192.168.9.1", "192.168.9.2"
LAN_A, LAN_B = "10.10.9.2", "20.10.9.2"
SIZE = 1 << 20  # 1 MB
HANG = 5.0  # s: a transfer that takes well under a second here and has not ended after this never will
PROBE_TOML = f"""\
[[tunnel]]
name = "My_Tunnel"
local = "{A}"
remote = "{B}"
address = "{A_INNER}"
peer = "{B_INNER}"
routes = ["20.10.9.0/24"]            # lan_b2
mtu = "probe"                        # measured end to end, not guessed

[tunnel.keepalive]                   # B2 is a plain Linux box: its kernel reflects the (padded) keepalives
interval = "200ms"
retries = 3

[tunnel.mtu_probe]
timeout = "300ms"                    # a probe not back by then is lost (the lab's round trip: < 1 ms)
"""


def transfer(client: Host, server: Host, port: int, within: float) -> float | None:
    """1 MB of TCP from `client` to `server` (lan_b2): the seconds it took, or None if not done `within`."""

    def serve(ready: Callable[[], None]) -> dict[str, object]:
        listener = socket.create_server(("0.0.0.0", port))
        listener.settimeout(within + 5)
        ready()
        total = 0
        try:
            conn, _ = listener.accept()
            conn.settimeout(within + 5)
            while chunk := conn.recv(65536):
                total += len(chunk)
        except OSError:
            pass
        return {"bytes": total}

    def send(ready: Callable[[], None]) -> dict[str, object]:
        ready()
        began = time.monotonic()
        with socket.create_connection((LAN_B, port), timeout=within) as conn:
            try:
                conn.sendall(bytes(SIZE))
                conn.shutdown(socket.SHUT_WR)
                conn.recv(1)
            except OSError:
                # hung: reset the connection (a small packet, it gets through) so lan_b2 stops waiting at once
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return {"seconds": None}
        return {"seconds": time.monotonic() - began}

    server_side = spawn(server, serve, within + 10)
    server_side.wait_ready()
    client_side = spawn(client, send, within + 10)
    client_side.wait_ready()
    seconds = client_side.result()["seconds"]
    received = server_side.result()["bytes"]
    return seconds if isinstance(seconds, float) and received == SIZE else None


def link_mtu(host: Host) -> int:
    return int(host.ip("-o", "link", "show", "My_Tunnel").stdout.split(" mtu ")[1].split()[0])


def tell(lab: Lab) -> None:
    say("A black hole: A2 and B2 through a router M whose link towards B2 carries 1400 bytes, and whose ICMP "
        "\"fragmentation needed\" never reaches A2 (filtered, as many providers do)")
    a, m, b, lan_a, lan_b = lab.bare_hosts("a2", "m", "b2", "lan_a2", "lan_b2")
    # One `ip -batch` per host, each veth's peer made straight in the next host (lab.hosts.seed_topology's way:
    # in the emulated guest every process costs 0.3-1 s). The tunnels are made on a 1500 path (both at 1476).
    for router, wan, gateway, far_wan, lan, prefix, local, remote, inner, peer, far in (
            (a, "eth0", "10.0.1.254", "10.0.2.0/24", lan_a, "10.10.9", A, B, A_INNER, B_INNER, "20.10.9.0/24"),
            (b, "eth1", "10.0.2.254", "10.0.1.0/24", lan_b, "20.10.9", B, A, B_INNER, A_INNER, "10.10.9.0/24")):
        router.ip_batch(
            "link set lo up", f"link add eth0 type veth peer name {wan} netns {m.netns}",
            f"addr add {local}/24 dev eth0", "link set eth0 up", f"route add {far_wan} via {gateway}",
            f"link add eth9 type veth peer name eth0 netns {lan.netns}", f"addr add {prefix}.1/24 dev eth9",
            "link set eth9 up", f"tunnel add My_Tunnel mode gre local {local} remote {remote} ttl 64",
            f"addr add {inner} peer {peer} dev My_Tunnel", "link set My_Tunnel up", f"route add {far} dev My_Tunnel")
        lan.ip_batch("link set lo up", f"addr add {prefix}.2/24 dev eth0", "link set eth0 up",
                     f"route add default via {prefix}.1")
    # Then the M-B2 segment shrinks to 1400, and M's ICMP "fragmentation needed" is dropped on its way out to A2.
    m.sh("ip link set lo up && ip addr add 10.0.1.254/24 dev eth0 && ip link set eth0 up"
         " && ip addr add 10.0.2.254/24 dev eth1 && ip link set eth1 mtu 1400 up"
         " && sysctl -qw net.ipv4.ip_forward=1 && tc qdisc add dev eth0 clsact"
         " && tc filter add dev eth0 egress protocol ip prio 1 u32 match ip protocol 1 0xff"
         " match u8 3 0xff at 20 match u8 4 0xff at 21 action drop")
    # How a plain Linux peer answers Cisco keepalives: it routes the decapsulated reply back (tests/test_pmtu*).
    a.sysctl("net.ipv4.ip_forward", 1)
    b.sh("ip link set eth0 mtu 1400 && sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.My_Tunnel.accept_local=1"
         " net.ipv4.conf.My_Tunnel.rp_filter=0 net.ipv4.conf.all.rp_filter=0")

    say("A hand-made tunnel A2 -> B2 (ip tunnel add ... mode gre): the kernel gives it 1476")
    show(a, "ip -o link show My_Tunnel | cut -d' ' -f2-5")
    small = show(a, f"ping -c 1 -W 1 {B_INNER} | tail -2")
    large = show(a, f"ping -c 1 -W 1 -M do -s 1448 {B_INNER} | tail -2")
    check("small packets pass, 1476-byte ones vanish and nothing says why", " 1 received" in small
          and " 0 received" in large and "mtu" not in a.sh(f"ip route get {B}").stdout)
    took = transfer(lan_a, lan_b, 5011, HANG)
    note(f"1 MB of TCP from lan_a2 to lan_b2 through the tunnel: {'hung' if took is None else f'{took:.1f} s'}")
    check(f"the transfer hangs (not done after {HANG:.0f} s)", took is None)

    say("greupd on A2 instead, with mtu = \"probe\" (B2 stays a plain Linux box, its tunnel hand-made)")
    print("\n".join("    " + line for line in PROBE_TOML.splitlines()), flush=True)
    a.ip("link", "del", "My_Tunnel")
    greupd = ForkedGreupd(a, PROBE_TOML).start()
    try:
        took = wait("a measured MTU", lambda: (greupd.tunnel("My_Tunnel").get("path_mtu") or {}).get("state")
                    == "measured", timeout=60)
        wait("the link's MTU set", lambda: link_mtu(a) != 1476, timeout=20)
        note(f"measured {took:.1f} s after greupd was ready")
        metrics = greupd.cli("metrics").stdout
        print("[a2]# greupd metrics | grep path_mtu\n" + "\n".join(
            "    " + line for line in metrics.splitlines() if "path_mtu" in line and not line.startswith("#")))
        show(a, "ip -o link show My_Tunnel | cut -d' ' -f2-5")
        check("greupd measured 1376 (1400 less GRE's 24 bytes) and set it on the link",
              greupd.tunnel("My_Tunnel")["path_mtu"]["bytes"] == 1376 and link_mtu(a) == 1376)
        took = transfer(lan_a, lan_b, 5012, 30.0)
        note(f"the same 1 MB: {'hung' if took is None else f'{took:.1f} s'}")
        check("the transfer completes", took is not None)
        note("\n".join(line for line in greupd.output().splitlines() if "path MTU" in line))
    finally:
        greupd.stop()


def main() -> int:
    with Lab("blackhole") as lab:
        tell(lab)
    say("Done: a black hole that hung a transfer, measured (1376) and set by greupd; the transfer completes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
