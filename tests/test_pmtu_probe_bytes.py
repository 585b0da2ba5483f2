"""The path MTU search's padded probe (codec.padded_probe_template), checked against scapy's own build, and
what it is when it comes back: a reply with our token, read by the same parser as a keepalive's."""

from __future__ import annotations

from ipaddress import IPv4Address

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP
from scapy.layers.l2 import GRE
from scapy.packet import Raw

from greupd.keepalive.bpf import reply_filter
from greupd.keepalive.codec import (
    ProbeBytes,
    ProbeReply,
    build_probe_template,
    gre_overhead,
    padded_probe_template,
    parse_gre,
    split_token,
)
from tests.test_keepalive_filter import passes

A = IPv4Address("172.19.1.1")
B = IPv4Address("172.19.1.2")
keys = st.none() | st.integers(0, 0xFFFFFFFF)
tokens = st.integers(1 << 32, (1 << 48) - 1)


def scapy_padded(okey: int | None, ikey: int | None, token: int, size: int) -> bytes:
    ip_id, sequence = split_token(token)
    outer = GRE(key_present=1, key=okey) if okey is not None else GRE()
    inner = GRE(seqnum_present=1, sequence_number=sequence, proto=0)
    if ikey is not None:
        inner.key_present, inner.key = 1, ikey
    head = IP(src=str(A), dst=str(B), id=0, ttl=255) / outer / IP(src=str(B), dst=str(A), id=ip_id, ttl=255,
                                                                   flags="DF") / inner
    return bytes(head / Raw(bytes(size - len(head))))


@given(okey=keys, ikey=keys, token=tokens, size=st.integers(100, 9000))
@settings(max_examples=150, deadline=None)  # no timed unit tests (scapy is slow under load)
def test_the_padded_probe_is_what_scapy_builds(okey: int | None, ikey: int | None, token: int, size: int) -> None:
    template = padded_probe_template(build_probe_template(A, B, okey, ikey), size)
    packet = template.with_token(token)
    assert len(packet) == size
    assert packet == scapy_padded(okey, ikey, token, size)
    # the engine's buffer: the GRE part, stamped in place, as for a keepalive
    probe = ProbeBytes(template)
    assert bytes(probe.stamp(token)) == packet[20:]


@given(okey=keys, ikey=keys, token=tokens, size=st.integers(100, 1500))
@settings(max_examples=50, deadline=None)
def test_its_reflection_is_a_reply_with_our_token_and_passes_the_replies_filter(
        okey: int | None, ikey: int | None, token: int, size: int) -> None:
    packet = padded_probe_template(build_probe_template(A, B, okey, ikey), size).with_token(token)
    reflection = packet[gre_overhead(okey):]  # what the peer routes back: the inner packet, whole
    assert len(reflection) == size - gre_overhead(okey)
    assert IP(reflection).flags == "DF"
    assert parse_gre(reflection) == ProbeReply(int(B), int(A), ikey, token)
    program, kind = reply_filter([int(B)], [int(A)], [token])
    assert kind == "tokens" and passes(program, reflection)


def test_gre_overhead() -> None:
    assert (gre_overhead(None), gre_overhead(7)) == (24, 28)
