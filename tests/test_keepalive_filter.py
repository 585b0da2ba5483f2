"""The GRE socket's filter passes only keepalives from a configured remote to a configured local (review M6).

- The compiled program, run by the small interpreter of tests/test_probe.py and checked against the kernel's
  own rules for classic BPF (sk_chk_filter): for any set of remotes, it passes exactly the packets from them.
- On a real kernel (a netns of the running one: a raw GRE socket needs no ip_gre), the engine's socket drops
  GRE from an unconfigured source in the kernel, passes the configured remote's, follows a reload of the remotes,
  and counts what its full receive buffer dropped.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from ipaddress import IPv4Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP
from scapy.layers.l2 import GRE

from greupd.keepalive.bpf import (
    GRE_PROTOCOL_PROGRAM,
    JA,
    MAX_INSTRUCTIONS,
    RET_K,
    SocketFilter,
    address_ranges,
    socket_filter,
)
from greupd.keepalive.codec import build_probe_template
from greupd.keepalive.engine import KeepaliveEngine, KeepaliveTarget
from greupd.keepalive.gre_socket import GreSocketFilter, open_gre_socket, socket_drops
from lab.hosts import Lab, in_netns
from tests.test_probe import run_socket_filter

A, B = IPv4Address("172.19.1.1"), IPv4Address("172.19.1.2")
_CONDITIONAL = (0x15, 0x25, 0x35)


def check_like_the_kernel(program: SocketFilter) -> None:
    """What sk_chk_filter and bpf_check_classic refuse: too long, a jump out of the program or backwards (only
    forward offsets exist), offsets that do not fit, and a program that can run off its end."""
    assert 0 < len(program) <= MAX_INSTRUCTIONS
    for pc, (code, jt, jf, k) in enumerate(program):
        assert 0 <= k <= 0xFFFFFFFF, (pc, code, k)
        if code in _CONDITIONAL:
            assert 0 <= jt <= 255 and 0 <= jf <= 255, (pc, jt, jf)
            assert pc + 1 + max(jt, jf) < len(program), pc
        elif code == JA:
            assert pc + 1 + k < len(program), (pc, k)
    assert program[-1][0] == RET_K


def reply(src: IPv4Address | int | str, dst: IPv4Address | int | str) -> bytes:
    """A keepalive reply's shape (GRE protocol 0) from src to dst."""
    return bytes(IP(src=str(IPv4Address(src)), dst=str(IPv4Address(dst)), proto=47) / GRE(proto=0))


address_sets = st.lists(st.integers(0, 0xFFFFFFFF), max_size=300)


@given(remotes=address_sets, locals_=st.lists(st.integers(0, 0xFFFFFFFF), min_size=1, max_size=4),
       others=st.lists(st.integers(0, 0xFFFFFFFF), max_size=20))
@settings(max_examples=60, deadline=None)
def test_the_filter_passes_exactly_the_configured_remotes_to_the_configured_locals(
        remotes: list[int], locals_: list[int], others: list[int]) -> None:
    program = socket_filter(remotes, locals_)
    assert program is not None
    check_like_the_kernel(program)
    local = locals_[0]
    for remote in remotes:
        assert run_socket_filter(program, reply(remote, local)) > 0
        for neighbour in (remote - 1, remote + 1):  # the edges of every range
            if 0 <= neighbour <= 0xFFFFFFFF:
                assert (run_socket_filter(program, reply(neighbour, local)) > 0) == (neighbour in remotes)
    for other in others:
        assert (run_socket_filter(program, reply(other, local)) > 0) == (other in remotes)
        assert (run_socket_filter(program, reply(remotes[0] if remotes else 0, other)) > 0) == (
            bool(remotes) and other in locals_)


def test_a_request_from_a_remote_passes_and_tunnel_traffic_from_it_does_not() -> None:
    program = socket_filter([int(B)], [int(A)])
    assert program is not None
    request = build_probe_template(B, A, 7, None).with_token(1 << 40)  # B's probe of A
    assert run_socket_filter(program, request) > 0
    assert run_socket_filter(program, bytes(IP(src=str(B), dst=str(A)) / GRE() / IP() / b"data")) == 0
    assert run_socket_filter(program, bytes(IP(src="192.0.2.9", dst=str(A)) / GRE(proto=0))) == 0


