"""The path MTU search's cost (#23), from the search itself (greupd/keepalive/pmtu.py) on a simulated path:

    python -m bench.pmtu [--rtt 0.02] [--tunnels 1000] [--steady 30]

- per path MTU (1200..1476, GRE without a key on a 1500 underlay): probes sent and simulated seconds from the
  start of a measurement to its result, with the default timing (3 probes per size, 100 ms apart, 1 s timeout);
- a black hole that appears (1376 -> 1276): seconds from the change to the lower result;
- the steady load of N tunnels: confirmations (one probe at the measured size every 5 s) and measurements
  (every 10 min), in packets and bits per second on the wire, and the CPU time of the search's own work
  per probe (measured here, natively: the engine's sendmsg and the kernel are not in it).
- the fleet: greupd's own prober (greupd/keepalive/pmtu_probe.py, its timers, tokens and spread starts) measuring
  N tunnels at once in a real event loop, each padded probe sent by a real sendto on loopback and read back by
  a real recv (a peer that reflects what its path carries, after --rtt): the time until all N are measured, the
  probes per second at the peak, and this process's CPU while they are measured and then while only the
  confirmations run (`--steady` s). No GRE is needed: the kernel's encapsulation and the peer's reflection of a
  real tunnel are not in these figures, the probe's own system calls are.
The times on a real kernel are in tests/test_pmtu_kernel.py (UML) and BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import json
import logging
import socket
import statistics
import time
from collections.abc import Sequence
from ipaddress import IPv4Address

from greupd.keepalive.codec import build_probe_template
from greupd.keepalive.pmtu import CONFIRM_EVERY, PathMtuSearch
from greupd.keepalive.pmtu_probe import CiscoProbes, PathMtuProber, PathMtuTarget

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


PATHS = (1500, 1400, 1424, 1300, 1474)  # the fleet's paths (bytes on the wire they carry), in turn


async def fleet(tunnels: int, rtt: float, steady: float) -> dict[str, object]:
    """N tunnels measured by the real prober; what it cost (see the module's docstring)."""
    loop = asyncio.get_running_loop()
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sink.setblocking(False)
    out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    out.setblocking(False)
    address = sink.getsockname()
    paths = {f"t{i}": PATHS[i % len(PATHS)] for i in range(tunnels)}
    in_flight: collections.deque[tuple[str, int, int]] = collections.deque()
    sent_at: collections.Counter[int] = collections.Counter()  # probes per whole second since the start
    began = loop.time()

    def send(name: str, buffer: bytearray) -> OSError | None:
        token, size = next(reversed(prober._tunnels[name].sent.items()))  # the probe being sent: the last one
        try:
            out.sendto(buffer, address)
        except OSError as exc:
            return exc
        in_flight.append((name, token, size))
        sent_at[int(loop.time() - began)] += 1
        return None

    def reflect() -> None:
        while True:
            try:
                sink.recv(2048)
            except BlockingIOError:
                return
            name, token, size = in_flight.popleft()
            if size <= paths[name] - 24:
                loop.call_later(rtt, claim, name, token)

    def claim(name: str, token: int) -> None:
        prober.claim(name, token, loop.time())

    logging.getLogger("greupd").setLevel(logging.ERROR)  # N results logged would be the bench's own cost
    results: dict[str, int] = {}
    prober = PathMtuProber(send, lambda: prober.refill(), lambda name, result: results.__setitem__(name, result.mtu),
                           route_mtu=lambda local, remote, fwmark: 1500)
    local = IPv4Address("172.19.0.1")
    prober.configure((PathMtuTarget(name, local, remote, None, FLOOR, 600.0),
                      CiscoProbes(build_probe_template(local, remote, None, None), None))
                     for name, remote in zip(paths, (IPv4Address("10.0.0.0") + i for i in itertools.count(1)),
                                             strict=False))
    prober.refill()
    loop.add_reader(sink.fileno(), reflect)
    cpu = time.process_time()
    prober.start(loop)
    while len(results) < tunnels:
        await asyncio.sleep(0.05)
    measuring_wall, measuring_cpu = loop.time() - began, time.process_time() - cpu
    wrong = [name for name, mtu in results.items() if mtu != paths[name] - 24]
    assert not wrong, f"wrong results: {wrong[:5]}"
    measuring_probes = prober.probes_sent
    await asyncio.sleep(CONFIRM_EVERY)  # the confirmations' phases settle
    cpu, probes, wall = time.process_time(), prober.probes_sent, loop.time()
    await asyncio.sleep(steady)
    steady_cpu, steady_probes, steady_wall = time.process_time() - cpu, prober.probes_sent - probes, loop.time() - wall
    loop.remove_reader(sink.fileno())
    prober.close()
    sink.close()
    out.close()
    per_measurement_cpu = measuring_cpu / tunnels
    return {
        "tunnels": tunnels,
        "all_measured_seconds": round(measuring_wall, 2),
        "probes_per_measurement": round(measuring_probes / tunnels, 1),
        "peak_probes_per_second": max(sent_at.values()),
        "measuring_cpu_percent_of_a_core": round(100 * measuring_cpu / measuring_wall, 1),
        "cpu_ms_per_measurement": round(1000 * per_measurement_cpu, 2),
        "steady_confirmations_per_second": round(steady_probes / steady_wall, 1),
        "steady_cpu_percent_of_a_core": round(100 * steady_cpu / steady_wall, 2),
        # every = 10 min: N measurements spread over 600 s on top of the confirmations
        "every_10m_cpu_percent_of_a_core": round(100 * (steady_cpu / steady_wall
                                                        + per_measurement_cpu * tunnels / 600.0), 2),
        "every_10m_probes_per_second": round(steady_probes / steady_wall + measuring_probes / 600.0, 1),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pmtu")
    parser.add_argument("--rtt", type=float, default=0.02)
    parser.add_argument("--tunnels", type=int, default=1000)
    parser.add_argument("--steady", type=float, default=30.0, help="seconds of confirmations alone (the fleet)")
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
        "fleet": asyncio.run(fleet(args.tunnels, args.rtt, args.steady)),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
