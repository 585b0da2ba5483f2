"""`greupd import --from kernel`: the GRE-family links of the running kernel, their addresses and routes.

Read with the same rtnetlink dumps and decoders the daemon observes with, so what is imported is exactly
what the daemon will compare against.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable

from greupd.gre import DEFAULT_ENCAP_LIMIT, IPV6_MODES, IPAddress, IPInterface
from greupd.importer import GRE_MODES, FoundRoute, FoundTunnel, carry_routes
from greupd.model import LINK_ALIAS, ROUTE_PROTO, TOS_INHERIT, ObservedLink, RouteSpec
from greupd.netlink import rtnl
from greupd.netlink.kernel import read_sysctl
from greupd.netlink.rtnl import address_from_message, link_from_message, route_from_message

# The kernel makes these when ip_gre/ip6_gre load, for packets no configured tunnel claims: not a user's tunnel.
FALLBACK_DEVICES = frozenset({"gre0", "gretap0", "erspan0", "ip6gre0"})
RTPROT_KERNEL = 2  # routes the kernel adds for an address (`proto kernel`): they come back with the address
RT_TABLE_LOCAL = 255


class KernelSnapshot:
    """One read of links, addresses and routes through one rtnetlink socket."""

    def __init__(self) -> None:
        sock = rtnl.RtnlSocket()
        try:
            def dump(request: rtnl.Request) -> list[bytes]:
                return sock.dump(request)

            self.links = dump(rtnl.dump_links())
            self.addresses = dump(rtnl.dump_addresses(0))
            self.routes = [m for family in (socket.AF_INET, socket.AF_INET6)
                           for m in dump(rtnl.dump_routes(family, 0))]
        finally:
            sock.close()


def tunnels_from_kernel(snapshot: KernelSnapshot | None = None) -> list[FoundTunnel]:
    snapshot = snapshot or KernelSnapshot()
    found: dict[int, tuple[FoundTunnel, ObservedLink]] = {}
    for msg in snapshot.links:
        decoded = link_from_message(msg)
        if decoded is None:
            continue
        name, link = decoded
        if link.spec.kind not in GRE_MODES or name in FALLBACK_DEVICES:
            continue
        found[link.index] = (_tunnel(name, link), link)
    names = {index: tunnel.name for index, (tunnel, _) in found.items()}

    for msg in snapshot.addresses:
        address = address_from_message(msg, names)
        if address is not None:
            _carry_address(found[rtnl.address_index(msg)][0], address.local, address.peer)

    routes: dict[int, list[FoundRoute]] = {index: [] for index in found}
    kept: list[tuple[RouteSpec, int, int]] = []
    for msg in snapshot.routes:
        protocol, kind = rtnl.route_protocol_and_type(msg)
        found_route = route_from_message(msg, names) if kind == rtnl.RTN_UNICAST and protocol != RTPROT_KERNEL else None
        oif = rtnl.route_oif(msg)
        if found_route is not None and found_route.table != RT_TABLE_LOCAL and oif is not None:
            kept.append((found_route, protocol, oif))
    for route, protocol, index in sorted(kept, key=lambda d: (d[0].dst.version, d[0].metric)):
        tunnel = found[index][0]
        via = f" via {route.gateway}" if route.gateway else ""
        text = f"{route.dst}{via} dev {tunnel.name}" + (" proto greupd" if protocol == ROUTE_PROTO else "")
        if route.gateway is not None and tunnel.mode in ("gretap", "ip6gretap") and tunnel.peer is None:
            tunnel.peer = str(route.gateway)  # an Ethernet tunnel's routes go via its peer: greupd's gateway
        routes[index].append(FoundRoute(str(route.dst), route.metric, route.table, text))
    for index, (tunnel, _) in found.items():
        carry_routes(tunnel, routes[index])
    return [tunnel for tunnel, _ in sorted(found.values(), key=lambda t: t[0].name)]


def _tunnel(name: str, link: ObservedLink) -> FoundTunnel:
    spec = link.spec
    ip6 = spec.kind in IPV6_MODES
    tunnel = FoundTunnel(
        name=name, mode=spec.kind, local=str(spec.local), remote=str(spec.remote),
        origin=f"the running kernel (ifindex {link.index})", ikey=spec.ikey, okey=spec.okey,
        ttl="inherit" if spec.ttl == 0 else spec.ttl,
        tos=None if ip6 or spec.tos is None else ("inherit" if spec.tos == TOS_INHERIT else spec.tos),
        pmtudisc=None if ip6 else spec.pmtudisc, mtu=spec.mtu,
        # Written only when it is not greupd's default, so that adopting the link changes nothing of it.
        encap_limit=None if spec.encap_limit == DEFAULT_ENCAP_LIMIT else spec.encap_limit)
    if link.owned:
        tunnel.notes.append(f"already greupd's (alias {LINK_ALIAS}): adopt changes nothing for it")
    if not link.up:
        tunnel.notes.append("the link is down today: greupd will set it up")
    if spec.local.is_unspecified or spec.remote.is_unspecified:
        tunnel.notes.append("greupd needs both local and remote; write the missing one before using this entry")
    return tunnel


def _carry_address(tunnel: FoundTunnel, local: IPInterface, peer: IPAddress | None) -> None:
    if tunnel.address is not None:
        tunnel.notes.append(f"address not carried over (greupd manages one per tunnel; adopting removes it): "
                            f"{local}{f' peer {peer}' if peer else ''}")
        return
    if peer is not None and local.network.prefixlen == local.max_prefixlen:
        tunnel.address, tunnel.peer = str(local.ip), str(peer)
    else:
        tunnel.address = str(local)
        if peer is not None:
            tunnel.notes.append(f"peer {peer} with a prefix length is not something greupd writes: left out")


def ip_forward_off(tunnels: Iterable[FoundTunnel]) -> bool:
    """Does this host not forward today (so the imported file must not switch forwarding on)?"""
    if read_sysctl("net/ipv4/ip_forward") == "0":
        return True
    ip6 = any(t.mode in ("ip6gre", "ip6gretap") or ":" in (t.address or "") or any(":" in r for r in t.routes)
              for t in tunnels)
    return ip6 and read_sysctl("net/ipv6/conf/all/forwarding") == "0"
