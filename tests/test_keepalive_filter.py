"""The GRE sockets' filters (#21 M6): replies only from a configured remote to a configured local, carrying a
token the engine issued; requests only from a remote of a tunnel that answers.

- The compiled programs, run by the small interpreter of tests/test_probe.py and checked against the kernel's
  own rules for classic BPF (sk_chk_filter): for any set of remotes and tokens, exactly those pass.
- On a real kernel (a netns of the running one: a raw GRE socket needs no ip_gre), the engine's socket drops
  GRE from an unconfigured source, and forged replies from a configured one, in the kernel; it follows a reload
  of the remotes; and what its full receive buffer dropped is counted.
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
    JA,
    MAX_INSTRUCTIONS,
    RET_K,
    SocketFilter,
    address_ranges,
    reply_fallbacks,
    reply_filter,
    request_filter,
)
from greupd.keepalive.codec import build_probe_template
from greupd.keepalive.engine import KeepaliveEngine, KeepaliveTarget
from greupd.keepalive.gre_socket import AttachedProgram, attach_socket_filter, open_gre_socket, socket_drops
from lab.hosts import Lab, in_netns
from tests.test_probe import run_socket_filter

A, B = IPv4Address("172.19.1.1"), IPv4Address("172.19.1.2")
_CONDITIONAL = (0x15, 0x25, 0x35, 0x45)


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


def reply(src: IPv4Address | int | str, dst: IPv4Address | int | str, token: int | None = 1 << 32,
          key: int | None = None) -> bytes:
    """A keepalive reply carrying `token` (IP ID and GRE sequence number) from src to dst: what comes back of
    our probe, built by scapy."""
    gre = GRE(proto=0, key_present=int(key is not None), key=key)
    if token is not None:
        gre.seqnum_present, gre.sequence_number = 1, token & 0xFFFFFFFF
    ip_id = token >> 32 if token is not None else 1
    return bytes(IP(src=str(IPv4Address(src)), dst=str(IPv4Address(dst)), proto=47, id=ip_id) / gre)


def passes(program: SocketFilter, packet: bytes) -> bool:
    return run_socket_filter(program, packet) > 0


address_sets = st.lists(st.integers(0, 0xFFFFFFFF), max_size=300)
token_sets = st.lists(st.integers(1 << 32, (1 << 48) - 1), min_size=1, max_size=200)


@given(remotes=address_sets, locals_=st.lists(st.integers(0, 0xFFFFFFFF), min_size=1, max_size=4),
       tokens=token_sets, others=st.lists(st.integers(0, 0xFFFFFFFF), max_size=20), key=st.none() | st.integers(
           0, 0xFFFFFFFF))
@settings(max_examples=60, deadline=None)
def test_replies_pass_from_the_configured_remotes_to_the_configured_locals_with_an_issued_token(
        remotes: list[int], locals_: list[int], tokens: list[int], others: list[int], key: int | None) -> None:
    program, kind = reply_filter(remotes, locals_, tokens)
    assert kind == "tokens"
    check_like_the_kernel(program)
    local, token = locals_[0], tokens[0]
    sequences = {t & 0xFFFFFFFF for t in tokens}
    for remote in remotes:
        assert passes(program, reply(remote, local, token, key))
        for neighbour in (remote - 1, remote + 1):  # the edges of every range
            if 0 <= neighbour <= 0xFFFFFFFF:
                assert passes(program, reply(neighbour, local, token, key)) == (neighbour in remotes)
    for other in others:
        assert passes(program, reply(other, local, token, key)) == (other in remotes)
        assert passes(program, reply(remotes[0] if remotes else 0, other, token, key)) == (
            bool(remotes) and other in locals_)
        if remotes:  # any 32 bits as the sequence number: only the issued ones pass
            assert passes(program, reply(remotes[0], local, other, key)) == (other in sequences)
    if remotes:
        assert not passes(program, reply(remotes[0], local, None, key))  # no sequence number: no token


def test_requests_pass_from_the_remotes_that_are_answered_and_replies_do_not() -> None:
    program, kind = request_filter([int(B)], [int(A)])
    assert kind == "addresses"
    check_like_the_kernel(program)
    request = build_probe_template(B, A, 7, None).with_token(1 << 40)  # B's probe of A
    assert passes(program, request)
    assert not passes(program, build_probe_template(IPv4Address("192.0.2.9"), A, 7, None).with_token(1 << 40))
    assert not passes(program, reply(B, A))
    assert not passes(program, bytes(IP(src=str(B), dst=str(A)) / GRE() / IP() / b"data"))
    replies, _ = reply_filter([int(B)], [int(A)], [1 << 40])
    assert not passes(replies, request)
    assert not passes(replies, bytes(IP(src=str(B), dst=str(A)) / GRE() / IP() / b"data"))


SCATTERED = [(index * 2654435761) & 0xFFFFFFFF for index in range(1, 5001)]  # no two adjacent


@pytest.mark.parametrize("count", [1, 17, 300, 1000, 3000])
def test_thousands_of_scattered_remotes_fit_and_each_is_found(count: int) -> None:
    remotes = SCATTERED[:count]
    program, kind = request_filter(remotes, [int(A)])
    assert kind == "addresses", count
    check_like_the_kernel(program)
    for remote in remotes[::max(1, count // 50)]:
        assert passes(program, build_probe_template(IPv4Address(remote), A, None, None).with_token(1 << 40))
        assert not passes(program, build_probe_template(IPv4Address(remote ^ 1), A, None, None).with_token(1 << 40))


def test_consecutive_remotes_are_one_range_however_many() -> None:
    assert address_ranges([5, 3, 4, 9, 10, 12]) == [(3, 5), (9, 10), (12, 12)]
    program, kind = request_filter(range(int(B), int(B) + 100_000), [int(A)])
    assert kind == "addresses" and len(program) < 60


def test_what_does_not_fit_is_left_out_tokens_first_and_said_once(caplog: pytest.LogCaptureFixture) -> None:
    assert reply_filter(SCATTERED[:400], [int(A)], [t << 8 | 1 << 40 for t in range(1600)])[1] == "tokens"
    program, kind = reply_filter(SCATTERED[:1000], [int(A)], [t << 8 | 1 << 40 for t in range(4000)])
    assert kind == "addresses"
    check_like_the_kernel(program)
    assert passes(program, reply(SCATTERED[0], A, 12345)) and not passes(program, reply(B, A, 12345))
    program, kind = reply_filter(SCATTERED, [int(A)], [1 << 40])
    assert kind == "protocol"
    check_like_the_kernel(program)
    assert passes(program, reply(B, A, 12345)) and not passes(program, reply(B, A, None))
    assert request_filter(SCATTERED, [int(A)])[1] == "protocol"
    attached: list[bytes] = []

    class FakeSocket:
        def setsockopt(self, level: int, option: int, value: bytes) -> None:
            attached.append(value)

    replies = AttachedProgram("replies", "tokens")
    for _ in range(2):
        replies.attach(FakeSocket(), program, kind, len(SCATTERED))  # type: ignore[arg-type]
    assert replies.kind == "protocol" and len(attached) == 1
    assert [r.message for r in caplog.records].count(
        "keepalive replies: 5000 tunnels are too many for the socket filter (4096 instructions at most): it leaves"
        " out the remotes' addresses, so a flood that it would have dropped can cost replies") == 1


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
                replies = AttachedProgram("replies", "tokens")
                replies.attach(sock, *reply_filter([int(B)], [int(A)], [7 << 32 | 42]), tunnels=1)
                # (Looped back, a packet is queued before sendto returns; the sleeps are margin.)
                send_raw([reply("192.0.2.9", A, 42), reply(B, A, 42), reply("172.19.1.3", A, 42),
                          reply(B, "127.0.0.1", 42), reply(B, A, 43), reply(B, A, None)])
                time.sleep(0.1)
                assert received(sock) == [str(B)]  # only the configured remote, local and token
                replies.attach(sock, *reply_filter([int(B) + 1], [int(A)], [42]), tunnels=1)  # a reload: .3
                send_raw([reply(B, A, 42), reply("172.19.1.3", A, 42)])
                time.sleep(0.1)
                assert received(sock) == ["172.19.1.3"]

                # Replies flooding a socket nobody reads: what the buffer cannot hold is counted.
                before = socket_drops(sock)
                assert before == 0
                send_raw([reply("172.19.1.3", A, 42)] * 20_000)
                time.sleep(0.1)
                drops = socket_drops(sock)
                assert drops is not None and drops > 0
                # Forged ones never reach the buffer: not read, yet not dropped there either.
                received(sock)
                send_raw([reply("192.0.2.9", A, 42)] * 10_000 + [reply("172.19.1.3", A, 43)] * 10_000)
                time.sleep(0.1)
                assert socket_drops(sock) == drops and received(sock) == []
            finally:
                sock.close()


@pytest.mark.needs_root
def test_the_engine_never_sees_forged_replies_or_gre_from_unconfigured_sources() -> None:
    """The engine itself (dac2a7b: its filter passed GRE protocol 0 from anyone, and every packet of such a
    flood took a place in the receive buffer and a turn in Python)."""
    with Lab() as lab:
        host = lab.host("a")
        host.ip_batch("link set lo up", f"addr add {A}/32 dev lo")
        loop = asyncio.new_event_loop()
        engine = KeepaliveEngine(lambda name, change: None, spread=False)
        engine.configure([KeepaliveTarget("to_b", A, B, None, None, 1.0, 3, 1, "off")])
        try:
            with in_netns(host):
                engine.start(loop)  # sends the first probe (it finds no route to B: lost, but its token issued)
                loop.run_until_complete(asyncio.sleep(0.05))
                tunnel = engine._tunnels["to_b"]
                sent, ahead = list(tunnel.window.tokens()), list(tunnel.tokens_ahead)
                assert len(sent) == 1 and ahead
                send_raw([reply("192.0.2.9", A, sent[0])] * 500  # an unconfigured source
                         + [reply(B, A, token) for token in range(1, 501)]  # forged: B's address, guessed tokens
                         + [reply(B, A, None)] * 100  # Cisco-style, no sequence number: no token of ours
                         + [reply(B, A, ahead[0]), reply(B, A, sent[0])])
            loop.run_until_complete(asyncio.sleep(0.2))
            assert engine.counters.packets == 2, engine.counters  # dac2a7b: every one of them
            assert engine.counters.replies == 1  # the reply to the probe sent
            assert engine.counters.unmatched_replies == 1  # a token drawn for the next probe: not sent yet
            status = engine.socket_status()
            assert status == {"filter": "tokens", "remotes": 1, "drops": 0}

            # A reload: the tunnel now goes to C. B's replies stay in the kernel, C's come through.
            c = IPv4Address("172.19.1.3")
            engine.configure([KeepaliveTarget("to_c", A, c, None, None, 1.0, 3, 1, "off")])
            token = engine._tunnels["to_c"].tokens_ahead[0]
            with in_netns(host):
                send_raw([reply(B, A, token), reply(c, A, token)])
            loop.run_until_complete(asyncio.sleep(0.1))
            assert engine.counters.packets == 3, engine.counters
        finally:
            engine.close()
            loop.close()


@pytest.mark.needs_root
def test_a_kernel_short_of_option_memory_gets_a_smaller_filter_not_an_error(caplog: pytest.LogCaptureFixture) -> None:
    """Linux 6.1 (Debian 12) charges a socket filter to net.core.optmem_max, 20480 bytes: the tokens of a few
    hundred tunnels do not fit, and attaching them failed with ENOMEM (seen in UML), which ended the engine's
    configure. Now the socket takes the addresses-only program, and keeps dropping unconfigured sources."""
    remotes = [int(B) + i for i in range(600)]
    tokens = [t << 8 | 1 << 40 for t in range(2400)]
    program, kind = reply_filter(remotes, [int(A)], tokens)
    assert kind == "tokens"
    with Lab() as lab:
        host = lab.host("a")
        host.ip_batch("link set lo up", f"addr add {A}/32 dev lo")
        host.run("sysctl", "-qw", "net.core.optmem_max=20480")
        with in_netns(host):
            sock = open_gre_socket()
            try:
                with pytest.raises(OSError):  # what the engine did before: an error out of configure
                    attach_socket_filter(sock, program)
                replies = AttachedProgram("replies", "tokens")
                replies.attach(sock, program, kind, 600, reply_fallbacks(remotes, [int(A)]))
                assert replies.kind == "addresses"
                send_raw([reply("192.0.2.9", A, 42), reply(B, A, 42)])
                time.sleep(0.1)
                assert received(sock) == [str(B)]
                replies.attach(sock, program, kind, 600, reply_fallbacks(remotes, [int(A)]))  # tried no more
            finally:
                sock.close()
    assert sum("net.core.optmem_max = 20480" in r.message for r in caplog.records) == 1
