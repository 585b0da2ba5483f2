"""The keepalive engine alone, natively, at a hub's size: 1000 and 10,000 tunnels x 1 s (issue #26).

    python -m bench.engine_bench [--tunnels N ...] [--interval S] [--window S] [--profile] [--out FILE]

As bench/host_bench.py's keepalive part (this machine's kernel has no GRE, but the engine needs none: raw
sockets on a veth between two netns), with what a hub needs on top: the prober's CPU split into user time
(greupd's Python) and system time (the kernel's, which on a veth includes the answering side's receive path,
run inside our sendmmsg), readiness waited for instead of slept for (10,000 tunnels take seconds to configure
on a loaded machine), and optionally a sampling profile of the prober (bench/greupd_timed.SamplingProfiler).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import scenario
from bench.greupd_timed import PROFILE_SAVE, PROFILE_START

REPO = Path(__file__).resolve().parent.parent
Json = dict[str, Any]
# The prober under the sampling profiler: the engine alone, as `python -m greupd.keepalive` runs it.
PROFILED = ("import os, runpy, signal, sys; from bench.greupd_timed import PROFILE_START, PROFILE_SAVE, "
            "SamplingProfiler; p = SamplingProfiler(os.environ['BENCH_PROFILE_DIR']); "
            "signal.signal(PROFILE_START, p.start); signal.signal(PROFILE_SAVE, p.save); "
            "sys.argv = ['greupd.keepalive', *sys.argv[1:]]; runpy.run_module('greupd.keepalive', "
            "run_name='__main__')")


def _times(pid: int) -> tuple[float, float]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / ticks, int(fields[12]) / ticks


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _tx_packets(netns: str) -> int:
    proc = subprocess.run(["ip", "netns", "exec", netns, "cat", "/sys/class/net/eth0/statistics/tx_packets"],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout)


def _wait_for(path: Path, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: no status file after {timeout} s")
        time.sleep(0.2)


def engine_cost(count: int, interval: float, window: float, profile: bool) -> Json:
    tag = f"benchen{os.getpid()}"
    a, b = f"{tag}a", f"{tag}b"
    procs: list[subprocess.Popen[bytes]] = []
    directory = Path(tempfile.mkdtemp(prefix="bench-engine-"))
    try:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "add", ns], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "-n", a, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", b],
                       check=True)
        for ns, addr in ((a, scenario.LOCAL), (b, scenario.REMOTE)):
            subprocess.run(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0"], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", "eth0", "up"], check=True)
        for ns, mirror in ((b, True), (a, False)):
            config = directory / f"{ns}.toml"
            config.write_text(scenario.greupd_toml(count, keepalive=(interval, 3, 1), mirror=mirror))
            status = directory / f"{ns}.json"
            args = ["-c", str(config), "--status-file", str(status), "--status-every", "3600"]
            python = [sys.executable, "-c", PROFILED] if profile and not mirror else [sys.executable, "-m",
                                                                                      "greupd.keepalive"]
            env = {**os.environ, "BENCH_PROFILE_DIR": str(directory)}
            procs.append(subprocess.Popen(["ip", "netns", "exec", ns, *python, *args], cwd=REPO, env=env,
                                          stdout=subprocess.DEVNULL, stderr=(directory / f"{ns}.err").open("w")))
            _wait_for(status, 300, f"engine in {ns}")
        prober = procs[-1]
        time.sleep(3 * interval + 2)  # every tunnel probed and answered a few times: the steady state
        if profile:
            os.kill(prober.pid, PROFILE_START)
        sent_before = _tx_packets(a)
        (user0, sys0), start = _times(prober.pid), time.monotonic()
        time.sleep(window)
        (user1, sys1), elapsed = _times(prober.pid), time.monotonic() - start
        probes = _tx_packets(a) - sent_before  # the prober sends nothing else (answer = "off")
        rss = _rss_mb(prober.pid)
        profile_text = None
        if profile:
            os.kill(prober.pid, PROFILE_SAVE)
            saved = directory / "profile-1.txt"
            _wait_for(saved, 60, "profile")
            time.sleep(0.5)
            profile_text = saved.read_text()
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(60)
        report = json.loads((directory / f"{a}.json").read_text())
        tunnels = report["tunnels"].values()
        cpu = (user1 - user0) + (sys1 - sys0)
        return {"tunnels": count, "interval": interval, "seconds": elapsed, "cpu_percent": 100 * cpu / elapsed,
                "user_percent": 100 * (user1 - user0) / elapsed, "sys_percent": 100 * (sys1 - sys0) / elapsed,
                "probes_per_s": probes / elapsed, "cpu_us_per_probe": 1e6 * cpu / max(probes, 1),
                "user_us_per_probe": 1e6 * (user1 - user0) / max(probes, 1),
                "load_average": Path("/proc/loadavg").read_text().split()[:3], "rss_mb": rss,
                "up": sum(bool(t["up"]) for t in tunnels), "profile": profile_text}
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], check=False)
        shutil.rmtree(directory, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.engine_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tunnels", type=int, action="append", help="repeatable (default 1000 and 10000)")
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--window", type=float, default=20.0)
    p.add_argument("--profile", action="store_true", help="a sampling profile of the prober over the window")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    rows = []
    for count in a.tunnels or [1000, 10_000]:
        row = engine_cost(count, a.interval, a.window, a.profile)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "profile"}), file=sys.stderr, flush=True)
    text = json.dumps({"meta": {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}, "engine": rows}, indent=1)
    if a.out:
        a.out.write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
