"""Measure how large a packet the path to a tunnel's peer carries, with padded keepalives the peer reflects.

Each probe is a Cisco keepalive padded to a given outer size with DF set (IP_HDRINCL). The peer's tunnel routes
its inner packet (padded too) back, so a reflection proves the size made it there and most of the way back.
The largest size that comes back, against the size the tunnel needs (its MTU plus the GRE overhead), tells
whether the path can carry the tunnel; the kernel's route cache tells whether an ICMP "fragmentation needed"
came (then path MTU discovery works; without one the too-large packets vanish: a black hole).
"""

from __future__ import annotations

import select
import socket
import struct
import time
from dataclasses import dataclass
from ipaddress import IPv4Address

from greupd.keepalive.codec import build_probe_template, ipv4_checksum, new_token

FLOOR = 576  # RFC 791: every IPv4 path carries this
WAIT = 0.3  # seconds for one reflection: the peer's kernel answers in well under a millisecond
IP_DF = 0x4000


@dataclass(frozen=True)
class PathProbe:
    """One tunnel's measurement: sizes are whole outer packets (IP header included)."""

    needed: int  # what the tunnel's MTU needs: its MTU + the GRE overhead
    largest: int | None  # the largest size that came back; None: not even the smallest
    tried: tuple[int, ...]


def padded_probe(local: IPv4Address, remote: IPv4Address, okey: int | None, ikey: int | None, size: int) -> bytes:
    """A keepalive of exactly `size` bytes, DF set, its inner packet padded so the reflection is large too."""
    template = build_probe_template(local, remote, okey, ikey)
    packet = bytearray(template.with_token(new_token()))
    inner = template.inner_ip_offset
    pad = size - len(packet)
    if pad < 0:
        raise ValueError(f"a keepalive is {len(packet)} bytes; {size} is too small")
    packet += bytes(pad)
    struct.pack_into("!H", packet, 2, size)
    struct.pack_into("!H", packet, 6, IP_DF)
    struct.pack_into("!H", packet, inner + 2, size - inner)
    struct.pack_into("!H", packet, inner + 10, 0)
    struct.pack_into("!H", packet, inner + 10, ipv4_checksum(memoryview(packet)[inner:inner + 20]))
    struct.pack_into("!H", packet, 10, 0)
    struct.pack_into("!H", packet, 10, ipv4_checksum(memoryview(packet)[:20]))
    return bytes(packet)


def probe_path(local: IPv4Address, remote: IPv4Address, okey: int | None, ikey: int | None,
               needed: int) -> PathProbe:
    """Try `needed` first; if it does not come back, search down to FLOOR for the largest that does."""
    tx = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    rx = socket.socket(socket.AF_INET, socket.SOCK_RAW, 47)
    overhead = build_probe_template(local, remote, okey, ikey).inner_ip_offset
    tried: list[int] = []

    def comes_back(size: int) -> bool:
        tried.append(size)
        try:
            tx.sendto(padded_probe(local, remote, okey, ikey, size), (str(remote), 0))
        except OSError:
            return False  # EMSGSIZE: larger than the interface (or a learned path MTU) allows
        deadline = time.monotonic() + WAIT
        while (left := deadline - time.monotonic()) > 0 and select.select([rx], [], [], left)[0]:
            data, (source, _) = rx.recvfrom(65535)
            if source == str(remote) and len(data) == size - overhead:
                return True
        return False

    try:
        if comes_back(needed):
            return PathProbe(needed, needed, tuple(tried))
        low, high = FLOOR, needed - 1
        if not comes_back(low):
            return PathProbe(needed, None, tuple(tried))
        while low < high:  # invariant: low comes back, everything above high does not
            middle = (low + high + 1) // 2
            if comes_back(middle):
                low = middle
            else:
                high = middle - 1
        return PathProbe(needed, low, tuple(tried))
    finally:
        tx.close()
        rx.close()
