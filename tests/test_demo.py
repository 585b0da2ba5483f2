"""`make demo` tells the seed's whole story, and its output says what a reader came to see.

The demo (demo/seed_story.py) stops with an error on any claim the kernel did not bear out; this test runs it
as `make demo` does (a new interpreter in a kernel with ip_gre and nftables inet) and reads its output as a
newcomer would: the NAT'd source address on each side and the SYN's MSS 1460 arriving as 1436; then a black hole
that hangs a hand-made tunnel's transfer, greupd measuring 1376 through it and the transfer completing.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.needs_nft_gre
def test_make_demo_shows_nat_both_ways_and_the_clamped_mss() -> None:
    done = subprocess.run([sys.executable, "-m", "demo.seed_story"], cwd=REPO, capture_output=True, text=True,
                          timeout=600, check=False)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "SYN arriving at lan_b's eth0: source 192.168.8.1, MSS 1436" in out  # NAT into the tunnel, clamp
    assert "SYN leaving lan_a's eth0:    source 10.10.1.2, MSS 1460" in out
    assert "SYN arriving at lan_a's eth0: source 10.10.1.1" in out  # NAT out of the tunnel
    assert "NOT TRUE" not in out
    for step in ("A LAN host pings the far LAN", "Drift:", "A withdraws the route", "A restores the route", "Done:"):
        assert step in out, out
    # the MTU black hole (demo/black_hole.py, issue #23): a hand-made tunnel hangs, greupd measures and it passes
    for claim in ("ok: the transfer hangs", "ok: the transfer completes",
                  "ok: greupd measured 1376 (1400 less GRE's 24 bytes) and set it on the link"):
        assert claim in out, out
