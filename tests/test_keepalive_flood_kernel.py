"""A GRE flood does not make greupd declare healthy tunnels down (#21 M6): bench/gre_flood.py, shorter and smaller.

Two keepalive engines answer each other for 20 tunnels (interval 1 s x retries 3) in netns of the running kernel,
while a third host floods A with keepalive-shaped GRE from unconfigured sources and with forged replies that
carry a configured remote's address and key (as fast as one sender each goes). The kernel's filters keep both
out of A's sockets: A's engine reads only the real replies and B's probes, and no tunnel goes down. (dac2a7b's
filter passed both; its engine read the flood, up to ~50k packets a second, and lost replies at its socket.)
Counts only, no timing: how fast the flood goes depends on the machine. The rates that matter are measured by
`python -m bench.gre_flood run` (RELIABILITY.md, "GRE flood").
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.gre_flood import run

pytestmark = pytest.mark.needs_root


def test_a_flood_of_junk_and_forged_replies_stays_in_the_kernel_and_downs_nothing(tmp_path: Path) -> None:
    flood = run(tunnels=20, interval=1.0, retries=3, seconds=8, junk_senders=1, spoof_senders=1, spoof_rate=0,
                request_senders=0, work=tmp_path)
    assert flood.junk_sent_per_s > 0 and flood.spoofed_sent_per_s > 0, flood
    assert flood.false_downs == 0 and flood.tunnels_down_at_end == 0, flood
    assert flood.filter == "tokens", flood
    # What reached A's engine: B's replies and B's probes of A, none of the flood (dac2a7b: all of it it could read).
    assert flood.unmatched == 0, flood
    assert flood.engine_packets <= flood.replies + flood.requests_answered + 4 * flood.tunnels, flood
