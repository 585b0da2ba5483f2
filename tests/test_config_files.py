"""Router A's /etc/greupd as it is on disk: whatever keeps a file from being read is a config error naming it.

A config read without one of its files would delete that file's tunnels at the next reload or start (review H2,
newcomer-3 N2, N6, N11). So a drop-in directory that cannot be listed, a FIFO, a device, a dangling symlink, a
directory named `*.toml`, an oversized file, TOML nested too deeply for the parser and a byte order mark are all
ConfigErrors naming the file (and the line where there is one), never a silent skip, a traceback or a hang.
Real files throughout; the unreadable cases run as uid 65534 (the unit's user greupd stands in) through setpriv.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from greupd.config import (
    ConfigError,
    ConfigProblem,
    load_config,
    load_config_sources,
    load_config_text,
    read_daemon_table,
)

REPO = Path(__file__).resolve().parent.parent
SEED_A = """[[tunnel]]
name = "My_Tunnel"
local = "172.19.1.1"
remote = "172.19.1.2"
routes = ["20.10.1.0/24"]
"""
BACKUP = """[[tunnel]]
name = "Backup"
local = "172.19.2.1"
remote = "172.19.2.2"
routes = ["20.10.1.0/24"]
metric = 10
"""
# newcomer-3's 1 KB file: routes nested 500 deep exhaust tomllib's recursion (RecursionError, not a TOML error).
NESTED = SEED_A.replace('routes = ["20.10.1.0/24"]', "routes = " + "[" * 500 + "]" * 500)
NOBODY = 65534


@pytest.fixture
def etc(tmp_path: Path) -> Path:
    """/etc/greupd of router A: tunnels.toml (My_Tunnel) and tunnels.d/10-backup.toml (Backup)."""
    (tmp_path / "tunnels.d").mkdir()
    (tmp_path / "tunnels.toml").write_text(SEED_A)
    (tmp_path / "tunnels.d" / "10-backup.toml").write_text(BACKUP)
    return tmp_path / "tunnels.toml"


def problem_of(path: Path) -> ConfigProblem:
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    [problem] = raised.value.problems
    return problem


def load_within(path: Path, seconds: float = 30) -> ConfigError | Exception | None:
    """load_config in a thread: on a loader that blocks (a FIFO opened without O_NONBLOCK) the test fails rather
    than hangs. What it raised, or None."""
    raised: list[Exception | None] = []

    def load() -> None:
        try:
            load_config(path)
            raised.append(None)
        except Exception as exc:
            raised.append(exc)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(seconds)
    assert raised, f"load_config({path}) still blocked after {seconds} s"
    return raised[0]


def test_the_files_of_router_a_load(etc: Path) -> None:
    assert [t.name for t in load_config(etc).tunnels] == ["My_Tunnel", "Backup"]


# --- not a regular file ----------------------------------------------------------------------------------


def test_a_fifo_as_the_config_is_refused_without_blocking(etc: Path) -> None:
    etc.unlink()
    os.mkfifo(etc)  # nobody ever writes to it: open() without O_NONBLOCK would wait forever
    raised = load_within(etc)
    assert isinstance(raised, ConfigError), raised
    [problem] = raised.problems
    assert (problem.file, problem.line) == (etc, None)
    assert "is a FIFO (named pipe), not a regular file" in problem.message


def test_a_fifo_in_tunnels_d_is_refused(etc: Path) -> None:
    fifo = etc.parent / "tunnels.d" / "20-pipe.toml"
    os.mkfifo(fifo)
    raised = load_within(etc)
    assert isinstance(raised, ConfigError), raised
    assert [(p.file, "FIFO" in p.message) for p in raised.problems] == [(fifo, True)]


def test_a_symlink_to_a_device_in_tunnels_d_is_refused(etc: Path) -> None:
    # /dev/zero would be read without end (2.2 GB in 8 s); a glob that wants is_file() skipped it in silence.
    link = etc.parent / "tunnels.d" / "20-zero.toml"
    link.symlink_to("/dev/zero")
    problem = problem_of(etc)
    assert problem.file == link
    assert problem.message.startswith("is a character device (through the symlink to /dev/zero), not a regular file")


def test_a_config_that_is_dev_null_is_refused_not_read_as_no_tunnels(etc: Path) -> None:
    etc.unlink()
    etc.symlink_to("/dev/null")  # read as empty, it would be a valid config of 0 tunnels: every tunnel deleted
    assert "is a character device" in problem_of(etc).message


def test_a_dangling_symlink_in_tunnels_d_is_refused(etc: Path) -> None:
    link = etc.parent / "tunnels.d" / "20-x.toml"
    link.symlink_to("/nonexistent/20-x.toml")
    problem = problem_of(etc)
    assert (problem.file, problem.message) == (link, "a symlink to /nonexistent/20-x.toml, which does not exist")


def test_a_directory_named_toml_in_tunnels_d_is_refused(etc: Path) -> None:
    (etc.parent / "tunnels.d" / "x.toml").mkdir()
    problem = problem_of(etc)
    assert (problem.file, problem.message) == (
        etc.parent / "tunnels.d" / "x.toml", "is a directory, not a regular file: a config is a text file")


def test_hidden_files_in_tunnels_d_are_not_config(etc: Path) -> None:
    # Emacs' lock file for 10-backup.toml is a dangling symlink named .#10-backup.toml: editing is no error.
    (etc.parent / "tunnels.d" / ".#10-backup.toml").symlink_to("root@router-a.1234:1700000000")
    assert [t.name for t in load_config(etc).tunnels] == ["My_Tunnel", "Backup"]


def test_a_tunnels_d_symlink_loop_is_refused_not_taken_for_no_drop_ins(etc: Path) -> None:
    # ELOOP even for root: Path.is_dir() answered False for it, and the drop-in tunnels were gone.
    dropins = etc.parent / "tunnels.d"
    shutil.rmtree(dropins)
    dropins.symlink_to("tunnels.d")
    problem = problem_of(etc)
    assert problem.file == dropins
    assert problem.message.startswith("cannot list the drop-in directory: Too many levels of symbolic links")


def test_a_file_over_16_mib_is_refused(etc: Path) -> None:
    with etc.open("r+b") as file:
        file.truncate(16 * 1024 * 1024 + 1)  # sparse: no disk used
    assert problem_of(etc).message == (
        f"is {16 * 1024 * 1024 + 1} bytes, more than a config file may have ({16 * 1024 * 1024} bytes)")


# --- text that tomllib cannot read --------------------------------------------------------------------------


def test_toml_nested_too_deeply_is_a_config_error_naming_the_line(etc: Path) -> None:
    etc.write_text(NESTED)
    problem = problem_of(etc)
    assert (problem.file, problem.line) == (etc, 5)
    assert problem.message.startswith("arrays or tables nested 500 deep, more than the TOML parser can read")
    # the same for `greupd check -` and for a last good config kept as text
    with pytest.raises(ConfigError):
        load_config_text(NESTED)
    with pytest.raises(ConfigError):
        load_config_sources([(etc, NESTED)])


def test_a_byte_order_mark_is_named(etc: Path) -> None:
    etc.write_bytes(b"\xef\xbb\xbf" + SEED_A.encode())
    problem = problem_of(etc)
    assert (problem.file, problem.line) == (etc, 1)
    assert problem.message.startswith("the file starts with a UTF-8 byte order mark (BOM")


def test_text_that_is_not_utf8_names_its_line(etc: Path) -> None:
    etc.write_bytes(SEED_A.encode() + b"# caf\xe9\n")
    problem = problem_of(etc)
    assert (problem.line, problem.message.startswith("not UTF-8 text: ")) == (6, True)


def test_crlf_line_ends_still_load(etc: Path) -> None:
    etc.write_bytes(SEED_A.replace("\n", "\r\n").encode())
    assert [t.name for t in load_config(etc).tunnels] == ["My_Tunnel", "Backup"]


def test_the_daemon_table_is_read_from_any_of_these_without_blocking(etc: Path) -> None:
    # `greupd run` finds state_dir, and `greupd status` the socket, this way before anything is validated.
    (etc.parent / "tunnels.d" / "20-pipe.toml").unlink(missing_ok=True)
    os.mkfifo(etc.parent / "tunnels.d" / "20-pipe.toml")
    (etc.parent / "tunnels.d" / "30-deep.toml").write_text(NESTED)
    (etc.parent / "tunnels.d" / "40-sock.toml").write_text('[daemon]\ncontrol_socket = "/run/x.sock"\n')
    assert read_daemon_table(etc) == {"control_socket": "/run/x.sock"}


# --- read as the unit's user (uid 65534 stands in for greupd) --------------------------------------------------


def python_for(uid: int) -> str:
    """An interpreter that uid can run (this venv's may live under root's 0700 home), of this Python's version."""
    for python in (sys.executable, os.path.realpath(sys.executable), "/usr/bin/python3"):
        probe = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", python, "-c",
                                "import sys; print(sys.version_info[:2])"], capture_output=True, text=True)
        if probe.returncode == 0 and probe.stdout.strip() == str(sys.version_info[:2]):
            return python
    pytest.skip(f"no Python {sys.version_info[:2]} that uid {uid} can run")


