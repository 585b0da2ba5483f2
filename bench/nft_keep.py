"""The nftables keep natively (issue #26): `NftKeeper.keep(config)`, what every "look again" of the watch, every
resync and every reload runs, with a hub's table of N tunnels (each with an MSS clamp and NAT both ways).

    python -m bench.nft_keep [--tunnels N ...] [--trials T]     (as root: it makes a netns of its own)

Cases, in one netns, trials interleaved: *before*: the comparison as it was up to this round, rendering the
config and reading the table back through libnftables (JSON of every chain, rule and element, normalized on
both sides) on every keep: the same code with the fingerprint switched off; *unchanged*: nothing happened
since the last keep; *another table changed*: a rule added to another table first (the generation moves,
our table's digest does not); *our table drifted*: a rule added to our table first, found and put back (the
read-back and the transaction that repairs it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from ipaddress import ip_address
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
Json = dict[str, Any]


def hub_config(count: int) -> Any:
    from greupd.config import Config, DaemonConfig, TunnelConfig

    seed = TunnelConfig.model_validate({"name": "t0", "local": "172.19.1.1", "remote": "172.19.1.2",
                                        "mss": {"clamp": 1436},
                                        "nat": {"into_tunnel": ["10.10.1.0/24"], "from_tunnel": ["eth1"]}})
    tunnels = [seed.model_copy(update={"name": f"t{i}", "remote": ip_address(f"172.21.{i // 250}.{i % 250 + 1}")})
               for i in range(1, count)]
    return Config(DaemonConfig(nft_table="greupd"), (seed, *tunnels))


def _nft(command: str) -> None:
    subprocess.run(["nft", "-f", "-"], input=command, text=True, check=True)


def measure_here(count: int, trials: int) -> Json:
    """Runs inside the bench's netns."""
    from greupd.nft.fingerprint import FingerprintError, NftNetlink
    from greupd.nft.keeper import NftKeeper

    class Blind(NftNetlink):  # the fingerprint switched off: every comparison is libnftables' read-back
        def generation(self) -> int:
            raise FingerprintError(95, "switched off for the benchmark")

    config = hub_config(count)
    errors: list[str] = []
    keeper = NftKeeper("greupd", lambda: None, errors.append)
    before = NftKeeper("greupd", lambda: None, errors.append)
    before.netlink = before.table.netlink = before.ipsec.netlink = Blind()
    _nft("add table ip other; add chain ip other pass { type filter hook forward priority 0; policy accept; }")
    start = time.perf_counter()
    keeper.keep(config)
    first = time.perf_counter() - start
    samples: dict[str, list[float]] = {"before": [], "unchanged": [], "other_table_changed": [], "drift_repaired": []}

    cpu: dict[str, list[float]] = {case: [] for case in samples}

    def timed(case: str, run: Any) -> None:
        # CPU time too (user + system, the kernel's dumps included): the machine's load stretches wall time.
        start, start_cpu = time.perf_counter(), time.process_time()
        run()
        samples[case].append(time.perf_counter() - start)
        cpu[case].append(time.process_time() - start_cpu)

    repaired = 0
    for _ in range(trials):
        def old_way() -> None:
            before._rendered = None  # rendered on every keep, as before
            before.keep(config)
        timed("before", old_way)
        keeper.keep(config)  # the table as the keeper left it (before's keep changed nothing: it matched)
        timed("unchanged", lambda: keeper.keep(config))
        _nft("add rule ip other pass counter")
        timed("other_table_changed", lambda: keeper.keep(config))
        _nft("add rule inet greupd forward counter")
        timed("drift_repaired", lambda: keeper.keep(config))
        listed = subprocess.run(["nft", "list", "chain", "inet", "greupd", "forward"], capture_output=True,
                                text=True, check=True).stdout
        repaired += "counter" not in listed
    return {"tunnels": count, "first_apply": first, "repaired": repaired, "trials": trials, "errors": errors,
            **samples, "cpu": cpu, "load_average": Path("/proc/loadavg").read_text().split()[:3]}


def measure(count: int, trials: int) -> Json:
    netns = f"benchnft{os.getpid()}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        proc = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-m", "bench.nft_keep", "--here",
                               "--tunnels", str(count), "--trials", str(trials)],
                              cwd=REPO, capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
        result: Json = json.loads(proc.stdout)
        return result
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.nft_keep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tunnels", type=int, action="append")
    p.add_argument("--trials", type=int, default=7)
    p.add_argument("--here", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    counts = a.tunnels or [1000, 10000]
    if a.here:
        print(json.dumps(measure_here(counts[0], a.trials)))
        return 0
    for count in counts:
        result = measure(count, a.trials)
        print(json.dumps(result))
        medians = {k: f"{1e3 * statistics.median(v):.1f} ms" for k, v in result.items()
                   if isinstance(v, list) and v and isinstance(v[0], float)}
        print(f"nft keep, {count} tunnels: {medians}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
