"""Code run inside a lab host's netns by forking this process, not by starting a new interpreter.

In the qemu guest (emulated CPU) a fresh Python process pays its imports again: ~10-40 s for greupd's
daemon (lab/README.md). A child forked from a process that has imported them already enters the host's
network namespace (setns) and runs at once. Used by the nftables traffic tests and by `make demo`, which
runs both routers' daemons and every `greupd` command this way.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lab.greupd_process import GreupdProcess
from lab.hosts import Host

CLONE_NEWNET = 0x40000000


def enter_netns(netns: str) -> None:
    """Move this (single-threaded) process into the named netns, as `ip netns exec` does."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {netns}")
    finally:
        os.close(fd)


@dataclass
class Child:
    """A forked child that runs one function in a host's netns; it reports "ready", then a JSON result."""

    pid: int
    reader: int
    timeout: float

    def _line(self, timeout: float) -> str:
        line = b""
        deadline = time.monotonic() + timeout
        while not line.endswith(b"\n"):
            ready, _, _ = select.select([self.reader], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError("the child in the netns did not answer")
            chunk = os.read(self.reader, 1)
            if not chunk:
                break
            line += chunk
        return line.decode()

    def wait_ready(self) -> None:
        line = self._line(self.timeout)
        assert line == "ready\n", f"child failed before ready: {line}"

    def result(self) -> dict[str, object]:
        line = self._line(self.timeout * 2)
        os.waitpid(self.pid, 0)
        os.close(self.reader)
        outcome: dict[str, object] = json.loads(line) if line else {"error": "child died"}
        assert "error" not in outcome, outcome.get("error")
        return outcome


def spawn(host: Host, body: Callable[[Callable[[], None]], dict[str, object]], timeout: float = 30.0) -> Child:
    """Run body(ready) in a child in host's netns; body calls ready() once it listens, returns a JSON-able dict."""
    reader, writer = os.pipe()
    sys.stdout.flush()
    pid = os.fork()
    if pid:
        os.close(writer)
        return Child(pid, reader, timeout)
    status = 1
    result: dict[str, object] = {"error": "not run"}
    try:
        os.close(reader)
        enter_netns(host.netns)

        def ready() -> None:
            os.write(writer, b"ready\n")

        result = body(ready)
        status = 0
    except BaseException:
        result = {"error": traceback.format_exc()}
    finally:
        # Whatever happens, the child ends here: it must never return into the parent's code.
        with contextlib.suppress(BaseException):
            os.write(writer, (json.dumps(result) + "\n").encode())
        os._exit(status)


def in_netns(host: Host, body: Callable[[], dict[str, object]], timeout: float = 30.0) -> dict[str, object]:
    return spawn(host, lambda ready: body(), timeout).result()


class ForkedGreupd(GreupdProcess):
    """`greupd run` and the `greupd` commands, as forked children of this process (imports paid once).

    Same files, socket and log as GreupdProcess; the output of `cli(...)` is what the command prints.
    """

    def __init__(self, host: Host, config: str, name: str = "greupd") -> None:
        super().__init__(host, config, name)
        # Not beside the config: in the qemu guest that folder is 9p, where a unix socket cannot be bound.
        self.socket = Path(tempfile.mkdtemp(prefix=f"greupd-{host.name}-")) / "control.sock"
        self.pid: int | None = None

    def _child(self, argv: Sequence[str], stdout: int, stderr: int) -> int:
        sys.stdout.flush()  # else the child inherits (and might repeat) what is still buffered
        sys.stderr.flush()
        pid = os.fork()
        if pid:
            return pid
        code = 1
        try:
            os.setsid()  # its own process group, so signal() reaches it alone
            enter_netns(self.host.netns)
            os.dup2(stdout, 1)
            os.dup2(stderr, 2)
            sys.stdout = io.TextIOWrapper(os.fdopen(1, "wb", closefd=False), line_buffering=True)
            sys.stderr = io.TextIOWrapper(os.fdopen(2, "wb", closefd=False), line_buffering=True)
            env = self.env  # before the clear: the property reads os.environ (PATH, for the commands it runs)
            os.environ.clear()
            os.environ.update(env)
            from greupd.cli import main

            code = main(list(argv))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            with contextlib.suppress(BaseException):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)

    def start(self, wait: bool = True, timeout: float = 60) -> ForkedGreupd:
        with self.log.open("ab") as log:
            self.pid = self._child(["run"], log.fileno(), log.fileno())
        if wait:
            self.wait_ready(timeout)
        return self

    def cli(self, *argv: str, check: bool = False, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        pid = self._child(argv, out_w, err_w)
        os.close(out_w)
        os.close(err_w)
        chunks: dict[int, list[bytes]] = {out_r: [], err_r: []}
        open_fds = [out_r, err_r]
        deadline = time.monotonic() + timeout
        while open_fds:
            ready, _, _ = select.select(open_fds, [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                raise TimeoutError(f"greupd {' '.join(argv)} did not finish in {timeout} s")
            for fd in ready:
                data = os.read(fd, 65536)
                if data:
                    chunks[fd].append(data)
                else:
                    open_fds.remove(fd)
                    os.close(fd)
        _, wait_status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(wait_status)
        result = subprocess.CompletedProcess(["greupd", *argv], code, b"".join(chunks[out_r]).decode(),
                                             b"".join(chunks[err_r]).decode())
        if check:
            result.check_returncode()
        return result

    def signal(self, sig: signal.Signals) -> None:
        assert self.pid is not None
        os.killpg(self.pid, sig)

    def _wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while True:
            assert self.pid is not None
            pid, wait_status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(wait_status)
            if time.monotonic() > deadline:
                raise TimeoutError(f"greupd in {self.host.name} did not exit within {timeout} s")
            time.sleep(0.05)

    def stop(self, timeout: float = 30) -> int:
        self.signal(signal.SIGTERM)
        return self._wait(timeout)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self._wait(10)
