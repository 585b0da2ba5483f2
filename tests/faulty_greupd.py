"""`python -m tests.faulty_greupd run`: the real greupd, with faults injected on request, for the tests of the
daemon's own robustness (issue #21 I4). Everything else is the daemon as shipped: its process, sockets, kernel.

$GREUPD_FAULTS names a file; each line in it is one fault, used up when it fires:
- `step`: the next loop step raises RuntimeError before doing anything (a bug anywhere in a pass);
- `load`: the next config load raises PermissionError (an unreadable drop-in directory, say);
- `apply`: the next reload raises RuntimeError half-way through applying the new config (after it validated and
  the tunnels' part began: where the keepalive targets are made).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import greupd.daemon
import greupd.liveness.room
from greupd.cli import main
from greupd.config import Config
from greupd.keepalive.engine import KeepaliveTarget


def _take(fault: str) -> bool:
    path = Path(os.environ["GREUPD_FAULTS"])
    lines = path.read_text().splitlines() if path.exists() else []
    if fault not in lines:
        return False
    lines.remove(fault)
    path.write_text("".join(f"{line}\n" for line in lines))
    return True


_daemon_module = vars(greupd.daemon)  # the names daemon.py imported, which is where it looks them up
_step = greupd.daemon.Daemon._step
_load: Callable[[Path], Config] = _daemon_module["load_config"]
_room_module = vars(greupd.liveness.room)  # where a reload makes the keepalive targets (the daemon asks the room)
_targets: Callable[[Config], list[KeepaliveTarget]] = _room_module["keepalive_targets"]


def faulty_step(self: greupd.daemon.Daemon) -> None:
    if _take("step"):
        raise RuntimeError("injected fault in a loop step")
    _step(self)


def faulty_targets(config: Config) -> list[KeepaliveTarget]:
    if _take("apply"):
        raise RuntimeError("injected fault while applying a reload")
    return _targets(config)


def faulty_load(path: Path) -> Config:
    if _take("load"):
        raise PermissionError(13, "Permission denied (injected)", str(path))
    return _load(path)


greupd.daemon.Daemon._step = faulty_step  # type: ignore[method-assign]
_room_module["keepalive_targets"] = faulty_targets
_daemon_module["load_config"] = faulty_load

if __name__ == "__main__":
    sys.exit(main())
