"""The BFD control packet codec against scapy's contrib/bfd as the independent reader and writer of the bytes."""

from __future__ import annotations

import hashlib

import pytest
from scapy.contrib.bfd import BFD, OptionalAuth

from greupd.liveness.bfd_codec import (
    AuthSection,
    AuthType,
    ControlPacket,
    Diag,
    MalformedPacket,
    State,
    decode,
    encode,
    sha1_digest_ok,
)

KEY = b"tunnel secret"


def test_encode_reads_back_in_scapy_field_by_field() -> None:
    packet = ControlPacket(state=State.INIT, diag=Diag.NEIGHBOR_DOWN, my_discriminator=0x01020304,
                           your_discriminator=0xA0B0C0D0, desired_min_tx_us=300_000, required_min_rx_us=250_000,
                           detect_mult=5, poll=True)
    parsed = BFD(encode(packet))
    assert (parsed.version, parsed.diag, parsed.sta, parsed.detect_mult, parsed.len) == (1, 3, 2, 5, 24)
    assert str(parsed.flags) == "P"
    assert (parsed.my_discriminator, parsed.your_discriminator) == (0x01020304, 0xA0B0C0D0)
    assert (parsed.min_tx_interval, parsed.min_rx_interval, parsed.echo_rx_interval) == (300_000, 250_000, 0)


@pytest.mark.parametrize("flags", ["", "P", "F", "C", "D", "CF"])
def test_decode_reads_what_scapy_writes(flags: str) -> None:
    data = bytes(BFD(sta=1, diag=7, flags=flags, detect_mult=3, my_discriminator=7, your_discriminator=0,
                     min_tx_interval=1_000_000, min_rx_interval=300_000, echo_rx_interval=50_000))
    packet = decode(data)
    assert packet.state == State.DOWN and packet.diag == Diag.ADMIN_DOWN
    assert (packet.poll, packet.final, packet.control_plane_independent, packet.demand) == (
        "P" in flags, "F" in flags, "C" in flags, "D" in flags)
    assert (packet.my_discriminator, packet.desired_min_tx_us, packet.required_min_rx_us,
            packet.required_min_echo_rx_us) == (7, 1_000_000, 300_000, 50_000)
    assert encode(packet) == data


def test_meticulous_sha1_is_rfc_5880_6_7_4() -> None:
    """The digest is SHA1 over the packet whose digest field holds the key padded to 20 bytes: scapy writes that
    packet (key in the auth_key field), hashlib hashes it, and ours must be byte for byte the same."""
    packet = ControlPacket(state=State.UP, my_discriminator=9, your_discriminator=10, desired_min_tx_us=300_000,
                           required_min_rx_us=300_000, auth=AuthSection(AuthType.METICULOUS_KEYED_SHA1, 1, 0xFFFFFFF0))
    ours = encode(packet, KEY)
    with_key = bytes(BFD(sta=3, flags="A", detect_mult=3, my_discriminator=9, your_discriminator=10,
                         min_tx_interval=300_000, min_rx_interval=300_000, echo_rx_interval=0,
                         optional_auth=OptionalAuth(auth_type=5, auth_keyid=1, sequence_number=0xFFFFFFF0,
                                                    auth_key=int.from_bytes(KEY.ljust(20, b"\0"), "big"))))
    assert len(ours) == len(with_key) == 52
    assert ours == with_key[:-20] + hashlib.sha1(with_key).digest()
    parsed = BFD(ours)
    assert (parsed.len, parsed.optional_auth.auth_type, parsed.optional_auth.auth_len,
            parsed.optional_auth.sequence_number) == (52, 5, 28, 0xFFFFFFF0)
    back = decode(ours)
    assert back.auth == AuthSection(5, 1, 0xFFFFFFF0, ours[-20:])
    assert sha1_digest_ok(ours, KEY)
    assert not sha1_digest_ok(ours, b"another key")
    tampered = bytearray(ours)
    tampered[2] = 4  # detect mult
    assert not sha1_digest_ok(bytes(tampered), KEY)


def test_an_hmac_sha1_is_not_accepted() -> None:
    """FRR's keychain SHA1 (FRR #23274) is an HMAC: a packet so signed fails our check."""
    import hmac
    packet = ControlPacket(state=State.UP, my_discriminator=9, auth=AuthSection(AuthType.METICULOUS_KEYED_SHA1, 1, 5))
    data = bytearray(encode(packet, KEY))
    data[-20:] = hmac.new(KEY, bytes(data[:-20]) + bytes(20), hashlib.sha1).digest()
    assert not sha1_digest_ok(bytes(data), KEY)


@pytest.mark.parametrize(("data", "why"), [
    (bytes(BFD(version=2, my_discriminator=1)), "version 2"),
    (bytes(BFD(my_discriminator=1))[:23], "shorter"),
    (bytes(BFD(len=30, my_discriminator=1)), "more than"),
    (bytes(BFD(len=20, my_discriminator=1)), "too short"),
    (bytes(BFD(detect_mult=0, my_discriminator=1)), "multiplier 0"),
    (bytes(BFD(flags="M", my_discriminator=1)), "multipoint"),
    (bytes(BFD(my_discriminator=0)), "my discriminator 0"),
    (bytes(BFD(flags="A", len=25, my_discriminator=1)) + b"\0", "too short"),
])
def test_what_6_8_6_discards(data: bytes, why: str) -> None:
    with pytest.raises(MalformedPacket, match=why):
        decode(data)


def test_a_longer_datagram_is_read_to_its_length_field() -> None:
    data = bytes(BFD(my_discriminator=1)) + b"trailing"
    assert decode(data).my_discriminator == 1


def test_an_unknown_diagnostic_decodes_as_none() -> None:
    assert decode(bytes(BFD(diag=30, my_discriminator=1))).diag == Diag.NONE


def test_encode_refuses_auth_without_a_key_or_with_md5() -> None:
    with pytest.raises(ValueError, match="needs the key"):
        encode(ControlPacket(state=State.UP, my_discriminator=1, auth=AuthSection(5, 1, 1)))
    with pytest.raises(ValueError, match="SHA1 only"):
        encode(ControlPacket(state=State.UP, my_discriminator=1, auth=AuthSection(2, 1, 1)), KEY)
    with pytest.raises(ValueError, match="1 to 20 bytes"):
        encode(ControlPacket(state=State.UP, my_discriminator=1, auth=AuthSection(5, 1, 1)), bytes(21))
