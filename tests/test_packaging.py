"""The Debian package as an administrator receives it: built with packaging/build-deb, read with dpkg-deb.

Installing it for real (dpkg -i, systemctl start) happens in the systemd lab: tests/test_systemd_lab.py.
Here the package is built once per run, offline (in a network namespace with no network, with an empty HOME
and empty caches: only the wheelhouse `make deps` filled), and its files, conffiles, dependencies and scripts
are checked, lintian reads it, and its bundled Python environment is run from an extracted copy.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

# Built and installed packages are `make install-test`'s (the .deb also goes to tests/test_systemd_lab.py's guests).
pytestmark = pytest.mark.distro

REPO = Path(__file__).resolve().parent.parent
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
BUILD_TOOLS = ("dpkg-buildpackage", "dh", "dpkg-deb")
WHEELHOUSE = REPO / "build" / "wheelhouse"  # `make deps` fills it


def run(*args: str | Path, cwd: Path = REPO, env: dict[str, str] | None = None,
        timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def offline() -> Iterator[tuple[list[str], dict[str, str]]]:
    """A command prefix and environment with no network and nothing cached: what a build may rely on.

    As root, `unshare --net` gives a network namespace with only a down loopback; anywhere else the build
    still gets an empty HOME and empty caches.
    """
    home = Path(tempfile.mkdtemp(prefix="greupd-empty-home-"))
    env = {"HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"), "PIP_CACHE_DIR": str(home / ".cache/pip"),
           "PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": "", "PIP_NO_INDEX": "1"}
    prefix = ["unshare", "--net"] if os.geteuid() == 0 and shutil.which("unshare") else []
    yield prefix, env
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def deb(offline: tuple[list[str], dict[str, str]]) -> Path:
    missing = [tool for tool in BUILD_TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (apt-get install dpkg-dev debhelper)")
    assert any(WHEELHOUSE.glob("pydantic-*.whl")), f"no wheelhouse at {WHEELHOUSE}: run `make deps` first"
    # Under the repo, not /tmp: the systemd lab guest (tests/test_systemd_lab.py) installs this very package, and
    # it sees the host's disk but not its /tmp. One folder per pytest process; those of dead processes go.
    lab = REPO / ".lab" / "deb"
    for old in lab.glob("*"):
        if old.name.isdigit() and not Path(f"/proc/{old.name}").exists():
            shutil.rmtree(old, ignore_errors=True)
    out = lab / str(os.getpid())
    prefix, env = offline
    built = run(*prefix, REPO / "packaging" / "build-deb", "--out", out, env=env)
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


def test_package_carries_the_units_and_the_user_unchanged(contents: dict[str, str], extracted: Path) -> None:
    for name in ("greupd.service", "greupd@.service"):
        units = [p for p in contents if re.fullmatch(rf"(/usr)?/lib/systemd/system/{re.escape(name)}", p)]
        assert len(units) == 1, name
        assert (extracted / units[0].lstrip("/")).read_text() == (REPO / "systemd" / name).read_text()
    sysusers = (extracted / "usr/lib/sysusers.d/greupd.conf").read_text()
    assert sysusers == (REPO / "systemd/greupd.sysusers").read_text()
    assert re.search(r"^u greupd - ", sysusers, re.M)


def test_live_config_configures_nothing_and_the_seed_is_an_example(deb: Path, extracted: Path) -> None:
    # A conffile that held someone else's tunnel and NAT would apply them the moment the service starts.
    assert control_file(deb, "conffiles").split() == ["/etc/greupd/tunnels.toml",
                                                      "/etc/iproute2/rt_protos.d/greupd.conf"]
    live = extracted / "etc/greupd/tunnels.toml"
    assert live.read_text() == (REPO / "packaging/tunnels.toml").read_text()
    check = greupd(extracted, "check", live)
    assert check.returncode == 0, check.stderr
    assert "0 tunnels from" in check.stdout
    assert re.search(r"^ip_forward = false", live.read_text(), re.M)  # and no sysctl changed either
    example = extracted / "usr/share/doc/greupd/examples/tunnels.toml"
    assert example.read_text() == (REPO / "etc/greupd/tunnels.toml").read_text()
    check = greupd(extracted, "check", example)
    assert check.returncode == 0, check.stderr
    assert "My_Tunnel: gre 172.19.1.1 -> 172.19.1.2" in check.stdout
    names = [line.split() for line in (extracted / "etc/iproute2/rt_protos.d/greupd.conf").read_text().splitlines()
             if line and not line.startswith("#")]
    assert names == [["222", "greupd"]]


def test_shipped_files_name_the_installed_json_schema(extracted: Path) -> None:
    schema = extracted / "usr/share/greupd/tunnels.schema.json"
    assert json.loads(schema.read_text()) == json.loads(greupd(extracted, "schema").stdout)
    for config in (extracted / "etc/greupd/tunnels.toml", extracted / "usr/share/doc/greupd/examples/tunnels.toml"):
        # Taplo (VS Code's Even Better TOML) reads the schema from a `#:schema` first line.
        assert config.read_text().splitlines()[0] == "#:schema file:///usr/share/greupd/tunnels.schema.json"


def test_catalog_man_pages_and_command(contents: dict[str, str], extracted: Path) -> None:
    assert "/usr/lib/systemd/catalog/greupd.catalog" in contents
    assert contents["/usr/bin/greupd"].startswith("-rwxr-xr-x root/root")
    for page, expected in (("man8/greupd.8.gz", "greupd status"), ("man5/tunnels.toml.5.gz", "[tunnel.keepalive]")):
        assert f"/usr/share/man/{page}" in contents
        rendered = run("man", "-l", extracted / "usr/share/man" / page, env={"MANWIDTH": "100"})
        assert expected in rendered.stdout


def test_dependencies_and_maintainer_scripts(deb: Path) -> None:
    depends = field(deb, "Depends")
    for package in ("python3.11", "libnftables1", "libsystemd0", "iproute2"):
        assert package in depends
    postinst = control_file(deb, "postinst")
    assert "systemd-sysusers" in postinst and "greupd.conf" in postinst  # the user exists before a unit starts
    # Never enabled or started by the install; debhelper writes the systemd part, not a hand-made systemctl.
    assert "deb-systemd-invoke start" not in postinst
    assert not re.search(r"^\s*systemctl (?!--system daemon-reload)", postinst, re.M)
    # An upgrade restarts a running daemon only onto a config that passes `greupd check` (else: a warning).
    check, restart = postinst.index("/usr/bin/greupd check"), postinst.index("deb-systemd-invoke try-restart")
    assert check < restart
    assert "not restarting" in postinst
    # Bytecode ships in the package: no compile in postinst, no cleanup in prerm.
    assert "compileall" not in postinst
    assert "__pycache__" not in control_file(deb, "prerm")


def test_maintainer_is_a_real_address(deb: Path) -> None:
    maintainer = field(deb, "Maintainer")
    assert re.fullmatch(r"[^<>]+ <[^@<>\s]+@[^@<>\s]+\.[a-z]+>", maintainer)
    assert "localhost" not in maintainer and "localdomain" not in maintainer
    # No placeholder domain (RFC 2606's .example/.invalid/.test): mail to it could never arrive.
    assert not re.search(r"\.(example|invalid|test|localhost)>$", maintainer), maintainer


def test_copyright_is_dep5_with_a_license_paragraph_for_every_license(extracted: Path) -> None:
    text = (extracted / "usr/share/doc/greupd/copyright").read_text()
    assert text.startswith("Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n")
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    used = {name for p in paragraphs if p.startswith("Files:")
            for line in p.splitlines() if line.startswith("License:")
            for name in re.split(r"\s+or\s+", line.removeprefix("License:").strip())}
    defined = {p.splitlines()[0].removeprefix("License:").strip() for p in paragraphs if p.startswith("License:")}
    assert used <= defined, f"no License paragraph for {used - defined}"
    # A wheel's or sdist's file name is its project's name, "-", then its version (which starts with a digit).
    bundled = {re.sub(r"[-_.]+", "_", w.name[:re.search(r"-\d", w.name).start()]).lower()  # type: ignore[union-attr]
               for w in WHEELHOUSE.iterdir() if w.suffix in (".whl", ".gz")}
    named = {re.sub(r"[-_.]+", "_", m).lower() for m in re.findall(r"wheelhouse/([A-Za-z0-9_.-]+?)-\*", text)}
    assert bundled <= named, f"bundled without a Files paragraph: {bundled - named}"


def test_bytecode_is_compiled_at_build_time(contents: dict[str, str], extracted: Path) -> None:
    site = "usr/lib/greupd/lib/python3.11/site-packages"
    pyc = extracted / site / "greupd/__pycache__/cli.cpython-311.pyc"
    assert f"/{site}/greupd/__pycache__/cli.cpython-311.pyc" in contents
    # PEP 552 flags: 0b01 = hash-based and not checked against the source (reproducible, never rewritten).
    assert int.from_bytes(pyc.read_bytes()[4:8], "little") == 0b01
    assert all(any(p.parent.joinpath("__pycache__").glob(f"{p.stem}.cpython-311.pyc"))
               for p in (extracted / site / "greupd").glob("*.py"))


def test_lintian_is_clean_and_every_override_says_why(deb: Path) -> None:
    if shutil.which("lintian") is None:
        pytest.skip("lintian is not installed (make deps installs it)")
    result = run("lintian", "--fail-on", "error,warning", deb)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not re.search(r"^[EW]: ", result.stdout, re.M), result.stdout
    overrides = (REPO / "packaging/debian/greupd.lintian-overrides").read_text().split("\n\n")
    for block in overrides:
        lines = block.strip().splitlines()
        assert lines[0].startswith("#"), f"an override without a reason: {block}"


def test_bundled_python_is_the_projects_own(contents: dict[str, str], extracted: Path) -> None:
    site = "/usr/lib/greupd/lib/python3.11/site-packages"
    assert any(re.fullmatch(rf"{site}/pydantic-2\.[\d.]+\.dist-info", p) for p in contents)
    assert any(re.fullmatch(rf"{site}/pyroute2-0\.9\.[\d.]+\.dist-info", p) for p in contents)
    assert f"{site}/greupd/cli.py" in contents
    assert not any(p.endswith("/bin/pip") for p in contents)
    python = extracted / "usr/lib/greupd/bin/python3"
    probe = run(python, "-I", "-c", "import sys, pydantic, systemd.journal, nftables, scapy.all, greupd.daemon;"
                " print(sys.prefix, pydantic.VERSION)")
    assert probe.returncode == 0, probe.stderr
    prefix, pydantic_version = probe.stdout.split()
    assert prefix == str(extracted / "usr/lib/greupd")  # the venv, not the system's python3-pydantic
    assert pydantic_version.startswith("2.")


def greupd(extracted: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """The packaged command, run from the extracted tree on its own venv."""
    return run(extracted / "usr/lib/greupd/bin/python3", "-I", extracted / "usr/bin/greupd", *args)


def test_packaged_command_asks_no_daemon_when_none_runs(extracted: Path, tmp_path: Path) -> None:
    launcher = (extracted / "usr/bin/greupd").read_text()
    assert launcher.startswith("#!/usr/lib/greupd/bin/python3 -I\n")
    assert greupd(extracted, "status", "--socket", tmp_path / "none.sock").returncode == 3


def test_packaged_command_exits_70_on_a_crash_not_the_config_error_status(extracted: Path) -> None:
    # The unit's RestartPreventExitStatus=1 stops restarts for a config that does not validate; a crash
    # (here: the config file is a folder, which nothing in greupd expects to read) must stay restartable.
    crashed = greupd(extracted, "check", extracted / "etc")
    assert crashed.returncode in (1, 70), crashed.stderr
    if crashed.returncode == 70:
        assert "Traceback" in crashed.stderr


def test_package_version_follows_pyproject(deb: Path) -> None:
    assert field(deb, "Version") == VERSION
    changelog = (REPO / "packaging/debian/changelog").read_text().splitlines()[0]
    assert changelog.startswith(f"greupd ({VERSION})")


# --- RPM: the spec builds on this Debian host too (rpmbuild --nodeps), which keeps it from rotting ------------

def test_rpm_spec_builds_offline_from_the_wheelhouse(offline: tuple[list[str], dict[str, str]],
                                                     tmp_path: Path) -> None:
    if shutil.which("rpmbuild") is None:
        pytest.skip("rpmbuild is not installed (apt-get install rpm)")
    assert any(WHEELHOUSE.glob("pydantic-*.whl")), f"no wheelhouse at {WHEELHOUSE}: run `make deps` first"
    prefix, env = offline
    # What `make rpm` runs: the source and wheelhouse tarballs, then rpmbuild (on Debian: --nodeps, and
    # systemd-rpm-macros' directories named by hand).
    built = run(*prefix, REPO / "packaging/build-rpm", "--out", tmp_path, env=env)
    assert built.returncode == 0, built.stderr[-4000:]
    (rpm,) = tmp_path.glob("greupd-*.rpm")
    files = run("rpm", "-qlp", rpm).stdout.split()
    for path in ("/usr/bin/greupd", "/usr/lib/systemd/system/greupd.service", "/usr/lib/systemd/system/greupd@.service",
                 "/usr/lib/sysusers.d/greupd.conf", "/usr/lib/systemd/catalog/greupd.catalog",
                 "/usr/share/man/man8/greupd.8", "/usr/share/man/man5/tunnels.toml.5",
                 "/usr/share/greupd/tunnels.schema.json", "/usr/share/doc/greupd/examples/tunnels.toml",
                 "/usr/lib/greupd/lib/python3.11/site-packages/greupd/__pycache__/cli.cpython-311.pyc",
                 "/etc/iproute2/rt_protos.d/greupd.conf"):
        assert path in files
    assert run("rpm", "-qcp", rpm).stdout.split() == ["/etc/greupd/tunnels.toml",
                                                      "/etc/iproute2/rt_protos.d/greupd.conf"]
    # Fedora's bundling rule: every library in the venv is a Provides: bundled(python3dist(name)) = version.
    provides = set(run("rpm", "-qp", "--provides", rpm).stdout.splitlines())
    site = "/usr/lib/greupd/lib/python3.11/site-packages/"
    dists = [re.fullmatch(r"(.+)-([^-]+)\.dist-info", p.removeprefix(site)) for p in files
             if p.startswith(site) and p.endswith(".dist-info")]
    for dist in dists:
        assert dist is not None
        name, version = dist.group(1).lower().replace("_", "-"), dist.group(2)
        if name != "greupd":
            assert f"bundled(python3dist({name})) = {version}" in provides, (
                f"packaging/rpm/greupd.spec lacks Provides: bundled(python3dist({name})) = {version}")
    # The scriptlets are the systemd macros' (and sysusers'): no compileall, no hand-run catalog update.
    scripts = run("rpm", "-qp", "--scripts", rpm).stdout
    assert "compileall" not in scripts and "update-catalog" not in scripts


# --- Debian 13: Debian's own python3-* packages, only pyroute2 and vici bundled (README "Install on a router") ----

@pytest.fixture(scope="module")
def trixie_deb(offline: tuple[list[str], dict[str, str]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    missing = [tool for tool in (*BUILD_TOOLS, "dh_python3") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (make deps installs them)")
    out = tmp_path_factory.mktemp("trixie")
    prefix, env = offline
    built = run(*prefix, REPO / "packaging" / "build-deb", "--suite", "trixie", "--out", out, env=env)
    assert built.returncode == 0, built.stderr[-4000:]
    return out / f"greupd_{VERSION}+deb13_all.deb"


def test_trixie_package_depends_on_debians_python_libraries_and_bundles_only_what_trixie_lacks(
        trixie_deb: Path) -> None:
    assert field(trixie_deb, "Architecture") == "all"
    assert field(trixie_deb, "Version") == f"{VERSION}+deb13"  # sorts after bookworm's: an upgrade to 13 moves over
    depends = field(trixie_deb, "Depends")
    for package in ("python3-pydantic (>= 2.7)", "python3-systemd", "python3-nftables", "python3-yaml",
                    "python3-prometheus-client", "libnftables1", "iproute2"):
        assert package in depends
    assert "python3-pyroute2" not in depends and "python3.11" not in depends
    listing = run("dpkg-deb", "-c", trixie_deb).stdout
    top = {m.group(1) for m in re.finditer(r" \./usr/lib/greupd/([^/\s]+)/", listing)}
    assert top == {"greupd", "pyroute2", "pyroute2-0.9.7.dist-info", "vici", "vici-6.0.3.dist-info"}
    assert "/usr/lib/systemd/system/greupd.service" in listing  # merged /usr, as Debian 13 wants
    assert "__pycache__" not in listing  # py3compile in postinst, for the python3 of the machine
    assert "py3compile -p greupd /usr/lib/greupd" in control_file(trixie_deb, "postinst")
    assert "deb-systemd-invoke stop" in control_file(trixie_deb, "prerm")


def test_trixie_package_is_lintian_clean(trixie_deb: Path) -> None:
    if shutil.which("lintian") is None:
        pytest.skip("lintian is not installed (make deps installs it)")
    result = run("lintian", "--fail-on", "error,warning", trixie_deb)
    assert result.returncode == 0, result.stdout + result.stderr


def test_remove_stops_the_daemon_and_purge_removes_its_state(deb: Path) -> None:
    # dh_installsystemd --no-start writes no stop: without ours, `apt remove` left greupd running on deleted files.
    prerm = control_file(deb, "prerm")
    assert '[ "$1" = "remove" ]' in prerm and "deb-systemd-invoke stop" in prerm and "greupd@*" in prerm
    assert "rm -rf /var/lib/greupd" in control_file(deb, "postrm")
