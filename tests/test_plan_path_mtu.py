"""The planner with mtu = "probe" (issue #23): the measured MTU is set on the link in place, same ifindex."""

from __future__ import annotations

from greupd.config import load_config_text
from greupd.model import ChangeLink, DesiredMemo, Observed, desired_state
from greupd.plan import plan_changes
from tests.test_plan import empty_kernel, simulate

PROBED = """
[[tunnel]]
name = "My_Tunnel"
local = "172.19.1.1"
remote = "172.19.1.2"
mtu = "probe"
routes = ["192.168.2.0/24"]
[tunnel.keepalive]
interval = 1
[tunnel.mss]
clamp = "pmtu"
"""


def created() -> Observed:
    desired = desired_state(load_config_text(PROBED))
    return simulate(empty_kernel(), plan_changes(desired, empty_kernel()).actions)


def test_before_a_measurement_the_link_keeps_the_kernels_mtu() -> None:
    desired = desired_state(load_config_text(PROBED))
    assert desired.tunnels["My_Tunnel"].link.mtu is None


def test_a_measured_mtu_changes_the_link_in_place() -> None:
    config = load_config_text(PROBED)
    before = created()
    plan = plan_changes(desired_state(config, path_mtus={"My_Tunnel": 1376}), before)
    assert len(plan.actions) == 1
    [action] = plan.actions
    assert isinstance(action, ChangeLink) and action.spec.mtu == 1376 and action.fields == ("mtu",)
    after = simulate(before, plan.actions)
    assert after.links["My_Tunnel"].index == before.links["My_Tunnel"].index
    lower = plan_changes(desired_state(config, path_mtus={"My_Tunnel": 1276}), after)
    assert [a.spec.mtu for a in lower.actions if isinstance(a, ChangeLink)] == [1276]


def test_a_number_wins_over_any_measurement() -> None:
    config = load_config_text(PROBED.replace('mtu = "probe"', "mtu = 1400"))
    assert desired_state(config, path_mtus={"My_Tunnel": 1376}).tunnels["My_Tunnel"].link.mtu == 1400


def test_the_memo_rebuilds_a_tunnel_whose_measurement_changed() -> None:
    config, memo = load_config_text(PROBED), DesiredMemo()
    assert memo.of(config, {}).tunnels["My_Tunnel"].link.mtu is None
    assert memo.of(config, {}, {"My_Tunnel": 1376}).tunnels["My_Tunnel"].link.mtu == 1376
    assert memo.of(config, {}, {"My_Tunnel": 1276}).tunnels["My_Tunnel"].link.mtu == 1276
    assert memo.of(config, {"My_Tunnel": False}, {"My_Tunnel": 1276}).tunnels["My_Tunnel"].routes == frozenset()
