"""`greupd doctor` on a kernel with both GRE and nftables `inet` (the demo's kind, `vng`): the seed's two routers
with greupd running the seed's whole config (NAT, MSS clamp: greupd's own table), a tunnel up through a real
ip_gre link, and doctor's trace crossing greupd's table. Nothing is found there; then another table's input
drop of GRE is found by its trace, and its fix makes it go (#24's "no false positives" and item 2).

Both daemons and every doctor run are children forked from this process (lab/forked.py), with what they import
imported here once: the guest emulates its CPU, and each new interpreter paid greupd's, pyroute2's and
nftables' imports again (212 s for this test in the guest, most of it imports)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

from lab.forked import ForkedGreupd
from lab.hosts import Lab, seed_topology

pytestmark = pytest.mark.needs_nft_gre


# What the forked daemons and doctor runs import, imported once, here (the demo's way: demo/seed_story.py).
PRELOAD = ("nftables", "pyroute2", "pyroute2.netlink.nfnetlink.nfctsocket", "scapy.layers.inet", "scapy.layers.l2",
           "greupd.cli", "greupd.control", "greupd.daemon", "greupd.doctor.hear", "greupd.doctor.pmtu",
           "greupd.doctor.read", "greupd.doctor.trace", "greupd.keepalive.codec", "greupd.nft.table")


def preload() -> None:
    for name in PRELOAD:
        importlib.import_module(name)


SEED = Path(__file__).resolve().parent.parent / "etc" / "greupd" / "tunnels.toml"


def b_config(text: str) -> str:
    """The seed's config as machine B has it: the addresses the other way round, B's LAN and interfaces."""
    swaps = {'local = "172.19.1.1"': 'local = "172.19.1.2"', 'remote = "172.19.1.2"': 'remote = "172.19.1.1"',
             'address = "192.168.8.1"': 'address = "192.168.8.11"', 'peer = "192.168.8.11"': 'peer = "192.168.8.1"',
             'routes = ["20.10.1.0/24"]': 'routes = ["10.10.1.0/24"]',
             'into_tunnel = ["10.10.1.0/24"]': 'into_tunnel = ["20.10.1.0/24"]'}
    for old, new in swaps.items():
        assert old in text
        text = text.replace(old, new)
    return text


def doctor(daemon: ForkedGreupd) -> tuple[int, list[dict[str, str]]]:
    done = daemon.cli("doctor", "--json", "-c", str(daemon.config_path), "--socket", str(daemon.socket), timeout=900)
    assert done.returncode in (0, 1), done.stderr
    findings: list[dict[str, str]] = json.loads(done.stdout)["findings"]
    return done.returncode, findings


def test_nothing_on_the_seeds_setup_then_a_traced_drop_in_another_table() -> None:
    text = SEED.read_text()
    preload()
    with Lab() as lab:
        seed = seed_topology(lab)
        a = ForkedGreupd(seed.a, text).start(timeout=600)
        b = ForkedGreupd(seed.b, b_config(text)).start(timeout=600)
        try:
            a.wait_for("My_Tunnel", "up", timeout=120)
            b.wait_for("My_Tunnel", "up", timeout=120)
            assert doctor(a) == (0, [])
            assert doctor(b) == (0, [])
            seed.a.run("nft", "-f", "-", input="table ip other {\n chain input {\n"
                       "  type filter hook input priority 0; policy accept;\n  ip protocol gre counter drop\n }\n}\n")
            code, findings = doctor(a)
            assert code == 1 and [f["check"] for f in findings] == ["firewall-drops-gre"], findings
            (finding,) = findings
            assert finding["evidence"].startswith("nftables trace ")
            assert "decided by table ip other chain input: ip protocol gre counter drop # handle 2" \
                in finding["evidence"]
            seed.a.run(*finding["fix"].split())
            assert doctor(a) == (0, [])
            a.wait_for("My_Tunnel", "up", timeout=120)
        finally:
            a.stop()
            b.stop()
