"""The planner: (Desired, Observed) -> the fewest ordered actions that make the kernel match. No I/O.

Ownership rules live here: a link is greupd's only if it carries the LINK_ALIAS marker, a route only if it
carries ROUTE_PROTO; nothing else is ever changed or deleted. A tunnel whose name is taken by a foreign
link is reported as a problem and left alone; the other tunnels are planned as usual. The one exception is
a tunnel with `adopt`: a foreign link of the same kind, endpoints and keys is taken over in place (marked,
changed where it differs, its routes for the configured prefixes replaced by ours in one request each).
"""

from __future__ import annotations

from greupd.model import (
    IPSEC_HELD,
    IPV6_FORWARDING,
    Action,
    AddAddress,
    AddressSpec,
    AddRoute,
    AdoptLink,
    ChangeLink,
    CreateLink,
    DeleteAddress,
    DeleteLink,
    DeleteRoute,
    Desired,
    LinkSpec,
    Observed,
    ObservedLink,
    Plan,
    PlanProblem,
    RouteSpec,
    SetLinkUp,
    SetSysctl,
    TakeOverRoute,
    TunnelIntent,
    accept_ra_key,
)


class _Steps:
    """Actions gathered by phase; the phase order is what makes a plan executable in one pass."""

    def __init__(self) -> None:
        self.sysctls: list[Action] = []
        self.delete_links: list[Action] = []
        self.create_links: list[Action] = []
        self.adopt_links: list[Action] = []
        self.change_links: list[Action] = []
        self.links_up: list[Action] = []
        self.link_sysctls: list[Action] = []
        self.delete_addresses: list[Action] = []
        self.add_addresses: list[Action] = []
        self.delete_routes: list[Action] = []
        self.add_routes: list[Action] = []
        self.links_down: list[Action] = []

    def ordered(self) -> tuple[Action, ...]:
        # Links must exist before their addresses and sysctls, be up before routes can use them (the kernel
        # refuses a route via a down device), and routes leave before a link is set down.
        return (*self.sysctls, *self.delete_links, *self.create_links, *self.adopt_links, *self.change_links,
                *self.links_up, *self.link_sysctls, *self.delete_addresses, *self.add_addresses,
                *self.delete_routes, *self.add_routes, *self.links_down)


def plan_changes(desired: Desired, observed: Observed) -> Plan:
    steps = _Steps()
    problems: list[PlanProblem] = []
    for key, value in sorted(desired.sysctls.items()):
        if observed.sysctls.get(key) != value:
            if key == IPV6_FORWARDING and value == "1":
                # Review M4: with forwarding on, accept_ra = 1 ignores router advertisements, and switching
                # it on purges the routers they taught (rt6_purge_dflt_routers spares accept_ra = 2 only).
                # Keep what the host learns by SLAAC today; 2 acts as 1 whenever forwarding is off again.
                steps.sysctls.extend(SetSysctl(accept_ra_key(name), "2") for name in sorted(observed.ra_interfaces))
            steps.sysctls.append(SetSysctl(key, value))

    routes_by_link: dict[str, set[RouteSpec]] = {}
    for route in observed.routes:
        routes_by_link.setdefault(route.ifname, set()).add(route)

    # A scoped pass (a drift repair, a reload of a few tunnels) plans its scope only, whatever the config's size.
    names = set(desired.tunnels) | set(observed.links) | set(desired.held) if observed.scope is None else \
        {n for n in observed.scope if n in desired.tunnels or n in observed.links or n in desired.held}
    for name in sorted(names):
        if not observed.covers(name):
            continue
        intent = desired.tunnels.get(name)
        link = observed.links.get(name)
        if name in desired.held:
            # Fail closed (review round 3, M1): no link while its cleartext drops are not in the kernel; one
            # of ours goes (and its routes with it), a foreign one is not ours to touch.
            if link is not None and link.owned:
                steps.delete_links.append(DeleteLink(name, "ipsec require: its cleartext GRE drops are not in the"
                                                           " kernel"))
            problems.append(PlanProblem(name, desired.held[name], IPSEC_HELD))
            continue
        if link is not None and not link.owned:
            if intent is not None and intent.adopt:
                mismatch = adoption_mismatch(intent, link.spec)
                if mismatch:
                    problems.append(PlanProblem(name, f"interface {name} is not greupd's and cannot be adopted"
                                                      f" ({mismatch}): left alone"))
                else:
                    _plan_adoption(steps, intent, link, observed)
            elif intent is not None:
                problems.append(PlanProblem(name, f"interface {name} exists and is not greupd's "
                                                  f"(kind {link.spec.kind}, no alias {'greupd'!r}): left alone"))
            continue
        if intent is None:
            if link is not None:
                steps.delete_links.append(DeleteLink(name, "not in the config"))
            continue
        _plan_tunnel(steps, intent, observed, routes_by_link.get(name, set()))

    # Owned routes whose device is no longer a tunnel of ours (e.g. moved by hand): remove them.
    for ifname, routes in sorted(routes_by_link.items()):
        if observed.covers(ifname) and ifname not in desired.tunnels and ifname not in observed.links:
            steps.delete_routes.extend(DeleteRoute(r) for r in sorted(routes, key=str))
    return Plan(steps.ordered(), tuple(problems))


