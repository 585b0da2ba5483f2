"""One greupd per network namespace (review L7): a second daemon in router A's netns, with a control socket and
a config of its own, refuses to start, says which process holds the netns, and touches nothing; the first one
keeps running. A daemon in another netns starts as usual.

The lock is a file per netns in /run/greupd, held with flock (review M3, newcomer-3 High 3): an unprivileged
user in the netns can neither bind the abstract name `\0greupd` the lock used to be, nor take the file, in a way
that keeps greupd from starting.

Runs on the host kernel in fresh netns hosts (no GRE needed: the refusal comes before any kernel request).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lab.greupd_process import GreupdProcess
from lab.hosts import Lab

pytestmark = pytest.mark.needs_root

SHIPPED = (Path(__file__).resolve().parents[1] / "etc" / "greupd" / "tunnels.toml").read_text()
# A test config of someone else's: it knows nothing of My_Tunnel, so it would delete it as "not in the config".
OTHER = '[daemon]\nnft_table = "other"\n'


def test_a_second_daemon_in_the_same_netns_refuses_to_start() -> None:
    with Lab() as lab:
        a, b = lab.host("a"), lab.host("b")
        first = GreupdProcess(a, SHIPPED).start()
        table = a.run("nft", "list", "table", "inet", "greupd").stdout

        second = GreupdProcess(a, OTHER, name="other")
        second.start(wait=False)
        assert second.proc is not None
        assert second.proc.wait(60) == 1
        assert f"another greupd already runs in this network namespace (pid {first.proc.pid if first.proc else 0})" \
            in second.output(), second.output()
        assert not second.socket.exists()
        assert a.run("nft", "list", "table", "inet", "greupd").stdout == table
        assert first.status() is not None and first.proc is not None and first.proc.poll() is None

        elsewhere = GreupdProcess(b, SHIPPED).start()  # another netns, another lock
        assert elsewhere.status() is not None
        assert first.stop() == 0
        # Gone with its holder: the next daemon in A starts.
        assert GreupdProcess(a, SHIPPED).start().status() is not None


# What any local user can run in the netns: bind the abstract name the lock used to be, and try to create, open and
# lock this netns's lock file; then hold whatever it got.
SQUAT = """
import fcntl, os, socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(b"\\0greupd"); s.listen(1)
net = os.stat("/proc/self/ns/net")
path = f"/run/greupd/netns-{net.st_dev}-{net.st_ino}.lock"
try:
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    print("lock: taken", flush=True)
except OSError as exc:
    print(f"lock: {type(exc).__name__}", flush=True)
time.sleep(120)
"""


def test_an_unprivileged_user_in_the_netns_cannot_keep_greupd_from_starting() -> None:
    with Lab() as lab:
        a = lab.host("a")
        squatter = a.popen("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
                           SQUAT, stdout=subprocess.PIPE, text=True)
        assert squatter.stdout is not None
        assert squatter.stdout.readline().strip() in ("lock: PermissionError", "lock: FileNotFoundError")

        first = GreupdProcess(a, SHIPPED).start()  # before: "another greupd already runs ... (pid <squatter>)"
        assert first.status() is not None and first.proc is not None

        second = GreupdProcess(a, OTHER, name="other").start(wait=False)
        assert second.proc is not None and second.proc.wait(60) == 1
        assert f"another greupd already runs in this network namespace (pid {first.proc.pid})" in second.output()
        assert first.stop() == 0
        squatter.kill()
