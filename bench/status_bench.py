"""`greupd status --json` and GET /metrics with N tunnels natively (issue #26), and how long they hold the loop.

    python -m bench.status_bench [--tunnels N] [--trials T]

The daemon's side as the daemon wires it (greupd/report.py's records of N tunnels with keepalives, served by
greupd/control.py's ControlServer and greupd/metrics.py's publisher and listener on one asyncio loop, in a
thread of this process), asked from outside: `greupd status --json` as a process (spawn to exit, its Python
start included, beside `python -c pass`), `greupd metrics` and GET /metrics (curl) with a fresh rendering each
(MIN_GAP 0). *Loop stall*: the longest the loop went without running a 1 ms ticker while answering.
*Before*: the same answers made in one go as they were up to this round (the whole status built and
json.dumps'ed at once; prometheus_client's rendering, tests/prometheus_oracle.py), timed alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench import scenario

REPO = Path(__file__).resolve().parent.parent
Json = dict[str, Any]


class Hub:
    """Daemon.status's shape over N tunnels: records as a converged pass leaves them, keepalive counters."""

    def __init__(self, count: int) -> None:
        from greupd.config import load_config_text
        from greupd.report import Reports

        self.config = load_config_text(scenario.greupd_toml(count, keepalive=(1.0, 3, 1)))
        self.reports = Reports()
        for index, tunnel in enumerate(self.config.tunnels):
            record = self.reports._record(tunnel.name)  # a converged pass, without a kernel
            record.state, record.reported, record.ifindex = "up", True, 100 + index

    def keepalive(self, name: str) -> Any:
        return {"interval": 1.0, "retries": 3, "sent": 86400 + len(name), "received": 86399, "missed_in_a_row": 0,
                "last_rtt_ms": 0.042}

    def status(self, of: slice = slice(None)) -> Any:
        return {"config": "/etc/greupd/tunnels.toml", "generation": 1, "last_error": None, "pid": os.getpid(),
                "netlink_requests": 6055, "tunnels": self.reports.statuses(self.config, self.keepalive, of),
                "warnings": [], "keepalive_socket": {"filter": "protocol", "remotes": 1, "drops": 0}}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def measure(count: int, trials: int, freeze: bool = False) -> Json:
    from greupd.config import DaemonConfig
    from greupd.control import ControlServer
    from greupd.metrics import MetricsPublisher

    hub = Hub(count)
    directory = Path(tempfile.mkdtemp(prefix="bench-status-"))
    sock = directory / "control.sock"
    port = _free_port()
    settings = DaemonConfig(metrics_listen=f"127.0.0.1:{port}")
    loop = asyncio.new_event_loop()
    stalls: list[float] = []
    ready, stop = threading.Event(), asyncio.Event()

    async def serve() -> None:
        publisher = MetricsPublisher(hub.status, lambda: settings, None, print, min_gap=0.0)
        server = ControlServer(sock, hub.status, _no_reload, metrics=publisher.scrape)
        await server.start()
        publisher.publish()  # binds metrics_listen, starts the task
        if freeze:  # what a daemon could do once started: its long-lived objects out of the collector's way
            import gc

            gc.freeze()
        last = time.perf_counter()
        ready.set()
        while not stop.is_set():  # the ticker: how long the loop goes without running it
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            stalls.append(now - last)
            last = now
        await server.close()

    # The clients are processes (curl, greupd): in this process they would hold the GIL the loop needs.
    thread = threading.Thread(target=lambda: loop.run_until_complete(serve()), daemon=True)
    thread.start()
    ready.wait(30)
    time.sleep(0.5)
    env = {**os.environ, "GREUPD_CONTROL_SOCKET": str(sock), "PYTHONPATH": str(REPO)}
    cases: dict[str, list[float]] = {"python_bare": [], "status_json_cli": [], "metrics_http": [],
                                     "metrics_cli": []}
    worst: dict[str, float] = {case: 0.0 for case in cases}

    def timed(case: str, run: Any) -> None:
        del stalls[:]
        start = time.perf_counter()
        run()
        cases[case].append(time.perf_counter() - start)
        worst[case] = max(worst[case], max(stalls, default=0.0))

    def cli(*argv: str) -> None:
        subprocess.run([sys.executable, "-m", "greupd", *argv], env=env, check=True, stdout=subprocess.DEVNULL)

    for _ in range(trials):
        timed("python_bare", lambda: subprocess.run([sys.executable, "-c", "pass"], check=True))
        timed("status_json_cli", lambda: cli("status", "--json"))
        timed("metrics_http", lambda: subprocess.run(["curl", "-sf", "-o", "/dev/null",
                                                      f"http://127.0.0.1:{port}/metrics"], check=True))
        timed("metrics_cli", lambda: cli("metrics"))
    status_size = len(subprocess.run([sys.executable, "-m", "greupd", "status", "--json"], env=env, check=True,
                                     capture_output=True).stdout)
    metrics_size = len(subprocess.run(["curl", "-sf", f"http://127.0.0.1:{port}/metrics"], check=True,
                                      capture_output=True).stdout)
    loop.call_soon_threadsafe(stop.set)
    thread.join(30)
    return {"tunnels": count, **cases, "loop_stall_max": worst, "status_bytes": status_size,
            "metrics_bytes": metrics_size, "before": before(hub, max(1, trials // 2)),
            "load_average": Path("/proc/loadavg").read_text().split()[:3]}


async def _no_reload() -> Any:
    return {"ok": False, "generation": 1, "error": "no reloads in this benchmark"}


def before(hub: Hub, trials: int) -> Json:
    """The old answers' one block on the loop: the whole status and json.dumps; prometheus_client's text."""
    from greupd.metrics import ReloadOutcome
    from tests.prometheus_oracle import render_by_prometheus_client

    status, metrics = [], []
    for _ in range(trials):
        start = time.perf_counter()
        whole = hub.status()
        json.dumps({"ok": True, "result": whole})
        status.append(time.perf_counter() - start)
        start = time.perf_counter()
        render_by_prometheus_client(hub.status(), ReloadOutcome(True, 0.0))
        metrics.append(time.perf_counter() - start)
    return {"status_whole": status, "metrics_prometheus_client": metrics}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.status_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tunnels", type=int, default=10000)
    p.add_argument("--trials", type=int, default=7)
    p.add_argument("--gc-freeze", action="store_true", help="gc.freeze() once serving (an experiment: stalls)")
    a = p.parse_args(argv)
    result = measure(a.tunnels, a.trials, a.gc_freeze)
    print(json.dumps(result))
    medians = {k: f"{1e3 * statistics.median(v):.0f} ms" for k, v in result.items() if isinstance(v, list) and v
               and isinstance(v[0], float)}
    print(f"status/metrics, {a.tunnels} tunnels: {medians}; loop stall max (ms): "
          f"{ {k: round(1e3 * v, 1) for k, v in result['loop_stall_max'].items()} }; before: "
          f"{ {k: round(1e3 * statistics.median(v)) for k, v in result['before'].items()} }", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
