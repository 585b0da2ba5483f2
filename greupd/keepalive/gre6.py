"""The bytes of MikroTik's GRE6 keepalive (ip6gre): building probes, reading what arrives on the raw IPv6 GRE socket.

RouterOS's `/interface gre6 keepalive` probe has the shape of Cisco's IPv4 one, but with IPv6 throughout and
the inner GRE of protocol 0x86DD where Cisco's has 0 (read from the GRE6 reflector the research cites,
anchors-3 section 2: it checks the outer protocol 0x86DD, the inner next header 47, the inner GRE protocol
0x86DD, and the addresses swapped):

    IPv6(local -> remote, nh 47) / GRE(key = our okey, proto 0x86DD)
        / IPv6(remote -> local, nh 47) / GRE(key = our ikey, proto 0x86DD)

The peer's kernel decapsulates it like any tunnel packet and routes the inner packet back to us (a plain Linux
peer needs net.ipv6.conf.all.forwarding = 1, nothing else). What comes back is a GRE packet of protocol 0x86DD
that carries no IPv6 packet: nothing but the sender's keepalive logic consumes it.

Our token (codec.py's, 48 bits) rides in the reflected part: its low 32 bits in the inner GRE sequence number
(S flag, which the socket filter checks, as for IPv4) and its high 16 bits in the inner IPv6 flow label, which
routers forward unchanged (RFC 6437) and the receiving socket reads with IPV6_FLOWINFO. IPv6 has no header
checksum, so stamping a token is two writes.

A raw IPv6 socket never sees the IPv6 header of what it receives: `parse_gre6` reads from the GRE header on,
with the addresses (and the flow label) the socket gave alongside. It returns codec.py's ProbeReply and
KeepaliveRequest, with addresses as 128-bit integers, so the engine treats both families alike.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from ipaddress import IPv6Address

from greupd.keepalive.codec import (
    IPPROTO_GRE,
    KeepaliveRequest,
    MalformedPacket,
    Packet,
    ProbeReply,
    ProbeToken,
    _gre_header,
)

ETH_P_IPV6 = 0x86DD
MIKROTIK_PROTO = ETH_P_IPV6  # the inner GRE protocol of a GRE6 keepalive: MikroTik's, not Cisco's 0
IPV6_HEADER = 40
_HOP_LIMIT = 255
_VERSION_6 = 0x60000000  # the first word of an IPv6 header with traffic class 0 and flow label 0
FLOW_LABEL = 0xFFFFF

_U32 = struct.Struct("!I")

# Scapy's build of the probe (scapy_probe_shape6 below), once per combination of keys, addresses, keys and
# token zero: kept as bytes so that the daemon need not import scapy. tests/test_gre6.py checks that these are
# exactly what scapy builds today.
_PROBE_SHAPES6: dict[tuple[bool, bool], str] = {
    # (has okey, has ikey): IPv6 / GRE(okey?, proto IPv6) / IPv6 / GRE(ikey?, sequence, proto IPv6)
    (False, False): "6000000000342fff" + "00" * 32 + "000086dd6000000000082fff" + "00" * 32 + "100086dd00000000",
    (False, True): "6000000000382fff" + "00" * 32 + "000086dd60000000000c2fff" + "00" * 32
                   + "300086dd0000000000000000",
    (True, False): "6000000000382fff" + "00" * 32 + "200086dd000000006000000000082fff" + "00" * 32
                   + "100086dd00000000",
    (True, True): "60000000003c2fff" + "00" * 32 + "200086dd0000000060000000000c2fff" + "00" * 32
                  + "300086dd0000000000000000",
}


def _offsets6(has_okey: bool, has_ikey: bool) -> tuple[int, int]:
    inner_ip_offset = IPV6_HEADER + 4 + (4 if has_okey else 0)
    return inner_ip_offset, inner_ip_offset + IPV6_HEADER + 4 + (4 if has_ikey else 0)


@dataclass(frozen=True)
class ProbeTemplate6:
    """One tunnel's GRE6 probe with a zero token, and where the token lives in it (outer IPv6 header included,
    as scapy builds it; the socket sends from `outer_header_length` on)."""

    packet: bytes
    inner_ip_offset: int
    sequence_offset: int
    outer_header_length = IPV6_HEADER

    def with_token(self, token: ProbeToken) -> bytes:
        """The whole probe carrying `token`."""
        return self.packet[:IPV6_HEADER] + bytes(ProbeBytes6(self).stamp(token))


class ProbeBytes6:
    """One tunnel's GRE6 probe as the engine sends it (the GRE part: the kernel builds the outer IPv6 header),
    in a buffer rewritten in place for every probe: the flow label and the sequence number."""

    __slots__ = ("_label_at", "_sequence_at", "buffer")

    def __init__(self, template: ProbeTemplate6) -> None:
        self.buffer = bytearray(template.packet[IPV6_HEADER:])
        self._label_at = template.inner_ip_offset - IPV6_HEADER
        self._sequence_at = template.sequence_offset - IPV6_HEADER

    def stamp(self, token: ProbeToken) -> bytearray:
        """The buffer, now carrying `token` (valid until the next stamp)."""
        buffer = self.buffer
        _U32.pack_into(buffer, self._label_at, _VERSION_6 | (token >> 32))
        _U32.pack_into(buffer, self._sequence_at, token & 0xFFFFFFFF)
        return buffer


@functools.cache
def probe_shape6(has_okey: bool, has_ikey: bool) -> ProbeTemplate6:
    """The probe's shape for this combination of keys, from the bytes scapy built (_PROBE_SHAPES6)."""
    return ProbeTemplate6(bytes.fromhex(_PROBE_SHAPES6[has_okey, has_ikey]), *_offsets6(has_okey, has_ikey))


