"""What a restarted daemon believes about its peers before the first reply (#11 H3), without a kernel:
router A's tunnel to B, whose peer was dead when the daemon stopped."""

from __future__ import annotations

import dataclasses

from greupd.config import Config, load_config_text
from greupd.keepalive.engine import targets_from_config
from greupd.keepalive.restart import initial_verdicts, target_endpoints
from greupd.model import Observed, ObservedLink, desired_state
from greupd.state import KeepaliveVerdict

ROUTER_A = """
[[tunnel]]
name = "to_b"
local = "172.19.1.1"
remote = "172.19.1.2"
routes = ["20.10.1.0/24"]
[tunnel.keepalive]
interval = 1
retries = 3
"""


def kernel(config: Config, alive: bool, link_up: bool = True) -> Observed:
    """What the previous daemon left: the owned link, with its routes if the peer was alive."""
    intent = desired_state(config, {"to_b": alive}).tunnels["to_b"]
    return Observed({"to_b": ObservedLink(7, intent.link, link_up, True)}, {}, intent.routes, {})


def test_a_saved_verdict_for_the_same_endpoints_is_kept() -> None:
    config = load_config_text(ROUTER_A)
    [target] = targets_from_config(config)
    dead = {"to_b": KeepaliveVerdict(False, "2026-11-28T06:00:00Z", target_endpoints(target))}
    assert initial_verdicts([target], dead, config, None) == {"to_b": False}
    # the same verdict for another remote says nothing about this one: the kernel decides, here: routes on
    moved = dataclasses.replace(target, remote=target.local)
    assert initial_verdicts([moved], dead, config, kernel(config, alive=True)) == {"to_b": True}


def test_without_a_saved_verdict_the_kernel_tells() -> None:
    config = load_config_text(ROUTER_A)
    targets = targets_from_config(config)
    assert initial_verdicts(targets, {}, config, kernel(config, alive=False)) == {"to_b": False}
    assert initial_verdicts(targets, {}, config, kernel(config, alive=True)) == {"to_b": True}
    nothing = Observed({}, {}, frozenset(), {})
    assert initial_verdicts(targets, {}, config, nothing) == {"to_b": True}  # first start: up until proven dead


def test_action_link_reads_the_links_state() -> None:
    config = load_config_text(ROUTER_A + 'action = "link"\n')
    targets = targets_from_config(config)
    assert initial_verdicts(targets, {}, config, kernel(config, alive=False, link_up=False)) == {"to_b": False}
    assert initial_verdicts(targets, {}, config, kernel(config, alive=True, link_up=True)) == {"to_b": True}


def test_a_foreign_link_of_that_name_says_nothing() -> None:
    config = load_config_text(ROUTER_A)
    targets = targets_from_config(config)
    intent = desired_state(config).tunnels["to_b"]
    foreign = Observed({"to_b": ObservedLink(7, intent.link, True, False)}, {}, frozenset(), {})
    assert initial_verdicts(targets, {}, config, foreign) == {"to_b": True}
