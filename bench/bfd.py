"""BFD's cost and detection time (#22), greupd's BFD engine against FRR's bfdd, both real, in two netns hosts:

    python -m bench.bfd cpu [--sessions 1000] [--interval-ms 300] [--multiplier 3] [--window 30] [--out F]
    python -m bench.bfd detect [--runs 20] [--interval-ms 300] [--multiplier 3] [--out F]

Run as root on the host's kernel (natively), or in the UML guest through the lab:

    .venv/bin/python -m lab run --guest uml -- .venv/bin/python -m bench.bfd cpu --out bench/results/bfd-cpu-uml.json

A runs `python -m bench.bfd side`: greupd's BfdEngine (greupd/liveness/bfd_engine.py), as the daemon runs it,
with one session per address pair and no daemon around it. The two hosts share one veth link; BFD is UDP between
addresses, so no GRE is needed (the engine's sockets and timers are what costs; a tunnel adds the kernel's
encapsulation only), and each side routes the other's /16 of session addresses via one gateway (one neighbour
entry, however many sessions).

- cpu: B is another greupd engine: FRR's bfdd, given a config of 1000 `peer`s, had made 576 sessions after
  2.5 minutes natively, each slower than the one before, and sent nothing meanwhile. All sessions up, then the
  CPU time (user + sys) of A's and B's engine processes over a window, as % of one core, with the sessions
  that went down meanwhile (0 expected) and the packets A sent and received.
- detect: B runs zebra and bfdd from FRR with one `peer`; one session, `runs` times each: bfdd is killed
  (SIGKILL: silence, no AdminDown) and the time until greupd's engine says down is taken; then A's engine is
  killed and the time until bfdd logs the session down is taken (FRR's log, millisecond stamps). Median and
  p99 of both, in the same guest with the same timers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

A_BASE, B_BASE = ipaddress.IPv4Address("10.64.0.0"), ipaddress.IPv4Address("10.65.0.0")
A_LINK, B_LINK = "172.30.0.1", "172.30.0.2"
REPO = Path(__file__).resolve().parent.parent


def pairs(count: int) -> list[tuple[str, str]]:
    return [(str(A_BASE + i + 1), str(B_BASE + i + 1)) for i in range(count)]


# --- A: greupd's engine ------------------------------------------------------------------------------


def side(count: int, interval_ms: int, multiplier: int, status_file: Path, role: str = "a") -> int:
    """Run the engine with `count` sessions until killed; events on stdout, a status file every second."""
    from greupd.liveness.bfd_codec import State
    from greupd.liveness.bfd_engine import BfdEngine, BfdTarget
    from greupd.liveness.bfd_session import BfdChange, Timers

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * count + 256)), hard))
    went_down = 0

    def changed(name: str, change: BfdChange) -> None:
        nonlocal went_down
        went_down += not change.up and change.previous == State.UP
        print(json.dumps({"t": time.time(), "name": name, "state": change.state.label, "up": change.up}), flush=True)

    if os.environ.get("BENCH_BFD_GC") == "off":  # a diagnostic: is the loop's lateness the collector's?
        import gc
        gc.disable()
    timers = Timers(interval_ms / 1000, interval_ms / 1000, multiplier)
    targets = [BfdTarget(f"s{i}", ipaddress.ip_address(a if role == "a" else b),
                         ipaddress.ip_address(b if role == "a" else a), timers)
               for i, (a, b) in enumerate(pairs(count))]

    async def run() -> None:
        loop = asyncio.get_running_loop()
        engine = BfdEngine(changed)
        engine.start(loop)
        engine.configure(targets)
        lag = [0.0]  # the loop's worst lateness since the last report: a stalled process takes every session down

        async def watch() -> None:
            while True:
                before = loop.time()
                await asyncio.sleep(0.05)
                lag[0] = max(lag[0], loop.time() - before - 0.05)

        watcher = asyncio.create_task(watch())
        profile_to = os.environ.get("BENCH_BFD_PROFILE")  # a diagnostic: where A's CPU goes, 20 s after the start
        if profile_to and role == "a":
            import cProfile
            profiler = cProfile.Profile()

            def dump() -> None:
                profiler.disable()
                profiler.dump_stats(profile_to)

            loop.call_later(8, profiler.enable)
            loop.call_later(20, dump)
        worst = 0.0
        while not watcher.done():
            statuses = [engine.status(t.name) for t in targets]
            worst = max(worst, lag[0])
            report = {"up": sum(s is not None and s["state"] == "up" for s in statuses),
                      "sent": sum(s["sent"] for s in statuses if s is not None),
                      "received": sum(s["received"] for s in statuses if s is not None), "went_down": went_down,
                      "lag_ms": round(lag[0] * 1000, 1), "worst_lag_ms": round(worst * 1000, 1)}
            print(json.dumps({"t": time.time(), "lag_ms": report["lag_ms"]}), flush=True)
            lag[0] = 0.0
            status_file.write_text(json.dumps(report))
            await asyncio.sleep(1.0)

    asyncio.run(run())
    return 0


# --- the lab -----------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


class Side:
    """`python -m bench.bfd side` in a host: greupd's engine with `count` sessions."""

    def __init__(self, host: Any, directory: Path, role: str, count: int, interval_ms: int, multiplier: int) -> None:
        self.host, self.role = host, role
        self.argv = [sys.executable, "-m", "bench.bfd", "side", "--role", role, "--sessions", str(count),
                     "--interval-ms", str(interval_ms), "--multiplier", str(multiplier)]
        self.status_file = directory / f"side-{role}.json"
        self.events = directory / f"side-{role}.events"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.status_file.unlink(missing_ok=True)
        with self.events.open("ab") as out:
            self.proc = self.host.popen(*self.argv, "--status", str(self.status_file), stdout=out, cwd=REPO,
                                        env={**os.environ, "PYTHONPATH": str(REPO)})

    def kill(self) -> float:
        assert self.proc is not None
        killed = time.time()
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        return killed

    def status(self) -> dict[str, Any]:
        try:
            status: dict[str, Any] = json.loads(self.status_file.read_text())
        except (OSError, ValueError):
            return {}
        return status

    def lags(self, start: float, end: float) -> list[float]:
        """The loop's worst lateness in each second between start and end (wall clock), in ms."""
        return [e["lag_ms"] for e in map(json.loads, self.events.read_text().splitlines())
                if "lag_ms" in e and start <= e["t"] <= end]

    def downs(self, after: float) -> list[float]:
        return [e["t"] for e in map(json.loads, self.events.read_text().splitlines())
                if "up" in e and not e["up"] and e["t"] >= after]


