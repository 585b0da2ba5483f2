"""The keepalive engine's own decisions, without sockets: what it answers, and that its schedule survives a bug.

- L5 (code-review-3): a tick that raises half-way keeps every tunnel in the schedule.
- L6: a peer's probe is reflected only when its inner IP header is plain (IHL 5, no fragment bits); scapy
  builds the probes, with options and fragment bits, as a forger would.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from ipaddress import IPv4Address
from typing import Any

import pytest
from scapy.layers.inet import IP, IPOption_LSRR, IPOption_RR, IPOption_Timestamp
from scapy.layers.l2 import GRE
from scapy.packet import Packet

from greupd.keepalive.engine import KeepaliveEngine, KeepaliveTarget, LivenessChange, _Tunnel

A, B = IPv4Address("172.19.1.1"), IPv4Address("172.19.1.2")


def target(name: str, remote: IPv4Address = B, answer: str = "daemon") -> KeepaliveTarget:
    return KeepaliveTarget(name, A, remote, ikey=None, okey=None, interval=1.0, retries=3, up_after=1,
                           answer="daemon" if answer == "daemon" else "off")


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """A loop that is never run: the engine only reads its clock and arms its timer on it."""
    the_loop = asyncio.new_event_loop()
    yield the_loop
    the_loop.close()


def scheduled(engine: KeepaliveEngine) -> set[str]:
    """The tunnels with a valid entry in the engine's schedule."""
    return {tunnel.target.name for _, entry, tunnel in engine._schedule if tunnel.entry == entry}


# --- L5 ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["_probe", "_next_probe"])
def test_a_tick_that_raises_half_way_leaves_every_tunnel_scheduled(
        loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    engine = KeepaliveEngine(lambda name, change: None, spread=False)
    engine._loop = loop
    engine.configure([target(f"t{i}", IPv4Address(int(B) + i)) for i in range(5)])
    assert scheduled(engine) == {f"t{i}" for i in range(5)}
    calls: list[str] = []
    next_probe = engine._next_probe

    def probe(tunnel: _Tunnel, now: float) -> None:
        """_probe without its socket; the second call raises if `where` says so (or _next_probe does)."""
        calls.append(tunnel.target.name)
        if where == "_probe" and len(calls) == 2:
            raise RuntimeError("a bug between popping the schedule and probing")
        engine._next_probe(tunnel, now)

    def broken_next_probe(tunnel: _Tunnel, now: float) -> LivenessChange | None:
        if len(calls) == 2:
            raise RuntimeError("a bug in scheduling the next probe")
        return next_probe(tunnel, now)

    monkeypatch.setattr(engine, "_probe", probe)
    if where == "_next_probe":
        monkeypatch.setattr(engine, "_next_probe", broken_next_probe)
    with pytest.raises(RuntimeError):
        engine._tick()
    assert scheduled(engine) == {f"t{i}" for i in range(5)}  # dac2a7b: none left, probing stopped for good
    assert all(t.next_at > loop.time() for t in engine._tunnels.values())  # next slot, no busy retry
    assert engine._timer is not None


# --- L6 ------------------------------------------------------------------------------------------------


class Answers:
    """An engine whose answers are recorded instead of sent."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sent: list[bytes] = []
        self.engine = KeepaliveEngine(self.verdict)
        self.engine.configure([target("to_b")])
        monkeypatch.setattr(self.engine, "_send_answer", lambda tunnel, packet: self.sent.append(packet))

    def verdict(self, name: str, change: LivenessChange) -> None:
        raise AssertionError(f"no verdict expected: {name} {change}")

    def offer(self, inner: Packet) -> bytes | None:
        """B's probe of A with `inner` as the part to reflect: what A sent back, if anything."""
        before = len(self.sent)
        self.engine.on_packet(bytes(IP(src=str(B), dst=str(A)) / GRE(proto=0x0800) / inner), 1.0)
        return self.sent[before] if len(self.sent) > before else None


def inner(**fields: Any) -> Packet:
    return IP(src=str(A), dst=str(B), **fields) / GRE(proto=0)


def test_a_plain_request_is_reflected_byte_for_byte(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = Answers(monkeypatch)
    packet = inner(id=7, flags="DF")
    assert answers.offer(packet) == bytes(packet)
    assert answers.engine.counters.requests_answered == 1


@pytest.mark.parametrize("options", [
    [IPOption_LSRR(routers=["192.0.2.99"])],  # loose source route: the forger's choice of path
    [IPOption_RR()],
    [IPOption_Timestamp()],
], ids=["lsrr", "record-route", "timestamp"])
def test_a_request_whose_inner_header_has_options_is_counted_not_reflected(
        monkeypatch: pytest.MonkeyPatch, options: list[Packet]) -> None:
    answers = Answers(monkeypatch)
    packet = inner(options=options)
    assert IP(bytes(packet)).ihl > 5
    assert answers.offer(packet) is None  # dac2a7b: reflected, options and all
    assert answers.engine.counters.requests_not_plain == 1
    assert answers.engine.counters.requests_answered == 0
    assert answers.offer(inner()) is not None  # and the next plain one is answered


@pytest.mark.parametrize("fragment", [{"flags": "MF"}, {"frag": 8}, {"flags": "MF", "frag": 1}],
                         ids=["more-fragments", "offset", "both"])
def test_a_request_whose_inner_header_is_a_fragment_is_counted_not_reflected(
        monkeypatch: pytest.MonkeyPatch, fragment: dict[str, Any]) -> None:
    answers = Answers(monkeypatch)
    assert answers.offer(inner(**fragment)) is None
    counters = answers.engine.counters
    assert counters.requests_answered == 0
    assert counters.malformed + counters.requests_not_plain == 1
