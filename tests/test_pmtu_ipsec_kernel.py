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
from lab.greupd_process import GreupdProcess
from lab.waiting import eventually
from tests.test_ipsec_kernel import router_config, wait_ipsec
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
