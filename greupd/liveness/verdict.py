"""One verdict per tunnel from several detectors: down while any of them says down (spec.md, 2026-12-06).

Each detector (keepalive, bfd, ...) reports its own up/down per tunnel; a tunnel with [tunnel.dampening]
has one more, "dampening", which says down while the flaps of the others' combined verdict are suppressed.
`down_by` names the detectors that say down, for status (`liveness.down_by`), the journal and the metrics.

Pure: the caller gives the time.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from greupd.liveness.dampening import Dampening, DampeningSettings

DAMPENING = "dampening"


@dataclass(frozen=True)
class LivenessVerdict:
    """What the daemon hears when a tunnel's combined verdict flips: `reason` for the journal
    (keepalive-timeout, bfd-down, dampened, and their returns), `message` its sentence."""

    up: bool
    reason: str
    message: str
    down_by: tuple[str, ...] = ()


@dataclass(frozen=True)
class VerdictChange:
    """A tunnel's combined verdict flipped."""

    name: str
    up: bool
    down_by: tuple[str, ...]
    message: str


class Verdicts:
    def __init__(self) -> None:
        self._said: dict[str, dict[str, bool]] = {}  # tunnel -> detector -> up
        self._dampening: dict[str, Dampening] = {}

    def is_up(self, name: str) -> bool:
        return not self.down_by(name)

    def down_by(self, name: str) -> tuple[str, ...]:
        said = self._said.get(name, {})
        down = [detector for detector, up in said.items() if not up]
        damp = self._dampening.get(name)
        if damp is not None and damp.suppressed:
            down.append(DAMPENING)
        return tuple(sorted(down))

    def names(self) -> set[str]:
        return set(self._said) | set(self._dampening)

    def dampening(self, name: str) -> Dampening | None:
        return self._dampening.get(name)

    def configure_dampening(self, settings: dict[str, DampeningSettings]) -> list[VerdictChange]:
        """Which tunnels have [tunnel.dampening] now; one that lost it is released at once."""
        changes = []
        for name in list(self._dampening):
            if name not in settings:
                before = self.down_by(name)
                del self._dampening[name]
                changes += self._compare(name, before, "dampening switched off")
        for name, wanted in settings.items():
            damp = self._dampening.get(name)
            if damp is None:
                self._dampening[name] = Dampening(wanted)
            else:
                damp.reconfigure(wanted)
        return changes

    def set(self, name: str, detector: str, up: bool, now: float, why: str) -> list[VerdictChange]:
        """A detector's verdict for a tunnel (the same one again is no change)."""
        said = self._said.setdefault(name, {})
        if said.get(detector) == up:
            return []
        before = self.down_by(name)
        raw_was_up = all(said.values())
        said[detector] = up
        damp = self._dampening.get(name)
        if damp is not None and raw_was_up and not all(said.values()) and damp.on_flap(now):
            why = f"{why}; flapping, held down (penalty {damp.penalty(now):.0f} > {damp.settings.suppress:.0f})"
        return self._compare(name, before, why)

    def forget(self, name: str, detectors: Iterable[str]) -> list[VerdictChange]:
        """These detectors no longer watch this tunnel (config changed): their verdicts go."""
        said = self._said.get(name)
        if said is None:
            return []
        before = self.down_by(name)
        for detector in detectors:
            said.pop(detector, None)
        if not said:
            del self._said[name]
        return self._compare(name, before, "detector removed")

    def tick(self, now: float) -> list[VerdictChange]:
        changes = []
        for name, damp in self._dampening.items():
            before = self.down_by(name)
            if damp.tick(now):
                changes += self._compare(name, before, f"dampening released (penalty {damp.penalty(now):.0f}"
                                                       f" < {damp.settings.reuse:.0f})")
        return changes

    def wake_at(self, now: float) -> float | None:
        times = [t for d in self._dampening.values() if (t := d.reuse_at(now)) is not None]
        return min(times) if times else None

    def _compare(self, name: str, before: tuple[str, ...], why: str) -> list[VerdictChange]:
        after = self.down_by(name)
        if bool(before) == bool(after):
            return []
        return [VerdictChange(name, not after, after, why)]
