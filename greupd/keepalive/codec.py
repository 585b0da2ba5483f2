"""The bytes of a Cisco-style GRE keepalive: building probes, reading what arrives on the raw GRE socket.

A Cisco IOS `keepalive <period> <retries>` probe is a GRE packet that carries, inside, the reply already
addressed back to the sender:

    IP(local -> remote, proto 47) / GRE(key = our okey, proto 0x0800)
        / IP(remote -> local, proto 47) / GRE(key = our ikey, proto 0)

The peer decapsulates it like any tunnel packet and routes the inner packet, which goes straight back to us
as a GRE packet with protocol 0 (no payload type: nothing consumes it but the sender's keepalive logic). The
peer needs no keepalive support at all, only a tunnel that accepts our key and a route back.

We add what Cisco leaves out: an unguessable token in the reflected part (the inner IP ID and the inner GRE
sequence number, S flag set), so that a reply proves a probe of ours went through the peer, and a forger who
can only guess addresses and keys cannot keep a dead tunnel up. (Whoever sees our probes on the wire sees
their tokens too: no keepalive protects against an attacker on the path, who could as well drop traffic.)

Scapy builds the probe's shape (once per combination of keys, kept as bytes: `_PROBE_SHAPES`); each
tunnel's template is that shape with its addresses and keys written in (`build_probe_template`), and each
probe is the template with a token and the inner IP checksum written in place, with struct (`ProbeBytes`):
a scapy build costs ~3 ms, a patch under a microsecond, and one loop carries thousands of tunnels. Tests
check the stored shapes and every patched probe against scapy's own build. The parser
(`parse_gre`) is plain struct over the raw socket's bytes, and raises only `MalformedPacket`.
"""

from __future__ import annotations

import functools
import os
import struct
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import NamedTuple

from greupd.keepalive.bpf import GRE_PROTOCOL_PROGRAM, SocketFilter

IPPROTO_GRE = 47
ETH_P_IP = 0x0800
KEEPALIVE_PROTO = 0  # GRE protocol type of the reflected part: "no payload", by Cisco's convention
# Huawei's probes come with this outer GRE protocol instead of 0x0800, an IPv4 request all the same
# (linux-gre-keepalive issue #3): read as requests, answered like Cisco's (answering.py).
HUAWEI_PROTO = 0x0004

# GRE flag bits (RFC 2784/2890, the first 16 bits of the header).
GRE_CSUM = 0x8000
GRE_ROUTING = 0x4000
GRE_KEY = 0x2000
GRE_SEQ = 0x1000
GRE_VERSION = 0x0007

IP_MF = 0x2000
IP_OFFSET = 0x1FFF

TOKEN_BITS = 48  # 16 bits of inner IP ID + 32 bits of inner GRE sequence number
_PROBE_TTL = 255  # Cisco's default tunnel TTL; the inner TTL only has to survive one hop at the peer

ProbeToken = int  # (ip_id << 32) | gre_sequence, 48 bits, ip_id never 0


_TOKEN_BYTES = TOKEN_BITS // 8
_POOL_TOKENS = 512
_token_pool = b""
_token_at = 0


def new_token() -> ProbeToken:
    """A fresh unguessable token. The IP ID part is never 0: a Linux host that reflects with IP_HDRINCL
    (our own `answer = "daemon"`) has the kernel replace an IP ID of 0, which would break the token.

    Drawn from a pool of os.urandom bytes refilled 512 tokens at a time: one getrandom() per probe was 15 %
    of the keepalive engine's time with 1000 tunnels.
    """
    global _token_pool, _token_at
    while True:
        if _token_at + _TOKEN_BYTES > len(_token_pool):
            _token_pool, _token_at = os.urandom(_TOKEN_BYTES * _POOL_TOKENS), 0
        token = int.from_bytes(_token_pool[_token_at:_token_at + _TOKEN_BYTES])
        _token_at += _TOKEN_BYTES
        if token >> 32:
            return token


def split_token(token: ProbeToken) -> tuple[int, int]:
    """(inner IP ID, inner GRE sequence number)."""
    return token >> 32, token & 0xFFFFFFFF


