"""`greupd run`, exactly as the CLI runs it, plus two things a benchmark needs from inside the process.

- BENCH_IMPORTED=<CLOCK_MONOTONIC> is sent on $NOTIFY_SOCKET once the interpreter is up and greupd.daemon is
  imported, so start-up splits into "Python + imports" and "config + first reconcile" (READY=1 comes from
  greupd itself). CLOCK_MONOTONIC is system-wide: the driver compares it with its own clock.
- A sampling profiler on demand ($BENCH_PROFILE_DIR set): PROFILE_START (SIGRTMIN+1) starts it, PROFILE_SAVE
  (SIGRTMIN+2) writes a summary to profile-<n>.txt there and sends BENCH_PROFILE_SAVED=<n>;
  $BENCH_PROFILE_FROM_START=1 starts it right after the imports. Why not cProfile: it reads the clock at
  every call and return, and in the UML guest a clock read is a syscall (no vDSO), so cProfile turns a
  10-second start into minutes and profiles itself.
  Sampling instead: ITIMER_PROF fires every SAMPLE_EVERY seconds of the process's own CPU time (user + sys)
  and the handler records the Python stack; a function's share of samples is its share of CPU.

    python -m bench.greupd_timed [greupd run options]
"""

from __future__ import annotations

import collections
import os
import signal
import socket
import sys
import time
from types import FrameType
from typing import cast

SAMPLE_EVERY = 0.002
# Real-time signals, not SIGUSR1/2: greupd's loop guard takes those (and logs them as stray) once it runs.
PROFILE_START = cast(signal.Signals, signal.SIGRTMIN + 1)  # not in the enum: a plain int
PROFILE_SAVE = cast(signal.Signals, signal.SIGRTMIN + 2)
TOP = int(os.environ.get("BENCH_PROFILE_TOP", "30"))


def _notify(message: str) -> None:
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect("\0" + path[1:] if path.startswith("@") else path)
        sock.send(message.encode())


def _where(frame: FrameType) -> str:
    code = frame.f_code
    path = code.co_filename
    for marker in ("site-packages/", "/lib/python3.11/", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{path}:{code.co_firstlineno}({code.co_name})"


class SamplingProfiler:
    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.own: collections.Counter[str] = collections.Counter()
        self.inclusive: collections.Counter[str] = collections.Counter()
        self.samples = 0
        self.started = 0.0
        self.cpu_started = 0.0
        self.count = 0

    def _sample(self, _signum: int, frame: FrameType | None) -> None:
        if frame is None:
            return
        self.samples += 1
        self.own[_where(frame)] += 1
        seen = set()
        while frame is not None:
            where = _where(frame)
            if where not in seen:
                seen.add(where)
                self.inclusive[where] += 1
            frame = frame.f_back

    def start(self, *_: object) -> None:
        self.own.clear()
        self.inclusive.clear()
        self.samples = 0
        self.started, self.cpu_started = time.monotonic(), time.process_time()
        signal.signal(signal.SIGPROF, self._sample)
        signal.setitimer(signal.ITIMER_PROF, SAMPLE_EVERY, SAMPLE_EVERY)

    def save(self, *_: object) -> None:
        signal.setitimer(signal.ITIMER_PROF, 0, 0)
        wall, cpu = time.monotonic() - self.started, time.process_time() - self.cpu_started
        total = max(self.samples, 1)
        lines = [f"{self.samples} samples, one per {SAMPLE_EVERY * 1000:.0f} ms of CPU; "
                 f"{cpu:.2f} s CPU in {wall:.2f} s wall",
                 "inclusive % (the function or anything it called):"]
        lines += [f"{100 * n / total:6.1f}  {where}" for where, n in self.inclusive.most_common(TOP)]
        lines.append("own % (the function itself, at the top of the stack):")
        lines += [f"{100 * n / total:6.1f}  {where}" for where, n in self.own.most_common(TOP)]
        self.count += 1
        with open(os.path.join(self.directory, f"profile-{self.count}.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
        _notify(f"BENCH_PROFILE_SAVED={self.count}")


def main() -> int:
    import greupd.daemon  # noqa: F401  (what `greupd run` imports before it reads the config)

    _notify(f"BENCH_IMPORTED={time.monotonic():.6f}")
    from greupd.cli import main as greupd_main

    directory = os.environ.get("BENCH_PROFILE_DIR")
    if directory:
        profiler = SamplingProfiler(directory)
        signal.signal(PROFILE_START, profiler.start)
        signal.signal(PROFILE_SAVE, profiler.save)
        if os.environ.get("BENCH_PROFILE_FROM_START") == "1":
            profiler.start()
    return greupd_main(["run", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
