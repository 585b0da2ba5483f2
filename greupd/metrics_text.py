"""greupd's Prometheus text (exposition format 0.0.4), written directly, a slice of tunnels at a time (pure).

prometheus_client built a sample object per value and formatted each through its generic path: ~0.5 s per
1000 tunnels on the daemon's loop (code review 3, M4), ~20 samples a tunnel. This writes the same bytes (its
sample order, label order and float formatting, checked against prometheus_client in tests/test_metrics.py)
with each tunnel's label strings and timestamps kept between renderings (`LabelCache`), and takes the
tunnels in slices (`MetricsText.add`), so the daemon can let its loop run between them (metrics.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from greupd import __version__
from greupd.status import DaemonStatus, IpsecState, TunnelState, TunnelStatus

_STATES: tuple[TunnelState, ...] = ("up", "down", "disabled", "error")
_IPSEC_STATES: tuple[IpsecState, ...] = ("established", "connecting", "down")


def go_float(value: float) -> str:
    """A value as prometheus_client writes it (utils.floatToGoString): Go's exponents from 1e7 on."""
    if type(value) is int and 0 <= value < 1000000:
        return f"{value}.0"  # the usual case (counts, states), without the float round trip
    d = float(value)
    if d == math.inf:
        return "+Inf"
    if d == -math.inf:
        return "-Inf"
    if math.isnan(d):
        return "NaN"
    s = repr(d)
    dot = s.find(".")
    if d > 0 and dot > 6:
        mantissa = f"{s[0]}.{s[1:dot]}{s[dot + 1:]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return s


def escape(value: str) -> str:
    """A label value: backslash, newline and double quote escaped."""
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


@dataclass
class LabelCache:
    """What stays the same from one rendering to the next: each tunnel's label text and `since` as a number."""

    tunnel: dict[str, str] = field(default_factory=dict)  # name -> tunnel="name"
    info: dict[tuple[str, str, str, str], str] = field(default_factory=dict)
    since: dict[str, str] = field(default_factory=dict)  # ISO 8601 -> Unix time, formatted

    def of(self, name: str) -> str:
        text = self.tunnel.get(name)
        if text is None:
            if len(self.tunnel) > 100_000:  # names come and go with reloads: never grow without bound
                self.tunnel.clear()
            text = self.tunnel[name] = f'tunnel="{escape(name)}"'
        return text

    def info_of(self, t: TunnelStatus) -> str:
        key = (t["name"], t["mode"], t["local"], t["remote"])
        text = self.info.get(key)
        if text is None:
            if len(self.info) > 100_000:
                self.info.clear()
            text = self.info[key] = (f'local="{escape(t["local"])}",mode="{escape(t["mode"])}",'
                                     f'remote="{escape(t["remote"])}",{self.of(t["name"])}')
        return text

    def since_of(self, iso: str) -> str:
        text = self.since.get(iso)
        if text is None:
            if len(self.since) > 100_000:
                self.since.clear()
            # `since` is ISO 8601 UTC with a Z (report.now_iso); fromisoformat reads the Z from Python 3.11 on.
            text = self.since[iso] = go_float(datetime.fromisoformat(iso).timestamp())
        return text


# (name as written, type, help) of the per-tunnel families, in the order they are written.
_TUNNEL_FAMILIES = (
    ("greupd_tunnel_info", "gauge", "A configured tunnel; the value is always 1"),
    ("greupd_tunnel_up", "gauge", "1 if the tunnel is up (link present, keepalives answered)"),
    ("greupd_tunnel_state", "gauge", "1 for the state the tunnel is in, 0 for the others"),
    ("greupd_tunnel_state_changes_total", "counter", "State transitions after the tunnel's first state (flaps: "
                                                     "keepalive timeouts and returns, removed links, errors)"),
    ("greupd_tunnel_last_change_timestamp_seconds", "gauge", "When the tunnel entered its current state"),
    ("greupd_drift_repairs_total", "counter", "Passes that put back what another program changed or removed on the "
                                              "tunnel (link, address, route)"),
    ("greupd_routes_installed", "gauge", "The tunnel's routes greupd has installed (0 while it is down)"),
    ("greupd_routes_configured", "gauge", "The routes the config gives the tunnel"),
    ("greupd_keepalive_sent_total", "counter", "Keepalive probes sent"),
    ("greupd_keepalive_received_total", "counter", "Keepalive replies received"),
    ("greupd_keepalive_missed_in_a_row", "gauge", "Probes unanswered since the last reply; `retries` of them take "
                                                  "the tunnel down"),
    ("greupd_keepalive_rtt_seconds", "gauge", "Round-trip time of the last keepalive reply"),
    ("greupd_keepalive_interval_seconds", "gauge", "Seconds between keepalive probes"),
)
_IPSEC_FAMILIES = (
    ("greupd_ipsec_sa_up", "gauge", "1 if the tunnel's IPsec SAs are established (IKE_SA established, CHILD_SA "
                                    "installed): its GRE travels in ESP"),
    ("greupd_ipsec_state", "gauge", "1 for the tunnel's IPsec state (established, connecting, down), 0 for the "
                                    "others"),
)
_LIVENESS_FAMILIES = (
    ("greupd_bfd_session_up", "gauge", "1 while the tunnel's BFD session is Up"),
    ("greupd_tunnel_dampened", "gauge", "1 while dampening holds the flapping tunnel down"),
)
_PATH_MTU_FAMILIES = (
    ("greupd_tunnel_path_mtu_bytes", "gauge", "The tunnel's MTU measured end to end by padded keepalives and set "
                                              "on its link (the floor when even that did not come back)"),
    ("greupd_tunnel_path_mtu_failed", "gauge", "1 if not even the floor came back (a black hole below it)"),
    ("greupd_tunnel_path_mtu_ipv6", "gauge", "1 if the MTU carries IPv6 (1280 or more, RFC 8200)"),
)


