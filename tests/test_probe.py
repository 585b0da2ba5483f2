"""The keepalive codec: the probe a Cisco would send, patched per probe without scapy, and a parser that
never raises anything but MalformedPacket, whatever arrives on the raw GRE socket."""

from __future__ import annotations

import contextlib
import random
import struct
from ipaddress import IPv4Address

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import GRE
from scapy.packet import Raw, fuzz

from greupd.keepalive.bpf import SocketFilter
from greupd.keepalive.codec import (
    GRE_SOCKET_FILTER,
    KeepaliveRequest,
    MalformedPacket,
    ProbeBytes,
    ProbeReply,
    _general_message,
    _Unusual,
    _usual_message,
    build_probe_template,
    new_token,
    parse_gre,
    probe_shape,
    scapy_probe_shape,
    split_token,
)

A = IPv4Address("172.19.1.1")
B = IPv4Address("172.19.1.2")

keys = st.none() | st.integers(0, 0xFFFFFFFF)
addresses = st.integers(1, 0xFFFFFFFE).map(IPv4Address)
tokens = st.integers(1 << 32, (1 << 48) - 1)


def scapy_probe(local: IPv4Address, remote: IPv4Address, okey: int | None, ikey: int | None, token: int) -> IP:
    """The probe as scapy builds it from scratch, the way a Cisco's would look (plus our token)."""
    ip_id, sequence = split_token(token)
    outer = GRE(key_present=1, key=okey) if okey is not None else GRE()
    inner = GRE(seqnum_present=1, sequence_number=sequence, proto=0)
    if ikey is not None:
        inner.key_present, inner.key = 1, ikey
    return (IP(src=str(local), dst=str(remote), id=0, ttl=255) / outer
            / IP(src=str(remote), dst=str(local), id=ip_id, ttl=255) / inner)


def with_checksums_recomputed(packet: bytes) -> bytes:
    parsed = IP(packet)
    del parsed.chksum
    del parsed[GRE].payload.chksum
    return bytes(parsed)


# --- building -----------------------------------------------------------------------------------------


@given(local=addresses, remote=addresses, okey=keys, ikey=keys, token=tokens)
@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
def test_patched_probe_is_byte_for_byte_what_scapy_builds(local: IPv4Address, remote: IPv4Address,
                                                          okey: int | None, ikey: int | None, token: int) -> None:
    template = build_probe_template(local, remote, okey, ikey)
    assert template.with_token(token) == bytes(scapy_probe(local, remote, okey, ikey, token))


@pytest.mark.parametrize(("has_okey", "has_ikey"), [(False, False), (False, True), (True, False), (True, True)])
def test_the_stored_probe_shapes_are_what_scapy_builds(has_okey: bool, has_ikey: bool) -> None:
    # The daemon starts probing without importing scapy; the bytes it starts from are scapy's.
    assert probe_shape(has_okey, has_ikey) == scapy_probe_shape(has_okey, has_ikey)


@given(okey=keys, ikey=keys, tokens_in_a_row=st.lists(tokens, min_size=2, max_size=5))
def test_the_engines_buffer_stamped_again_and_again_is_each_time_what_scapy_builds(
        okey: int | None, ikey: int | None, tokens_in_a_row: list[int]) -> None:
    template = build_probe_template(A, B, okey, ikey)
    probe = ProbeBytes(template)  # one buffer per tunnel, rewritten in place for every probe
    for token in tokens_in_a_row:
        expected = bytes(scapy_probe(A, B, okey, ikey, token))
        assert bytes(probe.stamp(token)) == expected[template.outer_header_length:]


