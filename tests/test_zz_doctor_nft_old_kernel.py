"""`greupd doctor` on a kernel with both GRE and nftables `inet` (the demo's kind, `vng`): the seed's two routers
with greupd running the seed's whole config (NAT, MSS clamp: greupd's own table), a tunnel up through a real
ip_gre link, and doctor's trace crossing greupd's table. Nothing is found there; then another table's input
drop of GRE is found by its trace, and its fix makes it go (#24's "no false positives" and item 2)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from lab.greupd_process import GreupdProcess
from lab.hosts import Host, Lab, seed_topology
from tests.test_doctor_kernel import _env

pytestmark = pytest.mark.needs_nft_gre

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


def doctor(router: Host, daemon: GreupdProcess) -> tuple[int, list[dict[str, str]]]:
    done = router.run(sys.executable, "-m", "greupd", "doctor", "--json", "-c", str(daemon.config_path), "--socket",
                      str(daemon.socket), env=_env(), check=False, timeout=900)
    assert done.returncode in (0, 1), done.stderr
    findings: list[dict[str, str]] = json.loads(done.stdout)["findings"]
    return done.returncode, findings


def test_old_version() -> None:
    text = SEED.read_text()
    with Lab() as lab:
        seed = seed_topology(lab)
        a = GreupdProcess(seed.a, text).start(timeout=600)
        b = GreupdProcess(seed.b, b_config(text)).start(timeout=600)
        try:
            a.wait_for("My_Tunnel", "up", timeout=120)
            b.wait_for("My_Tunnel", "up", timeout=120)
            assert doctor(seed.a, a) == (0, [])
            assert doctor(seed.b, b) == (0, [])
            seed.a.run("nft", "-f", "-", input="table ip other {\n chain input {\n"
                       "  type filter hook input priority 0; policy accept;\n  ip protocol gre counter drop\n }\n}\n")
            code, findings = doctor(seed.a, a)
            assert code == 1 and [f["check"] for f in findings] == ["firewall-drops-gre"], findings
            (finding,) = findings
            assert finding["evidence"].startswith("nftables trace ")
            assert "decided by table ip other chain input: ip protocol gre counter drop # handle 2" \
                in finding["evidence"]
            seed.a.run(*finding["fix"].split())
            assert doctor(seed.a, a) == (0, [])
            a.wait_for("My_Tunnel", "up", timeout=120)
        finally:
            a.stop()
            b.stop()
