"""MikroTik's GRE6 keepalive (gre6.py) and tolerant answering (answering.py), against scapy as the oracle.

Every packet a vendor sends is built here by scapy, the way that vendor sends it (anchors-3 section 2, the
linux-gre-keepalive issues it cites); greupd's bytes (stored shapes patched with struct) must equal scapy's.
"""

from __future__ import annotations

import asyncio
import socket
from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import GRE
from scapy.packet import Raw

from greupd.config import load_config_text
from greupd.keepalive.answering import Answer, AnswerRule, answer_for
from greupd.keepalive.bpf import (
    GRE_PROTOCOL_PROGRAM,
    SocketFilter,
    reply_fallbacks6,
    reply_filter6,
    request_filter,
    request_filter6,
)
from greupd.keepalive.codec import KeepaliveRequest, ProbeReply, parse_gre, split_token
from greupd.keepalive.engine import KeepaliveEngine, KeepaliveTarget, _inner_addresses, _Tunnel, targets_from_config
from greupd.keepalive.gre6 import (
    ProbeBytes6,
    build_probe_template6,
    padded_probe_template6,
    parse_gre6,
    probe_shape6,
    scapy_probe_shape6,
)
from lab.hosts import Lab, in_netns
from tests.test_probe import run_socket_filter

L6, R6 = IPv6Address("fd00:19::1"), IPv6Address("fd00:19::2")
keys = st.none() | st.integers(0, 0xFFFFFFFF)
addresses6 = st.integers(1, (1 << 128) - 2).map(IPv6Address)
tokens = st.integers(1 << 32, (1 << 48) - 1)


def scapy_probe6(local: IPv6Address, remote: IPv6Address, okey: int | None, ikey: int | None, token: int) -> IPv6:
    """Our GRE6 probe as scapy builds it from the layout of MikroTik's (plus our token)."""
    high, sequence = split_token(token)
    outer = GRE(key_present=1, key=okey, proto=0x86DD) if okey is not None else GRE(proto=0x86DD)
    inner = GRE(seqnum_present=1, sequence_number=sequence, proto=0x86DD)
    if ikey is not None:
        inner.key_present, inner.key = 1, ikey
    return (IPv6(src=str(local), dst=str(remote), nh=47, hlim=255) / outer
            / IPv6(src=str(remote), dst=str(local), nh=47, hlim=255, fl=high) / inner)


def mikrotik_probe6(mikrotik: IPv6Address, us: IPv6Address, payload: bytes = b"") -> IPv6:
    """A RouterOS `/interface gre6 keepalive` probe (no key: RouterOS's gre6 has none)."""
    return (IPv6(src=str(mikrotik), dst=str(us), nh=47, hlim=255) / GRE(proto=0x86DD)
            / IPv6(src=str(us), dst=str(mikrotik), nh=47, hlim=255) / GRE(proto=0x86DD) / Raw(payload))


def after_ipv6_header(packet: IPv6) -> bytes:
    """What a raw IPv6 socket reads of a packet: everything after its IPv6 header."""
    return bytes(packet)[40:]


def ints(packet: IPv6) -> tuple[int, int]:
    return int(IPv6Address(packet.src)), int(IPv6Address(packet.dst))


# --- building --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("has_okey", "has_ikey"), [(False, False), (False, True), (True, False), (True, True)])
def test_the_stored_gre6_shapes_are_what_scapy_builds(has_okey: bool, has_ikey: bool) -> None:
    assert probe_shape6(has_okey, has_ikey) == scapy_probe_shape6(has_okey, has_ikey)


@given(local=addresses6, remote=addresses6, okey=keys, ikey=keys, token=tokens)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_a_gre6_probe_is_byte_for_byte_what_scapy_builds(local: IPv6Address, remote: IPv6Address,
                                                        okey: int | None, ikey: int | None, token: int) -> None:
    template = build_probe_template6(local, remote, okey, ikey)
    assert template.with_token(token) == bytes(scapy_probe6(local, remote, okey, ikey, token))


