"""`greupd doctor`'s fixes, applied as printed, make a real GRE tunnel work (#24's acceptance), in the UML guest.

tests/test_doctor_kernel.py makes these faults on this machine's kernel, which has no GRE, so it can show only
that the finding goes. Here greupd runs a real ip_gre tunnel: the fault stops traffic through it, doctor names
exactly that check with its evidence, the fix's config line goes into the TOML and `greupd reload` applies it,
and then traffic crosses the tunnel and doctor finds nothing.

The daemons and every doctor run are children forked from this process (lab/forked.py): in UML a new interpreter
costs ~1 CPU s of imports, so they are paid once here.
"""

from __future__ import annotations

import re

import pytest

from lab.forked import ForkedGreupd
from lab.hosts import Host, Lab, seed_topology
from lab.waiting import wait_until
from tests.test_doctor_gre_kernel import seed_config
from tests.test_doctor_nft_gre_kernel import doctor, preload

pytestmark = pytest.mark.needs_gre


def test_ip_forward_off_stops_lan_to_lan_until_its_config_line_is_reloaded() -> None:
    """The seed's routers, A with `[daemon] ip_forward = false` and forwarding off: the tunnel is up (keepalives
    are answered by the daemons), but A routes nothing between its LAN and it. Doctor names ip-forward-off; its
    config line, reloaded, has greupd switch forwarding on, and LAN A reaches LAN B."""
    preload()
    with Lab() as lab:
        seed = seed_topology(lab)
        seed.a.sysctl("net.ipv4.ip_forward", 0)
        text = seed_config("172.19.1.1", "172.19.1.2", "192.168.8.1", "192.168.8.11", "20.10.1.0/24")
        a = ForkedGreupd(seed.a, text.replace("ip_forward = true", "ip_forward = false")).start()
        b = ForkedGreupd(seed.b, seed_config("172.19.1.2", "172.19.1.1", "192.168.8.11", "192.168.8.1",
                                             "10.10.1.0/24")).start()
        try:
            a.wait_for("My_Tunnel", "up", timeout=60)
            b.wait_for("My_Tunnel", "up", timeout=60)
            assert seed.a.wait_ping("192.168.8.11")  # the tunnel itself works
            assert not seed.lan_a.ping("20.10.1.2")
            code, findings = doctor(a)
            assert code == 1 and [f["check"] for f in findings] == ["ip-forward-off"], findings
            (finding,) = findings
            assert finding["evidence"] == ("net.ipv4.ip_forward = 0; [daemon] ip_forward = false; "
                                           "a daemon is running")
            line = finding["fix"].splitlines()[0]
            assert line == "in [daemon]: ip_forward = true   # greupd then switches it on"
            setting = line.split(": ", 1)[1].split("#")[0].strip()
            done = a.reload(a.config_path.read_text().replace("ip_forward = false", setting))
            assert done.returncode == 0, done.stdout + done.stderr
            assert wait_until(lambda: seed.a.sysctl_get("net.ipv4.ip_forward") == "1", 10)
            assert seed.lan_a.wait_ping("20.10.1.2")
            assert doctor(a) == (0, [])
        finally:
            a.stop()
            b.stop()


def df_ping(host: Host, address: str, mtu: int) -> bool:
    """One ping whose packets are exactly `mtu` bytes, DF set: it crosses only if the whole path carries them."""
    return host.run("ping", "-n", "-c", "1", "-W", "1", "-M", "do", "-s", str(mtu - 28), address,
                    check=False).returncode == 0


T1 = """[daemon]
ip_forward = true

[[tunnel]]
name = "T1"
mode = "gre"
local = "10.9.0.1"
remote = "10.9.0.2"
address = "192.168.9.1"
peer = "192.168.9.2"

[tunnel.keepalive]
interval = "1s"
"""


def test_mtu_blackhole_goes_with_the_printed_mtu_and_a_df_ping_of_that_size_crosses() -> None:
    """a's underlay is 1500 bytes, b's end of it 1400: a frame larger than that vanishes at b's interface (a
    narrower L2 segment sends no ICMP), so a's tunnel (MTU 1476) carries nothing larger. Doctor names
    mtu-blackhole from padded keepalives; its `mtu = N` line, reloaded, makes a DF ping of N bytes cross.
    ([tunnel.mss] clamp = "pmtu", the fix's second line, needs nftables inet, which UML lacks: the ping is not TCP.)"""
    preload()
    with Lab() as lab:
        a, b = lab.host("a"), lab.host("b")
        lab.link(a, b, "10.9.0.1/24", "10.9.0.2/24", then2=["link set eth0 mtu 1400"])
        # b: the peer's tunnel, set up to reflect keepalives (kernel-lab.md: forwarding, accept_local, rp_filter 0)
        b.ip_batch("link add T1 type gre local 10.9.0.2 remote 10.9.0.1", "addr add 192.168.9.2 peer 192.168.9.1 "
                   "dev T1", "link set T1 up")
        for key, value in (("net.ipv4.ip_forward", 1), ("net.ipv4.conf.T1.accept_local", 1),
                           ("net.ipv4.conf.T1.rp_filter", 0), ("net.ipv4.conf.all.rp_filter", 0)):
            b.sysctl(key, value)
        daemon = ForkedGreupd(a, T1).start()
        try:
            daemon.wait_for("T1", "up", timeout=60)
            assert wait_until(lambda: df_ping(a, "192.168.9.2", 1300), 20)  # small packets cross
            assert not df_ping(a, "192.168.9.2", 1476)  # the tunnel's own MTU does not
            code, findings = doctor(daemon)
            assert code == 1 and [f["check"] for f in findings] == ["mtu-blackhole"], findings
            (finding,) = findings
            largest = int(re.search(r"(\d+) bytes came back", finding["evidence"])[1])  # type: ignore[index]
            assert 576 < largest < 1420 and "no learned mtu" in finding["evidence"]  # veth: frames to MTU + 18
            assert finding["message"] == (f"the path to 10.9.0.2 carries packets of at most {largest} bytes, the "
                                          f"tunnel needs 1500, and no ICMP error says so: larger packets vanish")
            line = finding["fix"].splitlines()[0]
            assert line == f'in [[tunnel]] name = "T1": mtu = {largest - 24}'
            setting = line.split(": ", 1)[1]
            done = daemon.reload(T1.replace('peer = "192.168.9.2"\n', f'peer = "192.168.9.2"\n{setting}\n'))
            assert done.returncode == 0, done.stdout + done.stderr
            assert wait_until(lambda: f"mtu {largest - 24} " in a.ip("link", "show", "T1").stdout, 20)
            assert wait_until(lambda: df_ping(a, "192.168.9.2", largest - 24), 20)
            assert doctor(daemon) == (0, [])
        finally:
            daemon.stop()
