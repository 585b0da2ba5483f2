"""`greupd install-units` (greupd/install_units.py): the packaged units, pointed at the interpreter running it.

The end-to-end run (pip into a fresh venv, then install-units and systemd-analyze verify) is
tests/test_install_pip.py, in `make install-test`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

from greupd import install_units
from greupd.cli import main
from greupd.install_units import InstallUnitsError, check_command, greupd_command, plan_files, render_unit, unit_sources

REPO = Path(__file__).resolve().parent.parent


def test_render_replaces_only_the_exec_lines() -> None:
    packaged = (REPO / "systemd/greupd.service").read_text()
    rendered = render_unit(packaged, "/opt/greupd/bin/greupd")
    assert "ExecStart=/opt/greupd/bin/greupd run\n" in rendered
    assert "ExecReload=/opt/greupd/bin/greupd reload\n" in rendered
    assert "/usr/bin/greupd run" not in rendered and "/usr/bin/greupd reload" not in rendered
    assert rendered.startswith("# Written by `greupd install-units`")
    # The comments that mention /usr/bin/greupd in prose, and everything else, are the packaged unit's.
    body = rendered.split("\n", 2)[2]
    assert [line for line in body.splitlines() if not line.startswith("Exec")] == \
           [line for line in packaged.splitlines() if not line.startswith("Exec")]


def test_a_unit_without_the_packaged_exec_start_is_refused() -> None:
    with pytest.raises(InstallUnitsError, match="no ExecStart=/usr/bin/greupd"):
        render_unit("[Service]\nExecStart=/usr/local/bin/greupd run\n", "/opt/x/bin/greupd")


def test_the_command_is_the_script_beside_the_interpreter_else_python_m(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    python = tmp_path / "bin/python3"
    assert greupd_command(python) == f"{python} -m greupd"
    (tmp_path / "bin/greupd").write_text("#!/bin/sh\n")
    assert greupd_command(python) == str(tmp_path / "bin/greupd")
    with pytest.raises(InstallUnitsError, match="not absolute"):
        greupd_command(Path("bin/python3"))


@pytest.mark.parametrize("command", ["/root/.local/bin/greupd", "/home/ann/venv/bin/python3 -m greupd"])
def test_a_command_under_home_is_refused_since_protect_home_hides_it(command: str) -> None:
    with pytest.raises(InstallUnitsError, match="ProtectHome=yes hides"):
        check_command(command)
    check_command("/opt/greupd/bin/greupd")


def test_files_go_under_root(tmp_path: Path) -> None:
    files = plan_files(tmp_path, "/opt/greupd/bin/greupd", unit_sources())
    assert [f.path.relative_to(tmp_path).as_posix() for f in files] == [
        "etc/systemd/system/greupd.service", "etc/systemd/system/greupd@.service", "etc/sysusers.d/greupd.conf"]


def test_the_command_writes_the_files_and_says_what_to_run_next(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["install-units", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "systemd-sysusers" in out and "systemctl daemon-reload" in out
    unit = (tmp_path / "etc/systemd/system/greupd.service").read_text()
    assert f"ExecStart={greupd_command()} run\n" in unit
    assert main(["install-units", "--root", str(tmp_path / "dry"), "--dry-run"]) == 0
    assert not (tmp_path / "dry").exists()


def test_an_interpreter_under_home_exits_1_naming_the_way_out(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "executable", "/root/.local/share/pipx/venvs/greupd/bin/python")
    assert install_units.run(argparse.Namespace(root=str(tmp_path), dry_run=False)) == 1
    assert "PIPX_HOME=/opt/pipx" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_bash_completion_knows_the_command() -> None:
    from tests.test_completion import complete

    assert complete("greupd inst") == ["install-units"]
    assert set(complete("greupd install-units --")) >= {"--root", "--dry-run"}