def test_a_probe_buffer_stamped_again_carries_only_the_new_token() -> None:
    probe = ProbeBytes6(build_probe_template6(L6, R6, 7, 9))
    probe.stamp((0xFFFF << 32) | 0xFFFFFFFF)
    assert bytes(probe.stamp((1 << 32) | 5)) == after_ipv6_header(scapy_probe6(L6, R6, 7, 9, (1 << 32) | 5))


@pytest.mark.parametrize("okey", [None, 3])
def test_a_padded_gre6_probe_is_scapy_s_probe_with_zeros_after_the_inner_gre(okey: int | None) -> None:
    # pmtu.py's probe builder for ip6gre: the padding rides in the reflected part, whose lengths follow.
    token = (0xABC << 32) | 77
    padded = padded_probe_template6(build_probe_template6(L6, R6, okey, 4), 1280)
    expected = scapy_probe6(L6, R6, okey, 4, token) / Raw(bytes(1280 - len(scapy_probe6(L6, R6, okey, 4, token))))
    assert padded.with_token(token) == bytes(expected)
    assert len(padded.with_token(token)) == 1280
    with pytest.raises(ValueError, match="more than 60"):
        padded_probe_template6(build_probe_template6(L6, R6, okey, 4), 60)


# --- reading ---------------------------------------------------------------------------------------------


@given(okey=keys, ikey=keys, token=tokens, padding=st.sampled_from([0, 900]))
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_the_reflection_of_our_probe_reads_as_a_reply_with_its_token(okey: int | None, ikey: int | None,
                                                                    token: int, padding: int) -> None:
    # What a peer's kernel routes back: the inner part of our probe, hop limit one less.
    probe = scapy_probe6(L6, R6, okey, ikey, token) / Raw(bytes(padding))
    reflected = probe[GRE].payload.copy()
    reflected.hlim -= 1
    src, dst = ints(reflected)
    reply = parse_gre6(after_ipv6_header(reflected), src, dst, reflected.fl)
    assert reply == ProbeReply(int(R6), int(L6), ikey, token)


def test_a_mikrotik_probe_reads_as_a_request_and_is_answered_with_its_inner_packet() -> None:
    probe = mikrotik_probe6(R6, L6)
    request = parse_gre6(after_ipv6_header(probe), *ints(probe))
    assert isinstance(request, KeepaliveRequest)
    assert (request.inner_src, request.inner_dst) == (int(L6), int(R6))
    answer = answer_for(request, AnswerRule(int(L6), int(R6), None, 6))
    assert answer == Answer(bytes(probe[GRE].payload), False, "reflected")


@pytest.mark.parametrize("traffic", [
    IPv6(src="fd00:19::2", dst="fd00:19::1") / GRE(proto=0x86DD) / IPv6(src="fd01::1", dst="fd01::2", nh=59),
    IPv6(src="fd00:19::2", dst="fd00:19::1") / GRE(proto=0x0800) / IP(src="10.0.0.1", dst="10.0.0.2"),
    IPv6(src="fd00:19::2", dst="fd00:19::1") / GRE(proto=0x6558) / Raw(bytes(60)),
    # GRE6 carried in GRE6: the inner GRE carries a whole IPv6 packet
    IPv6(src="fd00:19::2", dst="fd00:19::1") / GRE(proto=0x86DD) / IPv6(src="fd01::1", dst="fd01::2", nh=47)
    / GRE(proto=0x86DD) / IPv6(src="fd02::1", dst="fd02::2", nh=59),
], ids=["ipv6", "ipv4", "ethernet", "gre6-in-gre6"])
def test_tunnel_traffic_is_neither_reply_nor_request(traffic: IPv6) -> None:
    assert parse_gre6(after_ipv6_header(traffic), *ints(traffic)) is None


