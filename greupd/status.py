"""The daemon's report of itself: the JSON shape of `greupd status --json` (spec.md), as typed dicts, and how
it is read a slice of tunnels at a time (`status_in_slices`: control.py and metrics.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, Literal, NotRequired, TypedDict

# Tunnels per slice of a status or metrics answer: ~1-3 ms of the daemon's loop each, natively.
SLICE: Final = 250

TunnelState = Literal["up", "down", "disabled", "error"]
IpsecState = Literal["established", "connecting", "down"]


class KeepaliveStatus(TypedDict):
    interval: float
    retries: int
    sent: int
    received: int
    missed_in_a_row: int
    last_rtt_ms: float | None


class KeepaliveSocketStatus(TypedDict):
    """`"keepalive_socket"`: the raw GRE sockets keepalives arrive on (keepalive/gre_socket.py, bpf.py)."""

    # What the kernel checks of a reply before the daemon sees it: "tokens": from a configured remote and
    # carrying a token the daemon issued; "addresses": from a configured remote; "protocol": a reply's shape
    # only (too many tunnels for the filter's 4096 instructions).
    filter: Literal["tokens", "addresses", "protocol"]
    remotes: int  # distinct remotes of tunnels with keepalives
    drops: int | None  # packets the kernel dropped there, a receive buffer full (a flood); None: unknown


class IpsecStatus(TypedDict):
    """`"ipsec"` of a tunnel with [tunnel.ipsec]."""

    state: IpsecState
    connection: str  # the connection's name in charon (swanctl --list-conns): greupd-<tunnel>
    ike_sa: str | None  # charon's IKE_SA state: ESTABLISHED, CONNECTING, ... (None: no IKE_SA)
    child_sa: str | None  # INSTALLED, REKEYING, ... (None: no CHILD_SA)
    charon: bool  # greupd is connected to charon's VICI socket
    error: str | None


class BfdStatus(TypedDict):
    """`"bfd"` of a tunnel with [tunnel.bfd] (greupd/liveness/bfd_engine.py)."""

    state: str  # up, down, init, admin-down
    remote_state: str
    detect_time_ms: int  # the peer is down after this long without a packet (0 before it said anything)
    sent: int
    received: int
    dropped: int  # wrong TTL or source, malformed, or failing the session's checks (authentication, discriminators)


class LivenessStatus(TypedDict):
    """`"liveness"` of a tunnel with any detector: which of them say down now (empty while it is up)."""

    down_by: list[str]  # "keepalive", "bfd", "dampening"


class PathMtuStatus(TypedDict):
    """`"path_mtu"` of a tunnel with mtu = "probe" (keepalive/pmtu.py): the link MTU measured end to end."""

    bytes: int | None  # the MTU set on the link (the floor when even that failed); None before the first result
    state: Literal["measured", "searching", "failed"]
    measured_at: str | None  # ISO 8601 UTC of the last result
    ipv6: bool | None  # False: below 1280, IPv6 through the tunnel breaks (RFC 8200)


class TunnelStatus(TypedDict):
    name: str
    mode: str
    local: str
    remote: str
    state: TunnelState
    since: str  # ISO 8601 UTC, e.g. 2026-11-24T20:15:02Z
    reason: str  # keepalive-timeout, keepalive-restored, link-removed, config, ...
    error: str | None
    ifindex: int | None
    routes: list[str]
    routes_installed: bool
    keepalive: KeepaliveStatus | None
    state_changes: int  # transitions since the tunnel's first state after start (or after it was configured)
    drift_repairs: int  # passes that put back what another program changed or removed (kernel events told us)
    ipsec: NotRequired[IpsecStatus]
    liveness: NotRequired[LivenessStatus]
    bfd: NotRequired[BfdStatus]
    path_mtu: NotRequired[PathMtuStatus]


class DaemonStatus(TypedDict):
    config: str
    generation: int  # bumps on every applied config (start = 1)
    last_error: str | None  # the last rejected reload or apply failure, None when all is well
    pid: int
    netlink_requests: NotRequired[int]  # rtnetlink requests sent since start (benchmarks: a reload should send few)
    tunnels: list[TunnelStatus]
    # What holds now and defeats part of the config, one line each, for as long as it holds: another table's
    # forward chain that drops what greupd's forward accepts let through (nft/foreign.py, review M9).
    warnings: NotRequired[list[str]]
    keepalive_socket: NotRequired[KeepaliveSocketStatus]


class ReloadResult(TypedDict):
    ok: bool
    generation: int
    error: str | None


class MetricsAnswer(TypedDict):
    text: str  # Prometheus text exposition format 0.0.4 (greupd/metrics.py)


StatusOf = Callable[[slice], DaemonStatus]  # Daemon.status: the daemon's fields and the tunnels in that slice


async def status_in_slices(status: StatusOf, begin: Callable[[DaemonStatus], None],
                           each: Callable[[list[TunnelStatus]], None], size: int = SLICE) -> None:
    """`begin` with the daemon's fields, then `each` with its tunnels `size` at a time, the loop running between
    slices (10,000 tunnels never hold it for long). A reload meanwhile (the generation moves) begins again: one
    answer never mixes two configs' tunnels."""
    import asyncio  # the daemon's; `greupd check` and the clients import this module without needing it

    while True:
        first = status(slice(0, size))
        begin(first)
        each(first["tunnels"])
        done, start = len(first["tunnels"]) < size, size
        while not done:
            await asyncio.sleep(0)
            part = status(slice(start, start + size))
            if part["generation"] != first["generation"]:
                break
            each(part["tunnels"])
            done, start = len(part["tunnels"]) < size, start + size
        if done:
            return
