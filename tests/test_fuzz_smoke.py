"""A smoke of `make fuzz` (fuzz/, RELIABILITY.md "Fuzzing") inside `make test`: every target's committed seed
corpus replayed through its harness with no crash, and each target's atheris worker run for a hundred
inputs (no time limit asserted: what is checked is that the campaign starts, mutates and ends cleanly).

The campaign itself (minutes per target, coverage, the table) is `make fuzz`, outside `make test`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fuzz.findings import CORPUS
from fuzz.targets import TARGETS

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", list(TARGETS))
def test_every_seed_passes_its_harness(name: str) -> None:
    seeds = sorted((CORPUS / name).iterdir())
    assert len(seeds) >= 3, f"fuzz/corpus/{name}/ lost its seeds"
    for seed in seeds:
        try:
            TARGETS[name].run(seed.read_bytes())
        except Exception as exc:
            raise AssertionError(f"seed fuzz/corpus/{name}/{seed.name} crashes its harness: {exc!r}") from exc


@pytest.mark.parametrize("name", list(TARGETS))
def test_the_atheris_worker_runs_the_target(name: str, tmp_path: Path) -> None:
    # Crashes it may find go to tmp_path, not fuzz/crashes/: a committed reproducer is a decision, not a test's.
    (tmp_path / "corpus").mkdir()
    env = {**os.environ, "GREUPD_FUZZ_CRASHES": str(tmp_path / "crashes"), "GREUPD_FUZZ_WORK": str(tmp_path / "work")}
    done = subprocess.run([sys.executable, "-m", "fuzz.worker", name, "-runs=100", "-seed=1",
                           f"-max_len={TARGETS[name].max_len}", str(tmp_path / "corpus"), str(CORPUS / name)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Done 100 runs" in done.stderr, done.stderr[-3000:]