# --- tolerant answering, each vendor's packet as it sends it --------------------------------------------

US, PUBLIC, PRIVATE = "203.0.113.1", "198.51.100.7", "192.168.5.15"


def rule4(local: str, remote: str, okey: int | None = None, inner: tuple[str, str, str] | None = None) -> AnswerRule:
    inner_ints = tuple(int(IPv4Address(a)) for a in inner) if inner is not None else None
    return AnswerRule(int(IPv4Address(local)), int(IPv4Address(remote)), okey, 4,
                      inner_ints[0] if inner_ints else None, (inner_ints[1], inner_ints[2]) if inner_ints else None)


def test_a_mikrotik_behind_nat_is_answered_at_its_public_address() -> None:
    # RouterOS 7 behind NAT writes its private WAN address as the inner destination (linux-gre-keepalive #4);
    # its NAT box rewrote only the outer source. We answer to the outer source, the tunnel's remote.
    probe = (IP(src=PUBLIC, dst=US, ttl=255) / GRE(proto=0x0800)
             / IP(src=US, dst=PRIVATE, ttl=255, id=4321) / GRE(proto=0))
    request = parse_gre(bytes(probe))
    assert isinstance(request, KeepaliveRequest)
    answer = answer_for(request, rule4(US, PUBLIC))
    assert answer == Answer(bytes(IP(src=US, dst=PUBLIC, ttl=255, id=4321) / GRE(proto=0)), False, "behind_nat")


def test_a_gre6_mikrotik_behind_a_prefix_translator_is_answered_at_its_public_address() -> None:
    private = IPv6Address("fd99::15")
    probe = mikrotik_probe6(R6, L6)
    probe[GRE].payload.dst = str(private)
    request = parse_gre6(after_ipv6_header(probe), *ints(probe))
    assert isinstance(request, KeepaliveRequest)
    answer = answer_for(request, AnswerRule(int(L6), int(R6), None, 6))
    assert answer == Answer(bytes(IPv6(src=str(L6), dst=str(R6), nh=47, hlim=255) / GRE(proto=0x86DD)), False,
                            "behind_nat")


def huawei_probe(key: int | None = None) -> IP:
    """Huawei VRP's probe: outer GRE protocol 0x0004, an IPv4 keepalive inside all the same (#3)."""
    outer = GRE(proto=0x0004, key_present=1, key=key) if key is not None else GRE(proto=0x0004)
    return IP(src=PUBLIC, dst=US, ttl=255) / outer / IP(src=US, dst=PUBLIC, ttl=255, id=9) / GRE(proto=0)


def test_huawei_s_odd_outer_protocol_is_a_request_answered_like_cisco_s() -> None:
    probe = huawei_probe(key=5)
    request = parse_gre(bytes(probe))
    assert request == KeepaliveRequest(int(IPv4Address(PUBLIC)), int(IPv4Address(US)), 5, int(IPv4Address(US)),
                                       int(IPv4Address(PUBLIC)), bytes(probe[GRE].payload))
    assert answer_for(request, rule4(US, PUBLIC, okey=5)) == Answer(bytes(probe[GRE].payload), False, "reflected")
    # and the kernel lets it through to the requests socket, which takes no other odd protocol
    program, _ = request_filter([int(IPv4Address(PUBLIC))], [int(IPv4Address(US))])
    assert run_socket_filter(program, bytes(probe)) > 0
    assert run_socket_filter(GRE_PROTOCOL_PROGRAM, bytes(probe)) > 0
    odd = huawei_probe()
    odd[GRE].proto = 0x0005
    assert run_socket_filter(program, bytes(odd)) == 0


def velocloud_probe() -> IP:
    """VeloCloud (as a Zscaler peer) addresses its probe with the tunnels' inner addresses (#1): outer
    192.168.1.64 -> .65, inner 172.22.74.137 (ours) -> .138 (its)."""
    return (IP(src="192.168.1.64", dst="192.168.1.65", ttl=255) / GRE(proto=0x0800)
            / IP(src="172.22.74.137", dst="172.22.74.138", ttl=255, id=1) / GRE(proto=0))