def run_as(uid: int, code: str, *argv: str) -> subprocess.CompletedProcess[str]:
    """Python code run as uid (setpriv), with this checkout's greupd and this venv's packages."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{REPO}:{sysconfig.get_paths()['purelib']}"}
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", python_for(uid),
                           "-c", code, *argv], capture_output=True, text=True, timeout=120, env=env, cwd="/")


LOAD = """
import sys
from pathlib import Path
from greupd.config import ConfigError, load_config
try:
    print("loaded", [t.name for t in load_config(Path(sys.argv[1])).tunnels])
except ConfigError as exc:
    print("ConfigError", exc)
"""


@pytest.fixture
def shared() -> Iterator[Path]:
    """A folder other users can reach (pytest's tmp_path is under a 0700 folder of root's), with router A's
    files in etc/, readable by all as a package installs them."""
    folder = Path(tempfile.mkdtemp(prefix="greupd-config-files-"))
    try:
        folder.chmod(0o755)
        (folder / "etc" / "tunnels.d").mkdir(parents=True)
        (folder / "etc" / "tunnels.toml").write_text(SEED_A)
        (folder / "etc" / "tunnels.d" / "10-backup.toml").write_text(BACKUP)
        for path in (folder / "etc", folder / "etc" / "tunnels.d"):
            path.chmod(0o755)
        yield folder
    finally:
        shutil.rmtree(folder)


@pytest.mark.needs_root
def test_the_units_user_reads_router_a_as_root_does(shared: Path) -> None:
    done = run_as(NOBODY, LOAD, str(shared / "etc" / "tunnels.toml"))
    assert done.stdout == "loaded ['My_Tunnel', 'Backup']\n", done.stderr


@pytest.mark.needs_root
def test_a_tunnels_d_the_units_user_cannot_list_is_an_error_not_missing_tunnels(shared: Path) -> None:
    # review H2: root made tunnels.d under umask 077. Python 3.11's Path.glob swallowed the PermissionError and
    # the daemon's config lacked Backup, which the next reload or start deleted.
    (shared / "etc" / "tunnels.d").chmod(0o700)
    done = run_as(NOBODY, LOAD, str(shared / "etc" / "tunnels.toml"))
    assert done.stdout == (f"ConfigError {shared / 'etc' / 'tunnels.d'}: cannot list the drop-in directory:"
                           f" Permission denied (as uid {NOBODY}); the tunnels its files define would be missing,"
                           " so nothing is loaded\n"), done.stderr


@pytest.mark.needs_root
def test_a_config_directory_the_units_user_cannot_search_is_a_config_error(shared: Path) -> None:
    # `chmod 700 /etc/greupd` to protect psk/: a bare PermissionError from is_dir() before, a traceback.
    (shared / "etc").chmod(0o700)
    done = run_as(NOBODY, LOAD, str(shared / "etc" / "tunnels.toml"))
    assert done.stdout.startswith(f"ConfigError {shared / 'etc' / 'tunnels.d'}: cannot list the drop-in directory:"
                                  " Permission denied"), done.stdout + done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.needs_root
def test_a_drop_in_the_units_user_cannot_read_is_a_config_error(shared: Path) -> None:
    (shared / "etc" / "tunnels.d" / "10-backup.toml").chmod(0o600)
    done = run_as(NOBODY, LOAD, str(shared / "etc" / "tunnels.toml"))
    assert done.stdout == (f"ConfigError {shared / 'etc' / 'tunnels.d' / '10-backup.toml'}: cannot read:"
                           f" Permission denied (as uid {NOBODY})\n"), done.stderr


START = """
import sys
from pathlib import Path
from greupd.state import StartRefused, start_config
try:
    start = start_config(Path(sys.argv[1]), {"GREUPD_STATE_DIR": sys.argv[2]})
    print("started", [t.name for t in start.config.tunnels], "rejected:", start.rejected)
except StartRefused as exc:
    print("refused", exc)
"""


@pytest.mark.needs_root
def test_a_start_as_the_units_user_falls_back_to_last_good_when_the_directory_is_closed(shared: Path) -> None:
    # review H2: start_config caught ConfigError only; the PermissionError crashed the start, the unit looped.
    config = shared / "etc" / "tunnels.toml"
    state = shared / "state"
    state.mkdir(mode=0o755)
    texts = [{"path": str(config), "text": SEED_A}, {"path": str(config.parent / "tunnels.d" / "10-backup.toml"),
                                                     "text": BACKUP}]
    (state / "last-good.json").write_text(json.dumps(
        {"format": 1, "config": str(config), "saved": "2026-12-06T20:00:00Z", "files": texts}))
    (shared / "etc").chmod(0o700)
    done = run_as(NOBODY, START, str(config), str(state))
    assert done.stdout.startswith("started ['My_Tunnel', 'Backup'] rejected: "), done.stdout + done.stderr
    assert "cannot list the drop-in directory: Permission denied" in done.stdout
