"""`python -m greupd.keepalive -c tunnels.toml`: the keepalive engine alone, each verdict printed as a JSON line.

A tool for labs and for checking a peer's keepalive interop without touching links, routes or nftables.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from greupd.config import Config, load_config
from greupd.keepalive.engine import KeepaliveEngine, LivenessChange, targets_from_config
from greupd.keepalive.pmtu import PathMtuResult


def _write_status(path: Path, engine: KeepaliveEngine) -> None:
    report = {
        "tunnels": {name: {"up": engine.is_up(name), **(engine.status(name) or {}),
                           "path_mtu": engine.path_mtu_status(name)} for name in engine.names()},
        "counters": dataclasses.asdict(engine.counters),
        "socket": engine.socket_status(),
    }
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(report))
    os.replace(temporary, path)


async def _run_alone(config: Config, status_file: Path | None, status_every: float) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def print_change(name: str, change: LivenessChange) -> None:
        line = {"tunnel": name, "up": change.up, "reason": change.reason, "message": change.message,
                "time": round(loop.time(), 3)}
        print(json.dumps(line), flush=True)

    def print_path_mtu(name: str, result: PathMtuResult) -> None:
        line = {"tunnel": name, "path_mtu": result.mtu, "state": result.state, "reason": result.reason,
                "time": round(loop.time(), 3)}
        print(json.dumps(line), flush=True)

    engine = KeepaliveEngine(print_change, on_path_mtu=print_path_mtu)
    engine.start(loop)
    engine.configure(targets_from_config(config))
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if status_file is not None:
        _write_status(status_file, engine)
    print(json.dumps({"started": engine.names()}), flush=True)
    try:
        while not stop.is_set():
            if status_file is not None:
                _write_status(status_file, engine)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), status_every)
    finally:
        if status_file is not None:
            _write_status(status_file, engine)
        engine.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m greupd.keepalive", description=(
        "Run only the keepalive engine for the tunnels of a config (no links, routes or nftables touched); "
        "print each up/down verdict as a JSON line."))
    parser.add_argument("-c", "--config", type=Path, required=True)
    parser.add_argument("--status-file", type=Path, help="rewrite this file with status and counters as JSON")
    parser.add_argument("--status-every", type=float, default=0.1, help="seconds between status writes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    asyncio.run(_run_alone(load_config(args.config), args.status_file, args.status_every))
    return 0


if __name__ == "__main__":
    sys.exit(main())
