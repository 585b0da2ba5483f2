"""`greupd doctor`'s checks that need a kernel with GRE links (#24): made in the UML guest when this one has none.

tunnel-clash: a hand-made link with T1's local, remote and key already exists; doctor names it, the fix
(`ip link del`) makes it go, and greupd can then make T1 and its keepalives get answered through it.
local-address-missing in the daemon (#24 item 4): status and log warn of it until its fix brings the tunnel up.
ipsec-no-sa: SAs made by hand and flushed; then with real charons, flushed under them, and the printed swanctl fix.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lab import charon as charon_lab
from lab.greupd_process import GreupdProcess
from lab.hosts import Lab
from lab.waiting import wait_until
from tests.test_doctor_kernel import CONFIG

pytestmark = pytest.mark.needs_gre


def test_tunnel_clash_with_a_foreign_link_of_the_same_endpoints_and_key(tmp_path: Path) -> None:
    with Lab() as lab:
        a, b = lab.host("a"), lab.host("b")
        lab.link(a, b, "10.9.0.1/24", "10.9.0.2/24")
        a.ip("link", "add", "old", "type", "gre", "local", "10.9.0.1", "remote", "10.9.0.2", "key", "7")
        # b: the peer's tunnel, set up to reflect keepalives (kernel-lab.md: forwarding, accept_local, rp_filter 0)
        b.ip_batch("link add T1 type gre local 10.9.0.2 remote 10.9.0.1 key 7", "link set T1 up")
        for key, value in (("net.ipv4.ip_forward", 1), ("net.ipv4.conf.T1.accept_local", 1),
                           ("net.ipv4.conf.T1.rp_filter", 0), ("net.ipv4.conf.all.rp_filter", 0)):
            b.sysctl(key, value)
        text = CONFIG.format(local="10.9.0.1", remote="10.9.0.2", extra="key = 7\n", forward="true").replace(
            'interval = "10s"', 'interval = "1s"')
        config = tmp_path / "tunnels.toml"
        config.write_text(text)

        commands = GreupdProcess(a, text)  # `greupd` as GreupdProcess runs it: forked in the UML guest

        def doctor() -> list[dict[str, str]]:
            done = commands.cli("doctor", "--json", "-c", str(config), "--socket", str(tmp_path / "none.sock"),
                                timeout=300)
            assert done.returncode in (0, 1), done.stderr
            findings: list[dict[str, str]] = json.loads(done.stdout)["findings"]
            return findings

        (finding,) = doctor()
        assert finding["check"] == "tunnel-clash" and finding["tunnel"] == "T1"
        assert finding["evidence"] == ("old: gre local 10.9.0.1 remote 10.9.0.2 key 7 (not greupd's); "
                                       "T1: local 10.9.0.1 remote 10.9.0.2 key 7")
        plan = commands.cli("plan", str(config), timeout=300)
        assert "# warning: T1: link old has the same endpoints and key as this tunnel" in plan.stdout
        a.run(*finding["fix"].splitlines()[0].split("#")[0].split())
        assert doctor() == []
        daemon = GreupdProcess(a, text).start()  # the tunnel works: made, and b's kernel answers its keepalives
        try:
            daemon.wait_for("T1", "up")
        finally:
            daemon.stop()


def test_the_daemon_warns_of_a_local_address_on_no_interface_until_the_fix_adds_it() -> None:
    """#24 item 4 in the daemon: local = 10.9.0.99 is on none of a's interfaces, so b's reflected keepalives never
    come back. `greupd status` and the log name local-address-missing; the fix it prints, applied (the underlay
    interface filled in), brings the tunnel up, and the warning goes."""
    with Lab() as lab:
        a, b = lab.host("a"), lab.host("b")
        lab.link(a, b, "10.9.0.1/24", "10.9.0.2/24")
        b.ip_batch("link add T1 type gre local 10.9.0.2 remote 10.9.0.99", "link set T1 up")
        for key, value in (("net.ipv4.ip_forward", 1), ("net.ipv4.conf.T1.accept_local", 1),
                           ("net.ipv4.conf.T1.rp_filter", 0), ("net.ipv4.conf.all.rp_filter", 0)):
            b.sysctl(key, value)
        daemon = GreupdProcess(a, CONFIG.format(local="10.9.0.99", remote="10.9.0.2", extra="", forward="true")
                               .replace('interval = "10s"', 'interval = "0.2s"'))
        daemon.start(wait=False)
        try:
            def warned() -> list[str]:
                status = daemon.status(check=False)
                return [w for w in (status or {}).get("warnings", []) if "(greupd doctor: " in w]

            assert wait_until(lambda: bool(warned()), 60), daemon.output()
            (line,) = warned()
            assert line.startswith("T1: local = 10.9.0.99 is on no interface of this host")
            assert "(greupd doctor: local-address-missing; fix: ip address add 10.9.0.99/32 dev <the underlay " \
                   "interface>)" in line
            assert f"greupd warning: {line}" in daemon.output()
            daemon.wait_for("T1", "down", timeout=30)  # up at first (a new tunnel starts up), then no answers
            fix = line.split("; fix: ", 1)[1].rstrip(")").replace("<the underlay interface>", "eth0")
            a.run(*fix.split())
            daemon.wait_for("T1", "up", timeout=30)
            assert wait_until(lambda: not warned(), 30)
            assert f"no longer: {line}" in daemon.output()
        finally:
            daemon.stop()


SA = ("xfrm state add src {s} dst {d} proto esp spi {spi} mode transport enc cbc(aes) "
      "0x01020304050607080910111213141516 auth hmac(sha256) "
      "0x0102030405060708091011121314151617181920212223242526272829303132 sel src {s} dst {d} proto gre")
POLICY = "xfrm policy add src {s}/32 dst {d}/32 proto gre dir {dir} tmpl src {s} dst {d} proto esp mode transport"


def test_ipsec_no_sa_once_the_sas_are_flushed(tmp_path: Path) -> None:
    """What charon installs for a [tunnel.ipsec] tunnel (transport-mode ESP SAs and GRE policies, made here with
    `ip xfrm` as charon would), then `ip xfrm state flush`: doctor names ipsec-no-sa. Its fix is
    `swanctl --terminate` and `--initiate`, which have charon install them again; without a peer charon here (the
    next test has them), the test installs
    the same SAs itself."""
    with Lab() as lab:
        a, b = lab.host("a"), lab.host("b")
        lab.link(a, b, "10.9.0.1/24", "10.9.0.2/24")
        psk = tmp_path / "psk"
        psk.write_text("a secret of thirty-two characters\n")
        psk.chmod(0o600)
        config = tmp_path / "tunnels.toml"
        config.write_text(CONFIG.format(local="10.9.0.1", remote="10.9.0.2", forward="true",
                                        extra=f'[tunnel.ipsec]\npsk_file = "{psk}"\n'))
        sas = [SA.format(s="10.9.0.1", d="10.9.0.2", spi="0x100"), SA.format(s="10.9.0.2", d="10.9.0.1", spi="0x200")]
        a.ip_batch(*sas, POLICY.format(s="10.9.0.1", d="10.9.0.2", dir="out"),
                   POLICY.format(s="10.9.0.2", d="10.9.0.1", dir="in"))

        commands = GreupdProcess(a, config.read_text())  # `greupd` as GreupdProcess runs it: forked in the UML guest

        def doctor() -> list[dict[str, str]]:
            done = commands.cli("doctor", "--json", "-c", str(config), "--socket", str(tmp_path / "none.sock"),
                                timeout=300)
            assert done.returncode in (0, 1), done.stderr
            return [f for f in json.loads(done.stdout)["findings"] if f["check"] != "peer-silent"]

        assert doctor() == []
        a.ip("xfrm", "state", "flush")
        (finding,) = doctor()
        assert finding["check"] == "ipsec-no-sa"
        assert finding["message"] == ("no IPsec SA for 10.9.0.1 > 10.9.0.2 and 10.9.0.2 > 10.9.0.1: greupd's table "
                                      "drops its GRE (require = true)")
        assert "out: src 10.9.0.1/32 dst 10.9.0.2/32 proto gre dir out" in finding["evidence"]
        assert "0x0102" not in finding["evidence"]  # never the keys
        assert finding["fix"].startswith("swanctl --terminate --ike greupd-T1 --force --uri unix:///")
        a.ip_batch(*sas)
        assert doctor() == []


@pytest.mark.skipif(charon_lab.available() is not None, reason=charon_lab.available() or "")
def test_ipsec_no_sa_after_a_flush_and_its_swanctl_fix_brings_the_sas_and_the_tunnel_back() -> None:
    """The seed's routers under [tunnel.ipsec] with a real charon each (tests/test_ipsec_kernel.py's setup), the
    tunnel up through ESP. A's greupd stops (on_exit = keep: link, routes and charon's connection stay), and A's
    SAs and policies are flushed under charon's feet (a running greupd would notice and have charon initiate
    again itself). Doctor names ipsec-no-sa; its fix (`swanctl --terminate`, then
    `--initiate`), run as printed, has charon install them again: the finding goes, and A reaches B through the
    tunnel again."""
    from lab.charon import Charon
    from lab.forked import ForkedGreupd
    from lab.hosts import seed_topology
    from tests.test_doctor_nft_gre_kernel import preload
    from tests.test_ipsec_kernel import A_SIDE, B_SIDE, router_config, wait_ipsec

    with Lab() as lab:
        seed = seed_topology(lab)
        charon_a, charon_b = Charon(seed.a).start(), Charon(seed.b).start()
        # require = false: UML has no nftables inet to hold greupd's drops (test_ipsec_kernel.py's docstring)
        a = GreupdProcess(seed.a, router_config(seed.a, *A_SIDE, vici=charon_a.socket, require=False)).start()
        b = GreupdProcess(seed.b, router_config(seed.b, *B_SIDE, vici=charon_b.socket, require=False)).start()
        try:
            wait_ipsec(a, "established")
            a.wait_for("My_Tunnel", "up", timeout=60)
            a.stop()
            assert seed.a.wait_ping("192.168.8.11", timeout=20)  # B's end of the tunnel, through ESP

            preload()  # doctor runs as a child forked from here: no interpreter and imports per run (lab/forked.py)
            forked = ForkedGreupd(seed.a, a.config_path.read_text())

            def doctor() -> tuple[int, list[dict[str, str]]]:
                done = forked.cli("doctor", "--json", "-c", str(a.config_path), "--socket", str(a.socket), timeout=300)
                assert done.returncode in (0, 1), done.stderr
                return done.returncode, json.loads(done.stdout)["findings"]

            # `ip xfrm flush` in a script: with the trap policy gone, no acquire asks charon to negotiate again,
            # and charon still counts its CHILD_SA as installed. A's GRE now leaves in the clear (B's policy
            # drops it) and B's ESP meets no SA here.
            seed.a.ip_batch("xfrm state flush", "xfrm policy flush")
            assert not seed.a.ping("192.168.8.11")
            code, findings = doctor()
            assert code == 1 and [f["check"] for f in findings] == ["ipsec-no-sa"], findings
            (finding,) = findings
            assert finding["message"] == ("no IPsec SA for 172.19.1.1 > 172.19.1.2 and 172.19.1.2 > 172.19.1.1: its "
                                          "GRE leaves in the clear")
            assert "GRE policies (ip xfrm policy):\nnone" in finding["evidence"]
            terminate, initiate = (line.split("#")[0].split() for line in finding["fix"].splitlines()[:2])
            uri = ["--uri", charon_a.uri]
            assert terminate == ["swanctl", "--terminate", "--ike", "greupd-My_Tunnel", "--force", *uri]
            assert initiate == ["swanctl", "--initiate", "--ike", "greupd-My_Tunnel", "--child", "gre", *uri]
            seed.a.run(*terminate, timeout=120)
            # B's trap may be first to negotiate again (its GRE to A): then charon answers "existing duplicate"
            done = seed.a.run(*initiate, timeout=120, check=False)
            assert done.returncode == 0 or "existing duplicate" in done.stdout + done.stderr, done.stdout
            assert doctor() == (0, [])
            assert seed.a.wait_ping("192.168.8.11", timeout=20)
            assert seed.a.ip("xfrm", "state").stdout.count("proto esp") >= 2  # charon's, both ways
        finally:
            b.stop()


def seed_config(local: str, remote: str, address: str, peer: str, lan: str) -> str:
    """etc/greupd/tunnels.toml's tunnel (the seed's), without [tunnel.nat] and [tunnel.mss]: this guest's nftables
    has no inet family (kernel-lab.md), so those are left to the demo's kernel."""
    return (f'[daemon]\nip_forward = true\n\n[[tunnel]]\nname = "My_Tunnel"\nmode = "gre"\nlocal = "{local}"\n'
            f'remote = "{remote}"\naddress = "{address}"\npeer = "{peer}"\nroutes = ["{lan}"]\n\n'
            f'[tunnel.keepalive]\ninterval = "1s"\nretries = 3\n')


def test_nothing_on_the_seeds_setup_with_greupd_running_on_both_routers() -> None:
    """No false positives: the seed's two routers, each with greupd and the tunnel up, their LANs pinging."""
    from lab.hosts import seed_topology

    with Lab() as lab:
        seed = seed_topology(lab)
        a = GreupdProcess(seed.a, seed_config("172.19.1.1", "172.19.1.2", "192.168.8.1", "192.168.8.11",
                                              "20.10.1.0/24")).start()
        b = GreupdProcess(seed.b, seed_config("172.19.1.2", "172.19.1.1", "192.168.8.11", "192.168.8.1",
                                              "10.10.1.0/24")).start()
        try:
            a.wait_for("My_Tunnel", "up")
            b.wait_for("My_Tunnel", "up")
            assert seed.lan_a.wait_ping("20.10.1.2")
            for daemon in (a, b):
                done = daemon.cli("doctor", "--json", "-c", str(daemon.config_path), "--socket", str(daemon.socket),
                                  timeout=300)
                assert (done.returncode, json.loads(done.stdout)) == (0, {"findings": []}), done.stderr
        finally:
            a.stop()
            b.stop()
