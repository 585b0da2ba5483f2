"""`python -m fuzz` (= `make fuzz`): every target under atheris for its time, then its corpus replayed under
coverage.py, then one table (markdown, as RELIABILITY.md's Fuzzing section has it).

    python -m fuzz                      every target, each for its default time (~12 minutes in all)
    python -m fuzz --seconds 30         each for 30 s (also FUZZ_SECONDS=30)
    python -m fuzz --targets gre,rtnl   a selection
    python -m fuzz --replay             no fuzzing: replay fuzz/crashes/ and say which reproducers still crash

The working corpus (seeds plus what libFuzzer found) grows in .fuzz/corpus/<target>/ across runs, logs are in
.fuzz/logs/; the committed seeds in fuzz/corpus/<target>/ are only read. New crashes are saved under
fuzz/crashes/<target>/ (an input and its traceback), timeouts and out-of-memory inputs too.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from fuzz.findings import CORPUS, CRASHES
from fuzz.targets import TARGETS, Target

REPO = Path(__file__).resolve().parent.parent
STATE = REPO / ".fuzz"


def fuzz_one(target: Target, seconds: int) -> dict[str, object]:
    corpus, artifacts, logs = (STATE / what / target.name for what in ("corpus", "artifacts", "logs"))
    for folder in (corpus, artifacts, logs.parent):
        folder.mkdir(parents=True, exist_ok=True)
    log = logs.with_suffix(".log")
    command = [sys.executable, "-m", "fuzz.worker", target.name, f"-max_total_time={seconds}",
               f"-max_len={target.max_len}", "-timeout=20", "-rss_limit_mb=3072", "-print_final_stats=1",
               f"-artifact_prefix={artifacts}/", str(corpus), str(CORPUS / target.name)]
    started = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix="greupd-fuzz-", dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None))
    with log.open("w") as out:
        try:
            rc = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, timeout=seconds + 300,
                                env={**os.environ, "GREUPD_FUZZ_WORK": str(scratch)}).returncode
        except subprocess.TimeoutExpired:
            rc = -1
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    elapsed = time.monotonic() - started
    text = log.read_text(errors="replace")
    status = re.findall(r"^#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)/(\S+)", text, re.MULTILINE)
    runs = re.search(r"stat::number_of_executed_units: (\d+)", text) or re.search(r"Done (\d+) runs", text)
    findings = dict(re.findall(r"^FINDING (\S+) (new|known)", text, re.MULTILINE))
    for artifact in sorted(artifacts.iterdir()):  # a timeout or out-of-memory: libFuzzer stopped there
        kept = CRASHES / target.name / artifact.name
        kept.parent.mkdir(parents=True, exist_ok=True)
        findings[artifact.name] = "known" if kept.exists() else "new"
        shutil.copyfile(artifact, kept)
        artifact.unlink()
    last = status[-1] if status else ("0", "0", "0", "0", "0b")
    return {"target": target.name, "seconds": round(elapsed), "rc": rc,
            "executions": int(runs.group(1)) if runs else int(last[0]), "cov": int(last[1]), "ft": int(last[2]),
            "corpus": f"{last[3]}/{last[4]}", "findings": findings}


def cover(target: Target) -> dict[str, object]:
    command = [sys.executable, "-m", "fuzz.cover", target.name, str(STATE / "corpus" / target.name),
               str(CORPUS / target.name)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        return {"error": done.stderr[-500:]}
    result: dict[str, object] = json.loads(done.stdout.splitlines()[-1])
    return result


def replay() -> int:
    """Each committed reproducer through its target: which still crash (the fix has not landed)."""
    still = 0
    for target in TARGETS.values():
        folder = CRASHES / target.name
        for file in sorted(folder.glob("*")) if folder.is_dir() else []:
            if file.suffix == ".txt":
                continue
            try:
                target.run(file.read_bytes())
                print(f"fixed     {target.name}/{file.name}")
            except Exception as exc:
                still += 1
                where = traceback.extract_tb(exc.__traceback__)[-1]
                print(f"crashes   {target.name}/{file.name}: {type(exc).__name__} at "
                      f"{Path(where.filename).name}:{where.lineno}: {str(exc)[:120]}")
    return still


def table(rows: list[dict[str, object]]) -> str:
    lines = ["| target | documented errors | s | executions | exec/s | cov | ft | corpus (files/bytes) "
             "| lines covered (replay) | crashes: new / saved before |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |"]
    for row in rows:
        covered = row.get("coverage", {})
        assert isinstance(covered, dict)
        modules = covered.get("lines", {})
        lines_text = ", ".join(f"{Path(m).name}{'/' if m.endswith('/') else ''} {a}/{b} ({100 * a // max(b, 1)} %)"
                               for m, (a, b) in modules.items())
        path = covered.get("path")
        if isinstance(path, list):
            lines_text += f"; the parsing functions {path[0]}/{path[1]} ({100 * path[0] // max(path[1], 1)} %)"
        found = row["findings"]
        assert isinstance(found, dict)
        new = sorted(k for k, v in found.items() if v == "new")
        known = sorted(k for k, v in found.items() if v == "known")
        executions, seconds = int(str(row["executions"])), max(int(str(row["seconds"])), 1)
        lines.append(f"| {row['target']} | {TARGETS[str(row['target'])].errors} | {seconds} | {executions:,} "
                     f"| {executions // seconds:,} | {row['cov']} | {row['ft']} | {row['corpus']} | "
                     f"{lines_text or covered.get('error', '?')} | {len(new)} / {len(known)}"
                     f"{': ' + ', '.join(new) if new else ''} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=int(os.environ.get("FUZZ_SECONDS", "0")) or None,
                        help="each target's time (default: its own, ~12 minutes in all; env FUZZ_SECONDS)")
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated, of {', '.join(TARGETS)}")
    parser.add_argument("--replay", action="store_true", help="only replay fuzz/crashes/")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.replay:
        return 1 if replay() else 0
    chosen = [TARGETS[name] for name in args.targets.split(",") if name]
    total = sum(args.seconds or t.seconds for t in chosen)
    print(f"fuzz: {len(chosen)} targets, {total} s of fuzzing, then a coverage replay of each", flush=True)
    rows = []
    for target in chosen:
        row = fuzz_one(target, args.seconds or target.seconds)
        row["coverage"] = cover(target)
        rows.append(row)
        found = row["findings"]
        assert isinstance(found, dict)
        print(f"fuzz: {target.name}: {row['executions']} executions in {row['seconds']} s, cov {row['cov']}, "
              f"ft {row['ft']}, {len(found)} crash signature(s) ({sum(v == 'new' for v in found.values())} new)",
              flush=True)
    print()
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    new = sum(v == "new" for row in rows for v in row["findings"].values())  # type: ignore[attr-defined]
    print(f"\nfuzz: {new} new crash signature(s); reproducers and tracebacks in fuzz/crashes/<target>/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