class Bench:
    """Hosts a and b on one link; greupd's engine in a; in b FRR's bfdd (with_frr) or another engine."""

    def __init__(self, count: int, interval_ms: int, multiplier: int, with_frr: bool) -> None:
        import tempfile

        from lab.bfd_peers import FrrBfd
        from lab.hosts import Lab

        self.lab = Lab("bfd").__enter__()
        self.a, self.b = self.lab.bare_hosts("a", "b")
        self.lab.link(self.a, self.b, f"{A_LINK}/24", f"{B_LINK}/24",
                      then1=["link set lo up", f"route add {B_BASE}/16 via {B_LINK}"],
                      then2=["link set lo up", f"route add {A_BASE}/16 via {A_LINK}"])
        # Each side's session addresses on its loopback: the other reaches them via the link's gateway.
        self.a.ip_batch(*(f"addr add {a}/32 dev lo" for a, _ in pairs(count)))
        self.b.ip_batch(*(f"addr add {b}/32 dev lo" for _, b in pairs(count)))
        self.frr: FrrBfd | None = None
        self.b_side: Side | None = None
        if with_frr:
            frr = FrrBfd(self.b, peer=str(A_BASE + 1), local=str(B_BASE + 1), interface="eth0")
            peers = "".join(f" peer {a} local-address {b}\n  receive-interval {interval_ms}\n"
                            f"  transmit-interval {interval_ms}\n  detect-multiplier {multiplier}\n !\n"
                            for a, b in pairs(count))
            frr.config.write_text("frr defaults traditional\n"
                                  f"log file {frr.dir}/frr.log debugging\nlog timestamp precision 3\n"
                                  f"debug bfd peer\nbfd\n{peers}!\n")
            self.frr = frr.start()
            directory = frr.dir
        else:
            directory = Path(tempfile.mkdtemp(prefix="bench-bfd-"))
            self.b_side = Side(self.b, directory, "b", count, interval_ms, multiplier)
        self.a_side = Side(self.a, directory, "a", count, interval_ms, multiplier)

    def wait(self, check: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise SystemExit(f"bench.bfd: {what} not after {timeout}s; a: {self.a_side.status()}")
            time.sleep(0.05)

    def frr_up(self) -> bool:
        assert self.frr is not None
        return (self.frr.session() or {}).get("status") == "up"

    def frr_downs(self, after: float) -> list[float]:
        """bfdd's log: when its session went down (control-expired), local time with milliseconds."""
        assert self.frr is not None
        found = []
        for line in (self.frr.dir / "frr.log").read_text(errors="replace").splitlines():
            if "state-change" in line and "up -> down" in line:
                stamp = re.match(r"(\d{4}/\d\d/\d\d \d\d:\d\d:\d\d\.\d+)", line)
                if stamp is not None:
                    when = datetime.strptime(stamp.group(1), "%Y/%m/%d %H:%M:%S.%f").timestamp()
                    if when >= after - 0.002:
                        found.append(when)
        return found

    def close(self) -> None:
        for side in (self.a_side, self.b_side):
            if side is not None and side.proc is not None and side.proc.poll() is None:
                side.kill()
        if self.frr is not None:
            self.frr.close()
        self.lab.close()


def cpu(args: argparse.Namespace) -> dict[str, Any]:
    bench = Bench(args.sessions, args.interval_ms, args.multiplier, with_frr=False)
    a, b = bench.a_side, bench.b_side
    assert b is not None
    try:
        a.start()
        b.start()
        started = time.monotonic()
        try:
            bench.wait(lambda: a.status().get("up") == args.sessions and b.status().get("up") == args.sessions,
                       args.up_timeout, f"{args.sessions} sessions up")
        except SystemExit as exc:  # a result too: this many sessions do not fit here
            print(exc, file=sys.stderr)
            return {"sessions": args.sessions, "interval_ms": args.interval_ms, "multiplier": args.multiplier,
                    "all_up": False, "after_s": args.up_timeout, "a_status": a.status(), "b_status": b.status(),
                    "loadavg_at_end": os.getloadavg()}
        up_after = time.monotonic() - started
        time.sleep(2)  # past the slow start's last packets
        assert a.proc is not None and b.proc is not None
        before = a.status()
        wall = time.time()
        t0, a0, b0 = time.monotonic(), cpu_seconds(a.proc.pid), cpu_seconds(b.proc.pid)
        time.sleep(args.window)
        t1, a1, b1 = time.monotonic(), cpu_seconds(a.proc.pid), cpu_seconds(b.proc.pid)
        time.sleep(1.1)
        after = a.status()
        seconds = t1 - t0
        lags = a.lags(wall + 1, wall + seconds)
        return {"sessions": args.sessions, "interval_ms": args.interval_ms, "multiplier": args.multiplier,
                "window_s": round(seconds, 1), "up_after_s": round(up_after, 1),
                "a_cpu_pct": round(100 * (a1 - a0) / seconds, 1), "b_cpu_pct": round(100 * (b1 - b0) / seconds, 1),
                "a_rss_mb": round(rss_mb(a.proc.pid), 1),
                "a_sent_per_s": round((after["sent"] - before["sent"]) / (seconds + 1.1)),
                "a_received_per_s": round((after["received"] - before["received"]) / (seconds + 1.1)),
                "a_went_down_in_window": after["went_down"] - before["went_down"],
                "b_went_down_total": b.status().get("went_down"), "a_up_at_end": after["up"],
                "a_loop_lag_ms_per_second": {"median": statistics.median(lags), "max": max(lags)} if lags else None,
                # A starved process (a busy machine: runnable, not running) does less than its share, so the
                # % above understates; the CPU per packet does not, and times the nominal rate (each session
                # sends every 75-100 % of the interval: 1 / (0.875 x interval), and receives as much) gives the
                # CPU the sessions need when nothing is late.
                "a_us_per_packet": round((a1 - a0) * 1e6 / packets, 1) if (packets := (
                    after["sent"] - before["sent"] + after["received"] - before["received"])
                    * seconds / (seconds + 1.1)) else None,  # the counters span the window and the 1.1 s after
                "a_projected_cpu_pct": round((a1 - a0) / packets * 2 * args.sessions / (0.875 * args.interval_ms / 1000)
                                             * 100, 1) if packets else None,
                "loadavg_at_end": os.getloadavg()}
    finally:
        bench.close()


def percentile(values: Sequence[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered) + 0.5) - 1))]


