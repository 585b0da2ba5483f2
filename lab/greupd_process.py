"""Run `greupd run` inside a lab host, as a user would: a TOML file, a process, `greupd status`/`reload`.

In the UML guest the daemon and the commands are children forked from the test's process (lab/forking.py):
a fresh interpreter there pays greupd's imports again, ~1.5 s of the machine's CPU per start. Everywhere
else, and whenever a `prefix` is set or `fork=False` is asked for, they are exec'd as a user would start them.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

from greupd.control import ControlUnavailable, request
from lab.forking import fork_greupd, run_greupd
from lab.hosts import Host
from lab.waiting import wait_until

REPO = Path(__file__).resolve().parent.parent


def forks_by_default() -> bool:
    """In the UML guest: there every exec of Python costs seconds, and greupd is imported here already.
    GREUPD_LAB_FORK=0 execs there too (to compare, or to rule the fork out), =1 forks on any kernel."""
    wanted = os.environ.get("GREUPD_LAB_FORK")
    return wanted == "1" if wanted in ("0", "1") else os.environ.get("GREUPD_LAB_GUEST") == "uml"


class GreupdProcess:
    """One daemon in one host, with its own config file and control socket under a temp dir."""

    def __init__(self, host: Host, config: str, name: str = "greupd", fork: bool | None = None) -> None:
        self.host = host
        self.dir = Path(tempfile.mkdtemp(prefix=f"greupd-{host.name}-", dir=_scratch()))
        self.config_path = self.dir / "tunnels.toml"
        self.socket = self.dir / "control.sock"
        self.log = self.dir / "greupd.log"
        self.config_path.write_text(config)
        self.proc: subprocess.Popen[bytes] | None = None
        self.prefix: tuple[str, ...] = ()  # a command to run the daemon under, e.g. setpriv dropping capabilities
        # Fork `greupd run` and the commands from this process instead of exec'ing Python (lab/forking.py);
        # a daemon with a prefix is always exec'd (the prefix is a program).
        self.fork = forks_by_default() if fork is None else fork

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "JOURNAL_STREAM", "WATCHDOG_USEC")}
        env.update(GREUPD_CONFIG=str(self.config_path), GREUPD_CONTROL_SOCKET=str(self.socket),
                   GREUPD_STATE_DIR=str(self.dir / "state"),
                   PYTHONPATH=str(REPO), GREUPD_LOG_LEVEL=os.environ.get("GREUPD_LOG_LEVEL", "INFO"))
        return env

    def cli(self, *argv: str, check: bool = False, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        if self.fork:
            return run_greupd(self.host, argv, self.env, timeout, check=check)
        return self.host.run(sys.executable, "-m", "greupd", *argv, check=check, timeout=timeout, env=self.env)

    def start(self, wait: bool = True, timeout: float = 60) -> Self:
        with self.log.open("ab") as out:
            if self.fork and not self.prefix:
                self.proc = fork_greupd(self.host, ["run"], self.env, out.fileno(), out.fileno())
            else:
                self.proc = self.host.popen(*self.prefix, sys.executable, "-m", "greupd", "run", stdout=out,
                                            stderr=subprocess.STDOUT, env=self.env)
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 60) -> dict[str, Any]:
        """Until the daemon answers and every enabled tunnel has left its initial state."""
        ready: list[dict[str, Any]] = []

        def answered_and_settled() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"greupd exited with {self.proc.returncode}:\n{self.output()}")
            status = self.status(check=False)
            if status is None or status["generation"] < 1:
                return False
            if any(t["state"] == "down" and t["reason"] == "config" for t in status["tunnels"]):
                return False
            ready.append(status)
            return True

        if not wait_until(answered_and_settled, timeout, interval=0.1):
            raise AssertionError(f"greupd not ready after {timeout}s:\n{self.output()}")
        return ready[-1]

    def status(self, check: bool = True) -> dict[str, Any] | None:
        # Straight to the control socket (a path, reachable from any netns): a CLI process per poll costs
        # seconds of imports in the UML guest. The CLI itself is tested separately.
        try:
            status = dict(request(self.socket, "status", timeout=30))
        except ControlUnavailable as exc:
            if check:
                raise AssertionError(f"greupd status failed: {exc}\n{self.output()}") from exc
            return None
        return status

    def tunnel(self, name: str) -> dict[str, Any]:
        status = self.status()
        assert status is not None
        return next(t for t in status["tunnels"] if t["name"] == name)

    def wait_for(self, name: str, state: str, timeout: float = 20) -> dict[str, Any]:
        seen: list[dict[str, Any]] = [{}]

        def in_state() -> bool:
            seen.append(self.tunnel(name))
            return bool(seen[-1]["state"] == state)

        if not wait_until(in_state, timeout, interval=0.05):
            raise AssertionError(f"tunnel {name} is {seen[-1].get('state')}, not {state}:\n{self.output()}")
        return seen[-1]

    def reload(self, config: str | None = None) -> subprocess.CompletedProcess[str]:
        """`greupd reload` as a user types it (exit status, stderr)."""
        if config is not None:
            self.config_path.write_text(config)
        result = self.cli("reload", timeout=120)
        if result.returncode not in (0, 1):
            raise AssertionError(f"greupd reload: {result.returncode} {result.stderr}\n{self.output()}")
        return result

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 30) -> int:
        assert self.proc is not None
        self.signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        assert self.proc is not None
        self.proc.wait(10)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def logged_at(self, pattern: str, after: float) -> float | None:
        """Wall-clock time of the first log line matching `pattern` stamped at or after `after` (1 ms of slack:
        greupd stamps its lines in milliseconds)."""
        for line in self.output().splitlines():
            stamp, _, rest = line.partition(" ")
            if re.search(pattern, rest):
                try:
                    when = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()
                except ValueError:
                    continue
                if when >= after - 0.001:
                    return when
        return None


def _scratch() -> str:
    # On the host file system (inside a guest /tmp may be a tmpfs that the host cannot read afterwards);
    # in a guest, its run dir. Except in vng: its run dir is on 9p, where no Unix socket can be created
    # (ENXIO), so there the guest's own /tmp (an overlay on tmpfs).
    if os.environ.get("GREUPD_LAB_GUEST") == "vng":
        return tempfile.mkdtemp(prefix="greupd-scratch-")
    rundir = os.environ.get("GREUPD_LAB_RUNDIR")
    path = Path(rundir) / "scratch" if rundir else REPO / ".lab" / "scratch"
    path.mkdir(parents=True, exist_ok=True)
    return str(path)
