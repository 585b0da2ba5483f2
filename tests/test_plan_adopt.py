"""`adopt = true`, without a kernel: the seed's hand-made My_Tunnel becomes greupd's in place, or is left alone."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

from greupd.config import load_config_text
from greupd.model import (
    AddressSpec,
    AdoptLink,
    LinkSpec,
    Observed,
    ObservedLink,
    RouteSpec,
    TakeOverRoute,
    desired_state,
)
from greupd.plan import describe, plan_changes

SEED_A = """
[daemon]
ip_forward = false

[[tunnel]]
name = "My_Tunnel"
local = "172.19.1.1"
remote = "172.19.1.2"
ttl = "inherit"
tos = 0
address = "192.168.8.1"
peer = "192.168.8.11"
routes = ["20.10.1.0/24"]
adopt = true
"""

HAND_MADE = LinkSpec("My_Tunnel", "gre", ipaddress.ip_address("172.19.1.1"), ipaddress.ip_address("172.19.1.2"),
                     ttl=0, tos=0, pmtudisc=True, mtu=1476)
HAND_ADDRESS = AddressSpec("My_Tunnel", ipaddress.ip_interface("192.168.8.1/32"), ipaddress.ip_address("192.168.8.11"))
HAND_ROUTE = RouteSpec("My_Tunnel", ipaddress.ip_network("20.10.1.0/24"))


def seed_by_hand(spec: LinkSpec = HAND_MADE, routes: frozenset[RouteSpec] = frozenset({HAND_ROUTE})) -> Observed:
    """Router A after the seed's step 2, typed by hand: `ip tunnel add`, `ip addr add ... peer`, `ip route add`."""
    return Observed({"My_Tunnel": ObservedLink(7, spec, True, owned=False)}, {"My_Tunnel": frozenset({HAND_ADDRESS})},
                    frozenset(), {}, foreign_routes=routes)


def test_hand_made_tunnel_is_adopted_in_place() -> None:
    plan = plan_changes(desired_state(load_config_text(SEED_A)), seed_by_hand())
    assert plan.problems == ()
    assert describe(plan).splitlines() == [
        "adopt link My_Tunnel (ifindex 7): set alias greupd",
        "take over route 20.10.1.0/24 dev My_Tunnel metric 0",
    ]
    assert plan.actions == (AdoptLink("My_Tunnel", 7), TakeOverRoute(HAND_ROUTE))


def test_adopted_tunnel_plans_nothing_more() -> None:
    desired = desired_state(load_config_text(SEED_A))
    adopted = Observed({"My_Tunnel": ObservedLink(7, HAND_MADE, True, owned=True)},
                       {"My_Tunnel": frozenset({HAND_ADDRESS})}, frozenset({HAND_ROUTE}), {})
    assert plan_changes(desired, adopted).actions == ()


def test_adoption_changes_what_differs_in_place_and_adds_missing_routes() -> None:
    config = load_config_text(SEED_A.replace('ttl = "inherit"', "ttl = 64").replace(
        'routes = ["20.10.1.0/24"]', 'routes = ["20.10.1.0/24", "20.10.2.0/24"]'))
    plan = plan_changes(desired_state(config), seed_by_hand())
    assert describe(plan).splitlines() == [
        "adopt link My_Tunnel (ifindex 7): set alias greupd",
        "change link My_Tunnel: ttl 64",
        "take over route 20.10.1.0/24 dev My_Tunnel metric 0",
        "add route 20.10.2.0/24 dev My_Tunnel metric 0",
    ]
    assert not any(type(a).__name__ in ("DeleteLink", "CreateLink", "DeleteRoute") for a in plan.actions)


def test_a_route_with_another_metric_is_not_taken_over() -> None:
    other_metric = replace(HAND_ROUTE, metric=5)
    plan = plan_changes(desired_state(load_config_text(SEED_A)), seed_by_hand(routes=frozenset({other_metric})))
    assert [str(a) for a in plan.actions][1:] == ["add route 20.10.1.0/24 dev My_Tunnel metric 0"]


def test_other_endpoints_are_an_error_and_the_link_is_untouched() -> None:
    elsewhere = replace(HAND_MADE, remote=ipaddress.ip_address("172.19.1.9"))
    plan = plan_changes(desired_state(load_config_text(SEED_A)), seed_by_hand(elsewhere))
    assert plan.actions == ()
    (problem,) = plan.problems
    assert problem.tunnel == "My_Tunnel"
    assert "remote 172.19.1.9, configured 172.19.1.2" in problem.message


def test_other_kind_or_key_is_an_error() -> None:
    for found, why in ((replace(HAND_MADE, kind="gretap"), "kind gretap, configured gre"),
                       (replace(HAND_MADE, ikey=42, okey=42), "ikey 42, configured none")):
        plan = plan_changes(desired_state(load_config_text(SEED_A)), seed_by_hand(found))
        assert plan.actions == () and why in plan.problems[0].message


def test_without_adopt_the_hand_made_link_is_left_alone() -> None:
    plan = plan_changes(desired_state(load_config_text(SEED_A.replace("adopt = true", ""))), seed_by_hand())
    assert plan.actions == ()
    assert "not greupd's" in plan.problems[0].message


def test_adopt_defaults_to_false_and_may_be_a_default() -> None:
    assert load_config_text(SEED_A.replace("adopt = true", "")).tunnels[0].adopt is False
    text = "[defaults]\nadopt = true\n" + SEED_A.replace("adopt = true", "").replace("[daemon]\nip_forward = false", "")
    assert load_config_text(text).tunnels[0].adopt is True