@pytest.mark.parametrize("inner", [("172.22.74.137", "172.22.74.138", "172.22.74.138"),
                                   ("172.22.74.137", "172.22.74.136", "172.22.74.139")], ids=["peer", "network"])
def test_velocloud_s_probe_on_inner_addresses_is_answered_through_the_tunnel(inner: tuple[str, str, str]) -> None:
    probe = velocloud_probe()
    request = parse_gre(bytes(probe))
    assert isinstance(request, KeepaliveRequest)
    answer = answer_for(request, rule4("192.168.1.65", "192.168.1.64", okey=77, inner=inner))
    # the inner packet in the tunnel's own GRE header, as a kernel routing it into the tunnel would send it
    assert answer == Answer(bytes(GRE(key_present=1, key=77, proto=0x0800) / probe[GRE].payload), True,
                            "inner_addresses")


def test_probes_for_other_addresses_are_never_answered() -> None:
    # Inner addresses that are neither ours nor the tunnel's: nothing to send, to anyone.
    probe = velocloud_probe()
    request = parse_gre(bytes(probe))
    assert isinstance(request, KeepaliveRequest)
    assert answer_for(request, rule4("192.168.1.65", "192.168.1.64")) == "not_addressed_to_us"
    assert answer_for(request, rule4("192.168.1.65", "192.168.1.64",
                                     inner=("172.22.74.141", "172.22.74.142", "172.22.74.142"))) == \
        "not_addressed_to_us"
    optioned = (IP(src=PUBLIC, dst=US) / GRE(proto=0x0800)
                / IP(src=US, dst=PUBLIC, options=b"\x01\x01\x01\x00") / GRE(proto=0))
    optioned_request = parse_gre(bytes(optioned))
    assert isinstance(optioned_request, KeepaliveRequest)
    assert answer_for(optioned_request, rule4(US, PUBLIC)) == "not_plain"


def test_a_probe_from_an_address_that_is_not_a_configured_remote_is_ignored_whatever_it_says() -> None:
    # Only a configured tunnel's (remote, local, key) gets an answer, and only ever to that remote: a forger
    # who writes a victim's address anywhere in the probe gets nothing sent (the engine never reaches a socket).
    engine = KeepaliveEngine(lambda name, change: None)
    target = KeepaliveTarget("t6", L6, R6, None, None, 1.0, 3, 1, "daemon")
    engine.configure([target])
    stranger = IPv6Address("fd00:66::9")
    for probe in (mikrotik_probe6(stranger, L6), mikrotik_probe6(R6, IPv6Address("fd00:19::5"))):
        engine.on_packet6(after_ipv6_header(probe), *ints(probe), 0, 0.0)
    keyed = (IPv6(src=str(R6), dst=str(L6), nh=47) / GRE(key_present=1, key=1, proto=0x86DD)
             / IPv6(src=str(L6), dst=str(R6), nh=47) / GRE(proto=0x86DD))
    engine.on_packet6(after_ipv6_header(keyed), *ints(keyed), 0, 0.0)
    assert engine.counters.requests_ignored == 3
    assert engine.counters.requests_answered == engine.counters.send_errors == 0
    v4 = (IP(src="192.0.2.66", dst=US) / GRE(proto=0x0800) / IP(src=US, dst="192.0.2.66") / GRE(proto=0))
    engine.on_packet(bytes(v4), 0.0)
    assert engine.counters.requests_ignored == 4


# --- the IPv6 sockets' programs ---------------------------------------------------------------------------

_NET = 0xFFF00000  # SKF_NET_OFF as the u32 of an instruction's k


