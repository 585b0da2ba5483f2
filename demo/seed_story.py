"""`make demo`: the seed how-to's two routers, done by greupd, in a kernel that has ip_gre.

Runs inside the lab guest (see the Makefile): routers A and B on an underlay, a LAN behind each, greupd on
both from two TOML files; a LAN-to-LAN ping through the tunnel; a tunnel deleted by hand and put back; B
dying and A's keepalives withdrawing the route; B back and the route restored.
"""

from __future__ import annotations

import sys
import textwrap
import time

from lab.greupd_process import GreupdProcess
from lab.hosts import Host, Lab, seed_topology

KEEPALIVE = """
[tunnel.keepalive]
interval = "200ms"
retries = 3
"""
A_TOML = f"""\
[[tunnel]]
name = "My_Tunnel"
local = "172.19.1.1"
remote = "172.19.1.2"
key = 42
address = "192.168.8.1"
peer = "192.168.8.11"
routes = ["20.10.1.0/24"]
{KEEPALIVE}"""
B_TOML = f"""\
[[tunnel]]
name = "My_Tunnel"
local = "172.19.1.2"
remote = "172.19.1.1"
key = 42
address = "192.168.8.11"
peer = "192.168.8.1"
routes = ["10.10.1.0/24"]
{KEEPALIVE}"""


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def show(host: Host, cmdline: str) -> str:
    out = host.sh(cmdline, check=False)
    text = (out.stdout + out.stderr).rstrip()
    print(f"[{host.name}]# {cmdline}\n{textwrap.indent(text, '    ') if text else ''}".rstrip(), flush=True)
    return text


def wait(condition: object, timeout: float = 15.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if callable(condition) and condition():
            return time.monotonic() - start
        time.sleep(0.02)
    raise SystemExit(f"demo: gave up after {timeout}s")


def main() -> int:
    with Lab("demo") as lab:
        seed = seed_topology(lab)
        say("The seed's network: A 172.19.1.1 and B 172.19.1.2; LAN 10.10.1.0/24 behind A, 20.10.1.0/24 behind B")
        show(seed.lan_a, "ping -c 1 -W 1 20.10.1.2 | tail -2")
        say("A's /etc/greupd/tunnels.toml (B's is the mirror image)")
        print(textwrap.indent(A_TOML, "    "))
        a = GreupdProcess(seed.a, A_TOML)
        b = GreupdProcess(seed.b, B_TOML)
        say("greupd check, then greupd plan on A: what it would change, changing nothing")
        print(textwrap.indent(a.cli("check").stdout.rstrip(), "    "))
        print(textwrap.indent(a.cli("plan").stdout.rstrip(), "    "))
        say("greupd run on A and B")
        a.start()
        b.start()
        print(textwrap.indent(a.cli("status").stdout.rstrip(), "    "))
        show(seed.a, "ip -d link show My_Tunnel | sed -n '1,3p;$p'; ip addr show My_Tunnel | grep inet; "
                     "ip route show proto 222")
        say("A LAN host pings the far LAN through the tunnel")
        wait(lambda: seed.lan_a.ping("20.10.1.2"))
        show(seed.lan_a, "ping -c 3 -i 0.2 20.10.1.2 | tail -2")

        say("Someone deletes the tunnel by hand: greupd puts it back (link, address, route)")
        show(seed.a, "ip link del My_Tunnel")
        took = wait(lambda: "20.10.1.0/24" in seed.a.ip("route", "show", "proto", "222").stdout)
        print(f"    restored within {took * 1000:.0f} ms of polling")
        show(seed.a, "ip addr show My_Tunnel | grep inet; ip route show proto 222")
        show(seed.lan_a, "ping -c 2 -i 0.2 20.10.1.2 | tail -2")

        say("B dies (its tunnel stops): A's keepalives go unanswered, A withdraws the route")
        b.kill()
        show(seed.b, "ip link set My_Tunnel down")
        a.wait_for("My_Tunnel", "down")
        show(seed.a, "ip route show proto 222; echo '(no greupd route)'")
        print(textwrap.indent(a.cli("status").stdout.rstrip(), "    "))

        say("B comes back: replies return, A restores the route")
        b2 = GreupdProcess(seed.b, B_TOML).start()
        a.wait_for("My_Tunnel", "up")
        show(seed.a, "ip route show proto 222")
        wait(lambda: seed.lan_a.ping("20.10.1.2"))
        show(seed.lan_a, "ping -c 2 -i 0.2 20.10.1.2 | tail -2")

        say("A's event log (under systemd this is `journalctl -u greupd GREUPD_TUNNEL=My_Tunnel`)")
        print(textwrap.indent(a.output().rstrip(), "    "))
        a.stop()
        b2.stop()
    say("Done. Tests: make test; the contract: README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