def ones_complement_sum(header: bytes | bytearray | memoryview) -> int:
    """The 16-bit ones' complement sum of a header's words (RFC 1071), folded."""
    words: tuple[int, ...] = struct.unpack(f"!{len(header) // 2}H", header)
    total = sum(words)
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def ipv4_checksum(header: bytes | bytearray | memoryview) -> int:
    """The ones' complement checksum of an IPv4 header (with its checksum field zeroed by the caller)."""
    return ~ones_complement_sum(header) & 0xFFFF


_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")


class ProbeBytes:
    """One tunnel's probe as the engine sends it, in a buffer it rewrites in place for every probe: the GRE
    part only (the kernel builds the outer IP header), with the token and the inner IP checksum written in.

    The inner checksum is updated, not recomputed (RFC 1624): the template's header sums to `_base` with an
    IP ID of 0, and the header's other words never change, so the checksum with IP ID `i` is ~(_base + i).
    """

    __slots__ = ("_base", "_checksum_at", "_id_at", "_sequence_at", "buffer")

    def __init__(self, template: ProbeTemplate) -> None:
        start = template.outer_header_length
        self.buffer = bytearray(template.packet[start:])
        inner = template.inner_ip_offset - start
        self._id_at, self._checksum_at = inner + 4, inner + 10
        self._sequence_at = template.sequence_offset - start
        header_len = (self.buffer[inner] & 0x0F) * 4
        header = bytearray(self.buffer[inner:inner + header_len])
        header[4:6] = header[10:12] = b"\0\0"
        self._base = ones_complement_sum(header)

    def stamp(self, token: ProbeToken) -> bytearray:
        """The buffer, now carrying `token` (valid until the next stamp)."""
        ip_id = token >> 32
        total = self._base + ip_id
        total = (total & 0xFFFF) + (total >> 16)
        buffer = self.buffer
        _U16.pack_into(buffer, self._id_at, ip_id)
        _U16.pack_into(buffer, self._checksum_at, ~total & 0xFFFF)
        _U32.pack_into(buffer, self._sequence_at, token & 0xFFFFFFFF)
        return buffer


@dataclass(frozen=True)
class ProbeTemplate:
    """One tunnel's probe with a zero token, and where the token and inner checksum live in it."""

    packet: bytes
    inner_ip_offset: int
    sequence_offset: int

    @property
    def outer_header_length(self) -> int:
        """Where the outer GRE header starts: a socket that builds the outer IP header itself sends the rest."""
        return (self.packet[0] & 0x0F) * 4

    def with_token(self, token: ProbeToken) -> bytes:
        """The whole probe carrying `token`, checksums valid. The outer IP ID is 0: a kernel that sends it
        (IP_HDRINCL) picks one, and recomputes the outer checksum anyway."""
        outer = self.packet[:self.outer_header_length]
        return outer + bytes(ProbeBytes(self).stamp(token))


def build_probe_template(local: IPv4Address, remote: IPv4Address, okey: int | None, ikey: int | None) -> ProbeTemplate:
    """The probe of tunnel local -> remote (once per tunnel, not per probe).

    The outer GRE carries our okey (what the peer's tunnel expects); the inner GRE carries our ikey, since it
    reaches us as if the peer's tunnel had sent it, with the peer's okey = our ikey.
    """
    shape = probe_shape(okey is not None, ikey is not None)
    buf = bytearray(shape.packet)
    inner = shape.inner_ip_offset
    struct.pack_into("!4s4s", buf, 12, local.packed, remote.packed)
    struct.pack_into("!4s4s", buf, inner + 12, remote.packed, local.packed)
    if okey is not None:
        struct.pack_into("!I", buf, 24, okey)
    if ikey is not None:
        struct.pack_into("!I", buf, inner + 24, ikey)
    for header in (0, inner):
        struct.pack_into("!H", buf, header + 10, 0)
        struct.pack_into("!H", buf, header + 10, ipv4_checksum(memoryview(buf)[header : header + 20]))
    return ProbeTemplate(bytes(buf), inner, shape.sequence_offset)


IP_DF = 0x4000


def gre_overhead(okey: int | None) -> int:
    """Bytes a GRE/IPv4 tunnel adds to each packet it sends: outer IP, GRE, and the output key if any."""
    return 20 + 4 + (4 if okey is not None else 0)


