"""Tunnel reports without a kernel: router A's tunnel comes up, its peer dies, comes back, loses its link.

Each pass is modelled as the daemon runs it: observe, plan, apply (acknowledged as planned), then
`Reports.update`; what the test checks is what the journal and `greupd status` would say.
"""

from __future__ import annotations

from collections.abc import Callable

from greupd.config import Config, load_config_text
from greupd.events import TunnelChanged
from greupd.keepalive.liveness import LivenessChange
from greupd.model import Observed, Plan, PlanProblem, SetLinkUp, desired_state
from greupd.netlink.kernel import ApplyError
from greupd.plan import plan_changes
from greupd.report import Reports

ROUTER_A = """
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
INDEX = 7


def nothing() -> Observed:
    return Observed({}, {}, frozenset(), {})


def alive(name: str) -> bool:
    return True


def dead(name: str) -> bool:
    return False


class RouterA:
    """Router A's daemon, minus the kernel: what a pass leaves in the kernel is what it planned."""

    def __init__(self, config: Config | None = None) -> None:
        self.config = config or load_config_text(ROUTER_A)
        self.reports = Reports(clock=lambda: "2026-11-24T20:15:02Z")
        self.kernel = nothing()

    def one_pass(self, is_up: Callable[[str], bool] = alive, errors: tuple[ApplyError, ...] = (),
                 problems: tuple[PlanProblem, ...] = (), repairs: frozenset[str] = frozenset()) -> list[TunnelChanged]:
        desired = desired_state(self.config, {t.name: is_up(t.name) for t in self.config.tunnels})
        plan = plan_changes(desired, self.kernel)
        plan = Plan(plan.actions, plan.problems + problems)
        names = frozenset(desired.tunnels)
        after = self.kernel.updated(Observed.as_planned(desired, names, dict.fromkeys(names, INDEX)))
        changes = self.reports.update(self.config, self.kernel, plan, errors, after, is_up, repairs)
        self.kernel = after
        return changes

    def messages(self, changes: list[TunnelChanged]) -> list[str]:
        return [c.message for c in changes]


def test_first_pass_reports_the_tunnel_up_with_its_routes() -> None:
    a = RouterA()
    changes = a.one_pass()
    assert changes == [TunnelChanged("My_Tunnel", "up", None, "config",
                                     "tunnel My_Tunnel up: config, routes 20.10.1.0/24 installed")]
    [status] = a.reports.statuses(a.config, lambda name: None)
    assert (status["state"], status["ifindex"], status["routes_installed"]) == ("up", INDEX, True)
    assert a.one_pass() == []  # nothing changed, nothing to say


def test_dead_peer_is_journalled_with_the_verdicts_own_sentence() -> None:
    a = RouterA()
    a.one_pass()
    missed = LivenessChange(False, "keepalive-timeout", "3 keepalives missed (interval 1s)")
    a.reports.note_liveness("My_Tunnel", missed)
    assert a.messages(a.one_pass(dead)) == [
        "tunnel My_Tunnel down: 3 keepalives missed (interval 1s), routes 20.10.1.0/24 withdrawn"]
    [status] = a.reports.statuses(a.config, lambda name: None)
    assert (status["state"], status["reason"], status["routes_installed"]) == ("down", "keepalive-timeout", False)

    a.reports.note_liveness("My_Tunnel", LivenessChange(True, "keepalive-restored",
                                                        "keepalives answered again (a reply, rtt 0.24 ms)"))
    [back] = a.one_pass()
    assert (back.state, back.previous, back.reason) == ("up", "down", "keepalive-restored")
    assert back.message == ("tunnel My_Tunnel up: keepalives answered again (a reply, rtt 0.24 ms),"
                            " routes 20.10.1.0/24 installed")


def test_without_a_verdict_sentence_the_settings_say_it() -> None:
    a = RouterA()
    a.one_pass()
    assert a.messages(a.one_pass(dead)) == [
        "tunnel My_Tunnel down: 3 keepalives missed (interval 1s), routes 20.10.1.0/24 withdrawn"]


def test_a_deleted_link_goes_down_then_is_restored() -> None:
    a = RouterA()
    a.one_pass()
    a.kernel = nothing()  # someone ran `ip link del My_Tunnel`
    changes = a.one_pass()
    assert [(c.state, c.reason) for c in changes] == [("down", "link-removed"), ("up", "link-restored")]
    assert changes[0].message == "tunnel My_Tunnel down: link removed, routes 20.10.1.0/24 withdrawn"


