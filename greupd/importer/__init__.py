"""`greupd import`: describe GRE-family tunnels that exist today as a tunnels.toml, each entry `adopt = true`.

    running kernel | netplan YAML | systemd-networkd .netdev/.network | ifupdown interfaces
        --(one small reader per source)--> [FoundTunnel, ...] --(toml.render)--> tunnels.toml text

A reader keeps what greupd can carry and says, per tunnel, what it could not (`notes`, printed as comments):
iptables rules become commented `[tunnel.nat]` / `[tunnel.mss]` suggestions (iptables.py), never live rules,
so the printed file plans to no change beyond the adoption itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from greupd.gre import MODES as GRE_MODES

Source = Literal["kernel", "netplan", "networkd", "ifupdown"]
SOURCES: tuple[Source, ...] = ("kernel", "netplan", "networkd", "ifupdown")
__all__ = ["GRE_MODES", "SOURCES", "FoundRoute", "FoundTunnel", "ImportProblem", "Source", "carry_routes",
           "unreadable"]


class ImportProblem(Exception):
    """The source cannot be read (a file, the kernel), or a named tunnel is not in it."""


@dataclass
class FoundTunnel:
    """One tunnel as a source describes it, in tunnels.toml's own terms (what `render` writes)."""

    name: str
    mode: str
    local: str
    remote: str
    origin: str  # where it was found, for the comment above the entry: "kernel ifindex 7", "/etc/netplan/x.yaml"
    ikey: int | None = None
    okey: int | None = None
    ttl: int | Literal["inherit"] = "inherit"
    tos: int | Literal["inherit"] | None = None  # None: not written (ip6 modes, or the source does not say)
    pmtudisc: bool | None = None
    encap_limit: int | Literal["none"] | None = None  # None: not written (IPv4 modes, or greupd's default, 4)
    mtu: int | None = None
    address: str | None = None  # "A" (with peer) or "A/len"
    peer: str | None = None
    routes: list[str] = field(default_factory=list)
    metric: int = 0
    table: int = 254
    notes: list[str] = field(default_factory=list)  # what was not carried over, and why
    suggestions: list[str] = field(default_factory=list)  # TOML lines to uncomment (e.g. [tunnel.nat])
    problem: str | None = None  # why the source's description of this tunnel could not be read: not carried over


def unreadable(name: str, origin: str, exc: Exception) -> FoundTunnel:
    """A tunnel whose description a reader could not make sense of (a key "abc"): written as a comment that says
    why, and the other tunnels carried over as usual, rather than a traceback for the whole import."""
    return FoundTunnel(name=name, mode="gre", local="", remote="", origin=origin,
                       problem=str(exc) or type(exc).__name__)


@dataclass
class FoundRoute:
    """A route through a tunnel as found; routes are grouped by (metric, table), one group per entry."""

    dst: str
    metric: int = 0
    table: int = 254
    text: str = ""  # how the source wrote it, for a note when it is not carried


def carry_routes(tunnel: FoundTunnel, routes: list[FoundRoute]) -> None:
    """Give the tunnel its routes: one metric and table per tunnel, so other groups become notes."""
    if not routes:
        return
    # The kernel stores an IPv6 route's metric 0 as 1024; tunnels.toml writes 0 for both.
    def key(route: FoundRoute) -> tuple[int, int]:
        metric = 0 if ":" in route.dst and route.metric == 1024 else route.metric
        return metric, route.table

    chosen = key(routes[0])
    tunnel.metric, tunnel.table = chosen
    for route in routes:
        if key(route) == chosen:
            if route.dst not in tunnel.routes:
                tunnel.routes.append(route.dst)
        else:
            tunnel.notes.append(f"route not carried over (one metric and table per tunnel): {route.text or route.dst}"
                                f" (metric {route.metric}, table {route.table})")