def padded_probe_template(template: ProbeTemplate, outer_size: int) -> ProbeTemplate:
    """The probe padded to `outer_size` bytes on the wire (outer IP header included), with DF set in the inner
    header: the path MTU search's probe (pmtu.py). The padding (zeros) is the payload of the inner GRE packet
    of protocol 0, so the peer reflects it whole, and the reflection, `outer_size` less the outer IP and GRE
    headers, leaves with DF too. (DF on the outer header is the sending socket's: IP_PMTUDISC_PROBE.)"""
    pad = outer_size - len(template.packet)
    if pad < 0:
        raise ValueError(f"a probe is {len(template.packet)} bytes, more than {outer_size}")
    buf = bytearray(template.packet + bytes(pad))
    inner = template.inner_ip_offset
    for header, length in ((0, outer_size), (inner, outer_size - inner)):
        struct.pack_into("!H", buf, header + 2, length)
        if header == inner:
            struct.pack_into("!H", buf, header + 6, IP_DF)
        struct.pack_into("!H", buf, header + 10, 0)
        struct.pack_into("!H", buf, header + 10, ipv4_checksum(memoryview(buf)[header : header + 20]))
    return ProbeTemplate(bytes(buf), inner, template.sequence_offset)


# Scapy's build of the probe (scapy_probe_shape below), once per combination of keys, addresses and keys
# zero: kept as bytes so that the daemon need not import scapy (~0.2 s natively, ~20 MB of memory) to
# start probing. tests/test_probe.py checks that these are exactly what scapy builds today.
_PROBE_SHAPES: dict[tuple[bool, bool], str] = {
    # (has okey, has ikey): IP / GRE(okey?, proto IPv4) / IP / GRE(ikey?, sequence, proto 0)
    (False, False): "4500003400000000ff2fbb9b0000000000000000000008004500001c00000000ff2fbbb3"
                    "00000000000000001000000000000000",
    (False, True): "4500003800000000ff2fbb970000000000000000000008004500002000000000ff2fbbaf"
                   "0000000000000000300000000000000000000000",
    (True, False): "4500003800000000ff2fbb97000000000000000020000800000000004500001c00000000"
                   "ff2fbbb300000000000000001000000000000000",
    (True, True): "4500003c00000000ff2fbb93000000000000000020000800000000004500002000000000"
                  "ff2fbbaf0000000000000000300000000000000000000000",
}


def _offsets(has_okey: bool, has_ikey: bool) -> tuple[int, int]:
    inner_ip_offset = 20 + 4 + (4 if has_okey else 0)
    return inner_ip_offset, inner_ip_offset + 20 + 4 + (4 if has_ikey else 0)


@functools.cache
def probe_shape(has_okey: bool, has_ikey: bool) -> ProbeTemplate:
    """The probe's shape for this combination of keys, from the bytes scapy built (_PROBE_SHAPES)."""
    inner_ip_offset, sequence_offset = _offsets(has_okey, has_ikey)
    return ProbeTemplate(bytes.fromhex(_PROBE_SHAPES[has_okey, has_ikey]), inner_ip_offset, sequence_offset)


def scapy_probe_shape(has_okey: bool, has_ikey: bool) -> ProbeTemplate:
    """Scapy's build of the probe's shape: where _PROBE_SHAPES comes from (a build costs milliseconds and
    the import far more, so the daemon uses the stored bytes)."""
    from scapy.layers.inet import IP
    from scapy.layers.l2 import GRE

    outer_gre = GRE(key_present=1, key=0, proto=ETH_P_IP) if has_okey else GRE(proto=ETH_P_IP)
    inner_gre = GRE(seqnum_present=1, sequence_number=0, proto=KEEPALIVE_PROTO)
    if has_ikey:
        inner_gre.key_present = 1
        inner_gre.key = 0
    packet = (
        IP(src="0.0.0.0", dst="0.0.0.0", id=0, ttl=_PROBE_TTL, proto=IPPROTO_GRE)
        / outer_gre
        / IP(src="0.0.0.0", dst="0.0.0.0", id=0, ttl=_PROBE_TTL, proto=IPPROTO_GRE)
        / inner_gre
    )
    return ProbeTemplate(bytes(packet), *_offsets(has_okey, has_ikey))


# --- what arrives on the raw GRE socket ---------------------------------------------------------------


class MalformedPacket(ValueError):
    """Bytes on the GRE socket that are not a GRE packet we can read; the reason says what is wrong."""