def run_filter6(program: SocketFilter, network: bytes, data: bytes) -> int:
    """What sk_filter returns on a raw IPv6 socket: the packet (`data`) starts at the GRE header, and loads at
    SKF_NET_OFF + n read the IPv6 header (`network`). The opcodes the programs use, as in test_probe's."""
    a = x = 0
    memory = [0] * 16
    pc = 0
    while True:
        code, jt, jf, k = program[pc]
        pc += 1
        if code in (0x20, 0x28, 0x40, 0x48, 0x50):
            where, size = {0x20: (k, 4), 0x28: (k, 2), 0x40: (x + k, 4), 0x48: (x + k, 2), 0x50: (x + k, 1)}[code]
            buffer = data
            if where >= _NET:
                buffer, where = network, where - _NET
            if where + size > len(buffer):
                return 0
            a = int.from_bytes(buffer[where:where + size])
        elif code in (0x15, 0x25, 0x35, 0x45):
            taken = {0x15: a == k, 0x25: a > k, 0x35: a >= k, 0x45: bool(a & k)}[code]
            pc += jt if taken else jf
        elif code == 0x05:
            pc += k
        elif code == 0x02:
            memory[k] = a
        elif code == 0x60:
            a = memory[k]
        elif code == 0x54:
            a &= k
        elif code == 0x74:
            a >>= k
        elif code == 0x04:
            a = (a + k) & 0xFFFFFFFF
        elif code == 0x0C:
            a = (a + x) & 0xFFFFFFFF
        elif code == 0x07:
            x = a
        elif code == 0x06:
            return k
        else:
            raise AssertionError(f"opcode {code:#x} not modelled")


def split6(packet: IPv6) -> tuple[bytes, bytes]:
    raw = bytes(packet)
    return raw[:40], raw[40:]


def test_the_ipv6_replies_program_passes_our_tokens_from_configured_remotes_only() -> None:
    token = (0x1234 << 32) | 0xCAFE
    reflection = scapy_probe6(L6, R6, None, None, token)[GRE].payload.copy()
    program, kind = reply_filter6([int(R6)], [int(L6)], [token])
    assert kind == "tokens"
    assert run_filter6(program, *split6(reflection)) > 0
    other_token = scapy_probe6(L6, R6, None, None, token + 1)[GRE].payload.copy()
    assert run_filter6(program, *split6(other_token)) == 0
    stranger = reflection.copy()
    stranger.src = "fd00:66::9"
    assert run_filter6(program, *split6(stranger)) == 0
    wrong_local = reflection.copy()
    wrong_local.dst = "fd00:19::7"
    assert run_filter6(program, *split6(wrong_local)) == 0
    addresses, protocol = reply_fallbacks6([int(R6)], [int(L6)])
    assert addresses[1] == "addresses" and protocol[1] == "protocol"
    assert run_filter6(addresses[0], *split6(other_token)) > 0
    assert run_filter6(addresses[0], *split6(stranger)) == 0


def test_the_ipv6_requests_program_passes_probes_from_answered_remotes_only() -> None:
    program, kind = request_filter6([int(R6)], [int(L6)])
    assert kind == "addresses"
    assert run_filter6(program, *split6(mikrotik_probe6(R6, L6))) > 0
    assert run_filter6(program, *split6(mikrotik_probe6(IPv6Address("fd00:66::9"), L6))) == 0
    traffic = IPv6(src=str(R6), dst=str(L6)) / GRE(proto=0x86DD) / IPv6(src="fd01::1", dst="fd01::2", nh=59)
    assert run_filter6(program, *split6(traffic)) == 0
    keyed = (IPv6(src=str(R6), dst=str(L6), nh=47) / GRE(key_present=1, key=3, seqnum_present=1, proto=0x86DD)
             / IPv6(src=str(L6), dst=str(R6), nh=47) / GRE(proto=0x86DD))
    assert run_filter6(program, *split6(keyed)) > 0


