"""What greupd sends back for a peer's keepalive probe, for peers that do not address it the Cisco way (pure).

A Cisco (or MikroTik, in IPv4 or GRE6) probe carries, inside, the reply already addressed back to its sender:
inner source = our local, inner destination = its remote. The peer's kernel-side partner simply routes that
inner packet; answer = "daemon" sends it ourselves (engine.py). Some peers write other inner addresses, and a
kernel would route their replies nowhere (linux-gre-keepalive issues #1 and #4, anchors-3 section 2):

- **Behind NAT** (MikroTik RouterOS 7): the inner destination is the peer's private WAN address, which only
  its NAT box knows. The probe came from a configured remote (outer source) with the tunnel's key, so we
  answer to that outer source: the inner packet with its destination rewritten to the remote, which the NAT
  box translates back to the private address on the way in, as it does the tunnel's own GRE.
- **Inner tunnel addresses** (VeloCloud acting as a Zscaler peer): inner source = our tunnel `address`,
  inner destination = the tunnel's `peer`. A kernel routes such a packet into the tunnel: so do we, the inner
  packet in the tunnel's GRE header (our okey), to the remote.
- Huawei's probes with the outer GRE protocol 0x0004 instead of 0x0800 are read as requests by the codec.

Whatever the case, an answer only ever goes to the configured remote of the tunnel the probe matched (outer
source, outer destination and key), never to an address a packet names: greupd is no reflector for forgers.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Literal, NamedTuple

from greupd.keepalive.codec import ETH_P_IP, GRE_KEY, KeepaliveRequest, ipv4_checksum, plain_ipv4
from greupd.keepalive.gre6 import ETH_P_IPV6, plain_ipv6

AnswerCase = Literal["reflected", "behind_nat", "inner_addresses"]


@dataclass(frozen=True)
class AnswerRule:
    """What one tunnel's answers are checked against: its outer endpoints, output key and family, and its inner
    addresses where it has them (our `address`, and the range the peer's may be in: `peer`, or the
    address's network)."""

    local: int
    remote: int
    okey: int | None
    family: Literal[4, 6]
    inner_local: int | None = None
    inner_peers: tuple[int, int] | None = None


class Answer(NamedTuple):
    """What to send to the tunnel's remote: `packet` is a whole IP packet (header included, sent as is) or, when
    `encapsulated`, a GRE packet that the GRE socket sends with a kernel-built outer header, as it sends probes."""

    packet: bytes
    encapsulated: bool
    case: AnswerCase


Refusal = Literal["not_addressed_to_us", "not_plain"]


def answer_for(request: KeepaliveRequest, rule: AnswerRule) -> Answer | Refusal:
    """The answer to a request that matched `rule`'s tunnel by outer addresses and key (the caller's lookup), or
    why there is none."""
    reflection = request.reflection
    if not (plain_ipv4(reflection) if rule.family == 4 else plain_ipv6(reflection)):
        # Reflected verbatim, options or extension headers would have us send source-routed or oddly
        # optioned packets to the remote on a forger's behalf; no keepalive needs them (review L6).
        return "not_plain"
    if request.inner_src == rule.local:
        if request.inner_dst == rule.remote:
            return Answer(reflection, False, "reflected")
        return Answer(_with_destination(reflection, rule), False, "behind_nat")
    if (rule.inner_local is not None and rule.inner_peers is not None and request.inner_src == rule.inner_local
            and rule.inner_peers[0] <= request.inner_dst <= rule.inner_peers[1]):
        return Answer(_gre_header(rule) + reflection, True, "inner_addresses")
    return "not_addressed_to_us"


def _with_destination(reflection: bytes, rule: AnswerRule) -> bytes:
    """The reflection addressed to the remote (its IPv4 checksum updated; IPv6 has none)."""
    packet = bytearray(reflection)
    if rule.family == 6:
        packet[24:40] = rule.remote.to_bytes(16)
        return bytes(packet)
    struct.pack_into("!I", packet, 16, rule.remote)
    struct.pack_into("!H", packet, 10, 0)
    struct.pack_into("!H", packet, 10, ipv4_checksum(memoryview(packet)[:20]))
    return bytes(packet)


def _gre_header(rule: AnswerRule) -> bytes:
    protocol = ETH_P_IP if rule.family == 4 else ETH_P_IPV6
    if rule.okey is None:
        return struct.pack("!HH", 0, protocol)
    return struct.pack("!HHI", GRE_KEY, protocol, rule.okey)
