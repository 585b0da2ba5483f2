"""Code run inside a lab host's netns by forking this process, not by starting a new interpreter.

In the qemu guest (emulated CPU) a fresh Python process pays its imports again: ~10-40 s for greupd's
daemon (lab/README.md). A child forked from a process that has imported them already enters the host's
network namespace (setns) and runs at once. Used by the nftables traffic tests and by `make demo`, which
runs both routers' daemons and every `greupd` command this way.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lab.forking import enter_netns
from lab.greupd_process import GreupdProcess
from lab.hosts import Host


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
    """`greupd run` and the `greupd` commands, as forked children of this process (imports paid once), in any
    guest. Same files and log as GreupdProcess; the output of `cli(...)` is what the command prints.
    """

    def __init__(self, host: Host, config: str, name: str = "greupd") -> None:
        super().__init__(host, config, name, fork=True)
        # Not beside the config: in the qemu guest that folder is 9p, where a unix socket cannot be bound.
        self.socket = Path(tempfile.mkdtemp(prefix=f"greupd-{host.name}-")) / "control.sock"
