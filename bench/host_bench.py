"""The parts of greupd's cost that do not depend on the kernel, measured natively on this machine (no guest).

The lab guest (UML) makes every syscall and page fault expensive, so its absolute numbers overstate what a
real kernel would show. These pure-CPU pieces (imports, config validation, planning, probe bytes, and
pyroute2 parsing rtnetlink dumps of the same size as a 1000-tunnel observe) run here at native speed, as a
yardstick for what the same code costs on real hardware.

    python -m bench.host_bench [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from bench import scenario

REPO = Path(__file__).resolve().parent.parent
Json = dict[str, Any]


def timed(fn: Callable[[], object], trials: int) -> list[float]:
    samples = []
    for _ in range(trials):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


def command(argv: list[str], trials: int) -> list[float]:
    def run() -> None:
        subprocess.run(argv, check=True, cwd=REPO, capture_output=True)

    run()  # page cache warm, as on a machine that has run greupd before
    return timed(run, trials)


def cpu_parts(count: int, trials: int) -> Json:
    from greupd.config import load_config_text
    from greupd.model import Observed, ObservedLink, desired_state
    from greupd.plan import plan_changes
    from greupd.probe import build_probe_template, new_token, parse_gre

    text = scenario.greupd_toml(count)
    config = load_config_text(text)
    desired = desired_state(config)
    empty = Observed({}, {}, frozenset(), {})
    # The kernel as greupd left it, except one tunnel's ttl: what a reload plans against.
    links = {name: ObservedLink(i, intent.link, True, True) for i, (name, intent) in enumerate(desired.tunnels.items())}
    changed = next(iter(links))
    links[changed] = ObservedLink(0, links[changed].spec.__class__(**{**links[changed].spec.__dict__, "ttl": 1}),
                                  True, True)
    converged = Observed(links, {n: i.addresses for n, i in desired.tunnels.items()},
                         frozenset(r for i in desired.tunnels.values() for r in i.routes), {})
    assert len(plan_changes(desired, converged).actions) == 1

    template = build_probe_template(IPv4Address(scenario.LOCAL), IPv4Address(scenario.REMOTE), 1, 1)
    reply = template.with_token(new_token())[template.inner_ip_offset:]
    probes = 10000
    return {
        "tunnels": count,
        "config_load": timed(lambda: load_config_text(text), trials),
        "desired_state": timed(lambda: desired_state(config), trials),
        "plan_cold": timed(lambda: plan_changes(desired, empty), trials),
        "plan_reload": timed(lambda: plan_changes(desired, converged), trials),
        "probe_build_us": [s / probes * 1e6 for s in timed(lambda: [template.with_token(new_token())
                                                                     for _ in range(probes)], trials)],
        "reply_parse_us": [s / probes * 1e6 for s in timed(lambda: [parse_gre(reply) for _ in range(probes)],
                                                            trials)],
    }


def dump_parsing(count: int, trials: int) -> Json:
    """pyroute2 (as greupd's Kernel uses it) reading dumps of `count` links with an address and 2 routes each.

    Bridge links stand in for GRE ones (this kernel has neither GRE nor dummy): the messages are of the same
    number and about the same size.
    """
    netns = f"benchhost{os.getpid()}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        lines = []
        for t in scenario.tunnels(count):
            lines += [f"link add {t.name} type bridge", f"link set {t.name} up",
                      f"addr add {t.address} peer {t.peer} dev {t.name}",
                      *(f"route add {r} dev {t.name} proto 222" for r in t.routes)]
        subprocess.run(["ip", "-n", netns, "-batch", "-"], input="\n".join(lines) + "\n", text=True, check=True)
        proc = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-m", "bench.host_bench",
                               "--dumps-here", str(trials)], cwd=REPO, capture_output=True, text=True, check=True)
        return {"tunnels": count, **json.loads(proc.stdout)}
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=False)


def _dumps_here(trials: int) -> Json:
    from greupd.netlink import Kernel

    async def measure() -> Json:
        kernel = Kernel()
        result: Json = {}
        try:
            for kind in ("link", "addr", "route"):
                samples = []
                for _ in range(trials):
                    start = time.perf_counter()
                    await kernel._dump(kind)  # the same call observe() makes
                    samples.append(time.perf_counter() - start)
                result[f"dump_{kind}"] = samples
        finally:
            kernel.close()
        return result

    return asyncio.run(measure())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.host_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--dumps-here", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.dumps_here is not None:
        print(json.dumps(_dumps_here(a.dumps_here)))
        return 0
    trials = 3 if a.quick else 7
    count = 100 if a.quick else 1000
    py = sys.executable
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine())
    result: Json = {
        "meta": {"machine": {"kernel": platform.release(), "cpus": os.cpu_count(), "cpu": cpu,
                             "python": platform.python_version(), "guest": "none (host)"},
                 "quick": a.quick, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")},
        "imports": {
            "python_bare": command([py, "-c", "pass"], trials),
            "import_daemon": command([py, "-c", "import greupd.daemon"], trials),
            "import_daemon_scapy": command([py, "-c", "import greupd.daemon; import scapy.layers.inet, "
                                                      "scapy.layers.l2"], trials),
            "import_scapy_all": command([py, "-c", "import scapy.all"], trials),
        },
        "cpu": cpu_parts(count, trials),
        "dumps": dump_parsing(count, trials),
    }
    text = json.dumps(result, indent=1, sort_keys=True)
    if a.out:
        a.out.write_text(text)
    else:
        print(text)
    medians = {k: round(statistics.median(v), 4) for k, v in result["cpu"].items() if isinstance(v, list)}
    print(f"host bench: {medians}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
