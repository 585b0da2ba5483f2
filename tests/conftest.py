"""Fixtures for the tests that build netns hosts; the lab's plugin decides where each kernel test runs.

A test marked ``needs_root``, ``needs_gre``, ``needs_nft_gre``, ``needs_systemd`` or ``needs_systemd_nft`` runs on
this kernel when it can, else in a guest kernel that can (one boot per guest kind): see lab/pytest_plugin.py. Under
CI=true that plugin makes a kernel-marked test that skips (or a guest that cannot boot) a failure.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from lab.hosts import Lab, SeedTopology, seed_topology

pytest_plugins = ["lab.pytest_plugin"]


@pytest.fixture
def lab() -> Iterator[Lab]:
    """A set of netns hosts, removed after the test whether it passed or not."""
    with Lab() as the_lab:
        yield the_lab


@pytest.fixture
def seed(lab: Lab) -> SeedTopology:
    """The seed how-to's topology: routers a, b (c via add_router) and LAN hosts lan_a, lan_b."""
    return seed_topology(lab)
