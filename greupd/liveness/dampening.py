"""Route flap dampening for a tunnel's verdict, as RFC 2439 does it for routes: a penalty per flap that decays
exponentially; above `suppress` the tunnel is held down, below `reuse` it may come up again; `max_hold` caps
how long one burst of flaps holds it (the penalty never exceeds reuse * 2 ** (max_hold / half_life)).

Pure: the caller gives the time (the loop's monotonic clock).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

PENALTY_PER_FLAP = 1000.0


@dataclass(frozen=True)
class DampeningSettings:
    half_life: float = 60.0
    suppress: float = 2000.0
    reuse: float = 750.0
    max_hold: float = 600.0

    @property
    def ceiling(self) -> float:
        return self.reuse * 2 ** (self.max_hold / self.half_life)


class Dampening:
    def __init__(self, settings: DampeningSettings) -> None:
        self.settings = settings
        self.suppressed = False
        self.flaps = 0
        self._penalty = 0.0
        self._at: float | None = None

    def penalty(self, now: float) -> float:
        if self._at is None:
            return 0.0
        return self._penalty * 2 ** (-max(0.0, now - self._at) / self.settings.half_life)

    def on_flap(self, now: float) -> bool:
        """The tunnel went down (a withdrawal, in RFC 2439's words); True if this flap suppresses it."""
        self.flaps += 1
        self._penalty = min(self.settings.ceiling, self.penalty(now) + PENALTY_PER_FLAP)
        self._at = now
        if not self.suppressed and self._penalty > self.settings.suppress:
            self.suppressed = True
            return True
        return False

    def tick(self, now: float) -> bool:
        """True if the tunnel is released now (the penalty fell below reuse)."""
        if self.suppressed and self.penalty(now) < self.settings.reuse:
            self.suppressed = False
            return True
        return False

    def reuse_at(self, now: float) -> float | None:
        """When tick() will release a suppressed tunnel; None while it is not suppressed."""
        if not self.suppressed or self._at is None:
            return None
        return self._at + self.settings.half_life * math.log2(self._penalty / self.settings.reuse)

    def reconfigure(self, settings: DampeningSettings) -> None:
        self.settings = settings
        self._penalty = min(self._penalty, settings.ceiling)
