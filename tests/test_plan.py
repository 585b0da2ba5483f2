"""The planner, without a kernel: seed story decisions, ownership rules, and convergence properties."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from greupd.config import load_config_text
from greupd.model import (
    Action,
    AddAddress,
    AddressSpec,
    AddRoute,
    ChangeLink,
    CreateLink,
    DeleteAddress,
    DeleteLink,
    DeleteRoute,
    Desired,
    DesiredMemo,
    LinkSpec,
    Observed,
    ObservedLink,
    RouteSpec,
    SetLinkUp,
    SetSysctl,
    desired_state,
)
from greupd.plan import describe, plan_changes

SEED_A = """
[[tunnel]]
name = "My_Tunnel"
local = "172.19.1.1"
remote = "172.19.1.2"
address = "192.168.8.1"
peer = "192.168.8.11"
routes = ["20.10.1.0/24"]
[tunnel.keepalive]
interval = 1
retries = 3
"""
# A second tunnel of router A: its own remote and its own route (the kernel keeps one route per prefix and metric).
OTHER = SEED_A.replace("My_Tunnel", "other").replace("172.19.1.2", "172.19.1.3").replace("20.10.1.0/24", "20.10.2.0/24")


def empty_kernel(sysctls: dict[str, str | None] | None = None) -> Observed:
    return Observed({}, {}, frozenset(), sysctls or {})


def simulate(observed: Observed, actions: tuple[Action, ...]) -> Observed:
    """A model kernel: what the kernel would hold after executing `actions` (as the applier would)."""
    links = dict(observed.links)
    addresses = {k: set(v) for k, v in observed.addresses.items()}
    routes = set(observed.routes)
    sysctls = dict(observed.sysctls)
    next_index = max((link.index for link in links.values()), default=10) + 1
    for action in actions:
        match action:
            case SetSysctl(key, value):
                sysctls[key] = value
            case CreateLink(spec, up):
                assert spec.name not in links, f"create over existing {spec.name}"
                links[spec.name] = ObservedLink(next_index, spec, up, True)
                addresses[spec.name] = set()
                next_index += 1
            case ChangeLink(spec, _):
                old = links[spec.name]
                assert old.owned
                links[spec.name] = replace(old, spec=spec)
            case DeleteLink(name, _):
                assert links[name].owned
                del links[name]
                addresses.pop(name, None)
                routes = {r for r in routes if r.ifname != name}
            case SetLinkUp(name, up):
                links[name] = replace(links[name], up=up)
                if not up:  # the kernel flushes a downed device's routes
                    routes = {r for r in routes if r.ifname != name}
            case AddAddress(address):
                addresses[address.ifname].add(address)
            case DeleteAddress(address):
                addresses[address.ifname].remove(address)
            case AddRoute(route):
                assert links[route.ifname].up, "the kernel refuses a route via a down device"
                assert route not in routes
                routes.add(route)
            case DeleteRoute(route):
                routes.remove(route)
    return Observed(links, {k: frozenset(v) for k, v in addresses.items()}, frozenset(routes), sysctls)


def test_seed_tunnel_from_nothing_is_created_in_order() -> None:
    desired = desired_state(load_config_text(SEED_A))
    plan = plan_changes(desired, empty_kernel({"net/ipv4/ip_forward": "0"}))
    assert describe(plan).splitlines() == [
        "sysctl net.ipv4.ip_forward=1",
        "create link My_Tunnel type gre local 172.19.1.1 remote 172.19.1.2 ttl 64, up",
        "add address 192.168.8.1 peer 192.168.8.11 dev My_Tunnel",
        "add route 20.10.1.0/24 dev My_Tunnel metric 0",
    ]


def test_a_second_plan_after_applying_is_empty() -> None:
    desired = desired_state(load_config_text(SEED_A))
    after = simulate(empty_kernel(), plan_changes(desired, empty_kernel()).actions)
    assert plan_changes(desired, after).actions == ()


def test_dead_peer_withdraws_routes_and_restores_them() -> None:
    config = load_config_text(SEED_A)
    up = simulate(empty_kernel(), plan_changes(desired_state(config), empty_kernel()).actions)
    down_plan = plan_changes(desired_state(config, {"My_Tunnel": False}), up)
    assert [str(a) for a in down_plan.actions] == ["delete route 20.10.1.0/24 dev My_Tunnel metric 0"]
    down = simulate(up, down_plan.actions)
    back = plan_changes(desired_state(config, {"My_Tunnel": True}), down)
    assert [str(a) for a in back.actions] == ["add route 20.10.1.0/24 dev My_Tunnel metric 0"]


def test_action_link_sets_the_link_down_after_withdrawing_routes() -> None:
    config = load_config_text(SEED_A.replace("retries = 3", 'retries = 3\naction = "link"'))
    up = simulate(empty_kernel(), plan_changes(desired_state(config), empty_kernel()).actions)
    plan = plan_changes(desired_state(config, {"My_Tunnel": False}), up)
    assert [str(a) for a in plan.actions] == ["delete route 20.10.1.0/24 dev My_Tunnel metric 0",
                                              "set link My_Tunnel down"]


def test_foreign_link_with_our_name_is_a_problem_and_untouched() -> None:
    config = load_config_text(SEED_A + OTHER)
    foreign = LinkSpec("My_Tunnel", "gre", ipaddress.ip_address("1.1.1.1"), ipaddress.ip_address("2.2.2.2"))
    observed = Observed({"My_Tunnel": ObservedLink(5, foreign, True, owned=False)}, {}, frozenset(), {})
    plan = plan_changes(desired_state(config), observed)
    assert [p.tunnel for p in plan.problems] == ["My_Tunnel"]
    assert all("My_Tunnel" not in str(a) for a in plan.actions)
    assert any(isinstance(a, CreateLink) and a.spec.name == "other" for a in plan.actions)


def test_unowned_links_and_routes_are_never_deleted() -> None:
    spec = LinkSpec("eth9", "gre", ipaddress.ip_address("1.1.1.1"), ipaddress.ip_address("2.2.2.2"))
    observed = Observed({"eth9": ObservedLink(5, spec, True, owned=False)}, {}, frozenset(), {})
    assert plan_changes(Desired({}, {}), observed).actions == ()


def test_owned_link_not_in_config_is_deleted() -> None:
    spec = LinkSpec("old", "gre", ipaddress.ip_address("1.1.1.1"), ipaddress.ip_address("2.2.2.2"))
    observed = Observed({"old": ObservedLink(5, spec, True, owned=True)}, {}, frozenset(), {})
    assert [str(a) for a in plan_changes(Desired({}, {}), observed).actions] == ["delete link old (not in the config)"]


def test_ttl_change_is_in_place_and_mode_change_replaces() -> None:
    config = load_config_text(SEED_A)
    current = simulate(empty_kernel(), plan_changes(desired_state(config), empty_kernel()).actions)
    ttl = plan_changes(desired_state(load_config_text(SEED_A.replace('name = "My_Tunnel"',
                                                                     'name = "My_Tunnel"\nttl = 32'))), current)
    assert [str(a) for a in ttl.actions] == ["change link My_Tunnel: ttl 32"]
    tap = SEED_A.replace('name = "My_Tunnel"', 'name = "My_Tunnel"\nmode = "gretap"').replace(
        "[tunnel.keepalive]\ninterval = 1\nretries = 3\n", "")
    replace_plan = plan_changes(desired_state(load_config_text(tap)), current)
    kinds = [type(a).__name__ for a in replace_plan.actions]
    assert kinds[:2] == ["DeleteLink", "CreateLink"]


SEED_A6 = """
[[tunnel]]
name = "My_Tunnel6"
mode = "ip6gre"
local = "2001:db8:ff::1"
remote = "2001:db8:ff::2"
routes = ["2001:db8:20::/64"]
"""


def test_ip6gre_gets_iproute2s_encap_limit_and_the_ipv4_modes_none() -> None:
    ip6gre = desired_state(load_config_text(SEED_A6)).tunnels["My_Tunnel6"].link
    gre = desired_state(load_config_text(SEED_A)).tunnels["My_Tunnel"].link
    assert (ip6gre.encap_limit, gre.encap_limit) == (4, None)


def test_encap_limit_change_is_in_place() -> None:
    """A reload to encap_limit = "none" (and back to a number) changes the link it has, like ttl: no flap."""
    current = simulate(empty_kernel(), plan_changes(desired_state(load_config_text(SEED_A6)), empty_kernel()).actions)
    for written, shown in (('"none"', "none"), ("0", "0")):
        config = load_config_text(SEED_A6 + f"encap_limit = {written}\n")
        plan = plan_changes(desired_state(config), current)
        assert [str(a) for a in plan.actions] == [f"change link My_Tunnel6: encap_limit {shown}"]
        assert plan_changes(desired_state(config), simulate(current, plan.actions)).actions == ()


def test_an_ip6gre_link_of_an_older_greupd_gets_the_limit_in_place() -> None:
    """greupd before review L5 sent no limit, so the kernel gave its links 0: they are changed, not replaced."""
    desired = desired_state(load_config_text(SEED_A6))
    link = desired.tunnels["My_Tunnel6"].link
    older = Observed({"My_Tunnel6": ObservedLink(9, replace(link, encap_limit=0), True, True)}, {},
                     frozenset(desired.tunnels["My_Tunnel6"].routes), dict(desired.sysctls))
    plan = plan_changes(desired, older)
    assert plan.actions == (ChangeLink(link, ("encap_limit",)),)


def test_scoped_observation_plans_only_its_tunnels() -> None:
    config = load_config_text(SEED_A + OTHER)
    observed = Observed({}, {}, frozenset(), {}, scope=frozenset({"other"}))
    plan = plan_changes(desired_state(config), observed)
    assert plan.actions and all("My_Tunnel" not in str(a) for a in plan.actions)


def test_ipv6_route_metric_zero_is_stored_as_1024() -> None:
    config = load_config_text(SEED_A.replace('routes = ["20.10.1.0/24"]', 'routes = ["2001:db8::/64"]'))
    (route,) = desired_state(config).tunnels["My_Tunnel"].routes
    assert route.metric == 1024


def test_kernel_answer_sets_martian_sysctls() -> None:
    config = load_config_text(SEED_A.replace("retries = 3", 'retries = 3\nanswer = "kernel"'))
    desired = desired_state(config)
    assert desired.tunnels["My_Tunnel"].sysctls == {"net/ipv4/conf/My_Tunnel/accept_local": "1",
                                                    "net/ipv4/conf/My_Tunnel/rp_filter": "0"}
    assert desired.sysctls["net/ipv4/conf/all/rp_filter"] == "0"


def test_switching_ipv6_forwarding_on_first_keeps_router_advertisements_where_the_host_uses_them() -> None:
    """Review M4: the interfaces configured by SLAAC get accept_ra = 2 before forwarding goes on; only then."""
    desired = desired_state(load_config_text(SEED_A.replace("20.10.1.0/24", "2001:db8::/64")))
    off: dict[str, str | None] = {"net/ipv4/ip_forward": "0", "net/ipv6/conf/all/forwarding": "0"}
    uplinks = replace(empty_kernel(off), ra_interfaces=frozenset({"wan1", "wan0"}))

    sysctls = [str(a) for a in plan_changes(desired, uplinks).actions if isinstance(a, SetSysctl)]
    assert sysctls == ["sysctl net.ipv4.ip_forward=1", "sysctl net.ipv6.conf.wan0.accept_ra=2",
                       "sysctl net.ipv6.conf.wan1.accept_ra=2", "sysctl net.ipv6.conf.all.forwarding=1"]
    # forwarding already on (by hand, or by us earlier): not ours to change, nothing learnt left to keep
    on = replace(uplinks, sysctls={**off, "net/ipv6/conf/all/forwarding": "1"})
    assert not any("accept_ra" in str(a) for a in plan_changes(desired, on).actions)


# --- properties: from any kernel state that holds only our objects and foreign ones, one plan converges ---

names = st.sampled_from(["t0", "t1", "t2", "t3"])
prefixes = st.sampled_from(["20.10.1.0/24", "20.10.2.0/24", "10.0.0.0/8", "2001:db8::/64"])


@st.composite
def configs(draw: st.DrawFn) -> str:
    text = ""
    installed: set[tuple[str, int]] = set()  # the kernel keeps one route per prefix and metric (table main)
    for i, name in enumerate(sorted(draw(st.sets(names, max_size=4)))):
        mode, metric, enabled = draw(st.sampled_from(["gre", "gretap"])), draw(st.integers(0, 2)), draw(st.booleans())
        # gretap routes via its IPv4 peer: IPv4 routes only.
        routes = [r for r in draw(st.lists(prefixes, unique=True, max_size=3))
                  if (r, metric) not in installed and not (mode == "gretap" and ":" in r)]
        if enabled:
            installed |= {(r, metric) for r in routes}
        text += (f'[[tunnel]]\nname = "{name}"\nlocal = "172.19.1.1"\nremote = "172.19.2.{i + 1}"\n'
                 f'mode = "{mode}"\n'
                 f'ttl = {draw(st.integers(1, 255))}\nkey = {draw(st.integers(0, 3))}\n'
                 f'address = "192.168.{i}.1"\npeer = "192.168.{i}.2"\n'
                 f'metric = {metric}\nenabled = {str(enabled).lower()}\n'
                 f"routes = [{', '.join(repr(r).replace(chr(39), chr(34)) for r in routes)}]\n")
    return text


@st.composite
def kernels(draw: st.DrawFn) -> Observed:
    links: dict[str, ObservedLink] = {}
    addresses: dict[str, frozenset[AddressSpec]] = {}
    routes: set[RouteSpec] = set()
    for index, name in enumerate(sorted(draw(st.sets(st.sampled_from(["t0", "t1", "t2", "t3", "eth0"]))))):
        owned = name != "eth0" and draw(st.booleans())
        spec = LinkSpec(name, draw(st.sampled_from(["gre", "gretap"])), ipaddress.ip_address("172.19.1.1"),
                        ipaddress.ip_address(f"172.19.3.{index + 1}"), ttl=draw(st.integers(1, 255)))
        up = draw(st.booleans())
        links[name] = ObservedLink(index + 2, spec, up, owned)
        if owned:
            addresses[name] = frozenset(
                AddressSpec(name, ipaddress.ip_interface(a)) for a in draw(st.sets(st.sampled_from(
                    ["192.168.9.1/24", "192.168.0.1/32"]), max_size=2)))
            if up:
                routes |= {RouteSpec(name, ipaddress.ip_network(p), 254, draw(st.integers(0, 2)))
                           for p in draw(st.sets(prefixes, max_size=2))}
    return Observed(links, addresses, frozenset(routes), {"net/ipv4/ip_forward": draw(st.sampled_from(["0", "1"]))})


@settings(max_examples=300, deadline=None)
@given(configs(), kernels())
def test_applying_the_plan_converges_and_a_second_plan_is_empty(text: str, kernel: Observed) -> None:
    config = load_config_text(text)
    desired = desired_state(config)
    plan = plan_changes(desired, kernel)
    after = simulate(kernel, plan.actions)
    assert plan_changes(desired, after).actions == ()
    conflicted = {p.tunnel for p in plan.problems}
    for name, intent in desired.tunnels.items():
        if name in conflicted:
            assert after.links[name] == kernel.links[name]  # foreign: untouched
            continue
        link = after.links[name]
        assert link.owned and link.spec == intent.link and link.up == intent.up
        assert after.addresses[name] == intent.addresses
        assert {r for r in after.routes if r.ifname == name} == intent.routes
    for name, link in kernel.links.items():
        if not link.owned:
            assert after.links[name] == link


def test_a_scoped_look_replaces_only_its_tunnels_in_a_snapshot() -> None:
    config = load_config_text(SEED_A + OTHER)
    full = simulate(empty_kernel(), plan_changes(desired_state(config), empty_kernel()).actions)
    gone = Observed({}, {}, frozenset(), {}, scope=frozenset({"other"}))
    merged = full.updated(gone)
    assert set(merged.links) == {"My_Tunnel"} and merged.scope is None
    assert {r.ifname for r in merged.routes} == {"My_Tunnel"}
    assert merged.addresses["My_Tunnel"] == full.addresses["My_Tunnel"] and "other" not in merged.addresses


def test_the_desired_state_kept_between_passes_is_the_one_computed_afresh() -> None:
    """The daemon keeps its desired state (model.DesiredMemo); a keepalive verdict rebuilds that tunnel only."""
    config = load_config_text(SEED_A + OTHER)
    memo = DesiredMemo()
    first = memo.of(config, {"My_Tunnel": True, "other": True})
    assert first == desired_state(config) and memo.of(config, {"My_Tunnel": True, "other": True}) is first
    dead = memo.of(config, {"My_Tunnel": False, "other": True})
    assert dead == desired_state(config, {"My_Tunnel": False})
    assert dead.tunnels["other"] is first.tunnels["other"]
    assert memo.of(config, {"My_Tunnel": True, "other": True}) == first
    reloaded = load_config_text((SEED_A + OTHER).replace('name = "My_Tunnel"', 'name = "My_Tunnel"\nttl = 100'))
    assert desired_state(reloaded) != first
    assert memo.of(reloaded, {"My_Tunnel": True, "other": True}) == desired_state(reloaded)