@pytest.mark.parametrize("count", [1, 17, 300, 1000, 3000])
def test_thousands_of_scattered_remotes_fit_and_each_is_found(count: int) -> None:
    spread = [(index * 2654435761) & 0xFFFFFFFF for index in range(1, count + 1)]  # no two adjacent
    program = socket_filter(spread, [int(A)])
    assert program is not None, count
    check_like_the_kernel(program)
    for remote in spread[::max(1, count // 50)]:
        assert run_socket_filter(program, reply(remote, A)) > 0
        assert run_socket_filter(program, reply(remote ^ 1, A)) == 0


def test_consecutive_remotes_are_one_range_however_many() -> None:
    assert address_ranges([5, 3, 4, 9, 10, 12]) == [(3, 5), (9, 10), (12, 12)]
    program = socket_filter(range(int(B), int(B) + 100_000), [int(A)])
    assert program is not None and len(program) < 50


def test_too_many_remotes_for_the_kernel_fall_back_to_the_protocol_filter() -> None:
    spread = [(index * 2654435761) & 0xFFFFFFFF for index in range(1, 5001)]
    assert socket_filter(spread, [int(A)]) is None
    attached: list[SocketFilter] = []

    class FakeSocket:
        def setsockopt(self, *args: object) -> None:
            attached.append(GRE_PROTOCOL_PROGRAM)

    follower = GreSocketFilter()
    follower.follow(FakeSocket(), spread, [int(A)])  # type: ignore[arg-type]
    assert follower.kind == "protocol" and len(attached) == 1


# --- on a real kernel ----------------------------------------------------------------------------------


def send_raw(packets: list[bytes]) -> None:
    """Each packet as it is (IP_HDRINCL, any source), looped back to this host."""
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as sender:
        for packet in packets:
            sender.sendto(packet, (str(IPv4Address(struct.unpack_from("!I", packet, 16)[0])), 0))


def received(sock: socket.socket) -> list[str]:
    """The sources of what the socket holds, read until empty."""
    sources: list[str] = []
    while True:
        try:
            data = sock.recv(4096)
        except BlockingIOError:
            return sources
        sources.append(str(IPv4Address(data[12:16])))


@pytest.mark.needs_root
def test_the_kernel_drops_gre_from_unconfigured_sources_and_follows_a_reload() -> None:
    with Lab() as lab:
        host = lab.host("a")
        host.ip_batch("link set lo up", f"addr add {A}/32 dev lo")
        with in_netns(host):
            sock = open_gre_socket()
            try:
                follower = GreSocketFilter()
                follower.follow(sock, [int(B)], [int(A)])
                assert follower.kind == "addresses"
                # (Looped back, a packet is queued before sendto returns; the sleeps are margin.)
                send_raw([reply("192.0.2.9", A), reply(B, A), reply("172.19.1.3", A), reply(B, "127.0.0.1")])
                time.sleep(0.1)
                assert received(sock) == [str(B)]  # only the configured remote to the configured local
                follower.follow(sock, [int(B) + 1], [int(A)])  # a reload: remote .3 instead of .2
                send_raw([reply(B, A), reply("172.19.1.3", A)])
                time.sleep(0.1)
                assert received(sock) == ["172.19.1.3"]

                # The configured remote flooding a socket nobody reads: what the buffer cannot hold is counted.
                before = socket_drops(sock)
                assert before == 0
                send_raw([reply("172.19.1.3", A)] * 20_000)
                time.sleep(0.1)
                drops = socket_drops(sock)
                assert drops is not None and drops > 0
                # Junk from anywhere else never reaches the buffer: not read, yet not dropped there either.
                received(sock)
                send_raw([reply("192.0.2.9", A)] * 20_000)
                time.sleep(0.1)
                assert socket_drops(sock) == drops and received(sock) == []
            finally:
                sock.close()


@pytest.mark.needs_root
def test_the_engine_never_sees_a_flood_from_an_unconfigured_source() -> None:
    """The engine itself (dac2a7b: its filter passed GRE protocol 0 from anyone, and every packet of such a
    flood took a place in the receive buffer and a turn in Python)."""
    with Lab() as lab:
        host = lab.host("a")
        host.ip_batch("link set lo up", f"addr add {A}/32 dev lo")
        loop = asyncio.new_event_loop()
        engine = KeepaliveEngine(lambda name, change: None)
        engine.configure([KeepaliveTarget("to_b", A, B, None, None, 1.0, 3, 1, "off")])
        try:
            with in_netns(host):
                engine.start(loop)
                send_raw([reply("192.0.2.9", A)] * 500 + [reply(B, A)] * 5)  # tokenless: unmatched replies
            loop.run_until_complete(asyncio.sleep(0.2))
            assert engine.counters.packets == 5, engine.counters
            assert engine.counters.unmatched_replies == 5
            status = engine.socket_status()
            assert status is not None and status["filter"] == "addresses" and status["remotes"] == 1
            assert status["drops"] == 0
        finally:
            engine.close()
            loop.close()