class ProbeReply(NamedTuple):
    """A GRE packet of protocol 0 from src to dst: the reflected part of a probe (ours, if the token is).

    Addresses are 32-bit integers, as on the wire, so the engine can look tunnels up without conversions.
    `token` is None when the packet has no sequence number (a Cisco's own probe reflected, not ours).
    (A NamedTuple, not a dataclass: one is made per packet, and a tuple is the cheapest to make.)
    """

    src: int
    dst: int
    key: int | None
    token: ProbeToken | None


class KeepaliveRequest(NamedTuple):
    """A peer's probe: GRE(proto 0x0800, or Huawei's 0x0004) from src to dst carrying IP(inner_src -> inner_dst)
    /GRE(proto 0); or its GRE6 form (gre6.py: 0x86DD both, addresses of 128 bits).

    `reflection` is the inner IP packet, exactly as many bytes as its total length says: what the peer
    expects to have routed back to it.
    """

    src: int
    dst: int
    key: int | None
    inner_src: int
    inner_dst: int
    reflection: bytes


GreMessage = ProbeReply | KeepaliveRequest
Packet = bytes | bytearray | memoryview


def _ipv4_header(data: Packet, start: int, end: int, what: str) -> tuple[int, int]:
    """Check the IPv4 header at data[start:end]; return (header length, end of the packet)."""
    if end - start < 20:
        raise MalformedPacket(f"{what}: {end - start} bytes, shorter than an IPv4 header")
    version_ihl = data[start]
    if version_ihl >> 4 != 4:
        raise MalformedPacket(f"{what}: IP version {version_ihl >> 4}")
    header_len = (version_ihl & 0x0F) * 4
    (total_len,) = struct.unpack_from("!H", data, start + 2)
    if header_len < 20 or total_len < header_len:
        raise MalformedPacket(f"{what}: header length {header_len}, total length {total_len}")
    if total_len > end - start:
        raise MalformedPacket(f"{what}: total length {total_len}, only {end - start} bytes")
    (fragment,) = struct.unpack_from("!H", data, start + 6)
    if fragment & (IP_MF | IP_OFFSET):
        raise MalformedPacket(f"{what}: a fragment")
    if data[start + 9] != IPPROTO_GRE:
        raise MalformedPacket(f"{what}: IP protocol {data[start + 9]}, not GRE")
    return header_len, start + total_len


def _gre_header(data: Packet, start: int, end: int, what: str) -> tuple[int, int | None, int | None, int]:
    """Read the GRE header at data[start:end]; return (protocol, key, sequence, offset of the payload)."""
    if end - start < 4:
        raise MalformedPacket(f"{what}: {end - start} bytes, shorter than a GRE header")
    flags, protocol = struct.unpack_from("!HH", data, start)
    # Like the kernel (gre_parse_header): version 1 is PPTP's enhanced GRE and source routing is obsolete.
    if flags & (GRE_VERSION | GRE_ROUTING):
        raise MalformedPacket(f"{what}: GRE flags {flags:#06x} (version or routing set)")
    offset = start + 4
    if flags & GRE_CSUM:
        offset += 4
    key = sequence = None
    if flags & GRE_KEY:
        if offset + 4 > end:
            raise MalformedPacket(f"{what}: GRE key missing")
        (key,) = struct.unpack_from("!I", data, offset)
        offset += 4
    if flags & GRE_SEQ:
        if offset + 4 > end:
            raise MalformedPacket(f"{what}: GRE sequence number missing")
        (sequence,) = struct.unpack_from("!I", data, offset)
        offset += 4
    if offset > end:
        raise MalformedPacket(f"{what}: GRE checksum missing")
    return protocol, key, sequence, offset


# Requests and replies as they nearly always arrive: IPv4 without options, GRE with at most a key and a
# sequence number. One read takes version/IHL, total length, IP ID, fragment bits, protocol, source,
# destination, GRE flags and GRE protocol; anything else takes the general path of parse_gre.
_HEAD = struct.Struct("!BxHHHxB2xIIHH")
_HEAD_FLAGS = GRE_KEY | GRE_SEQ


class _Unusual:
    """What _usual_message returns for a packet the general path has to read."""


_UNUSUAL = _Unusual()


def _gre_length(flags: int) -> int:
    return 4 + 4 * ((flags & GRE_KEY) >> 13) + 4 * ((flags & GRE_SEQ) >> 12)


