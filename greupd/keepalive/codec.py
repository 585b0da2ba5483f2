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

Scapy builds the probe's shape (once per combination of keys); each tunnel's template is that shape with
its addresses and keys written in (`build_probe_template`), and each probe is the template with a token and
the inner IP checksum written in, with struct: a scapy build costs ~3 ms, a patch ~7 us, and one loop
carries thousands of tunnels. Tests check every patched probe against scapy's own build of it. The parser
(`parse_gre`) is plain struct over the raw socket's bytes, and raises only `MalformedPacket`.
"""

from __future__ import annotations

import functools
import os
import struct
from dataclasses import dataclass
from ipaddress import IPv4Address

IPPROTO_GRE = 47
ETH_P_IP = 0x0800
KEEPALIVE_PROTO = 0  # GRE protocol type of the reflected part: "no payload", by Cisco's convention

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
_token_pool = bytearray()


def new_token() -> ProbeToken:
    """A fresh unguessable token. The IP ID part is never 0: a Linux host that reflects with IP_HDRINCL
    (our own `answer = "daemon"`) has the kernel replace an IP ID of 0, which would break the token.

    Drawn from a pool of os.urandom bytes refilled 512 tokens at a time: one getrandom() per probe was 15 %
    of the keepalive engine's time with 1000 tunnels.
    """
    global _token_pool
    while True:
        if len(_token_pool) < _TOKEN_BYTES:
            _token_pool = bytearray(os.urandom(_TOKEN_BYTES * 512))
        token = int.from_bytes(_token_pool[-_TOKEN_BYTES:])
        del _token_pool[-_TOKEN_BYTES:]
        if token >> 32:
            return token


def split_token(token: ProbeToken) -> tuple[int, int]:
    """(inner IP ID, inner GRE sequence number)."""
    return token >> 32, token & 0xFFFFFFFF


def ipv4_checksum(header: bytes | bytearray | memoryview) -> int:
    """The ones' complement checksum of an IPv4 header (with its checksum field zeroed by the caller)."""
    words: tuple[int, ...] = struct.unpack(f"!{len(header) // 2}H", header)
    total = sum(words)
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


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
        """The probe carrying `token`, checksums valid. The outer header does not change: its IP ID is 0, so
        the kernel picks one (IP_HDRINCL), and the kernel recomputes the outer checksum anyway."""
        ip_id, sequence = split_token(token)
        buf = bytearray(self.packet)
        inner = self.inner_ip_offset
        struct.pack_into("!H", buf, inner + 4, ip_id)
        struct.pack_into("!H", buf, inner + 10, 0)
        struct.pack_into("!I", buf, self.sequence_offset, sequence)
        header_len = (buf[inner] & 0x0F) * 4
        struct.pack_into("!H", buf, inner + 10, ipv4_checksum(memoryview(buf)[inner : inner + header_len]))
        return bytes(buf)


def build_probe_template(local: IPv4Address, remote: IPv4Address, okey: int | None, ikey: int | None) -> ProbeTemplate:
    """The probe of tunnel local -> remote (once per tunnel, not per probe).

    The outer GRE carries our okey (what the peer's tunnel expects); the inner GRE carries our ikey, since it
    reaches us as if the peer's tunnel had sent it, with the peer's okey = our ikey.
    """
    shape = _probe_shape(okey is not None, ikey is not None)
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


@functools.cache
def _probe_shape(has_okey: bool, has_ikey: bool) -> ProbeTemplate:
    """Scapy's build of the probe, once per combination of keys (a build costs milliseconds, which a thousand
    tunnels would spend at every start); build_probe_template writes addresses and keys into a copy."""
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
    inner_ip_offset = 20 + 4 + (4 if has_okey else 0)
    sequence_offset = inner_ip_offset + 20 + 4 + (4 if has_ikey else 0)
    return ProbeTemplate(bytes(packet), inner_ip_offset, sequence_offset)


# --- what arrives on the raw GRE socket ---------------------------------------------------------------


class MalformedPacket(ValueError):
    """Bytes on the GRE socket that are not a GRE packet we can read; the reason says what is wrong."""


@dataclass(frozen=True, slots=True)
class ProbeReply:
    """A GRE packet of protocol 0 from src to dst: the reflected part of a probe (ours, if the token is).

    Addresses are 32-bit integers, as on the wire, so the engine can look tunnels up without conversions.
    `token` is None when the packet has no sequence number (a Cisco's own probe reflected, not ours).
    """

    src: int
    dst: int
    key: int | None
    token: ProbeToken | None


