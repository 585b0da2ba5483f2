"""The path MTU search (greupd/keepalive/pmtu.py), pure: a simulated path and a simulated clock."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest

from greupd.keepalive.pmtu import (
    CONFIRM_EVERY,
    PROBE_SPACING,
    PROBES_PER_SIZE,
    PathMtuResult,
    PathMtuSearch,
    PathMtuTiming,
)

STEP = 0.05  # s of simulated time per step


class Path:
    """A path that carries sizes up to `mtu` (tunnel MTUs), loses `lost` probes whatever their size, and
    answers after `rtt`. Records every probe the search sent."""

    def __init__(self, mtu: int, rtt: float = 0.02) -> None:
        self.mtu = mtu
        self.rtt = rtt
        self.sent: list[tuple[float, int]] = []
        self.lose_next = 0
        self._in_flight: list[tuple[float, int]] = []

    def run(self, search: PathMtuSearch, start: float, until: float,
            stop: Callable[[PathMtuResult], bool] = lambda r: True) -> tuple[float, list[PathMtuResult]]:
        now, results = start, []
        while now < until:
            for size in search.due(now):
                self.sent.append((now, size))
                if self.lose_next:
                    self.lose_next -= 1
                elif size <= self.mtu:
                    self._in_flight.append((now + self.rtt, size))
            for arrival, size in [p for p in self._in_flight if p[0] <= now]:
                self._in_flight.remove((arrival, size))
                result = search.on_reply(size, now)
                if result is not None:
                    results.append(result)
            result = search.expire(now)
            if result is not None:
                results.append(result)
            if results and stop(results[-1]):
                return now, results
            now = round(now + STEP, 6)
        return now, results


def measured(path: Path, floor: int = 1200, ceiling: int = 1476, every: float = 600.0) -> tuple[
        PathMtuSearch, float, PathMtuResult]:
    search = PathMtuSearch(floor, every)
    search.restart(0.0, ceiling)
    now, results = path.run(search, 0.0, 120.0)
    assert results, "no result within 120 s"
    return search, now, results[-1]


def test_finds_the_largest_size_that_comes_back_to_the_byte() -> None:
    # The lab: a middle router's MTU of 1400, GRE without a key (24 bytes): the tunnel carries 1376.
    search, _, result = measured(Path(1376))
    assert (result.mtu, result.state) == (1376, "measured")
    assert search.mtu == 1376 and search.state == "measured" and result.ipv6
    assert search_sizes(1376)[0][1] == 1200, "the floor (RFC 8899's base) is confirmed first"


def search_sizes(mtu: int, ceiling: int = 1476) -> list[tuple[float, int]]:
    path = Path(mtu)
    search = PathMtuSearch(1200, 600.0)
    search.restart(0.0, ceiling)
    path.run(search, 0.0, 120.0)
    return path.sent


def test_a_path_that_carries_the_route_mtu_takes_two_probes() -> None:
    sent = search_sizes(1476)
    assert [size for _, size in sent] == [1200, 1476]


def test_sizes_bisect_and_each_failing_size_costs_probes_per_size() -> None:
    sent = [size for _, size in search_sizes(1376)]
    assert sent[:2] == [1200, 1476]
    # 1476 and every other size above 1376 is sent PROBES_PER_SIZE times; each size that came back once
    failing = {size for size in sent if size > 1376}
    passing = {size for size in sent if size <= 1376}
    assert all(sent.count(size) == PROBES_PER_SIZE for size in failing)
    assert all(sent.count(size) == 1 for size in passing)
    assert max(passing) == 1376 and min(failing) == 1377
    assert len(set(sent)) <= 2 + 9  # floor, ceiling, then a bisection of 276 bytes to one byte
    assert len(sent) < 40


def test_probes_are_rate_limited_by_the_spacing() -> None:
    sent = search_sizes(1300)
    times = [when for when, _ in sent]
    assert all(b - a >= PROBE_SPACING - 1e-9 for a, b in itertools.pairwise(times))


def test_a_single_loss_is_not_a_failing_size() -> None:
    path = Path(1476)
    path.lose_next = 2  # the floor's first two probes are lost, the third comes back
    search = PathMtuSearch(1200, 600.0)
    search.restart(0.0, 1476)
    _, results = path.run(search, 0.0, 60.0)
    assert (results[-1].mtu, results[-1].state) == (1476, "measured")


def test_a_path_below_the_floor_fails_and_keeps_the_floor() -> None:
    _, _, result = measured(Path(1100))
    assert (result.mtu, result.state) == (1200, "failed")
    assert "1200" in result.reason
    assert not result.ipv6  # 1200 < 1280: reported, IPv6 would break


def test_below_1280_is_reported_for_ipv6() -> None:
    _, _, result = measured(Path(1250))
    assert (result.mtu, result.state, result.ipv6) == (1250, "measured", False)


def test_a_ceiling_below_the_floor_measures_the_floor() -> None:
    _, _, result = measured(Path(1400), floor=1200, ceiling=1000)
    assert (result.mtu, result.state) == (1200, "measured")


def test_nothing_is_sent_before_restart() -> None:
    search = PathMtuSearch(1200, 600.0)
    assert search.due(0.0) == [] and search.expire(100.0) is None and search.next_wakeup() is None


def test_a_black_hole_that_appears_lowers_the_mtu_within_seconds() -> None:
    path = Path(1376)
    search, now, _ = measured(path)
    path.mtu = 1276  # the middle router's MTU falls to 1300
    later, results = path.run(search, now, now + 60.0)
    assert results and (results[-1].mtu, results[-1].state) == (1276, "measured")
    # found by the confirmation probes at the measured size, not at the next measurement (every = 600 s)
    assert later - now < 30.0
    assert "stopped coming back" in results[-1].reason


def test_a_higher_path_is_found_at_the_next_measurement_not_before() -> None:
    path = Path(1276)
    search, now, _ = measured(path, every=120.0)
    path.mtu = 1376
    later, results = path.run(search, now, now + 300.0, stop=lambda r: r.mtu == 1376)
    assert results[-1].mtu == 1376
    assert 120.0 - 1 <= later - now < 140.0  # at `every`, not at the confirmations in between
    assert results[-1].reason.startswith("every")


def test_confirmations_cost_one_probe_each() -> None:
    path = Path(1376)
    search, now, _ = measured(path)
    before = len(path.sent)
    path.run(search, now, now + 10 * CONFIRM_EVERY - 0.01, stop=lambda r: False)
    confirmations = path.sent[before:]
    assert {size for _, size in confirmations} == {1376}
    assert 8 <= len(confirmations) <= 10


def test_a_route_change_restarts_with_the_new_ceiling() -> None:
    path = Path(1476)
    search, now, _ = measured(path)
    search.restart(now, 1376, reason="route changed")
    assert search.state == "searching" and search.mtu == 1476  # the link keeps its MTU until a result
    _, results = path.run(search, now, now + 30.0)
    assert (results[-1].mtu, results[-1].state) == (1376, "measured")
    assert results[-1].reason.startswith("route changed")


def test_hold_sends_nothing_until_restart() -> None:
    path = Path(1476)
    search, now, _ = measured(path)
    search.hold()
    before = len(path.sent)
    _, results = path.run(search, now, now + 60.0, stop=lambda r: False)
    assert len(path.sent) == before and not results
    search.restart(now + 60.0, 1476, reason="peer back")
    assert search.due(now + 60.0) == [1200]


def test_a_failed_path_is_searched_again_and_recovers() -> None:
    path = Path(1100)
    search, now, result = measured(path)
    assert result.state == "failed"
    path.mtu = 1476
    _, results = path.run(search, now, now + 30.0)
    assert (results[-1].mtu, results[-1].state) == (1476, "measured")


@pytest.mark.parametrize("mtu", [1200, 1201, 1233, 1280, 1375, 1376, 1377, 1475, 1476])
def test_every_path_mtu_between_floor_and_ceiling_is_found(mtu: int) -> None:
    _, _, result = measured(Path(mtu))
    assert (result.mtu, result.state) == (mtu, "measured")


def test_timing_is_configurable() -> None:
    timing = PathMtuTiming(probes_per_size=1, spacing=0.5, timeout=0.2, confirm_every=60.0)
    search = PathMtuSearch(1200, 600.0, timing)
    path = Path(1300)
    search.restart(0.0, 1476)
    _, results = path.run(search, 0.0, 120.0)
    assert results[-1].mtu == 1300
    assert all(path.sent.count((t, s)) == 1 for t, s in path.sent)
    assert len([s for _, s in path.sent if s > 1300]) == len({s for _, s in path.sent if s > 1300})
