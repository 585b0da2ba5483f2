"""Listen for a silent peer's own keepalives: how the peer addresses this host shows a NAT between the two.

A peer's Cisco keepalive carries, inside, a packet from "this host as the peer knows it" (its `remote`) to
itself. Through a NAT that is the NAT's public address, not this host's `local`: the peer then also routes
our reflected keepalives to an address it cannot reach (`local`), which is why it seems silent. Doctor's own
keepalives, sent just before, opened the NAT's mapping that lets the peer's GRE in.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Sequence
from ipaddress import IPv4Address

from greupd.config import TunnelConfig
from greupd.keepalive.codec import KeepaliveRequest, MalformedPacket, parse_gre

LONGEST = 10.0  # seconds: at most one (common) keepalive interval of listening


def hear_keepalives(tunnels: Sequence[TunnelConfig]) -> dict[str, tuple[str, ...]]:
    """The inner source addresses of the keepalives each tunnel's remote sent, within one keepalive interval."""
    by_remote = {int(t.remote): t.name for t in tunnels if isinstance(t.remote, IPv4Address)}
    heard: dict[str, set[str]] = {name: set() for name in by_remote.values()}
    if not by_remote:
        return {}
    seconds = min(max((t.keepalive.interval for t in tunnels if t.keepalive is not None), default=1.0), LONGEST)
    rx = socket.socket(socket.AF_INET, socket.SOCK_RAW, 47)
    try:
        deadline = time.monotonic() + seconds + 0.5
        while (left := deadline - time.monotonic()) > 0 and select.select([rx], [], [], left)[0]:
            try:
                message = parse_gre(rx.recv(65535))
            except MalformedPacket:
                continue
            if isinstance(message, KeepaliveRequest) and message.src in by_remote:
                heard[by_remote[message.src]].add(str(IPv4Address(message.inner_src)))
                if all(heard.values()):
                    break
    finally:
        rx.close()
    return {name: tuple(sorted(found)) for name, found in heard.items()}
