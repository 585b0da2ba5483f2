"""A benchmark suite's results file is written whatever happens, with what stopped it if something did."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.record import results_file


def test_a_finished_suite_writes_its_results_and_meta(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    with results_file(out, "uml", quick=True) as data:
        data["reload"] = {"median_ms": 50}
    written = json.loads(out.read_text())
    assert written["reload"] == {"median_ms": 50} and "error" not in written
    assert written["meta"]["suite"] == "uml" and written["meta"]["quick"] is True
    assert written["meta"]["seconds"] >= 0 and written["meta"]["machine"]["cpus"] >= 1


def test_a_suite_that_fails_half_way_keeps_what_it_measured_and_says_why(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    with pytest.raises(TimeoutError), results_file(out, "nft", quick=False) as data:
        data["forwarding"] = {"rounds": 1}
        raise TimeoutError("no READY=1 in 600 s")
    written = json.loads(out.read_text())
    assert written["forwarding"] == {"rounds": 1}
    assert written["error"] == "TimeoutError: no READY=1 in 600 s"
