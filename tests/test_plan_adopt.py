"""`adopt = true`, without a kernel: the seed's hand-made My_Tunnel becomes greupd's in place, or is left alone."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from greupd.config import load_config_text
from greupd.model import (
    Action,
    AddressSpec,
    AddRoute,
    AdoptLink,
    ChangeLink,
    CreateLink,
    DeleteLink,
    LinkSpec,
    Observed,
    ObservedLink,
    RouteSpec,
    TakeOverRoute,
    desired_state,
)
from greupd.plan import describe, plan_changes
from tests.test_plan import simulate

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


def test_an_ip6gre_tunnel_made_by_ip_link_is_adopted_without_a_change_and_encaplimit_none_is_changed() -> None:
    """`ip link add ... type ip6gre` gives encaplimit 4, greupd's default: adopting it changes nothing of the link.
    One made with `encaplimit none` for a config that does not say so is adopted and changed in place."""
    config = load_config_text(
        '[[tunnel]]\nname = "Backup_v6"\nmode = "ip6gre"\nlocal = "2001:db8:1::1"\nremote = "2001:db8:1::2"\n'
        "adopt = true\n")
    by_ip = LinkSpec("Backup_v6", "ip6gre", ipaddress.ip_address("2001:db8:1::1"),
                     ipaddress.ip_address("2001:db8:1::2"), ttl=64, tos=None, pmtudisc=None, mtu=1448, encap_limit=4)
    desired = desired_state(config)
    for found, changes in ((by_ip, []), (replace(by_ip, encap_limit="none"), ["change link Backup_v6: encap_limit 4"])):
        observed = Observed({"Backup_v6": ObservedLink(5, found, True, owned=False)}, {}, frozenset(),
                            dict(desired.sysctls))
        plan = plan_changes(desired, observed)
        assert plan.problems == ()
        assert describe(plan).splitlines() == ["adopt link Backup_v6 (ifindex 5): set alias greupd", *changes]


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


# --- property: from any hand-made state, adoption converges in one pass and never recreates a link ---------

def simulate_adoption(observed: Observed, actions: tuple[Action, ...]) -> tuple[Observed, set[RouteSpec]]:
    """test_plan's model kernel, plus what AdoptLink and TakeOverRoute do (a link marked, a route's owner).

    Returns what the daemon would observe next, and every foreign route still in the kernel.
    """
    links = dict(observed.links)
    routes = set(observed.routes)
    foreign = set(observed.foreign_routes)
    for action in actions:
        if isinstance(action, AdoptLink):
            assert links[action.name].index == action.index
            links[action.name] = replace(links[action.name], owned=True)
        elif isinstance(action, TakeOverRoute):
            (taken,) = [r for r in foreign if (r.ifname, r.dst, r.table, r.metric) == (
                action.route.ifname, action.route.dst, action.route.table, action.route.metric)]
            foreign.remove(taken)
            routes.add(action.route)
        elif isinstance(action, AddRoute):
            # The kernel refuses (EEXIST) a route whose prefix, table and metric a foreign route holds: through
            # the link being adopted, that route must be taken over instead. (Through another link it is a
            # conflict that greupd reports and leaves alone, adopt or not.)
            assert (action.route.ifname, action.route.dst, action.route.table, action.route.metric) not in {
                (r.ifname, r.dst, r.table, r.metric) for r in foreign}
    rest = tuple(a for a in actions if not isinstance(a, AdoptLink | TakeOverRoute))
    after = simulate(replace(observed, links=links, routes=frozenset(routes)), rest)
    # The daemon sees foreign routes only through links it may still adopt.
    return replace(after, foreign_routes=frozenset(r for r in foreign if not after.links[r.ifname].owned)), foreign


@st.composite
def hand_made(draw: st.DrawFn) -> tuple[str, Observed]:
    """A config of adopt entries, and a kernel where some of them exist by hand (matching or not)."""
    text = ""
    links: dict[str, ObservedLink] = {}
    addresses: dict[str, frozenset[AddressSpec]] = {}
    foreign: set[RouteSpec] = set()
    for i, name in enumerate(sorted(draw(st.sets(st.sampled_from(["t0", "t1", "t2"]), min_size=1)))):
        routes = draw(st.lists(st.sampled_from(["20.10.1.0/24", "20.10.2.0/24"]), unique=True, max_size=2))
        ttl = draw(st.sampled_from([0, 64]))
        text += (f'[[tunnel]]\nname = "{name}"\nlocal = "172.19.1.1"\nremote = "172.19.2.{i + 1}"\n'
                 f'ttl = {64 if ttl else chr(34) + "inherit" + chr(34)}\ntos = 0\n'
                 f'address = "192.168.{i}.1"\npeer = "192.168.{i}.2"\nadopt = true\nmetric = {i}\n'
                 f"routes = [{', '.join(chr(34) + r + chr(34) for r in routes)}]\n")
        if not draw(st.booleans()):
            continue
        remote = f"172.19.2.{i + 1}" if draw(st.booleans()) else "172.19.9.9"
        spec = LinkSpec(name, draw(st.sampled_from(["gre", "gre", "gretap"])), ipaddress.ip_address("172.19.1.1"),
                        ipaddress.ip_address(remote), ttl=draw(st.sampled_from([0, 64])), tos=0)
        links[name] = ObservedLink(20 + i, spec, draw(st.booleans()), owned=False)
        addresses[name] = frozenset({AddressSpec(name, ipaddress.ip_interface(f"192.168.{i}.1/32"),
                                                 ipaddress.ip_address(f"192.168.{i}.2"))})
        if links[name].up:
            # Metric i is the entry's own (the kernel keeps one route per prefix, table and metric).
            foreign |= {RouteSpec(name, ipaddress.ip_network(p), 254, draw(st.sampled_from([i, 5])))
                        for p in draw(st.sets(st.sampled_from(["20.10.1.0/24", "20.10.3.0/24"]), max_size=2))}
    return text, Observed(links, addresses, frozenset(), {"net/ipv4/ip_forward": "1"},
                          foreign_routes=frozenset(foreign))


@settings(max_examples=300, deadline=None)
@given(hand_made())
def test_adoption_converges_in_one_pass_and_keeps_every_ifindex(case: tuple[str, Observed]) -> None:
    text, kernel = case
    desired = desired_state(load_config_text(text))
    plan = plan_changes(desired, kernel)
    recreated = [a for a in plan.actions if (isinstance(a, CreateLink) and a.spec.name in kernel.links)
                 or (isinstance(a, DeleteLink) and a.name in kernel.links)]
    assert recreated == []
    after, foreign_left = simulate_adoption(kernel, plan.actions)
    assert plan_changes(desired, after).actions == ()
    refused = {p.tunnel for p in plan.problems}
    for name, link in kernel.links.items():
        if name in refused:
            assert after.links[name] == link
        else:
            assert after.links[name].index == link.index and after.links[name].owned
            assert {r for r in after.routes if r.ifname == name} == desired.tunnels[name].routes
    # Foreign routes that no configured prefix claims stay where they were, foreign.
    claimed = {(r.ifname, r.dst, r.table, r.metric) for t in desired.tunnels.values() for r in t.routes}
    for route in kernel.foreign_routes:
        if (route.ifname, route.dst, route.table, route.metric) not in claimed:
            assert route in foreign_left


# `ip tunnel add My_Tunnel mode gre ... csum dev eth0` and a mark, as the kernel reports them (IFLA_GRE_IFLAGS and
# OFLAGS with GRE_CSUM, IFLA_GRE_LINK 2, IFLA_GRE_FWMARK 7): greupd does not manage them.
HAND_MADE_EXTRAS = ((2, b"\x80\x00"), (3, b"\x80\x00"), (1, b"\x02\x00\x00\x00"), (20, b"\x07\x00\x00\x00"))


def test_an_adopted_links_own_parameters_go_with_its_change_and_are_never_drift() -> None:
    """A change in place carries what the kernel reported of the parameters greupd does not manage, so the kernel
    (which resets what a change leaves out) keeps them; they alone never make a change."""
    observed = seed_by_hand()
    link = replace(observed.links["My_Tunnel"], kept=HAND_MADE_EXTRAS)
    observed = replace(observed, links={"My_Tunnel": link})
    config = load_config_text(SEED_A.replace('ttl = "inherit"', "ttl = 64"))
    (change,) = [a for a in plan_changes(desired_state(config), observed).actions if isinstance(a, ChangeLink)]
    assert (change.fields, change.kept) == (("ttl",), HAND_MADE_EXTRAS)

    adopted = Observed({"My_Tunnel": replace(link, owned=True)}, {"My_Tunnel": frozenset({HAND_ADDRESS})},
                       frozenset({HAND_ROUTE}), {})
    assert plan_changes(desired_state(load_config_text(SEED_A)), adopted).actions == ()
    assert link == replace(link, kept=())  # not part of what the planner compares
