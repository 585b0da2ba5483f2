"""A create that fails never marks someone else's link as greupd's (review H2).

greupd creates a link with NLM_F_EXCL and then marks it with the `greupd` alias. If the name is taken by
the time the create reaches the kernel (systemd-networkd made a .netdev of that name between greupd's look
and its create; or the create loaded ip_gre, whose init made the fallback `gre0` first), the create fails
with EEXIST and the mark must not land on the link that holds the name: from then on greupd would rewrite
it, and delete it on reload or at exit.

The race is made deterministic by giving the kernel layer a plan from a stale look: the daemon's own
reconciler, run in router A's netns, is told to create My_Tunnel (and gre0) after a foreign link took the
name. That is exactly the state a real race leaves between observe and apply.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from pathlib import Path

import pytest

from lab.hosts import Lab, seed_topology

pytestmark = pytest.mark.needs_gre

REPO = Path(__file__).resolve().parents[1]


def create_from_a_stale_look(*names: str) -> None:
    """Run in the router's netns: apply CreateLink for `names` as if the last look had found none of them."""
    from greupd.model import CreateLink, LinkSpec
    from greupd.netlink.kernel import Kernel

    kernel = Kernel()
    creates = [CreateLink(LinkSpec(name, "gre", ipaddress.ip_address("172.19.1.1"),
                                   ipaddress.ip_address("172.19.1.2"))) for name in names]
    for error in kernel.apply(creates):
        print(error)
    kernel.close()


def test_a_create_that_finds_the_name_taken_leaves_the_foreign_link_unmarked_and_untouched() -> None:
    with Lab() as lab:
        a = seed_topology(lab).a
        # networkd's .netdev, made between greupd's look and its create; gre0 is ip_gre's own fallback device
        # in every netns (the module is loaded in this kernel), the one a first create would have made appear.
        a.ip("link", "add", "My_Tunnel", "type", "dummy")
        a.ip("link", "set", "My_Tunnel", "mtu", "1300", "up")
        assert "gre0" in a.ip("link", "show", "gre0").stdout
        before = {name: a.ip("-d", "link", "show", name).stdout for name in ("My_Tunnel", "gre0")}

        run = a.run(sys.executable, "-c", f"import {__name__} as t; t.create_from_a_stale_look('My_Tunnel', 'gre0')",
                    env=dict(os.environ, PYTHONPATH=str(REPO)), check=False)
        assert run.returncode == 0, run.stderr
        # Both creates were refused, and said so.
        assert run.stdout.count("File exists") == 2, run.stdout

        after = {name: a.ip("-d", "link", "show", name).stdout for name in ("My_Tunnel", "gre0")}
        for name in ("My_Tunnel", "gre0"):
            assert "alias greupd" not in after[name], after[name]
        assert after == before
