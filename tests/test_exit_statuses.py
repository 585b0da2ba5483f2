"""Every exit status greupd(8)'s table promises, provoked for real, command by command (#25 item 4, N9, N10,
N12, N13, N14): scripts and the Ansible role rely on them.

Each case runs the real CLI (a process) the way a script or an operator would: as root, as an unprivileged user
(uid 65534 through setpriv), as a member of the daemon's group, against a real daemon on this kernel whose tunnel
is in state error (a link that is not greupd's holds its name: any kernel), with its standard output closed.
Crashes and Ctrl-C cannot be provoked from outside, so for those the command's function is replaced by one that
raises, in a process that otherwise runs `greupd` as installed. The last test holds the cases to the table:
every (command, status) the table lists has a case here, and no case exits with a status the table does not
list for that command.

A new command (build_parser() finds it) needs: its rows in the table ("every command" rows include it), a case
for each status it has there besides 64, 70 and 130 (those are generic), and an entry in PRINTING (its 141).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lab.greupd_process import GreupdProcess
from lab.hosts import Host, Lab
from tests.test_man_page import SOURCE, commands, exit_table

REPO = Path(__file__).resolve().parent.parent
NOBODY = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
# The daemon runs as root here, so its socket is root:root 0660: gid 0 plays the part of group greupd.
MEMBER = ["setpriv", "--reuid", "65534", "--regid", "0", "--clear-groups"]

VALID = """[daemon]
ip_forward = false

[[tunnel]]
name = "My_Tunnel"
mode = "gre"
local = "172.19.1.1"
remote = "172.19.1.2"
routes = ["20.10.1.0/24"]
"""
INVALID = VALID.replace('remote = "172.19.1.2"', 'remote = "172.19.1.300"')
INVALID_LINE = 8
NOTHING = "[daemon]\nip_forward = false\n"


@dataclass
class Routers:
    """Router a runs greupd with VALID, its tunnel in error (a veth holds the name); router b is empty."""

    a: Host
    b: Host
    daemon: GreupdProcess


@dataclass
class Lab2:
    """What a case works with: a scratch folder, and the routers for a case marked needs_root."""

    files: Path
    routers: Routers | None = None

    def _routers(self) -> Routers:
        assert self.routers is not None, "a case that uses the routers must be registered with root=True"
        return self.routers

    @property
    def a(self) -> Host:
        return self._routers().a

    @property
    def b(self) -> Host:
        return self._routers().b

    @property
    def daemon(self) -> GreupdProcess:
        return self._routers().daemon

    @property
    def socket(self) -> str:
        return str(self.daemon.socket)

    def file(self, name: str, text: str) -> str:
        path = self.files / name
        path.write_text(text)
        path.chmod(0o644)
        return str(path)


def env(**extra: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("GREUPD_", "NOTIFY_SOCKET", "JOURNAL_STREAM"))}
    return {**clean, "PYTHONPATH": str(REPO), **extra}


def greupd(*argv: str, prefix: tuple[str, ...] | list[str] = (), stdin: int | None = subprocess.DEVNULL,
           extra_env: dict[str, str] | None = None, python: tuple[str, ...] = ("-m", "greupd"),
           timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, sys.executable, *python, *argv], cwd=REPO, capture_output=True, text=True,
                          env=env(**(extra_env or {})), stdin=stdin, timeout=timeout, check=False)


def with_stdout_closed(*argv: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """`greupd ... | head -0`: the reading end is gone before greupd writes a byte."""
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.Popen([*prefix, sys.executable, "-m", "greupd", *argv], cwd=REPO, stdout=write,
                                stderr=subprocess.PIPE, text=True, env=env())
    finally:
        os.close(write)
    _, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, "", err)


RAISING = """
import argparse, sys
import greupd.cli as cli

def raising(args):
    raise {exception}

build = cli.build_parser
def patched():
    parser = build()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub.set_defaults(func=raising)
    return parser

