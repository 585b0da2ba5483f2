"""mtu = "probe" on ip6gre (issue #23, Build 4): the padded GRE6 keepalive as the search's probe (pmtu_probe.
Gre6Probes) against scapy, its overhead arithmetic, and the engine's IPv6 side without sockets (the kernel test
is tests/test_pmtu_gre6_kernel.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from ipaddress import IPv6Address

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import GRE
from scapy.packet import Raw

from greupd.keepalive.engine import KeepaliveEngine, KeepaliveTarget
from greupd.keepalive.gre6 import build_probe_template6
from greupd.keepalive.pmtu import PathMtuResult
from greupd.keepalive.pmtu_probe import Gre6Probes
from tests.test_gre6 import scapy_probe6

L6, R6 = IPv6Address("fd00:19::1"), IPv6Address("fd00:19::2")
keys = st.none() | st.integers(0, 0xFFFFFFFF)
tokens = st.integers(1 << 32, (1 << 48) - 1)


@pytest.mark.parametrize(("okey", "encap_option", "overhead"), [
    (None, False, 48 - 4), (5, False, 48), (None, True, 52), (5, True, 56)])
def test_the_overhead_is_ipv6_gre_key_and_the_links_encapsulation_limit_option(
        okey: int | None, encap_option: bool, overhead: int) -> None:
    # 40 (IPv6) + 4 (GRE) + 4 (key) + 8 (the destination option ip6gre adds unless encap_limit = "none"),
    # as the kernel's own default MTU says: 1500 - 52 = 1448 for a keyless ip6gre link with the option.
    assert Gre6Probes(build_probe_template6(L6, R6, okey, None), okey, encap_option).overhead == overhead


@given(okey=keys, ikey=keys, token=tokens, encap_option=st.booleans(), mtu=st.integers(1200, 9000))
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_the_probe_for_an_mtu_is_scapys_gre6_probe_padded_to_that_mtu_plus_the_overhead(
        okey: int | None, ikey: int | None, token: int, encap_option: bool, mtu: int) -> None:
    builder = Gre6Probes(build_probe_template6(L6, R6, okey, ikey), okey, encap_option)
    head = scapy_probe6(L6, R6, okey, ikey, token)
    expected = bytes(head / Raw(bytes(mtu + builder.overhead - len(head))))
    # the engine's buffer: from the GRE header on (the kernel writes the outer IPv6 header), stamped in place
    assert bytes(builder.padded(mtu).stamp(token)) == expected[40:]
    assert len(expected) == mtu + builder.overhead


# --- the engine, without sockets -------------------------------------------------------------------------


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    the_loop = asyncio.new_event_loop()
    yield the_loop
    the_loop.close()


def probed6(okey: int | None = None, encap_option: bool = True) -> KeepaliveTarget:
    return KeepaliveTarget("t6", L6, R6, ikey=None, okey=okey, interval=1.0, retries=3, up_after=1, answer="off",
                           mtu_probe=(1200, 600.0, 1.0), encap_option=encap_option)


def engine_on(loop: asyncio.AbstractEventLoop, target: KeepaliveTarget, underlay: int,
              results: list[tuple[str, PathMtuResult]]) -> KeepaliveEngine:
    engine = KeepaliveEngine(lambda name, change: None, spread=False,
                             on_path_mtu=lambda name, result: results.append((name, result)))
    engine.path_mtu._route_mtu = lambda local, remote, fwmark: underlay
    engine._loop = loop
    engine.configure([target])
    engine.path_mtu.start(loop)
    return engine


def reflect(engine: KeepaliveEngine, target: KeepaliveTarget, size: int, token: int, now: float) -> None:
    """What the peer routes back of the probe for MTU `size` (its inner packet, whole), as the IPv6 socket
    hands it over: from the GRE header on, with the addresses and the flow label beside it."""
    builder = Gre6Probes(build_probe_template6(L6, R6, target.okey, target.ikey), target.okey, target.encap_option)
    probe = IPv6(bytes(IPv6(src=str(L6), dst=str(R6), nh=47) / Raw(bytes(builder.padded(size).stamp(token)))))
    inner = probe[GRE].payload
    assert isinstance(inner, IPv6)
    engine.on_packet6(bytes(inner)[40:], int(R6), int(L6), inner.fl, now)


def in_flight(engine: KeepaliveEngine) -> dict[int, int]:
    return dict(engine.path_mtu._tunnels["t6"].sent)


@pytest.mark.parametrize(("okey", "encap_option", "ceiling"), [(None, True, 1400 - 52), (7, False, 1400 - 48)])
def test_an_ip6gre_tunnel_is_measured_by_its_gre6_replies_up_to_the_route_less_the_overhead(
        loop: asyncio.AbstractEventLoop, okey: int | None, encap_option: bool, ceiling: int) -> None:
    results: list[tuple[str, PathMtuResult]] = []
    target = probed6(okey, encap_option)
    engine = engine_on(loop, target, 1400, results)
    for expected in (1200, ceiling):  # the floor, then the route's MTU: both come back
        engine.path_mtu._tick()
        [(token, size)] = in_flight(engine).items()
        assert size == expected
        reflect(engine, target, size, token, loop.time())
    assert engine.counters.mtu_replies == 2 and engine.counters.unmatched_replies == 0
    assert results == [("t6", PathMtuResult(ceiling, "measured", "start: the route's MTU came back"))]
    status = engine.path_mtu_status("t6")
    assert status is not None and (status["bytes"], status["ipv6"]) == (ceiling, True)


def test_the_ipv6_filter_is_built_with_the_ip6gre_searchs_tokens_the_ipv4_one_without(
        loop: asyncio.AbstractEventLoop) -> None:
    engine = engine_on(loop, probed6(), 1500, [])
    engine.path_mtu._tick()
    ahead = set(engine.path_mtu._tunnels["t6"].tokens_ahead)
    assert ahead and set(in_flight(engine)) | ahead <= set(engine.path_mtu.tokens(6))
    assert not set(engine.path_mtu.tokens(4))


def test_a_path_below_1280_plus_the_overhead_is_reported_as_breaking_ipv6(loop: asyncio.AbstractEventLoop) -> None:
    # An IPv6 underlay carries at least 1280, an ip6gre link inside it then 1228: IPv6 through it breaks.
    results: list[tuple[str, PathMtuResult]] = []
    target = probed6()
    engine = engine_on(loop, target, 1280, results)
    for _ in range(2):
        engine.path_mtu._tick()
        [(token, size)] = in_flight(engine).items()
        reflect(engine, target, size, token, loop.time())
    status = engine.path_mtu_status("t6")
    assert status is not None and (status["bytes"], status["ipv6"]) == (1280 - 52, False)
