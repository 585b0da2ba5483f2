"""The keepalive engine's side of the path MTU search, without sockets (the kernel tests are
tests/test_pmtu_kernel.py): a padded probe's reply goes to the search, never to the tunnel's Liveness, and
the search holds while the peer is down."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network

import pytest

from greupd.keepalive.codec import build_probe_template, gre_overhead, padded_probe_template
from greupd.keepalive.engine import KeepaliveEngine, KeepaliveTarget, LivenessChange
from greupd.keepalive.pmtu import PathMtuResult
from greupd.keepalive.underlay import Remotes
from greupd.model import RouteSpec
from greupd.netlink import nlmsg, rtnl

A, B = IPv4Address("172.19.1.1"), IPv4Address("172.19.1.2")


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """A loop that is never run: the engine only reads its clock and arms its timers on it."""
    the_loop = asyncio.new_event_loop()
    yield the_loop
    the_loop.close()


def probed(okey: int | None = None) -> KeepaliveTarget:
    return KeepaliveTarget("t", A, B, ikey=None, okey=okey, interval=1.0, retries=3, up_after=1, answer="off",
                           mtu_probe=(1200, 600.0, 1.0))


def engine_on(loop: asyncio.AbstractEventLoop, target: KeepaliveTarget,
              results: list[tuple[str, PathMtuResult]]) -> KeepaliveEngine:
    engine = KeepaliveEngine(lambda name, change: None, spread=False,
                             on_path_mtu=lambda name, result: results.append((name, result)))
    engine.path_mtu._route_mtu = lambda local, remote, fwmark: 1500  # what a 1500 underlay's route says
    engine._loop = loop
    engine.configure([target])
    engine.path_mtu.start(loop)
    return engine


def reflection(target: KeepaliveTarget, size: int, token: int) -> bytes:
    """What the peer routes back of a padded probe for MTU `size`: the inner packet, whole."""
    assert isinstance(target.local, IPv4Address) and isinstance(target.remote, IPv4Address)  # gre's probe
    template = build_probe_template(target.local, target.remote, target.okey, target.ikey)
    packet = padded_probe_template(template, size + gre_overhead(target.okey)).with_token(token)
    return packet[gre_overhead(target.okey):]


def in_flight(engine: KeepaliveEngine) -> dict[int, int]:
    return dict(engine.path_mtu._tunnels["t"].sent)


def test_a_padded_probes_reply_goes_to_the_search_not_to_the_liveness(loop: asyncio.AbstractEventLoop) -> None:
    results: list[tuple[str, PathMtuResult]] = []
    target = probed()
    engine = engine_on(loop, target, results)
    engine.path_mtu._tick()  # the floor's first probe (sent nowhere: no socket)
    [(token, size)] = in_flight(engine).items()
    assert size == 1200
    before = engine.status("t")
    engine.on_packet(reflection(target, size, token), loop.time())
    assert engine.counters.mtu_replies == 1 and engine.counters.unmatched_replies == 0
    assert engine.status("t") == before, "the Liveness saw nothing"
    engine.path_mtu._tick()  # the route's MTU next: 1476
    [(token, size)] = in_flight(engine).items()
    assert size == 1476
    engine.on_packet(reflection(target, size, token), loop.time())
    assert results == [("t", PathMtuResult(1476, "measured", "start: the route's MTU came back"))]
    assert engine.path_mtus() == {"t": 1476}
    status = engine.path_mtu_status("t")
    assert status is not None and (status["bytes"], status["state"], status["ipv6"]) == (1476, "measured", True)
    # replayed: counts for nothing
    engine.on_packet(reflection(target, size, token), loop.time())
    assert engine.counters.mtu_replies == 2 and engine.counters.unmatched_replies == 1


def test_with_a_key_the_ceiling_is_28_bytes_under_the_route(loop: asyncio.AbstractEventLoop) -> None:
    target = probed(okey=7)
    engine = engine_on(loop, target, [])
    engine.path_mtu._tick()
    [(token, _)] = in_flight(engine).items()
    engine.on_packet(reflection(target, 1200, token), loop.time())
    engine.path_mtu._tick()
    assert list(in_flight(engine).values()) == [1472]


def test_the_search_holds_while_the_peer_is_down_and_starts_over_when_it_is_back(
        loop: asyncio.AbstractEventLoop) -> None:
    engine = engine_on(loop, probed(), [])
    tunnel = engine._tunnels["t"]
    engine._report(tunnel, LivenessChange(False, "keepalive-timeout", "3 keepalives missed"))
    assert engine.path_mtu._tunnels["t"].entry == -1, "nothing scheduled while the peer is down"
    engine._report(tunnel, LivenessChange(True, "keepalive-restored", "back"))
    measured = engine.path_mtu._tunnels["t"]
    assert measured.start_due is not None, "started again, spread from the start a moment ago"
    engine.path_mtu._step(measured, measured.start_due)
    assert list(in_flight(engine).values()) == [1200], "measured again from the floor"


def test_the_searchs_tokens_are_among_those_the_replies_filter_is_built_from(loop: asyncio.AbstractEventLoop) -> None:
    engine = engine_on(loop, probed(), [])
    engine.path_mtu._tick()
    ahead = set(engine.path_mtu._tunnels["t"].tokens_ahead)
    assert ahead and set(in_flight(engine)) | ahead <= set(engine.path_mtu.tokens())


def test_a_lost_probe_counts_against_its_size_only_while_keepalives_come_back(
        loop: asyncio.AbstractEventLoop) -> None:
    results: list[tuple[str, PathMtuResult]] = []
    engine = engine_on(loop, probed(), results)
    measured = engine.path_mtu._tunnels["t"]
    now = loop.time()
    for step in range(3):  # the floor's three probes, none comes back
        engine.path_mtu._step(measured, now + step * 0.2)
    assert sorted(in_flight(engine).values()) == [1200, 1200, 1200]
    engine._tunnels["t"].liveness.missed_in_a_row = 1  # a small keepalive was lost too
    engine.path_mtu._step(measured, now + 5.0)
    assert results == [] and measured.search.state == "searching" and measured.wait_until > now + 5.0
    engine._tunnels["t"].liveness.missed_in_a_row = 0  # keepalives come back, the padded probes did not
    engine.path_mtu._step(measured, now + 6.0)
    assert [(r.mtu, r.state) for _, r in results] == [(1200, "failed")]


def measure_1476(engine: KeepaliveEngine, target: KeepaliveTarget, loop: asyncio.AbstractEventLoop) -> None:
    for _ in range(2):  # the floor, then the route's MTU: both come back
        engine.path_mtu._tick()
        [(token, size)] = in_flight(engine).items()
        engine.on_packet(reflection(target, size, token), loop.time())


def test_a_route_covering_the_remote_measures_again_shortly(loop: asyncio.AbstractEventLoop) -> None:
    """The daemon's netlink watch hands every route that is not greupd's to route_changed (issue #23)."""
    results: list[tuple[str, PathMtuResult]] = []
    target = probed()
    engine = engine_on(loop, target, results)
    measure_1476(engine, target, loop)
    measured = engine.path_mtu._tunnels["t"]
    assert measured.search.state == "measured" and measured.start_due is None
    engine.path_mtu.route_changed(IPv4Network("10.0.0.0/8"))
    assert measured.start_due is None, "a route elsewhere changes nothing"
    engine.path_mtu._route_mtu = lambda local, remote, fwmark: 1400  # the new route's MTU
    engine.path_mtu.route_changed(IPv4Network("0.0.0.0/0"))
    due = measured.start_due
    assert due is not None and due <= loop.time() + 0.5
    engine.path_mtu.route_changed(IPv4Network("172.19.1.0/24"))  # the add after the delete of a replace
    assert measured.start_due == due, "a burst of notifications measures once"
    engine.path_mtu._step(measured, due)
    assert measured.search.searching and measured.ceiling == 1376 and measured.start_due is None
    assert list(in_flight(engine).values())[-1] == 1200, "from the floor again"


def test_a_route_notification_while_the_peer_is_down_waits_for_the_peer(loop: asyncio.AbstractEventLoop) -> None:
    engine = engine_on(loop, probed(), [])
    engine._report(engine._tunnels["t"], LivenessChange(False, "keepalive-timeout", "3 keepalives missed"))
    engine.path_mtu.route_changed(IPv4Network("172.19.1.2/32"))
    assert engine.path_mtu._tunnels["t"].start_due is None and engine.path_mtu._tunnels["t"].entry == -1


def test_the_remotes_a_prefix_covers() -> None:
    remotes = Remotes({"a": IPv4Address("10.0.0.1"), "b": IPv4Address("10.0.1.1"), "c": IPv4Address("10.1.0.1"),
                       "v6": IPv6Address("2001:db8::1")})
    assert list(remotes.covered_by(IPv4Network("0.0.0.0/0"))) == ["a", "b", "c"]
    assert list(remotes.covered_by(IPv4Network("10.0.0.0/16"))) == ["a", "b"]
    assert list(remotes.covered_by(IPv4Network("10.0.1.1/32"))) == ["b"]
    assert list(remotes.covered_by(IPv4Network("10.0.2.0/24"))) == []
    assert list(remotes.covered_by(IPv6Network("::/0"))) == ["v6"]
    assert list(Remotes({}).covered_by(IPv4Network("0.0.0.0/0"))) == []


@pytest.mark.parametrize("dst", ["0.0.0.0/0", "172.19.0.0/16", "2001:db8::/32"])
def test_the_watch_reads_a_route_notifications_prefix(dst: str) -> None:
    spec = RouteSpec("eth0", ip_network(dst), gateway=None)
    raw = bytes(nlmsg.HEADER.size) + rtnl.route(True, 2, spec, 3).body  # as the kernel sends it: header first
    assert rtnl.route_destination(raw) == ip_network(dst)


def test_measurements_start_spread_not_in_a_burst(loop: asyncio.AbstractEventLoop) -> None:
    """1000 tunnels starting (or behind a default route that changed) are measured over 10 s, 100 a second."""
    targets = [KeepaliveTarget(f"t{i}", A, IPv4Address(f"172.19.2.{i}"), ikey=None, okey=None, interval=1.0,
                               retries=3, up_after=1, answer="off", mtu_probe=(1200, 600.0, 1.0))
               for i in range(1, 4)]
    engine = KeepaliveEngine(lambda name, change: None, spread=False)
    engine.path_mtu._route_mtu = lambda local, remote, fwmark: 1500
    engine._loop = loop
    engine.configure(targets)
    engine.path_mtu.start(loop)
    starts = sorted(m.start_due or 0.0 for m in engine.path_mtu._tunnels.values())
    assert [round(b - a, 3) for a, b in itertools.pairwise(starts)] == [0.01, 0.01]
    for measured in engine.path_mtu._tunnels.values():
        engine.path_mtu._step(measured, measured.start_due or 0.0)
    engine.path_mtu.route_changed(IPv4Network("0.0.0.0/0"))
    again = sorted(m.start_due or 0.0 for m in engine.path_mtu._tunnels.values())
    assert again[0] >= starts[-1] + 0.01 and [round(b - a, 3) for a, b in itertools.pairwise(again)] \
        == [0.01, 0.01]