@given(okey=keys, ikey=keys, token=tokens)
def test_patched_probe_has_valid_checksums_as_scapy_reads_them(okey: int | None, ikey: int | None,
                                                                token: int) -> None:
    packet = build_probe_template(A, B, okey, ikey).with_token(token)
    assert with_checksums_recomputed(packet) == packet
    parsed = IP(packet)
    inner_ip = parsed[GRE].payload
    assert (parsed.src, parsed.dst, inner_ip.src, inner_ip.dst) == (str(A), str(B), str(B), str(A))
    assert parsed[GRE].proto == 0x0800 and inner_ip[GRE].proto == 0
    assert (inner_ip.id << 32) | inner_ip[GRE].sequence_number == token
    assert (parsed[GRE].key if parsed[GRE].key_present else None) == okey
    assert (inner_ip[GRE].key if inner_ip[GRE].key_present else None) == ikey


def test_template_leaves_the_outer_ip_id_to_the_kernel() -> None:
    # IP_HDRINCL with IP ID 0: the kernel picks the ID, as for any packet of ours
    packet = build_probe_template(A, B, 1, 2).with_token(new_token())
    assert IP(packet).id == 0


def test_tokens_never_have_a_zero_ip_id() -> None:
    # Our own answer = "daemon" peer reflects with IP_HDRINCL, where the kernel would replace an ID of 0.
    assert all(split_token(new_token())[0] != 0 for _ in range(10_000))
    assert len({new_token() for _ in range(1000)}) == 1000


# --- parsing ------------------------------------------------------------------------------------------


@given(okey=keys, ikey=keys, token=tokens)
def test_a_probe_arriving_at_the_peer_is_a_request_whose_reflection_is_the_inner_packet(
        okey: int | None, ikey: int | None, token: int) -> None:
    packet = build_probe_template(A, B, okey, ikey).with_token(token)
    request = parse_gre(packet)
    assert isinstance(request, KeepaliveRequest)
    assert (request.src, request.dst, request.key) == (int(A), int(B), okey)
    assert (request.inner_src, request.inner_dst) == (int(B), int(A))
    assert request.reflection == bytes(IP(packet)[GRE].payload)


@given(okey=keys, ikey=keys, token=tokens)
def test_the_reflection_coming_back_is_a_reply_with_our_token(okey: int | None, ikey: int | None,
                                                              token: int) -> None:
    request = parse_gre(build_probe_template(A, B, okey, ikey).with_token(token))
    assert isinstance(request, KeepaliveRequest)
    reply = parse_gre(request.reflection)
    assert reply == ProbeReply(src=int(B), dst=int(A), key=ikey, token=token)


def test_a_cisco_probe_without_sequence_number_reflects_as_a_reply_without_token() -> None:
    reflected = IP(src=str(B), dst=str(A)) / GRE(key_present=1, key=7, proto=0)
    assert parse_gre(bytes(reflected)) == ProbeReply(int(B), int(A), 7, None)


def test_ip_options_and_a_gre_checksum_are_read_past() -> None:
    inner = IP(src=str(A), dst=str(B), options=[b"\x01\x01\x01\x00"]) / GRE(seqnum_present=1, proto=0)
    packet = IP(src=str(B), dst=str(A), options=[b"\x01\x01\x01\x00"]) / GRE(chksum_present=1, key_present=1,
                                                                              key=9) / inner
    request = parse_gre(bytes(packet))
    assert isinstance(request, KeepaliveRequest)
    assert request.key == 9 and request.reflection == bytes(inner)


@pytest.mark.parametrize("packet", [
    IP(src="172.19.1.2", dst="172.19.1.1") / GRE() / IP() / ICMP(),
    IP(src="172.19.1.2", dst="172.19.1.1") / GRE(key_present=1, key=1) / IP() / TCP() / Raw(b"x" * 1400),
    IP(src="172.19.1.2", dst="172.19.1.1") / GRE() / IP() / GRE(proto=0x0800) / IP() / ICMP(),
    IP(src="172.19.1.2", dst="172.19.1.1") / GRE(proto=0x86DD) / IPv6() / ICMP(),
    IP(src="172.19.1.2", dst="172.19.1.1") / GRE(proto=0x6558) / Raw(b"\x00" * 60),
], ids=["icmp", "tcp", "gre-in-gre", "ipv6", "gretap"])
def test_tunnel_traffic_is_none_of_our_business(packet: IP) -> None:
    assert parse_gre(bytes(packet)) is None


