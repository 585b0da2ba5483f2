"""How the demos tell their story: numbered steps with the time since the start, commands as typed at a prompt
with their output, and claims checked against what the kernel did (the demo stops on the first false one)."""

from __future__ import annotations

import os
import subprocess
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

from lab.forked import ForkedGreupd
from lab.hosts import Host

STARTED = time.monotonic()


def seconds_since_python_started() -> float:
    """How long this interpreter took to start and import the above (the guest's CPU is emulated)."""
    started_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return uptime - started_ticks / os.sysconf("SC_CLK_TCK")


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m  [{time.monotonic() - STARTED:.1f} s]", flush=True)


def note(text: str) -> None:
    print(textwrap.indent(text.rstrip(), "   > "), flush=True)


def show(host: Host, cmdline: str) -> str:
    out = host.sh(cmdline, check=False)
    text = (out.stdout + out.stderr).rstrip()
    print(f"[{host.name}]# {cmdline}\n{textwrap.indent(text, '    ') if text else ''}".rstrip(), flush=True)
    return text


def greupd_says(router: ForkedGreupd, *argv: str) -> None:
    out = router.cli(*argv)
    print(f"[{router.host.name}]# greupd {' '.join(argv)}", flush=True)
    print(textwrap.indent((out.stdout + out.stderr).rstrip(), "    "), flush=True)


def wait(what: str, condition: Callable[[], bool], timeout: float = 30.0) -> float:
    """Seconds until `condition()` held. A look that itself timed out (a `ping` process that the loaded, emulated
    guest did not even start in time) counts as "not yet", not as the end of the demo."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            if condition():
                return time.monotonic() - start
        except subprocess.TimeoutExpired:
            pass
        time.sleep(0.02)
    raise SystemExit(f"demo: gave up after {timeout} s waiting for {what}")


def check(claim: str, ok: bool) -> None:
    """A line the reader can trust: the demo stops here if what it says is not what the kernel did."""
    print(f"    {'ok' if ok else 'NOT TRUE'}: {claim}", flush=True)
    if not ok:
        raise SystemExit(f"demo: {claim}: not what happened")