def test_a_refused_action_is_an_error_then_repaired() -> None:
    a = RouterA()
    refused = ApplyError("My_Tunnel", SetLinkUp("My_Tunnel", True), "Operation not permitted")
    [error] = a.one_pass(errors=(refused,))
    assert (error.state, error.reason) == ("error", "apply-failed")
    assert error.message == f"tunnel My_Tunnel error: {refused}"
    [status] = a.reports.statuses(a.config, lambda name: None)
    assert status["error"] is not None and "Operation not permitted" in status["error"]
    [repaired] = a.one_pass()
    assert (repaired.state, repaired.previous, repaired.reason) == ("up", "error", "repaired")
    assert a.reports.statuses(a.config, lambda name: None)[0]["error"] is None


def test_a_name_held_by_a_foreign_link_is_a_conflict() -> None:
    a = RouterA()
    [conflict] = a.one_pass(problems=(PlanProblem("My_Tunnel", "My_Tunnel is a veth greupd does not own"),))
    assert (conflict.state, conflict.reason) == ("error", "conflict")
    assert conflict.message == "tunnel My_Tunnel error: My_Tunnel is a veth greupd does not own"


def test_disabled_and_removed_tunnels() -> None:
    a = RouterA()
    a.one_pass()
    a.config = load_config_text(ROUTER_A.replace("[tunnel.keepalive]", "enabled = false\n[tunnel.keepalive]"))
    [disabled] = a.one_pass()
    assert (disabled.state, disabled.previous) == ("disabled", "up")
    assert disabled.message == "tunnel My_Tunnel disabled: config"
    a.config = load_config_text("")
    assert a.one_pass() == []
    assert a.reports.records == {}
    assert a.reports.statuses(a.config, lambda name: None) == []


def test_a_partial_pass_reports_only_the_tunnels_it_looked_at() -> None:
    a = RouterA()
    a.one_pass()
    elsewhere = Observed({}, {}, frozenset(), {}, frozenset({"Other"}))
    assert a.reports.update(a.config, elsewhere, Plan(()), (), elsewhere, dead) == []


def counters(a: RouterA) -> tuple[int, int]:
    [status] = a.reports.statuses(a.config, lambda name: None)
    return status["state_changes"], status["drift_repairs"]


def test_a_dead_peer_and_its_return_are_two_state_changes_and_no_repair() -> None:
    a = RouterA()
    a.one_pass()
    assert counters(a) == (0, 0)  # the first state after start is no change
    a.one_pass(dead)
    a.one_pass(dead)  # still down: nothing new
    a.one_pass()
    assert counters(a) == (2, 0)


def test_a_repaired_drift_counts_once_per_pass_that_acted_on_what_the_kernel_reported() -> None:
    a = RouterA()
    a.one_pass()
    a.kernel = nothing()  # `ip link del My_Tunnel`: the kernel's event marks the tunnel for repair
    a.one_pass(repairs=frozenset({"My_Tunnel"}))
    assert counters(a) == (2, 1)  # down (link removed), up (link restored), one repair
    a.one_pass(repairs=frozenset({"My_Tunnel"}))  # an event about our own change: nothing to do, no repair
    assert counters(a) == (2, 1)
    a.kernel = nothing()
    a.one_pass()  # the same work without an event (a reload, a resync) is no drift repair
    assert counters(a) == (4, 1)


# --- which tunnels answer = "daemon" may answer for (#11 H5) -------------------------------------------------


def test_only_a_tunnel_whose_own_end_works_is_answerable() -> None:
    a = RouterA()
    assert a.reports.answerable() == []  # nothing known before the first pass
    a.one_pass()
    assert a.reports.answerable() == ["My_Tunnel"]
    a.one_pass(dead)  # a dead peer: routes withdrawn, our end still works
    assert a.reports.answerable() == ["My_Tunnel"]
    a.one_pass(problems=(PlanProblem("My_Tunnel", "My_Tunnel is a dummy greupd does not own"),))
    assert a.reports.answerable() == []
    a.one_pass()
    assert a.reports.answerable() == ["My_Tunnel"]
    a.kernel = nothing()  # `ip link del My_Tunnel`, and the pass that would recreate it is refused
    a.one_pass(errors=(ApplyError("My_Tunnel", SetLinkUp("My_Tunnel", True), "Operation not permitted"),))
    assert a.reports.answerable() == []


def test_a_link_held_down_for_a_dead_peer_stays_answerable() -> None:
    """action = "link": both ends greupd, both answering; if a link set down for a dead peer stopped the
    answers, the peer would go down too and neither would ever come back."""
    a = RouterA(load_config_text(ROUTER_A + 'action = "link"\n'))
    a.one_pass()
    a.one_pass(dead)
    assert not a.kernel.links["My_Tunnel"].up
    assert a.reports.answerable() == ["My_Tunnel"]
