"""What keeps the daemon's loop alive when something inside it fails (issue #21 I4, review L1, newcomer-3 Low 17).

- `StepGuard` runs each loop step: an exception that is not a deliberate stop is logged with its traceback,
  reported (the daemon's `last_error`), and the loop goes on. Steps that keep failing are spaced out (1/10 s,
  doubling up to MAX_BACKOFF), so a bug that fails at every step is a line every few seconds, not a busy loop.
- `LoopErrors` is the asyncio loop's exception handler, for what fails outside a step (a callback, a task): the
  same report. The accept loop's "out of system resource" (EMFILE: every file descriptor in use) is said once a
  minute with a count, not as one traceback per try (newcomer-3 Medium 5 saw 27,000 of them).
- `guard_loop` installs both, and the signal handlers: SIGUSR1 and SIGUSR2 end a Python process by default;
  greupd has no use for them, so it logs and carries on. SIGPIPE is ignored (Python's start-up already does).
- `run_steps` is the loop itself.

`Backoff` is the pure part: consecutive failures in, seconds to wait out.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
from collections.abc import Callable
from typing import Any, Final

log = logging.getLogger("greupd")

FIRST_BACKOFF: Final = 0.1
MAX_BACKOFF: Final = 10.0
# An accept that fails for want of file descriptors is retried by asyncio every second: say so this often.
ACCEPT_ERROR_EVERY: Final = 60.0
_RESOURCE_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class Backoff:
    """Seconds to wait after the n-th failure in a row: FIRST_BACKOFF, doubling, at most MAX_BACKOFF."""

    def __init__(self, first: float = FIRST_BACKOFF, most: float = MAX_BACKOFF) -> None:
        self._first, self._most = first, most
        self.failures = 0

    def failed(self) -> float:
        self.failures += 1
        return min(self._first * 2.0 ** (self.failures - 1), self._most)

    def succeeded(self) -> None:
        self.failures = 0


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class StepGuard:
    """Runs the loop's steps; after a failed one, `quiet()` is true until the backoff is over, and `wake` is called
    then. `on_error` gets one line per failure; `again` marks all work afresh (a failed step may have taken work
    off the queue without doing it)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, wake: Callable[[], None], on_error: Callable[[str], None],
                 again: Callable[[], None]) -> None:
        self._loop, self._wake, self._on_error, self._again = loop, wake, on_error, again
        self._backoff = Backoff()
        self._quiet_until = 0.0

    def quiet(self) -> bool:
        return self._loop.time() < self._quiet_until

    def step(self, work: Callable[[], None]) -> None:
        try:
            work()
        except Exception as exc:
            delay = self._backoff.failed()
            log.error("internal error in the daemon's loop step", exc_info=True)
            self._on_error(f"internal error, the daemon carries on (next step in {delay:g} s): {describe(exc)}")
            self._quiet_until = self._loop.time() + delay
            self._loop.call_at(self._quiet_until, self._wake)
            self._again()
        else:
            self._backoff.succeeded()


class LoopErrors:
    """The asyncio exception handler: report once, keep going."""

    def __init__(self, on_error: Callable[[str], None]) -> None:
        self._on_error = on_error
        self._accept_said_at: float | None = None
        self._accept_unsaid = 0

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.set_exception_handler(self.handle)

    def handle(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        message = str(context.get("message") or "error in the event loop")
        if isinstance(exc, OSError) and exc.errno in _RESOURCE_ERRNOS and "accept" in message:
            self._accept_failed(loop.time(), exc)
            return
        log.error("%s", message, exc_info=exc if isinstance(exc, BaseException) else None)
        self._on_error(f"internal error, the daemon carries on: {message}"
                       + (f": {describe(exc)}" if isinstance(exc, BaseException) else ""))

    def _accept_failed(self, now: float, exc: OSError) -> None:
        if self._accept_said_at is not None and now - self._accept_said_at < ACCEPT_ERROR_EVERY:
            self._accept_unsaid += 1
            return
        more = f" ({self._accept_unsaid} more since the last report)" if self._accept_unsaid else ""
        self._accept_said_at, self._accept_unsaid = now, 0
        self._on_error(f"cannot accept connections: {exc.strerror or exc} (errno {exc.errno}); new connections wait "
                       f"until descriptors are free{more}; said at most once a minute")


def guard_loop(loop: asyncio.AbstractEventLoop, on_error: Callable[[str], None], reload: Callable[[], None],
               stop: Callable[[], None]) -> None:
    """The daemon's signals and exception handler: SIGHUP reloads, SIGTERM and SIGINT stop; SIGUSR1 and SIGUSR2
    (which end a Python process by default) are logged and ignored, and so is SIGPIPE (newcomer-3 Low 17)."""
    LoopErrors(on_error).install(loop)
    for sig, handler in ((signal.SIGHUP, reload), (signal.SIGTERM, stop), (signal.SIGINT, stop)):
        loop.add_signal_handler(sig, handler)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        loop.add_signal_handler(sig, log.warning, "%s received: greupd has no use for it, ignored (SIGHUP or "
                                "`greupd reload` reload the config, `greupd status` shows the state)", sig.name)


async def run_steps(loop: asyncio.AbstractEventLoop, wake: asyncio.Event, stop: asyncio.Event,
                    step: Callable[[], None], on_error: Callable[[str], None], again: Callable[[], None]) -> None:
    """The daemon's loop: a step each time `wake` is set, until `stop` is; a failed step does not end it (I4)."""
    guard = StepGuard(loop, wake.set, on_error, again)
    while True:
        await wake.wait()
        wake.clear()
        if stop.is_set():
            return
        if not guard.quiet():  # after a failed step, marks wait until the backoff is over and wakes us
            guard.step(step)
        # Let timers and readers run before a step that was asked for during this one (a hub's verdicts come in
        # passes of queue.VERDICTS_PER_PASS: the probes and the watchdog go on between them, #26).
        await asyncio.sleep(0)
