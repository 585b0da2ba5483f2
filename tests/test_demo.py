"""`make demo` tells the seed's whole story, and its output says what a reader came to see.

The demo (demo/seed_story.py) stops with an error on any claim the kernel did not bear out; this test runs its
main() in the kernel `make demo` uses (ip_gre and nftables inet) and reads its output as a newcomer would: the
NAT'd source address on each side and the SYN's MSS 1460 arriving as 1436; then a black hole that hangs a
hand-made tunnel's transfer, greupd measuring 1376 through it and the transfer completing.

main() runs in a child forked from pytest's process, with what the demo imports imported here once per guest (as
the other qemu stories do): a new interpreter, as `make demo` starts, paid ~40 s of its ~100 s in the emulated
guest for its start and imports again. So the demo's first line (its interpreter's start-up) reads ~0 s here;
`make demo` itself (.ci/run demo) still runs it as a new interpreter.
"""

from __future__ import annotations

import io
import os
import select
import signal
import sys
import time
import traceback
from collections.abc import Callable

import pytest


def forked_main(main: Callable[[], int], timeout: float) -> tuple[int, str]:
    """main() in a child of this process, its stdout and stderr (fds and sys objects) in one pipe: (status, output)."""
    reader, writer = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if not pid:
        code = 1
        try:
            os.close(reader)
            os.dup2(writer, 1)
            os.dup2(writer, 2)
            sys.stdout = io.TextIOWrapper(os.fdopen(1, "wb", closefd=False), line_buffering=True)
            sys.stderr = io.TextIOWrapper(os.fdopen(2, "wb", closefd=False), line_buffering=True)
            code = main()
        except BaseException:
            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)  # never back into pytest's code
    os.close(writer)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    while True:
        ready, _, _ = select.select([reader], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(reader)
            raise AssertionError(f"the demo did not finish in {timeout} s:\n{b''.join(chunks).decode()}")
        data = os.read(reader, 65536)
        if not data:
            break
        chunks.append(data)
    os.close(reader)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), b"".join(chunks).decode(errors="replace")


@pytest.mark.needs_nft_gre
def test_make_demo_shows_nat_both_ways_and_the_clamped_mss() -> None:
    from demo import seed_story
    from tests.test_doctor_nft_gre_kernel import preload

    preload()
    code, out = forked_main(seed_story.main, timeout=600)
    assert code == 0, out
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
