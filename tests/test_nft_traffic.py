"""The seed's MSS clamp and NAT acting on real traffic through a GRE tunnel (a kernel with ip_gre and nft inet).

Routers A and B, LANs 10.10.1.0/24 behind A and 20.10.1.0/24 behind B. The tunnel is built by hand with
`ip` (as in the seed how-to: the daemon is not under test here); only greupd's nftables table on A is
greupd's. Then a person's checks: the SYN a LAN host sends with MSS 1460 arrives with the clamped MSS, and
the far side sees the masqueraded address.

The hosts' sockets are opened in forked children that enter a host's netns (lab/forked.py, lab/traffic.py),
not in new Python processes: in the qemu guest these tests run in, a fresh interpreter's imports take many
seconds.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from greupd.config import load_config_text
from greupd.nft.render import Ruleset, render_ruleset
from greupd.nft.table import NftTable
from lab.forked import in_netns
from lab.hosts import Host, SeedTopology
from lab.traffic import TIMEOUT, handshake

pytestmark = pytest.mark.needs_nft_gre

SEED_TEXT = (Path(__file__).resolve().parents[1] / "etc" / "greupd" / "tunnels.toml").read_text()


def seed_ruleset(clamp: str = "1436") -> Ruleset:
    return render_ruleset(load_config_text(SEED_TEXT.replace("clamp = 1436", f"clamp = {clamp}")))


def apply_on(host: Host, ruleset: Ruleset) -> None:
    def apply() -> dict[str, object]:
        table = NftTable(ruleset.table)
        table.apply(ruleset)
        return {"matches": table.matches(ruleset)}

    assert in_netns(host, apply) == {"matches": True}


# --- the seed's tunnel, by hand ---------------------------------------------------------------------------------


def build_tunnel(seed: SeedTopology) -> None:
    for router, local, remote, address, peer, far_lan in (
        (seed.a, "172.19.1.1", "172.19.1.2", "192.168.8.1", "192.168.8.11", "20.10.1.0/24"),
        (seed.b, "172.19.1.2", "172.19.1.1", "192.168.8.11", "192.168.8.1", "10.10.1.0/24"),
    ):
        router.ip("tunnel", "add", "My_Tunnel", "mode", "gre", "local", local, "remote", remote, "ttl", "64")
        router.ip("addr", "add", address, "peer", peer, "dev", "My_Tunnel")
        router.ip("link", "set", "My_Tunnel", "up")
        router.ip("route", "add", far_lan, "dev", "My_Tunnel")
    assert seed.a.wait_ping("192.168.8.11", timeout=TIMEOUT), "the hand-made GRE tunnel does not carry a ping"


def test_seed_clamp_and_nat_act_on_connections_through_the_tunnel(seed: SeedTopology) -> None:
    build_tunnel(seed)
    # Without greupd's table: the LAN's own MSS and addresses go through untouched.
    plain = handshake(seed.lan_a, seed.lan_b, "20.10.1.2", 5001)
    assert (plain.syn_source, plain.syn_mss, plain.synack_mss) == ("10.10.1.2", 1460, 1460)

    apply_on(seed.a, seed_ruleset())

    # lan_a -> lan_b: clamped to 1436 on the way out, masqueraded as A's tunnel address; B's SYN-ACK is
    # clamped on its way in.
    out = handshake(seed.lan_a, seed.lan_b, "20.10.1.2", 5002)
    assert (out.syn_mss, out.syn_source, out.server_saw_peer) == (1436, "192.168.8.1", "192.168.8.1")
    assert out.synack_mss == 1436
    # B's tunnel address -> lan_a: leaves A's LAN interface as A's LAN address.
    back = handshake(seed.b, seed.lan_a, "10.10.1.2", 5003, client_addr="192.168.8.11", watch_client=False)
    assert (back.syn_source, back.server_saw_peer) == ("10.10.1.1", "10.10.1.1")


def test_pmtu_clamp_follows_the_tunnel_mtu(seed: SeedTopology) -> None:
    build_tunnel(seed)
    seed.a.ip("link", "set", "My_Tunnel", "mtu", "1400")

    apply_on(seed.a, seed_ruleset('"pmtu"'))
    through = handshake(seed.lan_a, seed.lan_b, "20.10.1.2", 5004)

    assert through.syn_mss == 1400 - 40  # route MTU less the IPv4 and TCP headers
    # The SYN-ACK comes in from the tunnel and leaves by A's LAN (MTU 1500), but `rt mtu` also takes the
    # route back to its source, through the tunnel: clamped to the tunnel's MTU too.
    assert through.synack_mss == 1400 - 40