def scapy_probe_shape6(has_okey: bool, has_ikey: bool) -> ProbeTemplate6:
    """Scapy's build of the probe's shape: where _PROBE_SHAPES6 comes from."""
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import GRE

    outer_gre = GRE(key_present=1, key=0, proto=ETH_P_IPV6) if has_okey else GRE(proto=ETH_P_IPV6)
    inner_gre = GRE(seqnum_present=1, sequence_number=0, proto=MIKROTIK_PROTO)
    if has_ikey:
        inner_gre.key_present = 1
        inner_gre.key = 0
    packet = (IPv6(src="::", dst="::", nh=IPPROTO_GRE, hlim=_HOP_LIMIT, fl=0) / outer_gre
              / IPv6(src="::", dst="::", nh=IPPROTO_GRE, hlim=_HOP_LIMIT, fl=0) / inner_gre)
    return ProbeTemplate6(bytes(packet), *_offsets6(has_okey, has_ikey))


def build_probe_template6(local: IPv6Address, remote: IPv6Address, okey: int | None,
                          ikey: int | None) -> ProbeTemplate6:
    """The GRE6 probe of tunnel local -> remote (once per tunnel, not per probe); keys as in codec.py's."""
    shape = probe_shape6(okey is not None, ikey is not None)
    buf = bytearray(shape.packet)
    inner = shape.inner_ip_offset
    struct.pack_into("!16s16s", buf, 8, local.packed, remote.packed)
    struct.pack_into("!16s16s", buf, inner + 8, remote.packed, local.packed)
    if okey is not None:
        _U32.pack_into(buf, IPV6_HEADER + 4, okey)
    if ikey is not None:
        _U32.pack_into(buf, inner + IPV6_HEADER + 4, ikey)
    return ProbeTemplate6(bytes(buf), inner, shape.sequence_offset)


def gre6_overhead(okey: int | None) -> int:
    """Bytes an ip6gre tunnel adds to each packet (outer IPv6, GRE, the output key), without the 8-byte
    encapsulation limit option a link sends unless encap_limit = "none" (probes never carry it)."""
    return IPV6_HEADER + 4 + (4 if okey is not None else 0)