def _plan_tunnel(steps: _Steps, intent: TunnelIntent, observed: Observed, routes: set[RouteSpec]) -> None:
    name = intent.link.name
    link = observed.links.get(name)
    fresh = link is None or link.spec.kind != intent.link.kind
    if link is not None and fresh:
        # A link cannot change kind in place (gre -> gretap): replace it.
        steps.delete_links.append(DeleteLink(name, f"kind {link.spec.kind} -> {intent.link.kind}"))
    if fresh:
        steps.create_links.append(CreateLink(intent.link, intent.up))
        addresses: frozenset[AddressSpec] = frozenset()
    else:
        assert link is not None
        _plan_link_in_place(steps, intent, link)
        addresses = observed.addresses.get(name, frozenset())

    for key, value in sorted(intent.sysctls.items()):
        if fresh or observed.sysctls.get(key) != value:
            steps.link_sysctls.append(SetSysctl(key, value))
    steps.delete_addresses.extend(DeleteAddress(a) for a in sorted(addresses - intent.addresses, key=str))
    steps.add_addresses.extend(AddAddress(a) for a in sorted(intent.addresses - addresses, key=str))
    # A replaced link takes its routes with it.
    present = set() if fresh else routes
    steps.delete_routes.extend(DeleteRoute(r) for r in sorted(present - intent.routes, key=str))
    steps.add_routes.extend(AddRoute(r) for r in sorted(intent.routes - present, key=str))


def _plan_link_in_place(steps: _Steps, intent: TunnelIntent, link: ObservedLink) -> None:
    """An existing link of the right kind: change what differs, and set it up or down, without recreating it."""
    changed = intent.link.differs_from(link.spec)
    if changed:
        # The link's other parameters go back as the kernel reported them: a change resets what it leaves out.
        steps.change_links.append(ChangeLink(intent.link, changed, link.kept))
    if intent.up and not link.up:
        steps.links_up.append(SetLinkUp(intent.link.name, True))
    elif not intent.up and link.up:
        steps.links_down.append(SetLinkUp(intent.link.name, False))


def adoption_mismatch(intent: TunnelIntent, found: LinkSpec) -> str:
    """Why a foreign link cannot become this tunnel in place ("" if it can): what a link cannot change."""
    wanted = intent.link
    if found.kind != wanted.kind:
        return f"kind {found.kind}, configured {wanted.kind}"
    differs = [f"{f} {_text(getattr(found, f))}, configured {_text(getattr(wanted, f))}"
               for f in ("local", "remote", "ikey", "okey") if getattr(found, f) != getattr(wanted, f)]
    return "; ".join(differs)


def _text(value: object) -> str:
    return "none" if value is None else str(value)


def _plan_adoption(steps: _Steps, intent: TunnelIntent, link: ObservedLink, observed: Observed) -> None:
    """Take over a matching foreign link in place: same ifindex, never down, routes replaced rather than re-added."""
    name = intent.link.name
    steps.adopt_links.append(AdoptLink(name, link.index))
    _plan_link_in_place(steps, intent, link)
    for key, value in sorted(intent.sysctls.items()):
        if observed.sysctls.get(key) != value:
            steps.link_sysctls.append(SetSysctl(key, value))
    addresses = observed.addresses.get(name, frozenset())
    steps.delete_addresses.extend(DeleteAddress(a) for a in sorted(addresses - intent.addresses, key=str))
    steps.add_addresses.extend(AddAddress(a) for a in sorted(intent.addresses - addresses, key=str))
    # The kernel keys a route by prefix, table and metric: a foreign route with our key is replaced in one
    # request (NLM_F_REPLACE), so traffic never meets a moment without it. Other foreign routes through the
    # link are not ours to judge and stay.
    foreign = {_route_key(r) for r in observed.foreign_routes if r.ifname == name}
    owned = {r for r in observed.routes if r.ifname == name}
    for route in sorted(intent.routes - owned, key=str):
        if _route_key(route) in foreign:
            steps.add_routes.append(TakeOverRoute(route))
        else:
            steps.add_routes.append(AddRoute(route))
    steps.delete_routes.extend(DeleteRoute(r) for r in sorted(owned - intent.routes, key=str))


def _route_key(route: RouteSpec) -> tuple[object, ...]:
    return route.dst, route.table, route.metric


def describe(plan: Plan) -> str:
    """The plan as `greupd plan` prints it."""
    lines = [str(action) for action in plan.actions] or ["nothing to change"]
    lines += [f"problem: {p.tunnel}: {p.message}" for p in plan.problems]
    return "\n".join(lines)
