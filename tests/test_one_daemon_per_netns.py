"""One greupd per network namespace (review L7): a second daemon in router A's netns, with a control socket and
a config of its own, refuses to start, says which process holds the netns, and touches nothing; the first one
keeps running. A daemon in another netns starts as usual.

Runs on the host kernel in fresh netns hosts (no GRE needed: the lock is an abstract AF_UNIX name, scoped to
the netns, and the refusal comes before any kernel request).
"""

from __future__ import annotations

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
