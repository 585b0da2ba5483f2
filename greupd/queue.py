"""The daemon's work queue: which tunnels to look at again, and when (controller-runtime's workqueue, small).

Every input only marks: a kernel event marks the tunnels it names (or everything, when it cannot tell), a
keepalive verdict marks its tunnel, an nftables event marks the table, SIGHUP and the control socket mark a
reload, a failed pass marks everything again after RETRY_AFTER, a tunnel the kernel refused something of is
marked again after a backoff (RETRY_BACKOFF), and everything is marked every RESYNC_EVERY. The loop then
takes one `Batch` and runs one pass over it. Backoff lives here, never in the reconciler: a tunnel that keeps
needing repair is being fought over by another program, and is paused instead of turning the fight into a busy
loop.

Pure: no loop, no clock of its own; `wake` is called when something was marked, and time is handed in. A
reload request may bring a future; the loop step that reloads resolves it with the answer (`settle`).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Generic, TypeVar

if TYPE_CHECKING:
    from greupd.config import Config

T = TypeVar("T")
R = TypeVar("R")  # what a reload answers

# A tunnel repaired more often than this is being fought over by another manager: back off instead of
# turning the fight into a busy loop.
FIGHT_REPAIRS: Final = 10
FIGHT_WINDOW: Final = 10.0
FIGHT_BACKOFF: Final = (1.0, 60.0)
# After a pass the kernel refused (a dump interrupted by a concurrent change, memory pressure), look at
# everything again this many seconds later.
RETRY_AFTER: Final = 1.0
# A tunnel whose actions the kernel refused (a foreign route holding its prefix, ENOMEM, ENOBUFS) is tried
# again after 1 s, then 2, 4, ... up to 60 s between tries, until a pass applies it (review M1): whatever
# held it may go away without an event we hear (another protocol's route is deleted).
RETRY_BACKOFF: Final = (1.0, 60.0)
# And, as a safety net for whatever no event and no refusal tells us about, a full pass this often.
RESYNC_EVERY: Final = 600.0
# Tunnels only a keepalive verdict marked, at most this many per pass (the rest in the next loop step): when a
# hub's uplink fails, thousands flip within a second, and one pass for all of them would hold the loop (probe
# timers, the watchdog) for as long as their route deletions take (#26). Their passes look at nothing (the
# kernel's memory), so splitting them costs no extra dump.
VERDICTS_PER_PASS: Final = 200


@dataclass(frozen=True)
class Batch:
    """What one pass is to do. names None: every tunnel; repairs: those the kernel told us about (not our own
    keepalive verdicts), which count towards a fight."""

    names: frozenset[str] | None
    repairs: frozenset[str] = frozenset()
    nft: bool = False
    # Marked for their keepalive verdict only (no kernel event, retry or other mark): what the last pass left
    # of them may be trusted (reconcile_pass's `trusted`).
    liveness_only: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return self.names is None or bool(self.names) or self.nft


@dataclass(frozen=True)
class Pause:
    """A tunnel the queue stopped repairing for `seconds`: mark it again then."""

    name: str
    seconds: float

    def __str__(self) -> str:
        return (f"tunnel {self.name}: repaired {FIGHT_REPAIRS} times in {FIGHT_WINDOW:.0f} s, another program "
                f"keeps changing it; next repair in {self.seconds:.0f} s")


@dataclass(frozen=True)
class Retry:
    """A tunnel the kernel refused something of: mark it again (`mark_retry`) in `seconds`."""

    name: str
    seconds: float

    def __str__(self) -> str:
        return f"tunnel {self.name}: the kernel refused an action; trying again in {self.seconds:.0f} s"


@dataclass
class _Fight:
    repairs: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=FIGHT_REPAIRS))
    backoff: float = 0.0
    paused_until: float = 0.0


class WorkQueue(Generic[R]):
    def __init__(self, wake: Callable[[], None] = lambda: None) -> None:
        self._wake = wake
        self._dirty: set[str] = set()
        self._liveness_dirty: set[str] = set()  # dirty because of a keepalive verdict, not the kernel
        self._retry_dirty: set[str] = set()  # dirty because a retry of refused actions is due
        self._marked: set[str] = set()  # dirty because of anything else (a kernel event, a pause over, ...)
        self._retries: dict[str, tuple[float, float]] = {}  # refused tunnel -> (backoff, when the retry is due)
        self._everything = False
        self._nft = False
        self._reload: list[asyncio.Future[R]] | None = None  # None: no reload asked for
        self._fights: dict[str, _Fight] = {}

    # --- marking ------------------------------------------------------------------------------------

    def mark(self, names: Iterable[str] | None) -> None:
        """Look at these tunnels again (None: at every tunnel)."""
        if names is None:
            self._everything = True
        else:
            self._dirty.update(names)
            self._marked.update(names)
        self._wake()

    def mark_liveness(self, name: str) -> None:
        """A keepalive verdict flipped: the routes follow it, which is no fight with anyone."""
        self._dirty.add(name)
        self._liveness_dirty.add(name)
        self._wake()

    def mark_retry(self, name: str) -> None:
        """A retry of refused actions is due: look again, which is no repair of anyone else's change."""
        self._dirty.add(name)
        self._retry_dirty.add(name)
        self._wake()

    def mark_everything(self) -> None:
        """Every tunnel and the table: the resync, and a loop step that failed half-way (its work may be lost)."""
        self.mark(None)
        self.mark_nft()

    def mark_nft(self) -> None:
        self._nft = True
        self._wake()

    def mark_reload(self, answer: asyncio.Future[R] | None = None) -> None:
        """Reload the config at the next step; `answer` gets the result (SIGHUP brings none)."""
        self._reload = self._reload or []
        if answer is not None:
            self._reload.append(answer)
        self._wake()

    # --- taking -------------------------------------------------------------------------------------

    def take_reload(self) -> list[asyncio.Future[R]] | None:
        """The futures waiting for a reload (maybe none), or None when no reload was asked for."""
        waiting, self._reload = self._reload, None
        return waiting

    def cancel_reloads(self) -> None:
        for answer in self.take_reload() or ():
            answer.cancel()

    def take_ready(self, now: float) -> Batch:
        """Everything marked and not paused; paused tunnels stay marked until their Pause is over."""
        nft, self._nft = self._nft, False
        if self._everything:
            self._everything = False
            self._dirty.clear()
            self._liveness_dirty.clear()
            self._retry_dirty.clear()
            self._marked.clear()
            return Batch(None, nft=nft)
        # A keepalive verdict is acted on even while the tunnel is paused for a fight (review L3): a dead peer's
        # routes must go within the detection time, not a minute later.
        ready = frozenset(n for n in self._dirty
                          if n in self._liveness_dirty or (f := self._fights.get(n)) is None or f.paused_until <= now)
        liveness_only = (ready & self._liveness_dirty) - self._retry_dirty - self._marked
        if len(liveness_only) > VERDICTS_PER_PASS:
            later = frozenset(sorted(liveness_only)[VERDICTS_PER_PASS:])  # still marked, for the next step
            ready, liveness_only = ready - later, liveness_only - later
            self._wake()
        self._dirty -= ready
        repairs = ready - self._liveness_dirty - self._retry_dirty
        self._liveness_dirty -= ready
        self._retry_dirty -= ready
        self._marked -= ready
        return Batch(ready, repairs, nft, liveness_only)

    # --- refusals -----------------------------------------------------------------------------------

    def note_refused(self, names: Iterable[str], now: float) -> list[Retry]:
        """The kernel refused actions of `names` at `now`: when to try each again (none if one is pending)."""
        retries: list[Retry] = []
        for name in names:
            backoff, due = self._retries.get(name, (0.0, 0.0))
            if due > now:
                continue  # a retry is already on its way; the refusal came from a pass something else asked for
            backoff = min(max(backoff * 2, RETRY_BACKOFF[0]), RETRY_BACKOFF[1])
            self._retries[name] = (backoff, now + backoff)
            retries.append(Retry(name, backoff))
        return retries

    def note_applied(self, names: Iterable[str]) -> None:
        """A pass covered `names` and the kernel refused nothing of theirs: the next refusal starts at 1 s."""
        for name in names:
            self._retries.pop(name, None)

    # --- fights -------------------------------------------------------------------------------------

    def note_repairs(self, names: Iterable[str], now: float) -> list[Pause]:
        """`names` were repaired (changed back) at `now`; pause those repaired too often, lately."""
        pauses: list[Pause] = []
        for name in names:
            fight = self._fights.setdefault(name, _Fight())
            fight.repairs.append(now)
            if len(fight.repairs) == FIGHT_REPAIRS and now - fight.repairs[0] < FIGHT_WINDOW:
                fight.backoff = min(max(fight.backoff * 2, FIGHT_BACKOFF[0]), FIGHT_BACKOFF[1])
                fight.paused_until = now + fight.backoff
                fight.repairs.clear()
                pauses.append(Pause(name, fight.backoff))
            elif now - fight.repairs[0] > 4 * FIGHT_WINDOW:
                fight.backoff = 0.0
        return pauses

    def after_pass(self, applied: Iterable[str], refused: Iterable[str], fought: Iterable[str],
                   now: float) -> list[Retry | Pause]:
        """What the queue makes of a pass: refused tunnels are tried again later (review M1), tunnels fought
        over wait; `due(wait)` once each one's seconds have passed."""
        self.note_applied(applied)
        return [*self.note_refused(refused, now), *self.note_repairs(fought, now)]

    def due(self, wait: Retry | Pause) -> None:
        if isinstance(wait, Retry):
            self.mark_retry(wait.name)
        else:
            self.mark({wait.name})

    def forget(self, keep: Iterable[str]) -> None:
        """Drop the fight history of tunnels no longer configured (a tunnel added back starts afresh)."""
        wanted = set(keep)
        for name in set(self._fights) - wanted:
            del self._fights[name]
        for name in set(self._retries) - wanted:
            del self._retries[name]


def reload_scope(old: Config, new: Config, in_error: Iterable[str]) -> tuple[frozenset[str], Config]:
    """The tunnels a reload looks at: the changed ones, and those in error (a reload is how an admin says "try
    again", review M1); and a config holding the tunnels of both, whose nftables table goes in first, so a route
    the new config adds meets its clamp and NAT, and one the old config had keeps them until it is gone (#11)."""
    before, after = {t.name: t for t in old.tunnels}, {t.name: t for t in new.tunnels}
    changed = frozenset(n for n in before.keys() | after.keys() if before.get(n) != after.get(n))
    both = dataclasses.replace(new, tunnels=(*new.tunnels, *(t for n, t in before.items() if n in changed)))
    return changed | (frozenset(in_error) & after.keys()), both


def settle(answers: Iterable[asyncio.Future[T]], work: Callable[[], T]) -> None:
    """Run `work` and give its result to every answer; if it raises, waiting answers get the exception (the
    control socket reports it, the daemon carries on), and with nobody waiting it propagates."""
    answers = [a for a in answers if not a.done()]
    try:
        result = work()
    except Exception as exc:
        if not answers:
            raise
        for answer in answers:
            answer.set_exception(exc)
    else:
        for answer in answers:
            answer.set_result(result)