def _usual_message(data: Packet) -> GreMessage | _Unusual | None:
    """parse_gre's fast path: what parse_gre returns, or _UNUSUAL. Never raises: a packet it is not sure
    about is left to the general path, which says what is wrong with it."""
    if len(data) < 24:
        return _UNUSUAL
    version_ihl, total_len, ip_id, fragment, protocol, src, dst, flags, gre_protocol = _HEAD.unpack_from(data)
    offset = 20 + _gre_length(flags)
    if (version_ihl != 0x45 or protocol != IPPROTO_GRE or fragment & (IP_MF | IP_OFFSET)
            or flags & ~_HEAD_FLAGS or total_len > len(data) or offset > total_len):
        return _UNUSUAL
    key = _U32.unpack_from(data, 24)[0] if flags & GRE_KEY else None
    if gre_protocol == KEEPALIVE_PROTO:
        if not flags & GRE_SEQ:
            return ProbeReply(src, dst, key, None)
        return ProbeReply(src, dst, key, (ip_id << 32) | _U32.unpack_from(data, offset - 4)[0])
    if gre_protocol != ETH_P_IP and gre_protocol != HUAWEI_PROTO:
        return None  # tunnel traffic
    if offset + 24 > total_len:
        return _UNUSUAL
    (inner_ihl, inner_len, _, inner_fragment, inner_protocol, inner_src, inner_dst, inner_flags,
     inner_gre_protocol) = _HEAD.unpack_from(data, offset)
    if inner_protocol != IPPROTO_GRE:
        return None  # tunnel traffic
    if (inner_ihl != 0x45 or inner_fragment & (IP_MF | IP_OFFSET) or inner_flags & ~_HEAD_FLAGS
            or offset + inner_len > total_len or 20 + _gre_length(inner_flags) > inner_len):
        return _UNUSUAL
    if inner_gre_protocol != KEEPALIVE_PROTO:
        return None  # GRE carried in GRE: traffic
    return KeepaliveRequest(src, dst, key, inner_src, inner_dst, bytes(data[offset:offset + inner_len]))


def plain_ipv4(header: Packet) -> bool:
    """An IPv4 header without options (IHL 5) that is no fragment (MF and offset 0): the only inner header
    greupd reflects (review L6). `header` is at least 20 bytes, as a KeepaliveRequest's reflection is."""
    return header[0] == 0x45 and not _U16.unpack_from(header, 6)[0] & (IP_MF | IP_OFFSET)


def parse_gre(data: Packet) -> GreMessage | None:
    """Read one packet from the raw IPPROTO_GRE socket (IP header included).

    Returns a ProbeReply, a KeepaliveRequest, or None for ordinary tunnel traffic (IPv4 that is not
    GRE-in-GRE, IPv6, Ethernet, ...). Raises MalformedPacket for anything that cannot be read.
    """
    usual = _usual_message(data)
    return usual if not isinstance(usual, _Unusual) else _general_message(data)


def _general_message(data: Packet) -> GreMessage | None:
    """parse_gre for any packet: IP options, GRE checksums, and every way a packet can be broken."""
    outer_len, end = _ipv4_header(data, 0, len(data), "outer IP")
    src, dst = struct.unpack_from("!II", data, 12)
    protocol, key, sequence, payload = _gre_header(data, outer_len, end, "outer GRE")
    if protocol == KEEPALIVE_PROTO:
        (ip_id,) = struct.unpack_from("!H", data, 4)
        token = (ip_id << 32) | sequence if sequence is not None else None
        return ProbeReply(src, dst, key, token)
    if protocol not in (ETH_P_IP, HUAWEI_PROTO) or end - payload < 20 or data[payload + 9] != IPPROTO_GRE:
        return None  # tunnel traffic, not a keepalive: none of our business
    inner_len, inner_end = _ipv4_header(data, payload, end, "inner IP")
    inner_protocol, _, _, _ = _gre_header(data, payload + inner_len, inner_end, "inner GRE")
    if inner_protocol != KEEPALIVE_PROTO:
        return None  # GRE carried in GRE: traffic
    inner_src, inner_dst = struct.unpack_from("!II", data, payload + 12)
    return KeepaliveRequest(src, dst, key, inner_src, inner_dst, bytes(data[payload:inner_end]))


# --- the socket filter ---------------------------------------------------------------------------------

# The kernel-side half of reading: which packets reach the socket at all (bpf.py). The protocol part alone is
# still importable here under its old name.
GRE_SOCKET_FILTER: SocketFilter = GRE_PROTOCOL_PROGRAM