def padded_probe_template6(template: ProbeTemplate6, outer_size: int) -> ProbeTemplate6:
    """The probe padded to `outer_size` bytes on the wire (outer IPv6 header included), for a path MTU search:
    zeros after the inner GRE header, which the peer reflects whole (they can never pass for an IPv6 packet,
    so the reflection still reads as a reply). Both payload lengths follow."""
    pad = outer_size - len(template.packet)
    if pad < 0:
        raise ValueError(f"a probe is {len(template.packet)} bytes, more than {outer_size}")
    buf = bytearray(template.packet + bytes(pad))
    inner = template.inner_ip_offset
    struct.pack_into("!H", buf, 4, outer_size - IPV6_HEADER)
    struct.pack_into("!H", buf, inner + 4, outer_size - inner - IPV6_HEADER)
    return ProbeTemplate6(bytes(buf), inner, template.sequence_offset)


# --- what arrives on the raw IPv6 GRE socket ------------------------------------------------------------


def _carries_ipv6(data: Packet, start: int) -> bool:
    """Whether data[start:] is an IPv6 packet whose length says it is exactly that: tunnel traffic. A reflected
    probe carries nothing, or padding (zeros)."""
    if len(data) - start < IPV6_HEADER or data[start] >> 4 != 6:
        return False
    return int.from_bytes(data[start + 4:start + 6]) + IPV6_HEADER == len(data) - start


def parse_gre6(data: Packet, src: int, dst: int, flow_label: int = 0) -> ProbeReply | KeepaliveRequest | None:
    """Read one packet from the raw IPv6 GRE socket: `data` from the GRE header on, `src`/`dst` the IPv6
    header's addresses as integers, `flow_label` its flow label (the token's high half, for a reply).

    Returns a ProbeReply (GRE 0x86DD carrying no IPv6 packet), a KeepaliveRequest (GRE 0x86DD carrying IPv6
    with next header 47 and a GRE 0x86DD that carries no IPv6 packet), or None for tunnel traffic. Raises
    MalformedPacket for anything that cannot be read.
    """
    end = len(data)
    protocol, key, sequence, payload = _gre_header(data, 0, end, "GRE")
    if protocol != ETH_P_IPV6:
        return None  # Ethernet (ip6gretap), IPv4, ...: traffic
    if not _carries_ipv6(data, payload):
        token = ((flow_label & 0xFFFF) << 32) | sequence if sequence is not None and flow_label else None
        return ProbeReply(src, dst, key, token)
    if data[payload + 6] != IPPROTO_GRE:
        return None  # IPv6 tunnel traffic
    inner_end = payload + IPV6_HEADER + int.from_bytes(data[payload + 4:payload + 6])
    if inner_end > end:
        raise MalformedPacket(f"inner IPv6: payload length {inner_end - payload - IPV6_HEADER}, only"
                              f" {end - payload - IPV6_HEADER} bytes")
    inner_protocol, _, _, inner_payload = _gre_header(data, payload + IPV6_HEADER, inner_end, "inner GRE")
    if inner_protocol != MIKROTIK_PROTO or _carries_ipv6(data[:inner_end], inner_payload):
        return None  # GRE6 carried in GRE6: traffic
    inner_src = int.from_bytes(data[payload + 8:payload + 24])
    inner_dst = int.from_bytes(data[payload + 24:payload + 40])
    return KeepaliveRequest(src, dst, key, inner_src, inner_dst, bytes(data[payload:inner_end]))


def plain_ipv6(header: Packet) -> bool:
    """An IPv6 header followed directly by GRE (no extension headers): the only inner packet greupd reflects,
    as plain_ipv4 for IPv4 (a routing header would have us send it on elsewhere)."""
    return len(header) >= IPV6_HEADER and header[0] >> 4 == 6 and header[6] == IPPROTO_GRE


__all__ = ["ETH_P_IPV6", "MIKROTIK_PROTO", "MalformedPacket", "ProbeBytes6", "ProbeTemplate6",
           "build_probe_template6", "gre6_overhead", "padded_probe_template6", "parse_gre6", "plain_ipv6",
           "probe_shape6", "scapy_probe_shape6"]
