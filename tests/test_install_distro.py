"""README's install section, run as written in a fresh root of each Debian release greupd is packaged for.

For Debian 12 (bookworm) and Debian 13 (trixie): the package for that release is built from this checkout
(packaging/build-deb --suite), a root of the release is made from Debian's archive with exactly what the package
Depends on and Recommends, plus systemd, kmod, iproute2 and ping (lab/distro_root.py: mmdebstrap, cached by that
package list), and the UML guest boots it with systemd as PID 1 (lab/guest.py, root=). In there
tests/install_in_guest.sh runs README's install block (apt install, tunnels.toml, systemctl enable --now) against a
kernel GRE peer, checks that greupd.service runs as user greupd and the tunnel comes up (keepalives answered, the
route in, a ping through), then `apt purge greupd` and checks that nothing of it is left.

Marker `distro`: not part of `make test` (plain pytest leaves it out); `make install-test` runs it, and .ci/run
runs that after `make test`. Ubuntu is not here: its archive is not among the package sources this project's
machines reach, so README makes no claim for it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab import guest
from lab.distro_root import RootError, deb_dependencies, distro_root

pytestmark = pytest.mark.distro

REPO = Path(__file__).resolve().parent.parent
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
WHEELHOUSE = REPO / "build" / "wheelhouse"
DEBS = {"bookworm": f"greupd_{VERSION}_amd64.deb", "trixie": f"greupd_{VERSION}+deb13_all.deb"}


def readme_install_block() -> str:
    """The shell block of README's "Install on a router" section: what an administrator types."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Install on a router\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```sh\n(.*?)^```$", section, re.S | re.M)
    assert len(blocks) == 1, "README's install section should have one ```sh block"
    return str(blocks[0])


def block_for(suite: str) -> str:
    """README's block for this release: its first line installs the bookworm package, its comment names trixie's."""
    block = readme_install_block()
    first, rest = block.split("\n", 1)
    assert first.startswith(f"apt install ./{DEBS['bookworm']} "), first
    assert f"apt install ./{DEBS['trixie']}" in first, f"README's install line does not name {DEBS['trixie']}"
    return f"apt install ./{DEBS[suite]}\n{rest}"


@pytest.fixture(scope="module")
def built() -> Iterator[Path]:
    """A folder under the checkout (the guest sees it) for this run's packages."""
    if shutil.which("dpkg-buildpackage") is None:
        pytest.skip("dpkg-buildpackage is not installed (make deps installs it)")
    assert any(WHEELHOUSE.glob("pydantic-*.whl")), f"no wheelhouse at {WHEELHOUSE}: run `make deps` first"
    out = REPO / ".lab" / "install" / str(os.getpid())
    out.mkdir(parents=True, exist_ok=True)
    yield out
    shutil.rmtree(out, ignore_errors=True)


def build_deb(suite: str, out: Path) -> Path:
    done = subprocess.run([REPO / "packaging/build-deb", "--suite", suite, "--out", out], capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    deb = out / DEBS[suite]
    assert deb.is_file(), done.stdout
    return deb


def control_field(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", deb, name], capture_output=True, text=True, timeout=60).stdout.strip()


@pytest.mark.parametrize("suite", sorted(DEBS))
def test_readme_install_block_in_a_fresh_root_then_purge(suite: str, built: Path) -> None:
    why = guest.unavailable("uml-systemd")
    if why:
        # Under CI a skip would pass for a test that never ran (as for the kernel markers, lab/pytest_plugin.py).
        (pytest.fail if os.environ.get("CI") == "true" else pytest.skip)(why)
    deb = build_deb(suite, built)
    # The root holds what the package asks for and nothing of greupd's own: apt in the guest has no network, so a
    # Depends missing from the package fails the install (or the start), as it would for a user.
    packages = deb_dependencies(control_field(deb, "Depends")) + deb_dependencies(control_field(deb, "Recommends"))
    try:
        root = distro_root(suite, packages, log=built / f"mmdebstrap-{suite}.log")
    except RootError as exc:
        pytest.fail(f"no {suite} root: {exc}")
    block = built / f"install-{suite}.sh"
    block.write_text(block_for(suite))
    result = guest.run("uml-systemd", ["sh", str(REPO / "tests/install_in_guest.sh"), str(deb), str(block)],
                       cwd=REPO, root=root, timeout=900)
    print(f"{suite}: root {root}; guest {result.seconds:.0f} s\n{result.output}")
    assert result.ok, result.describe()
    assert "step: done" in result.output