# --- configuration ----------------------------------------------------------------------------------------


def test_an_ip6gre_tunnel_s_keepalive_is_mikrotik_s_gre6_and_carries_its_inner_addresses() -> None:
    config = load_config_text(
        '[[tunnel]]\nname = "t6"\nmode = "ip6gre"\nlocal = "fd00:19::1"\nremote = "fd00:19::2"\n'
        'address = "fd10::1"\npeer = "fd10::2"\n[tunnel.keepalive]\ninterval = 1\n')
    keepalive = config.tunnels[0].keepalive
    assert keepalive is not None and keepalive.format is None
    (target,) = targets_from_config(config)
    assert (target.local, target.remote) == (L6, R6)
    assert target.inner == (int(IPv6Address("fd10::1")), int(IPv6Address("fd10::2")), int(IPv6Address("fd10::2")))
    assert isinstance(_Tunnel(target).probe, ProbeBytes6)


def test_inner_addresses_without_a_peer_are_the_address_s_network() -> None:
    assert _inner_addresses(IPv4Interface("172.22.74.137/30"), None) == (
        int(IPv4Address("172.22.74.137")), int(IPv4Address("172.22.74.136")), int(IPv4Address("172.22.74.139")))
    assert _inner_addresses(IPv6Interface("fd10::1/128"), None) is None
    assert _inner_addresses(None, None) is None


# --- the engine's answer path, sockets recorded instead of used -----------------------------------------


