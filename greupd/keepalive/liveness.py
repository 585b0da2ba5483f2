"""What keepalives decide, with no I/O: is a tunnel up, which replies count, how many answers we may send.

Everything here is fed the time by its caller (the engine passes the asyncio loop's monotonic clock), so the
tests drive it with plain numbers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from greupd.config import format_duration
from greupd.status import KeepaliveStatus

LivenessReason = Literal["keepalive-timeout", "keepalive-restored"]


@dataclass(frozen=True)
class LivenessChange:
    """A tunnel's keepalive verdict flipped; `message` is the sentence for the journal."""

    up: bool
    reason: LivenessReason
    message: str


class Liveness:
    """One tunnel's keepalive state machine, as Cisco IOS counts: a probe that is not answered within one
    interval is a miss; `retries` misses in a row take the tunnel down; `up_after` replies in a row bring it
    back.

    It starts UP unless told otherwise: a tunnel adopted when the daemon restarts keeps its routes until
    keepalives prove it dead, rather than being withdrawn and restored on every restart; one whose peer was
    dead before the restart starts down (the daemon resumes verdicts: greupd/keepalive/restart.py).

    Misses are counted per probe sent, never per elapsed time: at most one probe is outstanding, so a loop
    that wakes up five intervals late counts one miss, not five.
    """

    def __init__(self, interval: float, retries: int, up_after: int, *, up: bool = True) -> None:
        self.interval = interval
        self.retries = retries
        self.up_after = up_after
        self.up = up
        self.sent = 0
        self.received = 0
        self.missed_in_a_row = 0
        self.replies_in_a_row = 0
        self.last_rtt: float | None = None
        self._deadline: float | None = None  # when the outstanding probe counts as missed; None: none is

    @property
    def awaiting_reply(self) -> bool:
        return self._deadline is not None

    def reconfigure(self, interval: float, retries: int, up_after: int) -> None:
        """New timing from a reload; the verdict and counters stay (a reload is not a restart)."""
        self.interval, self.retries, self.up_after = interval, retries, up_after

    def on_probe_sent(self, now: float) -> LivenessChange | None:
        """A probe went out (or was attempted: one that cannot even be sent is still unanswered). If the
        previous probe is still unanswered it is a miss now, whatever on_timer was told."""
        change = self._miss() if self._deadline is not None else None
        self.sent += 1
        self._deadline = now + self.interval
        return change

    def on_timer(self, now: float) -> LivenessChange | None:
        """Time passed; the outstanding probe is a miss once its interval is over."""
        if self._deadline is None or now < self._deadline:
            return None
        return self._miss()

    def on_reply(self, now: float, rtt: float) -> LivenessChange | None:
        """A reply to one of our probes (the caller has checked its token: each counts once)."""
        self._deadline = None
        self.received += 1
        self.last_rtt = rtt
        self.missed_in_a_row = 0
        self.replies_in_a_row += 1
        if not self.up and self.replies_in_a_row >= self.up_after:
            self.up = True
            rtt_ms = f"{rtt * 1000:.3g} ms"
            in_a_row = f"{self.replies_in_a_row} replies in a row" if self.replies_in_a_row > 1 else "a reply"
            return LivenessChange(True, "keepalive-restored", f"keepalives answered again ({in_a_row}, rtt {rtt_ms})")
        return None

    def _miss(self) -> LivenessChange | None:
        self._deadline = None
        self.missed_in_a_row += 1
        self.replies_in_a_row = 0
        if self.up and self.missed_in_a_row >= self.retries:
            self.up = False
            missed = f"{self.missed_in_a_row} keepalive{'s' if self.missed_in_a_row > 1 else ''} missed"
            return LivenessChange(False, "keepalive-timeout", f"{missed} (interval {format_duration(self.interval)})")
        return None

    def status(self) -> KeepaliveStatus:
        return KeepaliveStatus(
            interval=self.interval,
            retries=self.retries,
            sent=self.sent,
            received=self.received,
            missed_in_a_row=self.missed_in_a_row,
            last_rtt_ms=round(self.last_rtt * 1000, 3) if self.last_rtt is not None else None,
        )


class ProbeWindow:
    """The tokens of the last `size` probes, with their send times. A reply counts only if its token is here,
    and claiming removes it: a replayed reply, or one for a probe too old to matter, counts for nothing."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._sent_at: dict[int, float] = {}  # insertion order = send order

    def __len__(self) -> int:
        return len(self._sent_at)

    def issue(self, token: int, now: float) -> None:
        self._sent_at[token] = now
        while len(self._sent_at) > self.size:
            del self._sent_at[next(iter(self._sent_at))]

    def tokens(self) -> Iterable[int]:
        """The tokens that can still be claimed."""
        return self._sent_at.keys()

    def claim(self, token: int) -> float | None:
        """The send time of the probe with this token, once; None if it is unknown, too old or claimed."""
        return self._sent_at.pop(token, None)

    def resize(self, size: int) -> None:
        self.size = size
        while len(self._sent_at) > self.size:
            del self._sent_at[next(iter(self._sent_at))]


class AnswerBudget:
    """A token bucket: how many of a peer's keepalives we reflect, so that a flood of forged requests
    (their source addresses are a configured remote's, which anyone can write) costs us little."""

    def __init__(self, rate: float = 20.0, burst: float = 20.0) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._last: float | None = None

    def take(self, now: float) -> bool:
        if self._last is not None:
            self._tokens = min(self.burst, self._tokens + max(0.0, now - self._last) * self.rate)
        self._last = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False
