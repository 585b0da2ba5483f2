"""Which underlay a tunnel's own packets take, as the kernel's GRE link says: its `dev` and its fwmark (pure).

ip_tunnel_xmit looks the route of a tunnel's packets up with the link's parameters: `flowi4_oif = parms.link`
(`ip tunnel add ... dev wan2`, or a VRF device, whose table the lookup then uses) and `flowi4_mark = fwmark`
(`ip rule fwmark 7 lookup isp2`). Probes and answers must take the same route (review M2), so the engine sends
each tunnel's with its link's underlay device in IP_PKTINFO's ipi_ifindex and its mark as an SO_MARK control
message (engine.py).

greupd never sets either (they are not in tunnels.toml): a link greupd created has neither, and a hand-made link
greupd adopted keeps both on every change (gre.KEPT_ON_CHANGE). So what the kernel reported of the link before a
pass is what holds after it, unless the pass put a new link in its place.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Collection, Iterable, Mapping
from typing import NamedTuple

from greupd.gre import IFLA_GRE_FWMARK, IFLA_GRE_LINK, IPAddress, IPNetwork, KeptAttributes
from greupd.model import Observed

_U32 = struct.Struct("=I")  # nla_put_u32: host byte order


class Underlay(NamedTuple):
    """Where a tunnel's packets leave: the ifindex its link is bound to (0: any) and their fwmark (0: none)."""

    ifindex: int = 0
    fwmark: int = 0


NO_UNDERLAY = Underlay()


def underlay_of(kept: KeptAttributes) -> Underlay:
    """The underlay of a GRE link from what the kernel reported of it (ObservedLink.kept)."""
    attributes = dict(kept)

    def u32(number: int) -> int:
        payload = attributes.get(number, b"")
        return _U32.unpack_from(payload)[0] if len(payload) >= _U32.size else 0

    return Underlay(u32(IFLA_GRE_LINK), u32(IFLA_GRE_FWMARK))


def underlays_after_pass(before: Observed, after: Observed, tunnels: Collection[str]) -> dict[str, Underlay]:
    """The underlay after a pass that saw `before` and left `after`, of each of `tunnels` the pass looked at: the
    link's own where the pass kept the link (same ifindex: untouched or changed in place), none where it made a
    new one or there is none."""
    underlays = {}
    # A scoped pass: its few names, not every tunnel's (a hub's pass for one tunnel among 10,000, #26).
    for name in tunnels if before.scope is None else (n for n in before.scope if n in tunnels):
        seen, now = before.links.get(name), after.links.get(name)
        same = seen is not None and now is not None and seen.index == now.index
        underlays[name] = underlay_of(seen.kept) if same and seen is not None else NO_UNDERLAY
    return underlays


class Remotes:
    """The remotes of the tunnels whose path is measured, sorted, so that a route notification (the daemon's
    netlink watch) finds the tunnels whose remote its prefix covers in log n: a router taking a full BGP table
    hears a million route notifications, and each must cost next to nothing."""

    def __init__(self, remotes: Mapping[str, IPAddress]) -> None:
        self._sorted = sorted((address.version, int(address), name) for name, address in remotes.items())

    def covered_by(self, prefix: IPNetwork) -> Iterable[str]:
        """The tunnels whose remote `prefix` covers (0.0.0.0/0: every IPv4 one), in address order."""
        low = bisect.bisect_left(self._sorted, (prefix.version, int(prefix.network_address), ""))
        high = int(prefix.broadcast_address)
        for version, address, name in self._sorted[low:]:
            if version != prefix.version or address > high:
                break
            yield name