cli.build_parser = patched
sys.exit(cli.main(sys.argv[1:]))
"""


def raising_in(command: str, exception: str) -> subprocess.CompletedProcess[str]:
    """`greupd COMMAND` whose work raises `exception`: what a bug in it, or Ctrl-C during it, ends with."""
    return greupd(command, python=("-c", RAISING.format(exception=exception)))


# --- the cases: (command, status) -> a function that provokes it and checks what greupd says -----------------

Case = Callable[[Lab2], subprocess.CompletedProcess[str]]
CASES: list[tuple[str, int, str, Case]] = []  # command, status, what, how
NEEDS_ROOT: set[str] = set()  # the routers, setpriv, ip netns exec, or run's capabilities


def case(command: str, status: int, what: str, root: bool = True) -> Callable[[Case], Case]:
    def register(how: Case) -> Case:
        CASES.append((command, status, what, how))
        if root:
            NEEDS_ROOT.add(what)
        return how
    return register


@case("check", 0, "check of a valid config", root=False)
def _(lab: Lab2) -> subprocess.CompletedProcess[str]:
    return greupd("check", "-c", lab.file("valid.toml", VALID))


@case("check", 1, "check of an invalid config", root=False)
def _(lab: Lab2) -> subprocess.CompletedProcess[str]:
    done = greupd("check", "-c", lab.file("invalid.toml", INVALID))
    assert f"invalid.toml:{INVALID_LINE}: tunnel[0].remote: " in done.stderr
    return done


@case("plan", 0, "plan --detailed-exitcode, nothing to change")
def _(lab: Lab2) -> subprocess.CompletedProcess[str]:
    return greupd("plan", "--detailed-exitcode", lab.file("nothing.toml", NOTHING), prefix=netns(lab.b))


@case("plan", 2, "plan --detailed-exitcode, changes")
def _(lab: Lab2) -> subprocess.CompletedProcess[str]:
    done = greupd("plan", "--detailed-exitcode", lab.file("valid.toml", VALID), prefix=netns(lab.b))
    assert "create link My_Tunnel" in done.stdout
    return done


@case("plan", 1, "plan --json of an invalid config: JSON all the same")
def _(lab: Lab2) -> subprocess.CompletedProcess[str]:
    path = lab.file("invalid.toml", INVALID)
    done = greupd("plan", "--json", "--detailed-exitcode", path, prefix=netns(lab.b))
    answer = json.loads(done.stdout)  # N10: JSON, not an empty stdout
    assert answer["changes"] is None and answer["nftables"] is None
    assert answer["errors"] == [{"tunnel": None, "file": path, "line": INVALID_LINE, "field": "tunnel[0].remote",
                                 "message": "'172.19.1.300' is not an IPv4 or IPv6 address"}]
    return done


@case("plan", 1, "plan --detailed-exitcode, a tunnel that cannot be made")
def _(lab: Lab2) -> subprocess.CompletedProcess[str]:
    done = greupd("plan", "--json", "--detailed-exitcode", lab.file("valid.toml", VALID), prefix=netns(lab.a))
    (error,) = json.loads(done.stdout)["errors"]
    assert error["tunnel"] == "My_Tunnel" and "not greupd's" in error["message"]
    return done


@case("plan", 77, "plan -n NETNS as a user")
def _(lab: Lab2) -> subprocess.CompletedProcess[str]:
    done = greupd("-n", lab.a.netns, "plan", lab.file("valid.toml", VALID), prefix=NOBODY)
    assert done.stderr == f"greupd: cannot enter network namespace {lab.a.netns!r}: Operation not permitted\n"
    return done


@case("run", 0, "run stopped by SIGTERM")
def _(lab: Lab2) -> subprocess.CompletedProcess[str]:
    other = GreupdProcess(lab.b, NOTHING).start()
    return subprocess.CompletedProcess(["greupd", "run"], other.stop(), other.output(), "")


@case("run", 1, "run with an invalid config and no last good one")
def _(lab: Lab2) -> subprocess.CompletedProcess[str]:
    return greupd("run", "-c", lab.file("invalid.toml", INVALID),
                  extra_env={"GREUPD_STATE_DIR": str(lab.files / "state-1")})


@case("run", 77, "run as a user, without CAP_NET_ADMIN and CAP_NET_RAW")
def _(lab: Lab2) -> subprocess.CompletedProcess[str]:
    sock, state = lab.files / "run-77.sock", lab.files / "state-77"
    lab.files.chmod(0o777)  # so that only the missing capabilities can stop it
    try:
        done = greupd("run", "-c", lab.file("valid.toml", VALID), "--socket", str(sock),
                      extra_env={"GREUPD_STATE_DIR": str(state)}, prefix=NOBODY)
    finally:
        lab.files.chmod(0o755)
    # N13: one line, before anything is created (no control socket left behind, no state)
    assert done.stderr == ("greupd: run needs CAP_NET_ADMIN and CAP_NET_RAW, and this process has neither "
                           "(run it as root or under greupd.service)\n")
    assert not sock.exists() and not state.exists()
    return done


@case("status", 0, "status of a daemon whose tunnel is in error")
def _(lab: Lab2) -> subprocess.CompletedProcess[str]:
    done = greupd("status", "--socket", lab.socket)
    assert "My_Tunnel" in done.stdout and "error" in done.stdout
    return done


@case("status", 0, "status as a member of the daemon's group")
def _(lab: Lab2) -> subprocess.CompletedProcess[str]:
    return greupd("status", "--socket", lab.socket, prefix=MEMBER)


@case("status", 1, "status of an unknown tunnel")
def _(lab: Lab2) -> subprocess.CompletedProcess[str]:
    return greupd("status", "--socket", lab.socket, "My_Tunnel", "Nope")


@case("status", 3, "status with no daemon", root=False)
def _(lab: Lab2) -> subprocess.CompletedProcess[str]:
    return greupd("status", "--socket", str(lab.files / "none.sock"))


@case("status", 4, "status --check while a tunnel is in error")
def _(lab: Lab2) -> subprocess.CompletedProcess[str]:
    done = greupd("status", "--check", "--json", "--socket", lab.socket, "My_Tunnel")
    assert [t["state"] for t in json.loads(done.stdout)["tunnels"]] == ["error"]
    return done


@case("status", 77, "status as a user outside the daemon's group")
def _(lab: Lab2) -> subprocess.CompletedProcess[str]:
    done = greupd("status", "--socket", lab.socket, prefix=NOBODY)
    assert done.stderr.startswith(f"greupd: permission denied on {lab.socket}: Permission denied")
    return done


@case("status", 130, "status interrupted by Ctrl-C while it waits for an answer", root=False)
def _(lab: Lab2) -> subprocess.CompletedProcess[str]:
    path = lab.files / "silent.sock"
    with socket.socket(socket.AF_UNIX) as silent:  # takes the connection and never answers
        silent.bind(str(path))
        silent.listen()
        # SIGINT as a terminal leaves it: a shell's background job (a CI runner's `cmd &`) starts with SIGINT
        # ignored, every child inherits that, and Python keeps an inherited SIG_IGN (no KeyboardInterrupt then).
        proc = subprocess.Popen([sys.executable, "-m", "greupd", "status", "--socket", str(path)], cwd=REPO,
                                env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        connection, _ = silent.accept()
        with connection:
            assert connection.recv(100).startswith(b'{"command": "status"}')
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=60)
    assert "Traceback" not in err
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@case("metrics", 0, "metrics")
def _(lab: Lab2) -> subprocess.CompletedProcess[str]:
    done = greupd("metrics", "--socket", lab.socket)
    assert 'greupd_tunnel_up{tunnel="My_Tunnel"} 0.0' in done.stdout
    return done


@case("metrics", 3, "metrics with no daemon", root=False)
def _(lab: Lab2) -> subprocess.CompletedProcess[str]:
    return greupd("metrics", "--socket", str(lab.files / "none.sock"))


@case("metrics", 77, "metrics as a user outside the daemon's group")
def _(lab: Lab2) -> subprocess.CompletedProcess[str]:
    return greupd("metrics", "--socket", lab.socket, prefix=NOBODY)


@case("reload", 0, "reload")
def _(lab: Lab2) -> subprocess.CompletedProcess[str]:
    return greupd("reload", "--socket", lab.socket)


@case("reload", 1, "reload of an invalid config")
def _(lab: Lab2) -> subprocess.CompletedProcess[str]:
    lab.daemon.config_path.write_text(INVALID)
    try:
        done = greupd("reload", "--socket", lab.socket)
    finally:
        lab.daemon.config_path.write_text(VALID)
    assert "reload rejected, the running config stays in force" in done.stderr
    return done


@case("reload", 3, "reload with no daemon", root=False)
def _(lab: Lab2) -> subprocess.CompletedProcess[str]:
    return greupd("reload", "--socket", str(lab.files / "none.sock"))


@case("reload", 77, "reload by a member of the daemon's group (the daemon refuses)")
def _(lab: Lab2) -> subprocess.CompletedProcess[str]:
    done = greupd("reload", "--socket", lab.socket, prefix=MEMBER)
    assert "refused: permission denied: reload is for root" in done.stderr  # N14: not 1, "config invalid"
    return done


@case("reload", 77, "reload by a user outside the daemon's group")
def _(lab: Lab2) -> subprocess.CompletedProcess[str]:
    return greupd("reload", "--socket", lab.socket, prefix=NOBODY)


@case("import", 0, "import from the kernel")
def _(lab: Lab2) -> subprocess.CompletedProcess[str]:
    return greupd("import", prefix=netns(lab.a))


@case("import", 1, "import of a tunnel that does not exist")
def _(lab: Lab2) -> subprocess.CompletedProcess[str]:
    done = greupd("import", "Nope", prefix=netns(lab.a))
    assert "no GRE-family tunnel named Nope in the running kernel" in done.stderr
    return done


@case("import", 77, "import -n NETNS as a user")
def _(lab: Lab2) -> subprocess.CompletedProcess[str]:
    return greupd("-n", lab.a.netns, "import", prefix=NOBODY)


@case("doctor", 0, "doctor finding nothing")
def _(lab: Lab2) -> subprocess.CompletedProcess[str]:
    done = greupd("doctor", "-c", lab.file("nothing.toml", NOTHING), "--socket", str(lab.files / "none.sock"),
                  prefix=netns(lab.b))
    assert done.stdout.startswith("doctor: nothing found")
    return done


@case("doctor", 1, "doctor with a finding")
def _(lab: Lab2) -> subprocess.CompletedProcess[str]:
    done = greupd("doctor", "--json", "-c", lab.file("valid.toml", VALID), "--socket", str(lab.files / "none.sock"),
                  prefix=netns(lab.b))
    assert "local-address-missing" in [f["check"] for f in json.loads(done.stdout)["findings"]]
    return done


@case("doctor", 1, "doctor of a tunnel not in the config", root=False)
def _(lab: Lab2) -> subprocess.CompletedProcess[str]:
    done = greupd("doctor", "-c", lab.file("valid.toml", VALID), "Nope")
    assert "no tunnel named Nope in " in done.stderr
    return done


@case("doctor", 1, "doctor of an invalid config", root=False)
def _(lab: Lab2) -> subprocess.CompletedProcess[str]:
    done = greupd("doctor", "-c", lab.file("invalid.toml", INVALID))
    assert f"invalid.toml:{INVALID_LINE}: tunnel[0].remote: " in done.stderr and done.stdout == ""
    return done


@case("doctor", 77, "doctor -n NETNS as a user")
def _(lab: Lab2) -> subprocess.CompletedProcess[str]:
    return greupd("-n", lab.a.netns, "doctor", "-c", lab.file("valid.toml", VALID), prefix=NOBODY)


@case("schema", 0, "schema", root=False)
def _(lab: Lab2) -> subprocess.CompletedProcess[str]:
    return greupd("schema")


@case("install-units", 0, "install-units into a folder", root=False)
def _(lab: Lab2) -> subprocess.CompletedProcess[str]:
    done = greupd("install-units", "--root", str(lab.files / "units"))
    assert (lab.files / "units/etc/systemd/system/greupd.service").is_file()
    return done


@case("install-units", 1, "install-units where no folder can be made", root=False)
def _(lab: Lab2) -> subprocess.CompletedProcess[str]:
    blocker = Path(lab.file("not-a-folder", ""))
    done = greupd("install-units", "--root", str(blocker))
    assert "cannot write" in done.stderr and "Traceback" not in done.stderr
    return done


# For every command: a usage error, a crash, Ctrl-C; and but for run, a reader that went away.
def usage_error(command: str) -> Case:
    def how(lab: Lab2) -> subprocess.CompletedProcess[str]:
        done = greupd(command, "--no-such-option")
        assert "error: unrecognized arguments: --no-such-option" in done.stderr and done.stdout == ""
        return done
    return how


def crash(command: str) -> Case:
    def how(lab: Lab2) -> subprocess.CompletedProcess[str]:
        done = raising_in(command, 'RuntimeError("a bug")')
        assert "Traceback" in done.stderr and "RuntimeError: a bug" in done.stderr
        return done
    return how


def interrupt(command: str) -> Case:
    def how(lab: Lab2) -> subprocess.CompletedProcess[str]:
        done = raising_in(command, "KeyboardInterrupt")
        assert "Traceback" not in done.stderr
        return done
    return how


# What each command prints on stdout, to find its reader gone (N12: `greupd plan | head -1`).
PRINTING: dict[str, Callable[[Lab2], tuple[str, ...]]] = {
    "check": lambda lab: ("check", lab.file("valid.toml", VALID)),
    "plan": lambda lab: ("plan", lab.file("valid.toml", VALID)),
    "status": lambda lab: ("status", "--socket", lab.socket),
    "metrics": lambda lab: ("metrics", "--socket", lab.socket),
    "reload": lambda lab: ("reload", "--socket", lab.socket),
    "import": lambda lab: ("import",),
    "schema": lambda lab: ("schema",),
    "install-units": lambda lab: ("install-units", "--dry-run"),
    "doctor": lambda lab: ("doctor", "-c", lab.file("nothing.toml", NOTHING), "--socket", str(lab.files / "none.sock")),
}


def reader_gone(command: str) -> Case:
    def how(lab: Lab2) -> subprocess.CompletedProcess[str]:
        done = with_stdout_closed(*PRINTING[command](lab))
        # quietly: no BrokenPipeError, no "Exception ignored" (what the daemon answered may still be said on
        # stderr: `reload` names the tunnels the kernel refused something of, here the one a veth holds the name of)
        assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr
        assert "BrokenPipe" not in done.stderr and (command == "reload" or done.stderr == ""), done.stderr
        return done
    return how


for _command in commands():
    CASES.append((_command, 64, f"{_command} with an unknown option", usage_error(_command)))
    CASES.append((_command, 70, f"{_command} crashing", crash(_command)))
    CASES.append((_command, 130, f"{_command} interrupted", interrupt(_command)))
    if _command != "run":
        CASES.append((_command, 141, f"{_command} with its reader gone", reader_gone(_command)))
        NEEDS_ROOT.add(f"{_command} with its reader gone")


def netns(host: Host) -> tuple[str, ...]:
    return ("ip", "netns", "exec", host.netns)


@pytest.fixture(scope="module")
def routers() -> Iterator[Routers]:
    with Lab() as lab:
        a, b = lab.host("a"), lab.host("b")
        a.ip("link", "add", "My_Tunnel", "type", "veth", "peer", "name", "other")  # not greupd's: state error
        daemon = GreupdProcess(a, VALID).start()
        daemon.wait_for("My_Tunnel", "error")
        daemon.dir.chmod(0o750)  # group root (the stand-in for group greupd) may reach the socket; others not
        try:
            yield Routers(a, b, daemon)
        finally:
            daemon.stop()


def _params() -> list[object]:
    return [pytest.param(command, status, how, id=what, marks=[pytest.mark.needs_root] if what in NEEDS_ROOT else [])
            for command, status, what, how in CASES]


@pytest.fixture
def lab(request: pytest.FixtureRequest) -> Iterator[Lab2]:
    """A scratch folder uid 65534 can read (pytest's tmp_path is in a 0700 folder); the routers, for a case that
    needs root."""
    files = Path(tempfile.mkdtemp(prefix="greupd-exit-statuses-"))
    files.chmod(0o755)
    try:
        routers: Routers | None = (request.getfixturevalue("routers")
                                   if request.node.get_closest_marker("needs_root") else None)
        yield Lab2(files, routers)
    finally:
        shutil.rmtree(files)


@pytest.mark.parametrize(("command", "status", "how"), _params())
def test_exit_status(command: str, status: int, how: Case, lab: Lab2) -> None:
    done = how(lab)
    assert done.returncode == status, f"greupd {command}: {done.returncode}, not {status}\n{done.stderr}"


def test_every_status_in_greupd_8_is_provoked_and_no_other() -> None:
    """The walk (#25's acceptance): greupd(8)'s table, command by command, is exactly what the cases provoke."""
    documented = {(command, row.status) for row in exit_table(SOURCE) for command in row.commands}
    provoked = {(command, status) for command, status, _, _ in CASES}
    assert documented - provoked == set(), f"greupd(8) lists statuses no case provokes: {documented - provoked}"
    assert provoked - documented == set(), f"cases exit with statuses greupd(8) does not list: {provoked - documented}"
    for command in commands():
        assert command in PRINTING or command == "run", f"no case finds `greupd {command}`'s reader gone"


def test_usage_errors_no_longer_share_2_with_plan_changes() -> None:
    assert greupd("plan", "--detailled-exitcode").returncode == 64  # a typo must not read as "changes" (N9)


def test_a_reader_gone_before_a_long_output_is_quiet_too(tmp_path: Path) -> None:
    """`greupd schema | head -1`: head exits after its line, greupd is still writing."""
    shell = subprocess.run(["bash", "-c", f"set -o pipefail; {sys.executable} -m greupd schema | head -1"],
                           cwd=REPO, capture_output=True, text=True, env=env(), timeout=120, check=False)
    assert shell.stdout == "{\n" and shell.stderr == ""
    assert shell.returncode in (0, 141)  # 141 when head was gone before the last write, as for any command