class Recorded:
    """An engine whose answers are recorded (whole packets, and GRE sent through the tunnel) instead of sent."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *targets: KeepaliveTarget) -> None:
        self.sent: list[tuple[str, str, bytes]] = []
        self.engine = KeepaliveEngine(lambda name, change: None)
        self.engine.configure(list(targets))
        monkeypatch.setattr(self.engine, "_send_answer", lambda tunnel, packet: self.sent.append(
            (tunnel.target.name, "packet", packet)))
        monkeypatch.setattr(self.engine, "_send_in_tunnel", lambda tunnel, gre: self.sent.append(
            (tunnel.target.name, "in tunnel", gre)))


def target4(name: str, local: str, remote: str, okey: int | None = None,
            inner: tuple[int, int, int] | None = None) -> KeepaliveTarget:
    return KeepaliveTarget(name, IPv4Address(local), IPv4Address(remote), None, okey, 1.0, 3, 1, "daemon",
                           inner=inner)


def test_the_engine_answers_each_vendor_s_probe_to_the_configured_remote_only(monkeypatch: pytest.MonkeyPatch) -> None:
    velocloud_inner = (int(IPv4Address("172.22.74.137")), int(IPv4Address("172.22.74.138")),
                       int(IPv4Address("172.22.74.138")))
    recorded = Recorded(monkeypatch, target4("nat", US, PUBLIC), target4("velo", "192.168.1.65", "192.168.1.64",
                                                                         inner=velocloud_inner),
                        KeepaliveTarget("mikrotik6", L6, R6, None, None, 1.0, 3, 1, "daemon"))
    engine = recorded.engine
    nat = IP(src=PUBLIC, dst=US, ttl=255) / GRE(proto=0x0800) / IP(src=US, dst=PRIVATE, ttl=255) / GRE(proto=0)
    engine.on_packet(bytes(nat), 1.0)
    engine.on_packet(bytes(huawei_probe()), 1.0)
    engine.on_packet(bytes(velocloud_probe()), 1.0)
    gre6 = mikrotik_probe6(R6, L6)
    engine.on_packet6(after_ipv6_header(gre6), *ints(gre6), 0, 1.0)
    assert recorded.sent == [
        ("nat", "packet", bytes(IP(src=US, dst=PUBLIC, ttl=255) / GRE(proto=0))),
        ("nat", "packet", bytes(huawei_probe()[GRE].payload)),
        ("velo", "in tunnel", bytes(GRE(proto=0x0800) / velocloud_probe()[GRE].payload)),
        ("mikrotik6", "packet", bytes(gre6[GRE].payload)),
    ]
    assert engine.counters.answered_behind_nat == 1 and engine.counters.answered_inner_addresses == 1
    assert engine.counters.requests_answered == 4
    # every one of them goes to the tunnel's remote: the socket address is the target's, never the packet's
    assert {t.address[0] for t in engine._tunnels.values()} == {PUBLIC, "192.168.1.64", str(R6)}


# --- on a real kernel (a netns of the running one: raw IPv6 GRE sockets need no ip6_gre) -----------------


def send_raw6(packets: list[IPv6]) -> None:
    """Each packet as it is (header included, any source), looped back to this host."""
    with socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW) as sender:
        for packet in packets:
            sender.sendto(bytes(packet), (packet.dst, 0))


def reflection6(src: IPv6Address | str, token: int) -> IPv6:
    """What comes back of our GRE6 probe to R6, from `src`, carrying `token` (flow label and sequence number)."""
    high, sequence = split_token(token)
    return (IPv6(src=str(src), dst=str(L6), nh=47, hlim=254, fl=high)
            / GRE(seqnum_present=1, sequence_number=sequence, proto=0x86DD))


@pytest.mark.needs_root
def test_the_kernel_passes_the_engine_only_the_reflections_of_its_own_gre6_probes() -> None:
    """The IPv6 socket filter's loads at SKF_NET_OFF and the flow label read with IPV6_FLOWINFO, on a kernel."""
    with Lab() as lab:
        host = lab.host("a")
        host.ip_batch("link set lo up", f"addr add {L6}/128 dev lo nodad")
        loop = asyncio.new_event_loop()
        engine = KeepaliveEngine(lambda name, change: None, spread=False)
        engine.configure([KeepaliveTarget("to_r6", L6, R6, None, None, 1.0, 3, 1, "off")])
        try:
            with in_netns(host):
                engine.start(loop)  # the first probe finds no route to R6: lost, but its token issued
                loop.run_until_complete(asyncio.sleep(0.05))
                tunnel = engine._tunnels["to_r6"]
                (sent,) = tunnel.window.tokens()
                stranger = IPv6Address("fd00:66::2")  # the same low 32 bits as R6: let through, refused in Python
                send_raw6([reflection6("fd00:66::9", sent)] * 200  # an unconfigured source
                          + [reflection6(R6, token) for token in range(1 << 32, (1 << 32) + 200)]  # guessed tokens
                          + [reflection6(R6, (sent & ~0xFFFFFFFF) + ((sent + 1) & 0xFFFFFFFF))]
                          + [reflection6(stranger, sent), reflection6(R6, sent ^ (1 << 40)), reflection6(R6, sent)])
            loop.run_until_complete(asyncio.sleep(0.2))
            assert engine.counters.packets == 3, engine.counters
            assert engine.counters.replies == 1  # the reply to the probe sent, its flow label read from the kernel
            assert engine.counters.unmatched_replies == 2  # the stranger's, and the one with a wrong high half
            assert engine.socket_status()["drops"] == 0
            assert engine.is_up("to_r6") and tunnel.liveness.status()["received"] == 1
        finally:
            engine.close()
            loop.close()