def _truncated_inner() -> bytes:
    packet = bytearray(bytes(IP(src="1.1.1.1", dst="2.2.2.2") / GRE() / IP(src="2.2.2.2", dst="1.1.1.1")
                             / GRE(proto=0)))
    struct.pack_into("!H", packet, 24 + 2, 200)  # inner total length beyond the packet
    return bytes(packet)


MALFORMED = {
    "empty": b"",
    "short": bytes(IP())[:12],
    "ipv6 header": bytes(IPv6() / Raw(b"\x00" * 8)),
    "ihl 4": b"\x44" + bytes(IP(proto=47) / GRE())[1:],
    "total length beyond the bytes": bytes(IP(proto=47, len=100) / GRE()),
    "total length below the header": bytes(IP(proto=47, len=19) / GRE()),
    "a fragment": bytes(IP(proto=47, flags="MF") / GRE()),
    "not GRE": bytes(IP() / ICMP()),
    "no GRE header": bytes(IP(proto=47) / Raw(b"\x00\x00")),
    "GRE version 1": bytes(IP() / GRE(version=1, proto=0)),
    "GRE routing": bytes(IP() / GRE(routing_present=1, proto=0)),
    "key flag without key": bytes(IP(proto=47) / Raw(b"\x20\x00\x00\x00\x00\x00")),
    "sequence flag without sequence": bytes(IP(proto=47) / Raw(b"\x10\x00\x00\x00")),
    "checksum flag without checksum": bytes(IP(proto=47) / Raw(b"\x80\x00\x00\x00")),
    "inner not IPv4": bytes(IP() / GRE(proto=0x0800) / Raw(b"\x65" + b"\x00" * 8 + b"\x2f" + b"\x00" * 10)),
    "inner total length beyond the bytes": _truncated_inner(),
    "inner GRE header missing": bytes(IP() / GRE() / IP(proto=47)),
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_packets_raise_malformed_packet(data: bytes) -> None:
    with pytest.raises(MalformedPacket):
        parse_gre(data)


def _parse_or_malformed(data: bytes) -> None:
    with contextlib.suppress(MalformedPacket):
        parse_gre(data)


@given(st.binary(max_size=200))
def test_random_bytes_never_raise_anything_else(data: bytes) -> None:
    _parse_or_malformed(data)


@given(seed=st.integers(0, 2**32 - 1), inner=st.booleans())
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_scapy_fuzzed_gre_never_raises_anything_else(seed: int, inner: bool) -> None:
    random.seed(seed)  # scapy's fuzz() draws from the random module
    packet = IP(src=str(B), dst=str(A)) / fuzz(GRE())
    if inner:
        packet = packet / fuzz(IP(proto=47)) / fuzz(GRE())
    _parse_or_malformed(bytes(packet))


@given(okey=keys, ikey=keys, token=tokens, cut=st.integers(0, 80),
       flips=st.lists(st.tuples(st.integers(0, 79), st.integers(0, 255)), max_size=6))
def test_truncated_and_mangled_probes_never_raise_anything_else(okey: int | None, ikey: int | None, token: int,
                                                                 cut: int, flips: list[tuple[int, int]]) -> None:
    packet = bytearray(build_probe_template(A, B, okey, ikey).with_token(token))
    for index, value in flips:
        if index < len(packet):
            packet[index] = value
    _parse_or_malformed(bytes(packet[:cut]))
    _parse_or_malformed(bytes(packet))


@given(okey=keys, ikey=keys, token=tokens, request=st.booleans(), cut=st.integers(0, 80),
       flips=st.lists(st.tuples(st.integers(0, 79), st.integers(0, 255)), max_size=4))
def test_the_fast_path_reads_what_the_general_path_reads(okey: int | None, ikey: int | None, token: int,
                                                          request: bool, cut: int,
                                                          flips: list[tuple[int, int]]) -> None:
    """parse_gre reads the usual packet in one struct read; wherever it does, it must say exactly what the
    general reader (options, checksums, every way of being broken) says."""
    template = build_probe_template(A, B, okey, ikey)
    packet = bytearray(template.with_token(token))
    if not request:
        packet = packet[template.inner_ip_offset:]
    for index, value in flips:
        if index < len(packet):
            packet[index] = value
    for data in (bytes(packet), bytes(packet[:cut])):
        usual = _usual_message(data)
        if isinstance(usual, _Unusual):
            continue
        assert usual == _general_message(data)


# --- the socket filter, run by a small classic-BPF interpreter ----------------------------------------


def run_socket_filter(program: SocketFilter, packet: bytes) -> int:
    """What the kernel's sk_filter returns for `packet` (bytes kept; 0 drops): the opcodes the filter uses."""
    a = x = 0
    memory = [0] * 16
    pc = 0
    while True:
        code, jt, jf, k = program[pc]
        pc += 1
        if code in (0x20, 0x40, 0x48, 0x50, 0xB1):  # loads; out of bounds ends the program with 0
            where, size = {0x20: (k, 4), 0x40: (x + k, 4), 0x48: (x + k, 2), 0x50: (x + k, 1), 0xB1: (k, 1)}[code]
            if where + size > len(packet):
                return 0
            value = int.from_bytes(packet[where:where + size], "big")
            if code == 0xB1:
                x = 4 * (value & 0x0F)
            else:
                a = value
        elif code == 0x15:
            pc += jt if a == k else jf
        elif code == 0x25:
            pc += jt if a > k else jf
        elif code == 0x35:
            pc += jt if a >= k else jf
        elif code == 0x45:
            pc += jt if a & k else jf
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


@given(okey=keys, ikey=keys, token=tokens, options=st.booleans())
def test_the_socket_filter_passes_every_request_and_reply(okey: int | None, ikey: int | None, token: int,
                                                          options: bool) -> None:
    probe = build_probe_template(A, B, okey, ikey).with_token(token)
    if options:  # the same probe with outer IP options: the filter must follow the header length
        parsed = IP(probe)
        parsed.options = [b"\x01\x01\x01\x00"]
        del parsed.ihl, parsed.len, parsed.chksum
        probe = bytes(parsed)
    request = parse_gre(probe)
    assert isinstance(request, KeepaliveRequest)
    assert run_socket_filter(GRE_SOCKET_FILTER, probe) > 0
    assert run_socket_filter(GRE_SOCKET_FILTER, request.reflection) > 0


@given(data=st.binary(min_size=20, max_size=120), seed=st.integers(0, 2**32 - 1))
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_the_socket_filter_drops_nothing_the_parser_would_act_on(data: bytes, seed: int) -> None:
    random.seed(seed)
    candidates = [data, bytes(IP(src=str(B), dst=str(A)) / fuzz(GRE()) / IP(proto=47) / GRE(proto=0))]
    for packet in candidates:
        try:
            message = parse_gre(packet)
        except MalformedPacket:
            continue
        if message is not None:
            assert run_socket_filter(GRE_SOCKET_FILTER, packet) > 0


@pytest.mark.parametrize("packet", [
    IP() / GRE() / IP() / TCP() / Raw(b"x" * 1400),
    IP() / GRE(key_present=1, seqnum_present=1, chksum_present=1) / IP() / ICMP(),
    IP() / GRE(proto=0x86DD) / IPv6() / ICMP(),
], ids=["tcp", "icmp with every GRE field", "ipv6"])
def test_the_socket_filter_keeps_tunnel_traffic_out_of_python(packet: IP) -> None:
    assert run_socket_filter(GRE_SOCKET_FILTER, bytes(packet)) == 0