@dataclass(frozen=True, slots=True)
class KeepaliveRequest:
    """A peer's probe: GRE(proto 0x0800) from src to dst carrying IP(inner_src -> inner_dst)/GRE(proto 0).

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


def _ipv4_header(data: bytes, start: int, end: int, what: str) -> tuple[int, int]:
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


def _gre_header(data: bytes, start: int, end: int, what: str) -> tuple[int, int | None, int | None, int]:
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


def parse_gre(data: bytes) -> GreMessage | None:
    """Read one packet from the raw IPPROTO_GRE socket (IP header included).

    Returns a ProbeReply, a KeepaliveRequest, or None for ordinary tunnel traffic (IPv4 that is not
    GRE-in-GRE, IPv6, Ethernet, ...). Raises MalformedPacket for anything that cannot be read.
    """
    outer_len, end = _ipv4_header(data, 0, len(data), "outer IP")
    src, dst = struct.unpack_from("!II", data, 12)
    protocol, key, sequence, payload = _gre_header(data, outer_len, end, "outer GRE")
    if protocol == KEEPALIVE_PROTO:
        (ip_id,) = struct.unpack_from("!H", data, 4)
        token = (ip_id << 32) | sequence if sequence is not None else None
        return ProbeReply(src, dst, key, token)
    if protocol != ETH_P_IP or end - payload < 20 or data[payload + 9] != IPPROTO_GRE:
        return None  # tunnel traffic, not a keepalive: none of our business
    inner_len, inner_end = _ipv4_header(data, payload, end, "inner IP")
    inner_protocol, _, _, _ = _gre_header(data, payload + inner_len, inner_end, "inner GRE")
    if inner_protocol != KEEPALIVE_PROTO:
        return None  # GRE carried in GRE: traffic
    inner_src, inner_dst = struct.unpack_from("!II", data, payload + 12)
    return KeepaliveRequest(src, dst, key, inner_src, inner_dst, data[payload:inner_end])


# --- the socket filter --------------------------------------------------------------------------------

# A raw IPPROTO_GRE socket gets a copy of every GRE packet the host receives, tunnel traffic included.
# This classic BPF program, run by the kernel on each copy, keeps only what parse_gre can return something
# for (protocol 0, or IPv4 whose inner protocol is GRE), so a busy tunnel's traffic never reaches Python.
# Packets too short for a load are dropped by the kernel (a BPF load out of bounds returns 0).
# (code, jt, jf, k) as in struct sock_filter.
_BPF_LD_H_IND = 0x48  # A = u16 at [X + k]
_BPF_LD_B_IND = 0x50  # A = u8 at [X + k]
_BPF_LDX_MSH = 0xB1  # X = 4 * (u8 at [k] & 0x0f)
_BPF_JEQ_K = 0x15
_BPF_ST = 0x02  # M[k] = A
_BPF_LD_MEM = 0x60  # A = M[k]
_BPF_AND_K = 0x54
_BPF_RSH_K = 0x74
_BPF_ADD_K = 0x04
_BPF_ADD_X = 0x0C
_BPF_TAX = 0x07
_BPF_RET_K = 0x06

SocketFilter = tuple[tuple[int, int, int, int], ...]

GRE_SOCKET_FILTER: SocketFilter = (
    (_BPF_LDX_MSH, 0, 0, 0),  # 0: X = outer IP header length
    (_BPF_LD_H_IND, 0, 0, 2),  # 1: A = GRE protocol
    (_BPF_JEQ_K, 21, 0, KEEPALIVE_PROTO),  # 2: protocol 0 -> accept
    (_BPF_JEQ_K, 0, 19, ETH_P_IP),  # 3: not IPv4 -> drop
    (_BPF_LD_H_IND, 0, 0, 0),  # 4: A = GRE flags
    (_BPF_ST, 0, 0, 0),  # 5: M[0] = flags
    (_BPF_AND_K, 0, 0, GRE_CSUM),  # 6
    (_BPF_RSH_K, 0, 0, 13),  # 7: A = 4 if checksum present
    (_BPF_ADD_X, 0, 0, 0),  # 8
    (_BPF_ADD_K, 0, 0, 4),  # 9
    (_BPF_TAX, 0, 0, 0),  # 10: X = outer header + 4 + checksum
    (_BPF_LD_MEM, 0, 0, 0),  # 11
    (_BPF_AND_K, 0, 0, GRE_KEY),  # 12
    (_BPF_RSH_K, 0, 0, 11),  # 13: A = 4 if key present
    (_BPF_ADD_X, 0, 0, 0),  # 14
    (_BPF_TAX, 0, 0, 0),  # 15
    (_BPF_LD_MEM, 0, 0, 0),  # 16
    (_BPF_AND_K, 0, 0, GRE_SEQ),  # 17
    (_BPF_RSH_K, 0, 0, 10),  # 18: A = 4 if sequence present
    (_BPF_ADD_X, 0, 0, 0),  # 19
    (_BPF_TAX, 0, 0, 0),  # 20: X = offset of the inner IP header
    (_BPF_LD_B_IND, 0, 0, 9),  # 21: A = inner IP protocol
    (_BPF_JEQ_K, 1, 0, IPPROTO_GRE),  # 22
    (_BPF_RET_K, 0, 0, 0),  # 23: drop
    (_BPF_RET_K, 0, 0, 0x40000),  # 24: accept (the whole packet)
)
