"""What every guest suite writes: the machine it ran on, and its results file (stdlib only: the suites that
import this run under emulation, where each import costs seconds)."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

Json = dict[str, Any]


def machine() -> Json:
    """The guest's kernel, CPUs, memory and Python, for the header of BENCHMARKS.md."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith(("model name", "cpu model"))), platform.machine())
    mem = Path("/proc/meminfo").read_text().split("\n")[0].split()[1]
    return {"kernel": platform.release(), "guest": os.environ.get("GREUPD_LAB_GUEST", "none"),
            "cpus": os.cpu_count(), "cpu": cpu, "mem_mb": int(mem) // 1024, "python": platform.python_version()}


@contextlib.contextmanager
def results_file(path: Path, suite: str, quick: bool) -> Iterator[Json]:
    """A dict, its `meta` filled in, that is written to `path` as JSON when the suite ends, also when it fails
    half-way (then with the `error` that stopped it); `meta.seconds` is how long the suite ran."""
    started = time.monotonic()
    data: Json = {"meta": {"suite": suite, "quick": quick, "machine": machine(),
                           "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}}
    try:
        yield data
    except BaseException as exc:
        data["error"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        data["meta"]["seconds"] = time.monotonic() - started
        path.write_text(json.dumps(data, indent=1, sort_keys=True))
