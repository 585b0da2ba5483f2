"""bench/run: boot the lab guests, run the benchmark suites in them, keep the raw JSON, render BENCHMARKS.md.

    bench/run                      everything (~70 min): bench/results/*.json and BENCHMARKS.md
    bench/run --quick              small N, few trials (a smoke run): .lab/bench-quick/
    bench/run --only uml --only render

Suites: host (kernel-independent parts, natively, no guest), systemd (the uml-systemd guest: cold
convergence of greupd vs `ip -batch` vs systemd-networkd, and networkd under drift), uml (the UML guest:
start-up, reload, drift repair, dead-peer detection, keepalive cost, idle wake-ups, profiles), nft (the vng
guest: forwarding rate through greupd's nftables table, 1 tunnel against 1000); keepalive (only with --only:
the uml suite's dead-peer and keepalive-cost parts alone, in bench/results/keepalive.json); hub (issue #26's
hub in the UML guest, 1000 and 2000 tunnels: 10,000 does not fit UML; GREUPD_BENCH_HUB_TUNNELS=N for another
size) and hub-systemd (its convergence part in the uml-systemd guest); engine (the keepalive engine alone
natively at 1000 and 10,000 tunnels, bench/engine_bench.py). Without --only: all but keepalive (the uml suite
measures it too).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench import engine_bench, host_bench, render
from lab import guest

REPO = Path(__file__).resolve().parent.parent
SUITES = ("host", "systemd", "uml", "nft")
GUEST: dict[str, guest.GuestKind] = {"systemd": "uml-systemd", "uml": "uml", "keepalive": "uml", "nft": "vng",
                                     "hub": "uml", "hub-systemd": "uml-systemd"}
# After SUITES: the hub and the engine alone (#26); the keepalive part of the uml suite only when
# asked for (--only keepalive).
ALONE = ("keepalive", "hub", "hub-systemd", "engine")
DEFAULT = (*SUITES, "hub", "hub-systemd", "engine")
# The module each guest suite runs (default bench.lab_bench --suite NAME); nft: bench/forwarding.py.
SUITE_MODULE = {"nft": ["bench.forwarding"]}
TIMEOUT = 3600.0


def code_version() -> str:
    """The commit measured, and whether greupd/ differed from it (other engineers share the work tree)."""
    def git(*argv: str) -> str:
        proc = subprocess.run(["git", *argv], cwd=REPO, capture_output=True, text=True)
        return proc.stdout.strip()

    dirty = git("status", "--porcelain", "--", "greupd")
    return git("rev-parse", "--short", "HEAD") + (" + uncommitted changes in greupd/" if dirty else "")


def stamp(out: Path, version: str) -> None:
    if out.exists():
        data = json.loads(out.read_text())
        data.setdefault("meta", {})["code"] = version
        out.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def run_guest_suite(suite: str, out: Path, quick: bool) -> bool:
    kind = GUEST[suite]
    module = SUITE_MODULE.get(suite, ["bench.lab_bench", "--suite", suite])
    argv = [sys.executable, "-m", *module, *(["--quick"] if quick else [])]
    print(f"bench: suite {suite} in the {kind} guest ...", file=sys.stderr, flush=True)
    result = guest.run(kind, argv, cwd=REPO, timeout=TIMEOUT, stream=sys.stderr, collect=["bench.json"])
    raw = result.files.get("bench.json")
    if raw:
        data = json.loads(raw)
        data.setdefault("meta", {})["guest_seconds"] = result.seconds
        out.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    if not result.ok:
        print(result.describe(), file=sys.stderr)
    print(f"bench: suite {suite}: {'ok' if result.ok else 'FAILED'} in {result.seconds:.0f} s -> {out}",
          file=sys.stderr)
    return result.ok and raw is not None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small N and few trials, results under .lab/bench-quick")
    p.add_argument("--only", action="append", choices=(*SUITES, *ALONE, "render"),
                   help="run only these suites (repeatable); 'render' only rewrites BENCHMARKS.md")
    p.add_argument("--results", type=Path, help="where the raw JSON goes (default bench/results)")
    a = p.parse_args(argv)
    results = a.results or (REPO / ".lab" / "bench-quick" if a.quick else REPO / "bench" / "results")
    results.mkdir(parents=True, exist_ok=True)
    chosen = a.only or [*DEFAULT, "render"]
    started = time.monotonic()
    ok = True
    # The native suites last: they measure wall times on the host, which other work on the machine stretches most.
    native = ("host", "engine")
    for suite in sorted((*SUITES, *ALONE), key=lambda name: name in native):
        if suite not in chosen:
            continue
        out = results / f"{suite}.json"
        version = code_version()
        if suite == "host":
            print("bench: suite host (natively) ...", file=sys.stderr, flush=True)
            ok = host_bench.main(["--out", str(out), *(["--quick"] if a.quick else [])]) == 0 and ok
        elif suite == "engine":
            print("bench: suite engine (natively) ...", file=sys.stderr, flush=True)
            ok = engine_bench.main(["--out", str(out), *(["--tunnels", "300"] if a.quick else [])]) == 0 and ok
        else:
            ok = run_guest_suite(suite, out, a.quick) and ok
        stamp(out, version)
    if "render" in chosen:
        target = results / "BENCHMARKS.md" if a.quick else REPO / "BENCHMARKS.md"
        command = "bench/run --quick" if a.quick else "bench/run"
        render.main(["--results", str(results), "--out", str(target), "--command", command])
    print(f"bench: {'done' if ok else 'FAILED'} in {(time.monotonic() - started) / 60:.1f} min", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
