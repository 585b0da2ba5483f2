"""The tunnel's MTU, measured end to end: a search in the manner of RFC 8899 (DPLPMTUD) over padded keepalives.

A Cisco keepalive is reflected by any GRE peer (Cisco, MikroTik, a Linux kernel, greupd). Padded to an outer size
S with DF set on both IP headers, one probe tests the way there at S and the way back at S less the outer headers
(24 bytes, 28 with an output key): if it comes back, a tunnel packet of S bytes reaches the peer. The link's MTU
governs what we send, so the forward size is what counts; the reflection only needs the way back to carry S - 24,
which a symmetric path does. (A path much narrower on the way back shows as a lower measurement: never too high.)

Sizes here are tunnel MTUs (the inner packet, what `ip link set mtu` takes): a probe for MTU m is m + overhead
bytes on the wire. The search, as RFC 8899 section 5.2 lays it out:

- BASE: confirm `floor` (the base PLPMTU: 1200 unless configured). If it never comes back while small keepalives
  do, the path is a black hole even there: state "failed", and the link is kept at `floor` (never lower).
- SEARCH: the ceiling (the underlay route's MTU less the overhead) first, since most paths carry it; then bisect
  between the largest size that came back and the smallest that did not, down to one byte.
- A size is confirmed by one reply; it fails only when `probes_per_size` probes of it were all lost (a single
  loss is more often congestion than size: RFC 8899 MAX_PROBES). Probes of one size leave `spacing` apart;
  at most one size is in flight.
- SEARCH_COMPLETE ("measured"): every `confirm_every`, one probe at the measured size. If `probes_per_size` of
  them are lost in a row (while small keepalives come back: the engine only reports losses then), a black hole
  appeared: search again at once, from the floor, below the size that failed. A lower path thus lowers the
  MTU within seconds; a higher one is found at the next measurement (`every`, or a route change: `restart`).

No I/O and no clock: the engine asks `due(now)` for the sizes to send, reports replies (`on_reply`) and asks
`expire(now)` for lost probes; each returns a `PathMtuResult` when the measurement changed. The engine never
counts these probes as keepalive misses and never takes the peer for dead by them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

State = Literal["searching", "measured", "failed"]

IPV6_MIN_MTU = 1280  # RFC 8200 section 5: a link that carries IPv6 carries 1280 bytes (RFC 7676 section 3.2)
PROBES_PER_SIZE = 3  # RFC 8899's MAX_PROBES
PROBE_SPACING = 0.1  # s between the probes of one size
PROBE_TIMEOUT = 1.0  # s: a probe not back by then is lost (GRE round trips are milliseconds to a few hundred)
CONFIRM_EVERY = 5.0  # s between probes at the measured size, so a black hole that appears is seen in seconds


@dataclass(frozen=True)
class PathMtuResult:
    """What a measurement found: `mtu` is the link MTU to set (the largest size that came back, or `floor`
    when even that failed); `ipv6` False when it is below 1280 (IPv6 through the tunnel would break)."""

    mtu: int
    state: State
    reason: str

    @property
    def ipv6(self) -> bool:
        return self.mtu >= IPV6_MIN_MTU


@dataclass(frozen=True)
class PathMtuTiming:
    probes_per_size: int = PROBES_PER_SIZE
    spacing: float = PROBE_SPACING
    timeout: float = PROBE_TIMEOUT
    confirm_every: float = CONFIRM_EVERY


class PathMtuSearch:
    """One tunnel's search. Start it with `restart(now, ceiling)`; before that it sends nothing."""

    def __init__(self, floor: int, every: float, timing: PathMtuTiming = PathMtuTiming()) -> None:
        self.floor = floor
        self.every = every
        self.timing = timing
        self.state: State = "searching"
        self.mtu: int | None = None  # the last measured (or, failed: the floor); None before the first result
        self.measured_at: float | None = None
        self.probes_sent = 0  # in the current measurement, for status and the benchmark
        self._ceiling = floor
        self._good = 0  # the largest size that came back in this measurement (0: not even the floor yet)
        self._bad = 0  # the smallest size that did not (0: none yet)
        self._size: int | None = None  # the size in flight; None: nothing to probe (idle in "measured")
        self._confirming = False  # the size in flight is the measured one, re-checked
        self._sent_of_size = 0
        self._next_send = 0.0
        self._deadline = 0.0  # when the size in flight counts as failed, once all its probes left
        self._next_measurement: float | None = None
        self._started = False

    # --- what the engine calls -------------------------------------------------------------------------

    def restart(self, now: float, ceiling: int, reason: str = "start") -> None:
        """Measure again now: at start, every `every`, and when the route to the remote changed (`ceiling`:
        the underlay route's MTU less the tunnel's overhead). The link keeps its MTU until a result."""
        self._ceiling = max(self.floor, ceiling)
        self._started = True
        self.state = "searching"
        self.probes_sent = 0
        self._good, self._bad = 0, 0
        self._confirming = False
        self._reason = reason
        self._begin(self.floor, now)

    def due(self, now: float) -> list[int]:
        """The sizes of the probes to send now (each one probe; the engine pads and sends them). Rate-limited:
        at most one per `spacing`, and only while a size is in flight."""
        self._start_due_work(now)
        if self._size is None or self._sent_of_size >= self.timing.probes_per_size or now < self._next_send:
            return []
        self._sent_of_size += 1
        self.probes_sent += 1
        self._next_send = now + self.timing.spacing
        self._deadline = now + self.timing.timeout
        return [self._size]

    def on_reply(self, size: int, now: float) -> PathMtuResult | None:
        """A probe of `size` came back. Replies to sizes no longer in flight are ignored, except that a size
        above the largest good one still raises it (a late reply proves the path carried it)."""
        if not self._started:
            return None
        if self._confirming:
            if size >= (self.mtu or 0):
                self._idle(now)
            return None
        if self.state != "searching" or size <= self._good or (self._bad and size >= self._bad):
            return None
        self._good = size
        return self._next_size(now)

    def expire(self, now: float) -> PathMtuResult | None:
        """The size in flight failed if all its probes left and none came back by the deadline."""
        self._start_due_work(now)
        if (self._size is None or self._sent_of_size < self.timing.probes_per_size
                or now < self._deadline):
            return None
        size = self._size
        if self._confirming:
            # A black hole at the measured size, while small keepalives come back: search below it at once.
            self.restart(now, self._ceiling, reason=f"probes of {size} bytes stopped coming back")
            self._bad = size
            return None
        self._bad = size
        if size == self.floor:
            return self._finish("failed", self.floor, now,
                                f"not even {self.floor} bytes came back (a black hole below the floor)")
        return self._next_size(now)

    def next_wakeup(self) -> float | None:
        """When `due` or `expire` has something to do next (the engine's timer)."""
        if self._size is not None:
            if self._sent_of_size < self.timing.probes_per_size:
                return self._next_send
            return self._deadline
        return self._next_measurement

    def hold(self) -> None:
        """The peer is down (small keepalives are lost too): nothing to learn about sizes. Nothing is sent
        until `restart`, which the engine calls when the peer is back."""
        self._size = None
        self._next_measurement = None
        self._confirming = False

    @property
    def searching(self) -> bool:
        return self._started and self.state == "searching"

    # --- inside ----------------------------------------------------------------------------------------

    def _start_due_work(self, now: float) -> None:
        if self._size is not None or self._next_measurement is None or now < self._next_measurement:
            return
        if self.measured_at is not None and now - self.measured_at >= self.every - 1e-9:
            self.restart(now, self._ceiling, reason="every")
        elif self.state == "measured" and self.mtu is not None:
            self._confirming = True
            self._begin(self.mtu, now)
        else:
            self.restart(now, self._ceiling, reason="every")

    def _begin(self, size: int, now: float) -> None:
        self._size = size
        self._sent_of_size = 0
        self._next_send = now
        self._deadline = now + self.timing.timeout

    def _next_size(self, now: float) -> PathMtuResult | None:
        if not self._good:
            return None  # the floor is still in flight
        if self._good >= self._ceiling:
            return self._finish("measured", self._good, now, f"{self._reason}: the route's MTU came back")
        if not self._bad:
            self._begin(self._ceiling, now)  # most paths carry the route's MTU: one probe settles it
            return None
        if self._bad - self._good <= 1:
            return self._finish("measured", self._good, now, f"{self._reason}: {self._bad} bytes did not come back")
        self._begin((self._good + self._bad) // 2, now)
        return None

    def _finish(self, state: State, mtu: int, now: float, reason: str) -> PathMtuResult:
        self.state, self.mtu, self.measured_at = state, mtu, now
        self._idle(now)
        return PathMtuResult(mtu, state, reason)

    def _idle(self, now: float) -> None:
        self._size = None
        self._confirming = False
        self._next_measurement = now + min(self.every, self.timing.confirm_every)