def _header(name: str, kind: str, documentation: str) -> str:
    documentation = documentation.replace("\\", r"\\").replace("\n", r"\n")
    return f"# HELP {name} {documentation}\n# TYPE {name} {kind}\n"


def _single(name: str, kind: str, documentation: str, value: float, labels: str = "") -> str:
    return _header(name, kind, documentation) + f"{name}{{{labels}}} {go_float(value)}\n" if labels else \
        _header(name, kind, documentation) + f"{name} {go_float(value)}\n"


class MetricsText:
    """One rendering: the daemon's fields (`head`), then `add` for each slice of tunnels, then `text()`."""

    def __init__(self, head: DaemonStatus, reload_ok: bool, last_success: float, cache: LabelCache | None = None,
                 version: str = __version__) -> None:
        self._head, self._reload_ok, self._last_success, self._version = head, reload_ok, last_success, version
        self._cache = cache or LabelCache()
        self._tunnel: list[list[str]] = [[] for _ in _TUNNEL_FAMILIES]
        self._ipsec: list[list[str]] = [[] for _ in _IPSEC_FAMILIES]
        self._charon: bool | None = None  # None: no tunnel with [tunnel.ipsec]
        self._liveness: list[list[str]] = [[] for _ in _LIVENESS_FAMILIES]
        self._path_mtu: list[list[str]] = [[] for _ in _PATH_MTU_FAMILIES]
        self._measured = False

    def add(self, tunnels: Iterable[TunnelStatus]) -> None:
        """One slice of tunnels: each family's lines for them, joined into one piece (the last join is then of a
        few hundred pieces, not of 200,000 lines)."""
        cache = self._cache
        tunnel: list[list[str]] = [[] for _ in _TUNNEL_FAMILIES]
        ipsec: list[list[str]] = [[] for _ in _IPSEC_FAMILIES]
        liveness: list[list[str]] = [[] for _ in _LIVENESS_FAMILIES]
        path_mtus: list[list[str]] = [[] for _ in _PATH_MTU_FAMILIES]
        info, up, state, changes, since, repairs, installed, configured, sent, received, missed, rtt, interval = \
            tunnel
        for t in tunnels:
            lab = cache.of(t["name"])
            current = t["state"]
            info.append(f"greupd_tunnel_info{{{cache.info_of(t)}}} 1.0\n")
            up.append(f"greupd_tunnel_up{{{lab}}} {'1.0' if current == 'up' else '0.0'}\n")
            state.extend(f'greupd_tunnel_state{{state="{each}",{lab}}} {"1.0" if current == each else "0.0"}\n'
                         for each in _STATES)
            changes.append(f"greupd_tunnel_state_changes_total{{{lab}}} {go_float(t['state_changes'])}\n")
            since.append(f"greupd_tunnel_last_change_timestamp_seconds{{{lab}}} {cache.since_of(t['since'])}\n")
            repairs.append(f"greupd_drift_repairs_total{{{lab}}} {go_float(t['drift_repairs'])}\n")
            routes = len(t["routes"])
            installed.append(f"greupd_routes_installed{{{lab}}} {go_float(routes if t['routes_installed'] else 0)}\n")
            configured.append(f"greupd_routes_configured{{{lab}}} {go_float(routes)}\n")
            keepalive = t["keepalive"]
            if keepalive is not None:
                sent.append(f"greupd_keepalive_sent_total{{{lab}}} {go_float(keepalive['sent'])}\n")
                received.append(f"greupd_keepalive_received_total{{{lab}}} {go_float(keepalive['received'])}\n")
                missed.append(f"greupd_keepalive_missed_in_a_row{{{lab}}} {go_float(keepalive['missed_in_a_row'])}\n")
                interval.append(f"greupd_keepalive_interval_seconds{{{lab}}} {go_float(keepalive['interval'])}\n")
                if keepalive["last_rtt_ms"] is not None:
                    rtt.append(f"greupd_keepalive_rtt_seconds{{{lab}}} {go_float(keepalive['last_rtt_ms'] / 1000)}\n")
            if "ipsec" in t:
                sa = t["ipsec"]
                ipsec[0].append(f"greupd_ipsec_sa_up{{{lab}}} {'1.0' if sa['state'] == 'established' else '0.0'}\n")
                ipsec[1].extend(f'greupd_ipsec_state{{state="{each}",{lab}}} '
                                f'{"1.0" if sa["state"] == each else "0.0"}\n' for each in _IPSEC_STATES)
                self._charon = bool(self._charon) or sa["charon"]
            if "bfd" in t:
                liveness[0].append(f"greupd_bfd_session_up{{{lab}}} {'1.0' if t['bfd']['state'] == 'up' else '0.0'}\n")
            if "liveness" in t:
                liveness[1].append(f"greupd_tunnel_dampened{{{lab}}} "
                                   f"{'1.0' if 'dampening' in t['liveness']['down_by'] else '0.0'}\n")
            if "path_mtu" in t:
                self._measured = True
                path_mtu = t["path_mtu"]
                if path_mtu["bytes"] is not None:
                    size = path_mtu["bytes"]
                    path_mtus[0].append(f"greupd_tunnel_path_mtu_bytes{{{lab}}} {go_float(size)}\n")
                    path_mtus[1].append(f"greupd_tunnel_path_mtu_failed{{{lab}}} "
                                        f"{'1.0' if path_mtu['state'] == 'failed' else '0.0'}\n")
                    path_mtus[2].append(f"greupd_tunnel_path_mtu_ipv6{{{lab}}} {'1.0' if size >= 1280 else '0.0'}\n")
        for pieces, lines in ((self._tunnel, tunnel), (self._ipsec, ipsec), (self._liveness, liveness),
                              (self._path_mtu, path_mtus)):
            for family, family_lines in zip(pieces, lines, strict=True):
                if family_lines:
                    family.append("".join(family_lines))

    def text(self) -> str:
        head = self._head
        parts = [
            _single("greupd_build_info", "gauge", "greupd's version; the value is always 1", 1,
                    f'version="{escape(self._version)}"'),
            _single("greupd_config_generation", "gauge", "Bumps on every applied config; 1 at start",
                    head["generation"]),
            _single("greupd_config_last_reload_success", "gauge",
                    "1 if the last config load (start or reload) applied, 0 if it was rejected", int(self._reload_ok)),
            _single("greupd_config_last_reload_success_timestamp_seconds", "gauge",
                    "When a config was last applied (start or reload)", self._last_success),
        ]
        if "netlink_requests" in head:
            parts.append(_single("greupd_netlink_requests_total", "counter",
                                 "rtnetlink requests sent since the daemon started", head["netlink_requests"]))
        for (name, kind, documentation), lines in zip(_TUNNEL_FAMILIES, self._tunnel, strict=True):
            parts += [_header(name, kind, documentation), *lines]
        if self._charon is not None:
            for (name, kind, documentation), lines in zip(_IPSEC_FAMILIES, self._ipsec, strict=True):
                parts += [_header(name, kind, documentation), *lines]
            # One session serves every tunnel; each tunnel's status carries the same flag.
            parts.append(_single("greupd_ipsec_charon_connected", "gauge",
                                 "1 if greupd holds a VICI session with charon ([daemon] vici_socket)",
                                 int(self._charon)))
        keepalive_socket = head.get("keepalive_socket")
        if keepalive_socket is not None:
            parts.append(_single("greupd_keepalive_socket_filter_addresses", "gauge", "1 if the kernel passes "
                                 "keepalive packets from configured remotes only, 0 if from any source (too many "
                                 "remotes for the filter)", int(keepalive_socket["filter"] != "protocol")))
            parts.append(_single("greupd_keepalive_socket_filter_tokens", "gauge", "1 if the kernel passes only "
                                 "replies that carry a token greupd issued, 0 if any reply from a configured remote "
                                 "(too many tunnels for the filter)", int(keepalive_socket["filter"] == "tokens")))
            if keepalive_socket["drops"] is not None:
                parts.append(_single("greupd_keepalive_socket_drops_total", "counter", "Packets the kernel dropped "
                                     "at the keepalive socket because its receive buffer was full",
                                     keepalive_socket["drops"]))
        for (name, kind, documentation), lines in zip(_LIVENESS_FAMILIES, self._liveness, strict=True):
            parts += [_header(name, kind, documentation), *lines]
        if self._measured:
            for (name, kind, documentation), lines in zip(_PATH_MTU_FAMILIES, self._path_mtu, strict=True):
                parts += [_header(name, kind, documentation), *lines]
        return "".join(parts)


def render_text(status: DaemonStatus, reload_ok: bool, last_success: float, version: str = __version__) -> str:
    """The whole text of one status at once (the textfile's, tests')."""
    text = MetricsText(status, reload_ok, last_success, version=version)
    text.add(status["tunnels"])
    return text.text()