def summary(values: Sequence[float]) -> dict[str, Any]:
    ms = [round(v * 1000, 1) for v in values]
    return {"runs": len(ms), "median_ms": round(statistics.median(ms), 1), "p99_ms": percentile(ms, 0.99),
            "min_ms": min(ms), "max_ms": max(ms), "samples_ms": ms}


def detect(args: argparse.Namespace) -> dict[str, Any]:
    bench = Bench(1, args.interval_ms, args.multiplier, with_frr=True)
    a, frr = bench.a_side, bench.frr
    assert frr is not None
    greupd: list[float] = []
    frrs: list[float] = []

    def both_up() -> bool:
        return a.status().get("up") == 1 and bench.frr_up()

    try:
        a.start()
        for run in range(args.runs):
            bench.wait(both_up, 60, f"run {run}: both up")
            time.sleep(0.5 + (run % 5) * 0.061)  # kill at a different point of the packet cycle each time
            killed = time.time()
            frr.stop_bfdd()
            bench.wait(lambda at=killed: bool(a.downs(at)), 10, f"run {run}: greupd sees bfdd gone")
            greupd.append(a.downs(killed)[0] - killed)
            frr.start_bfdd()
            bench.wait(both_up, 60, f"run {run}: both up again")
            time.sleep(0.5 + (run % 5) * 0.061)
            killed = a.kill()
            bench.wait(lambda at=killed: bool(bench.frr_downs(at)), 10, f"run {run}: bfdd sees greupd gone")
            frrs.append(bench.frr_downs(killed)[0] - killed)
            a.start()
        return {"interval_ms": args.interval_ms, "multiplier": args.multiplier,
                "detect_time_ms": args.interval_ms * args.multiplier,
                "greupd_detects_killed_bfdd": summary(greupd), "bfdd_detects_killed_greupd": summary(frrs),
                "loadavg_at_end": os.getloadavg()}
    finally:
        bench.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bfd", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    for name in ("cpu", "detect", "side"):
        p = sub.add_parser(name)
        p.add_argument("--sessions", type=int, default=1000)
        p.add_argument("--interval-ms", type=int, default=300)
        p.add_argument("--multiplier", type=int, default=3)
        p.add_argument("--window", type=float, default=30.0)
        p.add_argument("--runs", type=int, default=20)
        p.add_argument("--status", type=Path)
        p.add_argument("--role", choices=("a", "b"), default="a")
        p.add_argument("--up-timeout", type=float, default=600.0)
        p.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.what == "side":
        return side(args.sessions, args.interval_ms, args.multiplier, args.status, args.role)
    from bench.record import machine

    result = {"meta": {"suite": f"bfd-{args.what}", "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                       "command": "python -m bench.bfd " + " ".join(sys.argv[1:] if argv is None else argv)},
              "result": cpu(args) if args.what == "cpu" else detect(args)}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out is not None:
        with contextlib.suppress(OSError):
            args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
