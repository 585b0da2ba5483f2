"""The keepalive engine's own decisions, without sockets: what it answers, and that its schedule survives a bug.

- L5 (code-review-3): a tick that raises half-way keeps every tunnel in the schedule.
- M2: probes and answers carry the tunnel link's underlay device (IP_PKTINFO ipi_ifindex) and fwmark (SO_MARK),
  as the last pass saw the link (the kernel test is tests/test_keepalive_underlay_kernel.py).
- L6: a peer's probe is reflected only when its inner IP header is plain (IHL 5, no fragment bits); scapy
  builds the probes, with options and fragment bits, as a forger would.
"""

from __future__ import annotations

import asyncio
import ctypes
import socket
import struct
from collections.abc import Iterator
from ipaddress import IPv4Address
from typing import Any

import pytest
from scapy.layers.inet import IP, IPOption_LSRR, IPOption_RR, IPOption_Timestamp
from scapy.layers.l2 import GRE
from scapy.packet import Packet

from greupd.gre import IFLA_GRE_FWMARK, IFLA_GRE_LINK, KeptAttributes
from greupd.keepalive.engine import KeepaliveEngine, KeepaliveTarget, LivenessChange, _Tunnel
from greupd.keepalive.underlay import NO_UNDERLAY, Underlay, underlay_of, underlays_after_pass
from greupd.model import LinkSpec, Observed, ObservedLink

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


# --- M2 ------------------------------------------------------------------------------------------------


def observed(links: dict[str, ObservedLink], scope: frozenset[str] | None = None) -> Observed:
    return Observed(links, {}, frozenset(), {}, scope)


def gre_link(index: int, kept: KeptAttributes = ()) -> ObservedLink:
    return ObservedLink(index, LinkSpec("to_b", "gre", A, B), True, True, kept)


BOUND: KeptAttributes = ((IFLA_GRE_LINK, struct.pack("=I", 7)), (IFLA_GRE_FWMARK, struct.pack("=I", 0x2A)))


def test_the_underlay_is_the_links_dev_and_fwmark_as_the_kernel_reported_them() -> None:
    assert underlay_of(BOUND) == Underlay(ifindex=7, fwmark=0x2A)
    assert underlay_of(()) == NO_UNDERLAY
    assert underlay_of(((IFLA_GRE_LINK, struct.pack("=I", 3)),)) == Underlay(3, 0)


def test_a_link_kept_by_the_pass_keeps_its_underlay_a_new_one_has_none() -> None:
    before = observed({"kept": gre_link(10, BOUND), "replaced": gre_link(11, BOUND), "gone": gre_link(12, BOUND)})
    after = observed({"kept": gre_link(10), "replaced": gre_link(99), "new": gre_link(13)})
    assert underlays_after_pass(before, after, ["kept", "replaced", "gone", "new", "absent"]) == {
        "kept": Underlay(7, 0x2A), "replaced": NO_UNDERLAY, "gone": NO_UNDERLAY, "new": NO_UNDERLAY,
        "absent": NO_UNDERLAY}
    # A pass over some tunnels says nothing about the others.
    partial = observed({"kept": gre_link(10, BOUND)}, scope=frozenset({"kept"}))
    assert underlays_after_pass(partial, partial, ["kept", "other"]) == {"kept": Underlay(7, 0x2A)}


def control_messages(control: bytes) -> list[tuple[int, int, bytes]]:
    """A control buffer's messages (struct cmsghdr, 64-bit) as (level, type, data)."""
    messages, at = [], 0
    while at < len(control):
        length, level, kind = struct.unpack_from("@Nii", control, at)
        messages.append((level, kind, control[at + 16:at + length]))
        at += socket.CMSG_SPACE(length - 16)
    return messages


def test_probes_and_answers_carry_the_links_ifindex_and_mark() -> None:
    engine = KeepaliveEngine(lambda name, change: None)
    engine.configure([target("to_b")])
    engine.follow_underlays({"to_b": Underlay(7, 0x2A), "not_ours": Underlay(1, 1)})
    tunnel = engine._tunnels["to_b"]
    pktinfo = (socket.IPPROTO_IP, 8, struct.pack("=I4s4s", 7, A.packed, bytes(4)))
    mark = (socket.SOL_SOCKET, socket.SO_MARK, struct.pack("=I", 0x2A))
    assert tunnel.source == [pktinfo, mark]  # sendmsg: a probe without sendmmsg, and every answer
    if tunnel.datagram is not None:  # sendmmsg: the same two messages
        header = tunnel.datagram.header
        assert control_messages(ctypes.string_at(header.msg_control, header.msg_controllen)) == [pktinfo, mark]
    engine.follow_underlays({"to_b": NO_UNDERLAY})
    assert engine._tunnels["to_b"].source == [(socket.IPPROTO_IP, 8, struct.pack("=I4s4s", 0, A.packed, bytes(4)))]
