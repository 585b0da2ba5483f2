"""pyproject.toml's licence metadata (PEP 639): setuptools builds greupd without a deprecation warning (#25 item 5).

setuptools 77 deprecated `license = { text = ... }` (builds stop working on 2027-02-18); the SPDX string and
`license-files` replace it, and a pattern that matches no file is deprecated too, so the files must travel
with the sources wherever the package is built (packaging/build-deb copies a list of them).
"""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
WHEELHOUSE = REPO / "build" / "wheelhouse"
DEBIAN_PYTHON = "/usr/bin/python3.11"


def test_the_licence_is_an_spdx_expression_with_its_file() -> None:
    project = PROJECT["project"]
    assert project["license"] == "MIT"
    for pattern in project["license-files"]:
        assert list(REPO.glob(pattern)), f"license-files pattern {pattern!r} matches nothing"
    assert any(r.startswith("setuptools>=77") for r in PROJECT["build-system"]["requires"])


def test_the_debian_build_copies_the_licence_files() -> None:
    # build-deb tars a list of top-level paths into its build tree: the licence file must be among them.
    tar_line = next(line for line in (REPO / "packaging" / "build-deb").read_text().splitlines()
                    if line.strip().startswith("-cf - "))
    for pattern in PROJECT["project"]["license-files"]:
        assert pattern in tar_line.split(), f"packaging/build-deb does not copy {pattern}"


def test_setuptools_builds_greupd_without_a_deprecation_warning(tmp_path: Path) -> None:
    """As the .deb does: Debian's python3.11 and pip, setuptools from the wheelhouse, no index."""
    if not Path(DEBIAN_PYTHON).exists() or not list(WHEELHOUSE.glob("setuptools-*.whl")):
        pytest.skip("needs /usr/bin/python3.11 and the wheelhouse (make deps)")
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".lab", "build", "dist", "*.egg-info", "__pycache__", "bench", "tests", "demo", "lab"))
    built = subprocess.run([DEBIAN_PYTHON, "-m", "pip", "wheel", "-v", "--no-deps", "--no-index", "--find-links",
                            str(WHEELHOUSE), "--disable-pip-version-check", "-w", str(tmp_path / "out"), str(source)],
                           capture_output=True, text=True, timeout=600, check=False)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    output = built.stdout + built.stderr
    assert "Deprecat" not in output, [line for line in output.splitlines() if "eprecat" in line or "Pattern" in line]
    assert "adding 'greupd-0.1.0.dist-info/licenses/LICENSE'" in output
