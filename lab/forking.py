"""`greupd` (daemon or command) as a child forked from this process into a host's netns, not a new interpreter.

A fresh `python -m greupd` pays greupd's imports again: 3-8 s of the UML guest's clock and ~1.2-1.7 s of the
machine's CPU per start (lab/README.md), ~10-40 s in the qemu guest. A child forked from a process that has
imported them already enters the host's network namespace (setns) and runs `greupd.cli.main` at once. What the
child runs is the same code on the same argv and environment; only how the process begins differs.

The child behaves like an exec'd one where it matters: its own session (the Lab's killpg reaches it alone),
its stdout/stderr on the given fds, no other inherited fd (subprocess closes them for an exec; here a test's
socket must not live on in the daemon), its own environment, and it ends in os._exit: it never returns into
the parent's code (pytest).
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import gc
import io
import os
import select
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

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


class ForkedPopen(subprocess.Popen[bytes]):
    """The Popen of a forked child: pid, poll, wait, signals and returncode as for an exec'd one, so the Lab
    kills it on close and GreupdProcess treats it as the process it would have started. No pipes."""

    def __init__(self, pid: int, args: Sequence[str]) -> None:  # no super().__init__(): there is nothing to exec
        self.args = list(args)
        self.pid = pid
        self.returncode: Any = None
        self.stdin = self.stdout = self.stderr = None

    def poll(self) -> int | None:
        if self.returncode is None:
            with contextlib.suppress(ChildProcessError):
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
            time.sleep(0.02)
        return code

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def __del__(self) -> None:  # Popen's would queue it for reaping by pid; the Lab and its owner reap it
        pass

    def __repr__(self) -> str:
        return f"<ForkedPopen: pid {self.pid} args {self.args!r} returncode {self.returncode}>"


def fork_greupd(host: Host, argv: Sequence[str], env: Mapping[str, str], stdout: int, stderr: int) -> ForkedPopen:
    """Start `greupd ARGV` in host's netns, stdout and stderr on those fds; the Lab kills it on close."""
    sys.stdout.flush()  # else the child inherits (and might repeat) what is still buffered
    sys.stderr.flush()
    # The parent's objects, frozen: no collection in the child scans them (copying every page the parent
    # shares with it) or finalizes one of them (closing a socket of the parent's in the middle of greupd).
    gc.freeze()
    try:
        pid = os.fork()
    except BaseException:
        gc.unfreeze()
        raise
    if pid:
        gc.unfreeze()
        proc = ForkedPopen(pid, ["greupd", *argv])
        host.lab._procs.append(proc)
        return proc
    code = 1
    try:
        os.setsid()  # its own process group and session, as Host.popen gives an exec'd one
        _fresh_signal_handlers()
        enter_netns(host.netns)
        os.dup2(stdout, 1)
        os.dup2(stderr, 2)
        _release_inherited_fds()
        sys.stdout = io.TextIOWrapper(os.fdopen(1, "wb", closefd=False), line_buffering=True)
        sys.stderr = io.TextIOWrapper(os.fdopen(2, "wb", closefd=False), line_buffering=True)
        faulthandler.enable(sys.stderr)  # pytest's writes to an fd released above
        os.environ.clear()
        os.environ.update(env)
        from greupd.cli import main

        code = main(list(argv))
    except SystemExit as exc:  # as the interpreter ends on it
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def run_greupd(host: Host, argv: Sequence[str], env: Mapping[str, str], timeout: float,
               check: bool = False) -> subprocess.CompletedProcess[str]:
    """`greupd ARGV` in host's netns, as Host.run would run it: its exit status, stdout and stderr."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        proc = fork_greupd(host, argv, env, out_w, err_w)
    finally:
        os.close(out_w)
        os.close(err_w)
    chunks: dict[int, list[bytes]] = {out_r: [], err_r: []}
    open_fds = [out_r, err_r]
    deadline = time.monotonic() + timeout
    try:
        while open_fds:
            ready, _, _ = select.select(open_fds, [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
                raise subprocess.TimeoutExpired(["greupd", *argv], timeout)
            for fd in ready:
                data = os.read(fd, 65536)
                if data:
                    chunks[fd].append(data)
                else:
                    open_fds.remove(fd)
    finally:
        os.close(out_r)
        os.close(err_r)
    result = subprocess.CompletedProcess(["greupd", *argv], proc.wait(), b"".join(chunks[out_r]).decode(),
                                         b"".join(chunks[err_r]).decode())
    if check:
        result.check_returncode()
    return result


def _release_inherited_fds() -> None:
    """Every fd above stdio now points at /dev/null: the parent's sockets, pipes and files are released as an
    exec would release them (a test's closed socket must not live on in the daemon), yet no number is free
    for greupd to reuse, so an inherited object that closes "its" fd later cannot close one of greupd's."""
    null = os.open(os.devnull, os.O_RDWR)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd != null:
            with contextlib.suppress(OSError):  # the listing's own fd, gone by now
                os.dup2(null, fd, inheritable=False)
    os.close(null)


def _fresh_signal_handlers() -> None:
    """What a new interpreter starts with: a handler the parent (pytest, a test) installed does not survive an
    exec, so it goes back to the default (SIGINT to Python's own); ignored signals stay ignored, as over exec."""
    for sig in signal.valid_signals():
        with contextlib.suppress(OSError, ValueError):
            handler = signal.getsignal(sig)
            if callable(handler) and handler is not signal.default_int_handler:
                signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
