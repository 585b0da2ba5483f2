"""The Debian package as an administrator receives it: built with packaging/build-deb, read with dpkg-deb.

Installing it for real (dpkg -i, systemctl start) happens in the systemd lab: tests/test_systemd_lab.py.
Here the package is built once per run and its files, conffiles, dependencies and scripts are checked, and its
bundled Python environment is run from an extracted copy.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
BUILD_TOOLS = ("dpkg-buildpackage", "dh", "dpkg-deb")


def run(*args: str | Path, cwd: Path = REPO, env: dict[str, str] | None = None,
        timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def deb() -> Path:
    missing = [tool for tool in BUILD_TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (apt-get install dpkg-dev debhelper)")
    # Under the repo, not /tmp: the systemd lab guest (tests/test_systemd_lab.py) installs this very package, and
    # it sees the host's disk but not its /tmp. One folder per pytest process; those of dead processes go.
    lab = REPO / ".lab" / "deb"
    for old in lab.glob("*"):
        if old.name.isdigit() and not Path(f"/proc/{old.name}").exists():
            shutil.rmtree(old, ignore_errors=True)
    out = lab / str(os.getpid())
    built = run(REPO / "packaging" / "build-deb", "--out", out)
    assert built.returncode == 0, built.stderr[-4000:]
    deb = out / f"greupd_{VERSION}_amd64.deb"
    os.environ["GREUPD_LAB_DEB"] = str(deb)  # every GREUPD_* variable reaches the lab guests
    return deb


@pytest.fixture(scope="module")
def contents(deb: Path) -> dict[str, str]:
    """path -> the `dpkg-deb -c` line (mode, owner, size) for every file in the package."""
    listing = run("dpkg-deb", "-c", deb).stdout
    entries = {}
    for line in listing.splitlines():
        path = line.split(None, 5)[5].split(" -> ")[0]
        entries[path.removeprefix(".").rstrip("/")] = line
    return entries


@pytest.fixture(scope="module")
def extracted(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("root")
    assert run("dpkg-deb", "-x", deb, root).returncode == 0
    # The venv's interpreter is a relative link to /usr/bin/python3.11; point the extracted tree's at the real one.
    (root / "usr/bin/python3.11").symlink_to("/usr/bin/python3.11")
    return root


def field(deb: Path, name: str) -> str:
    return run("dpkg-deb", "-f", deb, name).stdout.strip()


def control_file(deb: Path, name: str) -> str:
    return run("dpkg-deb", "--info", deb, name).stdout


def test_package_carries_the_unit_unchanged(contents: dict[str, str], extracted: Path) -> None:
    units = [p for p in contents if re.fullmatch(r"(/usr)?/lib/systemd/system/greupd\.service", p)]
    assert len(units) == 1
    assert (extracted / units[0].lstrip("/")).read_text() == (REPO / "systemd/greupd.service").read_text()


def test_config_and_route_protocol_name_are_conffiles(deb: Path, extracted: Path) -> None:
    assert control_file(deb, "conffiles").split() == ["/etc/greupd/tunnels.toml",
                                                      "/etc/iproute2/rt_protos.d/greupd.conf"]
    assert (extracted / "etc/greupd/tunnels.toml").read_text() == (REPO / "etc/greupd/tunnels.toml").read_text()
    names = [line.split() for line in (extracted / "etc/iproute2/rt_protos.d/greupd.conf").read_text().splitlines()
             if line and not line.startswith("#")]
    assert names == [["222", "greupd"]]


def test_catalog_man_page_and_command(contents: dict[str, str], extracted: Path) -> None:
    assert "/usr/lib/systemd/catalog/greupd.catalog" in contents
    assert "/usr/share/man/man8/greupd.8.gz" in contents
    assert contents["/usr/bin/greupd"].startswith("-rwxr-xr-x root/root")
    rendered = run("man", "-l", extracted / "usr/share/man/man8/greupd.8.gz", env={"MANWIDTH": "100"})
    assert "greupd status" in rendered.stdout


def test_dependencies_and_no_auto_start(deb: Path) -> None:
    depends = field(deb, "Depends")
    for package in ("python3.11", "libnftables1", "libsystemd0", "iproute2"):
        assert package in depends
    postinst = control_file(deb, "postinst")
    # Never enabled or started by the install: the shipped config is machine A's example.
    assert "deb-systemd-invoke start" not in postinst
    assert "systemctl try-restart greupd.service" in postinst  # but an upgrade restarts a running daemon


def test_bundled_python_is_the_projects_own(contents: dict[str, str], extracted: Path) -> None:
    site = "/usr/lib/greupd/lib/python3.11/site-packages"
    assert any(re.fullmatch(rf"{site}/pydantic-2\.[\d.]+\.dist-info", p) for p in contents)
    assert any(re.fullmatch(rf"{site}/pyroute2-0\.9\.[\d.]+\.dist-info", p) for p in contents)
    assert f"{site}/greupd/cli.py" in contents
    assert not any("/__pycache__/" in p or p.endswith("/bin/pip") for p in contents)
    python = extracted / "usr/lib/greupd/bin/python3"
    probe = run(python, "-I", "-c", "import sys, pydantic, systemd.journal, nftables, scapy.all, greupd.daemon;"
                " print(sys.prefix, pydantic.VERSION)")
    assert probe.returncode == 0, probe.stderr
    prefix, pydantic_version = probe.stdout.split()
    assert prefix == str(extracted / "usr/lib/greupd")  # the venv, not the system's python3-pydantic
    assert pydantic_version.startswith("2.")


def test_packaged_command_checks_the_shipped_config(extracted: Path, tmp_path: Path) -> None:
    python = extracted / "usr/lib/greupd/bin/python3"
    launcher = (extracted / "usr/bin/greupd").read_text()
    assert launcher.startswith("#!/usr/lib/greupd/bin/python3 -I\n")
    check = run(python, "-I", extracted / "usr/bin/greupd", "check", "-c", extracted / "etc/greupd/tunnels.toml")
    assert check.returncode == 0, check.stderr
    assert "My_Tunnel: gre 172.19.1.1 -> 172.19.1.2" in check.stdout
    status = run(python, "-I", extracted / "usr/bin/greupd", "status", "--socket", tmp_path / "none.sock")
    assert status.returncode == 3


def test_package_version_follows_pyproject(deb: Path) -> None:
    assert field(deb, "Version") == VERSION
    changelog = (REPO / "packaging/debian/changelog").read_text().splitlines()[0]
    assert changelog.startswith(f"greupd ({VERSION})")


def test_man_page_source_has_no_warnings() -> None:
    if shutil.which("groff") is None:
        pytest.skip("groff is not installed")
    result = run("groff", "-man", "-ww", "-z", REPO / "docs/greupd.8")
    assert (result.returncode, result.stderr) == (0, "")


# --- RPM: the spec builds on this Debian host too (rpmbuild --nodeps), which keeps it from rotting ------------

def test_rpm_spec_builds(deb: Path, tmp_path: Path) -> None:  # deb: its build fills the wheelhouse
    if shutil.which("rpmbuild") is None:
        pytest.skip("rpmbuild is not installed (apt-get install rpm)")
    wheelhouse = Path(os.environ.get("GREUPD_WHEELHOUSE")
                      or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "greupd/wheelhouse")
    if not any(wheelhouse.glob("pydantic-*.whl")):
        pytest.skip(f"no wheelhouse at {wheelhouse} yet (packaging/build-deb fills it)")
    sources = tmp_path / "SOURCES"
    sources.mkdir()
    tarball = sources / f"greupd-{VERSION}.tar.gz"
    packed = run("tar", "--exclude=__pycache__", "--exclude=*.egg-info", f"--transform=s,^,greupd-{VERSION}/,",
                 "-czf", tarball, "greupd", "pyproject.toml", "README.md", "etc", "systemd", "docs", "packaging")
    assert packed.returncode == 0, packed.stderr
    built = run("rpmbuild", "-bb", "--nodeps", "--define", f"_topdir {tmp_path}",
                # systemd-rpm-macros is Fedora's; on Debian name the unit directory by hand.
                "--define", "_unitdir /usr/lib/systemd/system", REPO / "packaging/rpm/greupd.spec",
                env={"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheelhouse)})
    assert built.returncode == 0, built.stderr[-4000:]
    (rpm,) = (tmp_path / "RPMS").rglob("greupd-*.rpm")
    files = run("rpm", "-qlp", rpm).stdout.split()
    for path in ("/usr/bin/greupd", "/usr/lib/systemd/system/greupd.service",
                 "/usr/lib/systemd/catalog/greupd.catalog", "/usr/share/man/man8/greupd.8",
                 "/etc/iproute2/rt_protos.d/greupd.conf"):
        assert path in files
    assert run("rpm", "-qcp", rpm).stdout.split() == ["/etc/greupd/tunnels.toml",
                                                      "/etc/iproute2/rt_protos.d/greupd.conf"]
