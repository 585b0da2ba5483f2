"""README's pip and pipx routes for other systems: this checkout installed by pip into a fresh venv, and by pipx
(Debian's, 1.1) into a fresh PIPX_HOME, then `greupd install-units`.

The venv is made with Debian's python3.11 (the interpreter the wheelhouse matches) and pip installs from the
wheelhouse only (no index): systemd-python is compiled from its sdist, which is why README names gcc, pkg-config,
libsystemd-dev and python3-dev. The units install-units writes must run that venv's greupd (not /usr/bin/greupd)
and pass `systemd-analyze verify`, which fails on an ExecStart= that does not exist.

Marker `distro` (make install-test): the venv and the systemd-python build take a minute.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.distro

REPO = Path(__file__).resolve().parent.parent
WHEELHOUSE = REPO / "build" / "wheelhouse"
PYTHON = Path("/usr/bin/python3.11")


def run(*argv: str | Path, timeout: float = 600, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(WHEELHOUSE),
           "PIP_DISABLE_PIP_VERSION_CHECK": "1", **extra}
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout, env=env)


def test_pip_install_then_install_units_points_the_units_at_the_venv(tmp_path: Path) -> None:
    if not PYTHON.exists():
        pytest.skip(f"no {PYTHON}")
    assert any(WHEELHOUSE.glob("pydantic-*.whl")), f"no wheelhouse at {WHEELHOUSE}: run `make deps` first"
    venv = tmp_path / "opt-greupd"
    made = run(PYTHON, "-m", "venv", venv)
    assert made.returncode == 0, made.stderr
    installed = run(venv / "bin/pip", "install", copy_of_the_checkout(tmp_path))
    assert installed.returncode == 0, installed.stderr[-4000:]
    units_point_at(venv / "bin/greupd", tmp_path / "root")


def test_pipx_install_then_install_units_points_the_units_at_pipxs_venv(tmp_path: Path) -> None:
    """README's other route: `PIPX_HOME=... PIPX_BIN_DIR=... pipx install ./`. The command on PATH is pipx's link;
    the units must name the venv's own greupd (what the link points at), which stays put when the link moves."""
    if not PYTHON.exists():
        pytest.skip(f"no {PYTHON}")
    pipx = shutil.which("pipx")
    if pipx is None:
        pytest.skip("no pipx (apt-get install pipx; make deps installs it)")
    home, bin_dir = tmp_path / "opt-pipx", tmp_path / "usr-local-bin"
    installed = run(pipx, "install", "--python", PYTHON, copy_of_the_checkout(tmp_path),
                    PIPX_HOME=str(home), PIPX_BIN_DIR=str(bin_dir), PIPX_SHARED_LIBS=str(home / "shared"))
    assert installed.returncode == 0, (installed.stdout + installed.stderr)[-4000:]
    assert (bin_dir / "greupd").resolve() == (home / "venvs/greupd/bin/greupd").resolve()
    units_point_at(bin_dir / "greupd", tmp_path / "root", home / "venvs/greupd/bin/greupd")


def copy_of_the_checkout(tmp_path: Path) -> Path:
    """A copy of the checkout, not the checkout: pip's build must not need (or leave) anything in the repo."""
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".venv", ".lab", "build", "dist", ".git", "*.egg-info",
                                                               "__pycache__", ".mypy_cache", ".ruff_cache"))
    return source


def units_point_at(greupd: Path, root: Path, expected: Path | None = None) -> None:
    """`greupd check` runs; `greupd install-units --root` writes the packaged units with Exec*= naming `expected`
    (default: `greupd` itself), and they pass `systemd-analyze verify`."""
    expected = expected or greupd
    probe = run(greupd, "check", REPO / "etc/greupd/tunnels.toml")
    assert probe.returncode == 0, probe.stderr

    written = run(greupd, "install-units", "--root", root)
    assert written.returncode == 0, written.stderr
    assert "systemctl daemon-reload" in written.stdout
    for name in ("greupd.service", "greupd@.service"):
        unit = (root / "etc/systemd/system" / name).read_text()
        assert re.findall(r"^Exec\w+=.*$", unit, re.M) == [f"ExecStart={expected} run", f"ExecReload={expected} reload"]
        # Everything else is the packaged unit's, line for line.
        packaged = (REPO / "systemd" / name).read_text()
        assert [line for line in unit.splitlines() if not line.startswith(("Exec", "#"))] == \
               [line for line in packaged.splitlines() if not line.startswith(("Exec", "#"))]
    assert (root / "etc/sysusers.d/greupd.conf").read_text() == (REPO / "systemd/greupd.sysusers").read_text()
    if shutil.which("systemd-analyze"):
        # --man=no: the man pages are the packages' (Documentation=man:greupd(8)), not pip's.
        verified = run("systemd-analyze", "verify", "--man=no", root / "etc/systemd/system/greupd.service")
        assert verified.returncode == 0, verified.stdout + verified.stderr
