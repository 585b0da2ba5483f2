"""Waiting for a condition in tests that drive real kernels and daemons: poll, never sleep blindly."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(check: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    """True as soon as check() is; False once `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval)
    return check()


def eventually(check: Callable[[], bool], timeout: float = 10.0, what: str = "condition",
               detail: Callable[[], str] | None = None, interval: float = 0.02) -> None:
    """Like wait_until, but a timeout fails the test, naming `what` (and `detail()`, e.g. a log)."""
    if not wait_until(check, timeout, interval):
        raise AssertionError(f"{what}: not true after {timeout}s" + (f"\n{detail()}" if detail else ""))
