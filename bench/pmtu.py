"""The path MTU search's cost (#23), from the search itself (greupd/keepalive/pmtu.py) on a simulated path:

    python -m bench.pmtu [--rtt 0.02] [--tunnels 1000]

- per path MTU (1200..1476, GRE without a key on a 1500 underlay): probes sent and simulated seconds from the
  start of a measurement to its result, with the default timing (3 probes per size, 100 ms apart, 1 s timeout);
- a black hole that appears (1376 -> 1276): seconds from the change to the lower result;
- the steady load of N tunnels: confirmations (one probe at the measured size every 5 s) and measurements
  (every 10 min), in packets and bits per second on the wire, and the CPU time of the search's own work
  per probe (measured here, natively: the engine's sendmsg and the kernel are not in it).
The times on a real kernel are in tests/test_pmtu_kernel.py (UML) and BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence

from greupd.keepalive.pmtu import CONFIRM_EVERY, PathMtuSearch

FLOOR, CEILING, OVERHEAD = 1200, 1476, 24
STEP = 0.01


def simulate(search: PathMtuSearch, mtu: int, rtt: float, start: float, until: float) -> tuple[float, int, int]:
    """Run `search` against a path that carries `mtu`, until a result; (seconds, probes, result's MTU)."""
    now, sent, in_flight = start, 0, list[tuple[float, int]]()
    while now < until:
        for size in search.due(now):
            sent += 1
            if size <= mtu:
                in_flight.append((now + rtt, size))
        for arrival, size in [p for p in in_flight if p[0] <= now]:
            in_flight.remove((arrival, size))
            result = search.on_reply(size, now)
            if result is not None:
                return now - start, sent, result.mtu
        result = search.expire(now)
        if result is not None:
            return now - start, sent, result.mtu
        now += STEP
    raise AssertionError(f"no result for {mtu} in {until - start} s")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pmtu")
    parser.add_argument("--rtt", type=float, default=0.02)
    parser.add_argument("--tunnels", type=int, default=1000)
    args = parser.parse_args(argv)
    rows = []
    for mtu in (1200, 1250, 1276, 1300, 1376, 1400, 1450, 1475, 1476):
        search = PathMtuSearch(FLOOR, 600.0)
        search.restart(0.0, CEILING)
        seconds, probes, found = simulate(search, mtu, args.rtt, 0.0, 300.0)
        assert found == mtu
        rows.append({"path_mtu": mtu, "probes": probes, "seconds": round(seconds, 2)})
    worst = 0.0
    for offset in (0.0, 1.0, 2.5, 4.9):  # where in the confirmation period the path changes
        copy = PathMtuSearch(FLOOR, 600.0)
        copy.restart(0.0, CEILING)
        settled, _, _ = simulate(copy, 1376, args.rtt, 0.0, 300.0)
        seconds, _, found = simulate(copy, 1276, args.rtt, settled + offset, settled + 300.0)
        assert found == 1276
        worst = max(worst, seconds)
    # the search's own CPU per probe: due/on_reply/expire only (no simulated clock), natively
    calls, began = 0, time.perf_counter()
    for _ in range(20000):
        search = PathMtuSearch(FLOOR, 600.0)
        search.restart(0.0, CEILING)
        for size in search.due(0.0):
            search.on_reply(size, 0.01)
            calls += 1
    per_probe_us = (time.perf_counter() - began) / calls * 1e6
    mean_probes = statistics.mean(row["probes"] for row in rows)
    confirm_pps = args.tunnels / CONFIRM_EVERY
    measure_pps = args.tunnels * mean_probes / 600.0
    report = {
        "per_path_mtu": rows,
        "black_hole_1376_to_1276_seconds_worst": round(worst, 2),
        "tunnels": args.tunnels,
        "confirmations_per_second": confirm_pps,
        "measurement_probes_per_second": round(measure_pps, 1),
        "wire_mbit_per_second": round((confirm_pps + measure_pps) * 1400 * 8 / 1e6, 2),
        "search_cpu_us_per_probe": round(per_probe_us, 1),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
