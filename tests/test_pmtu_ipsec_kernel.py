"""The path MTU search under [tunnel.ipsec] (issue #23): the ESP overhead is measured, not assumed.

The same path as tests/test_pmtu_kernel.py (a middle router at 1400 that drops its own "fragmentation needed"),
with greupd and charon on both ends and A's tunnel at mtu = "probe". A's padded probes leave as its GRE does, by
the ESP policy for GRE, so what comes back is the largest GRE packet whose ESP packet crosses 1400 bytes: less
than the 1376 of plain GRE by ESP's own bytes (AES-GCM-16 in transport mode: 8 of header, 8 of IV, 16 of ICV,
2 of trailer and padding to 4 bytes). DF pings through the tunnel confirm it to the byte.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from lab import charon as charon_lab
from lab.charon import Charon
from lab.forked import ForkedGreupd
from lab.greupd_process import GreupdProcess
from lab.hosts import Lab, seed_topology
from lab.traffic import handshake
from lab.waiting import eventually
from tests.test_ipsec_fail_closed import load_esp_crypto
from tests.test_ipsec_kernel import A_SIDE, B_SIDE, router_config, wait_ipsec
from tests.test_pmtu_kernel import A_INNER, B_INNER, MTU_PROBE, A, B, Path3, df_ping, path3

pytestmark = pytest.mark.skipif(charon_lab.available() is not None, reason=charon_lab.available() or "")
__all__ = ["path3"]  # the fixture


def esp_gcm_transport(gre_packet: int) -> int:
    """Bytes on the wire of a GRE packet (IPv4, no options) in ESP transport mode with AES-GCM-16."""
    payload = gre_packet - 20
    return 20 + 8 + 8 + -(-(payload + 2) // 4) * 4 + 16


@pytest.fixture
def under_ipsec(path3: Path3) -> Iterator[tuple[Path3, GreupdProcess]]:
    for host in (path3.a, path3.b):
        host.ip("link", "del", "My_Tunnel")
    charon_a, charon_b = Charon(path3.a).start(), Charon(path3.b).start()
    # require = false: UML's nftables cannot hold the drops, so a require tunnel would wait in error (#21 M1)
    a_config = router_config(path3.a, A, B, A_INNER, B_INNER, "20.10.1.0/24", vici=charon_a.socket, require=False)
    a_config = a_config.replace('peer = "', 'mtu = "probe"\npeer = "', 1) + "[tunnel.mtu_probe]\n" + MTU_PROBE
    a = GreupdProcess(path3.a, a_config).start()
    b = GreupdProcess(path3.b, router_config(path3.b, B, A, B_INNER, A_INNER, "10.10.1.0/24",
                                             vici=charon_b.socket, require=False)).start()
    try:
        yield path3, a
    finally:
        a.stop()
        b.stop()
        charon_a.stop()
        charon_b.stop()


@pytest.mark.needs_gre
def test_the_esp_overhead_is_measured_not_assumed(under_ipsec: tuple[Path3, GreupdProcess], tmp_path: Path) -> None:
    path, a = under_ipsec
    wait_ipsec(a, "established")
    changes = a.wait_for("My_Tunnel", "up", timeout=30)["state_changes"]  # IKE's first seconds may cost a flap
    expected = max(size for size in range(1200, 1400) if esp_gcm_transport(size + 24) <= 1400)
    eventually(lambda: (a.tunnel("My_Tunnel").get("path_mtu") or {}).get("state") == "measured", timeout=90,
               what="measured under IPsec", detail=a.output)
    measured = a.tunnel("My_Tunnel")["path_mtu"]["bytes"]
    print(f"pmtu under IPsec: {measured} measured, {expected} expected by ESP's arithmetic")  # BENCHMARKS.md
    assert measured == expected
    eventually(lambda: f" mtu {measured} " in path.a.ip("-o", "link", "show", "My_Tunnel").stdout, timeout=10,
               what="the link's MTU set", detail=a.output)
    assert df_ping(path.a, B_INNER, measured) and not df_ping(path.a, B_INNER, measured + 1)
    assert a.tunnel("My_Tunnel")["state_changes"] == changes, "the search never took the tunnel down"


# --- in the qemu guest (nftables inet): require = true, a path that allows more than the 1395 default ----------

IPSEC_DEFAULT_MTU = 1395  # what [tunnel.ipsec] sets without a measurement: room for ESP on a 1500 underlay


@pytest.mark.needs_nft_gre
def test_under_ipsec_the_measured_mtu_beats_the_1395_default_and_the_clamp_follows_it(tmp_path: Path) -> None:
    """The seed's A and B on a 1500 underlay, [tunnel.ipsec] with require = true (the drops' table held) and
    mtu = "probe" with clamp = "pmtu" on A: the measured MTU is ESP's arithmetic for 1500 bytes, above the 1395
    that greupd assumes without a measurement, and a SYN from A's LAN arrives clamped to it."""
    from tests.test_doctor_nft_gre_kernel import preload
    from tests.test_ipsec_fail_closed import SLOW_POLL, in_state

    with Lab() as lab:
        seed = seed_topology(lab)
        # charon starts on an emulated CPU here: minutes on a loaded machine, not the UML's seconds (lab/charon.py)
        preload()  # what the forked daemons import, once per guest, not in each child
        charon_a, charon_b = Charon(seed.a).start(timeout=300), Charon(seed.b).start(timeout=300)
        # The kernel's AES-GCM ESP crypto built before the charons negotiate (the modules are the guest's, so one
        # netns suffices): ci10 failed here as the I2/I3 story did, a responder's stall over the first SA leaving
        # A with an SPI B never used (tests/test_ipsec_fail_closed.py, load_esp_crypto).
        load_esp_crypto(seed.b)
        a_config = router_config(seed.a, *A_SIDE, vici=charon_a.socket, secrets=tmp_path)
        a_config = (a_config.replace('peer = "', 'mtu = "probe"\npeer = "', 1)
                    + "[tunnel.mtu_probe]\n" + MTU_PROBE + '[tunnel.mss]\nclamp = "pmtu"\n')
        # forked from this process (lab/forked.py): a new interpreter pays greupd's imports again, minutes there
        a = ForkedGreupd(seed.a, a_config).start(timeout=300)
        b = ForkedGreupd(seed.b, router_config(seed.b, *B_SIDE, vici=charon_b.socket, secrets=tmp_path)).start(
            timeout=300)
        try:
            wait_ipsec(a, "established", timeout=300, interval=SLOW_POLL)
            in_state(a, "up", 120)
            expected = max(size for size in range(1200, 1500) if esp_gcm_transport(size + 24) <= 1500)
            eventually(lambda: (a.tunnel("My_Tunnel").get("path_mtu") or {}).get("state") == "measured",
                       timeout=120, what="measured under IPsec", detail=a.output, interval=SLOW_POLL)
            measured = a.tunnel("My_Tunnel")["path_mtu"]["bytes"]
            print(f"pmtu under IPsec, 1500 underlay: {measured} measured, {expected} by ESP's arithmetic")
            assert measured == expected > IPSEC_DEFAULT_MTU
            eventually(lambda: f" mtu {measured} " in seed.a.ip("-o", "link", "show", "My_Tunnel").stdout,
                       timeout=20, what="the link's MTU set", detail=a.output, interval=SLOW_POLL)
            through = handshake(seed.lan_a, seed.lan_b, "20.10.1.2", 5005)
            assert through.syn_sent_mss == 1460 and through.syn_mss == measured - 40, "clamp = pmtu follows"
        finally:
            a.stop()
            b.stop()
            charon_a.stop()
            charon_b.stop()