def send_raw4(packets: list[IP]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as sender:
        for packet in packets:
            sender.sendto(bytes(packet), (packet.dst, 0))


@pytest.mark.needs_root
def test_on_a_kernel_each_vendor_s_probe_is_answered_at_the_remote_with_the_bytes_it_expects() -> None:
    """The engine's sockets for real (answers looped back: both ends are addresses of this netns), each
    vendor's probe sent as it sends it; a capture socket sees exactly what left, and where to."""
    local, remote, stranger = "172.19.1.1", "172.19.1.2", "172.19.1.9"
    with Lab() as lab:
        host = lab.host("a")
        host.ip_batch("link set lo up", f"addr add {local}/32 dev lo", f"addr add {remote}/32 dev lo",
                      f"addr add {stranger}/32 dev lo")
        loop = asyncio.new_event_loop()
        engine = KeepaliveEngine(lambda name, change: None, spread=False)
        ours, its = int(IPv4Address("172.22.74.137")), int(IPv4Address("172.22.74.138"))
        inner = (ours, its, its)
        engine.configure([KeepaliveTarget("t", IPv4Address(local), IPv4Address(remote), None, 7, 60.0, 3, 1,
                                          "daemon", inner=inner)])
        try:
            with in_netns(host):
                capture = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_GRE)
                capture.setblocking(False)
                engine.start(loop)
                probes = [
                    # MikroTik behind NAT: its private address as the inner destination
                    IP(src=remote, dst=local, ttl=255) / GRE(proto=0x0800)
                    / IP(src=local, dst="192.168.5.15", ttl=255, id=11) / GRE(proto=0),
                    # Huawei: outer protocol 0x0004
                    IP(src=remote, dst=local, ttl=255) / GRE(proto=0x0004)
                    / IP(src=local, dst=remote, ttl=255, id=12) / GRE(proto=0),
                    # VeloCloud: the tunnel's inner addresses
                    IP(src=remote, dst=local, ttl=255) / GRE(proto=0x0800)
                    / IP(src="172.22.74.137", dst="172.22.74.138", ttl=255, id=13) / GRE(proto=0),
                    # from an address that is no configured remote, naming the remote inside: nothing
                    IP(src=stranger, dst=local, ttl=255) / GRE(proto=0x0800)
                    / IP(src=local, dst=remote, ttl=255, id=14) / GRE(proto=0),
                ]
                send_raw4(probes)
            loop.run_until_complete(asyncio.sleep(0.3))
            left = []
            while True:
                try:
                    data = capture.recv(4096)
                except BlockingIOError:
                    break
                packet = IP(data)
                if packet.src == local and not (GRE in packet[GRE].payload and packet[GRE].payload[GRE].seqnum_present):
                    left.append(packet)  # (not the engine's own probe, whose inner GRE carries a token)
            capture.close()
            assert engine.counters.requests_answered == 3 and engine.counters.requests_ignored == 0
            assert {p.dst for p in left} == {remote}
            # what the peers get: the NAT'd MikroTik its probe's inner packet at its public address, Huawei its
            # inner packet, VeloCloud its inner packet inside the tunnel's GRE (okey 7), as its kernel would
            by_id = {(p[GRE].payload.id if p[GRE].proto == 0x0800 else p.id): p for p in left}
            assert bytes(by_id[11]) == bytes(IP(src=local, dst=remote, ttl=255, id=11) / GRE(proto=0))
            assert bytes(by_id[12]) == bytes(probes[1][GRE].payload)
            assert by_id[13][GRE].key == 7 and bytes(by_id[13][GRE].payload) == bytes(probes[2][GRE].payload)
            assert 14 not in by_id
        finally:
            engine.close()
            loop.close()


def test_format_mikrotik_on_gre_is_cisco_s_bytes_and_defaults_leave_ip6gre_without_keepalives() -> None:
    config = load_config_text(
        '[defaults.keepalive]\ninterval = 1\n'
        '[[tunnel]]\nname = "t4"\nlocal = "172.19.1.1"\nremote = "172.19.1.2"\n'
        '[tunnel.keepalive]\nformat = "mikrotik"\n'
        '[[tunnel]]\nname = "t6"\nmode = "ip6gre"\nlocal = "fd00:19::1"\nremote = "fd00:19::2"\n')
    (target,) = targets_from_config(config)  # t6 has none: a default keepalive never starts probing an ip6gre peer
    assert target.name == "t4" and not isinstance(_Tunnel(target).probe, ProbeBytes6)
