"""`greupd import --from networkd`: systemd-networkd `.netdev` files of Kind=gre/ip6gre/gretap/ip6gretap, with
the addresses and routes of the `.network` file that matches each by Name=.

Defaults are networkd's and the kernel's: TTL inherit for IPv4 tunnels (64 for ip6 modes), TOS 0,
DiscoverPathMTU yes, route metric 0, table main.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from greupd.importer import GRE_MODES, FoundRoute, FoundTunnel, ImportProblem, carry_routes, unreadable

DEFAULT_PATH = Path("/etc/systemd/network")
_TABLES = {"main": 254, "default": 253, "local": 255}


@dataclass
class UnitFile:
    """A systemd-style INI file: sections may repeat ([Route] per route), so it is a list, not a dict."""

    path: Path
    sections: list[tuple[str, list[tuple[str, str]]]] = field(default_factory=list)

    def values(self, section: str, key: str) -> list[str]:
        return [v for name, pairs in self.sections if name == section for k, v in pairs if k == key]

    def value(self, section: str, key: str) -> str | None:
        found = self.values(section, key)
        return found[-1] if found else None  # the last assignment wins


def read_unit(path: Path) -> UnitFile:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ImportProblem(f"{path}: cannot read: {exc}") from None
    unit = UnitFile(path)
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            unit.sections.append((line[1:-1], []))
        elif "=" in line and unit.sections:
            key, value = line.split("=", 1)
            unit.sections[-1][1].append((key.strip(), value.strip()))
    return unit


def tunnels_from_networkd(path: Path = DEFAULT_PATH) -> list[FoundTunnel]:
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    netdevs = [read_unit(p) for p in files if p.suffix == ".netdev"]
    networks = [read_unit(p) for p in files if p.suffix == ".network"]
    tunnels = []
    for netdev in netdevs:
        kind = (netdev.value("NetDev", "Kind") or "").lower()
        name = netdev.value("NetDev", "Name")
        if kind in GRE_MODES and name:
            network = next((n for n in networks if name in (n.value("Match", "Name") or "").split()), None)
            try:
                tunnels.append(_tunnel(name, kind, netdev, network))
            except ValueError as exc:  # this tunnel only
                tunnels.append(unreadable(name, str(netdev.path), exc))
    return tunnels


def _tunnel(name: str, kind: str, netdev: UnitFile, network: UnitFile | None) -> FoundTunnel:
    ip6 = kind.startswith("ip6")
    origin = str(netdev.path) + (f" and {network.path}" if network else "")
    tunnel = FoundTunnel(name=name, mode=kind, local=netdev.value("Tunnel", "Local") or "",
                         remote=netdev.value("Tunnel", "Remote") or "", origin=origin,
                         ttl=64 if ip6 else "inherit", tos=None if ip6 else 0, pmtudisc=None if ip6 else True)
    for direction, field_name in (("ikey", "InputKey"), ("okey", "OutputKey")):
        option = field_name if netdev.value("Tunnel", field_name) else "Key"
        setattr(tunnel, direction, _key(option, netdev.value("Tunnel", option)))
    ttl = netdev.value("Tunnel", "TTL")
    if ttl is not None and _number(ttl):
        tunnel.ttl = "inherit" if int(ttl) == 0 else int(ttl)
    tos = netdev.value("Tunnel", "TOS")
    if tos is not None and _number(tos) and not ip6:
        tunnel.tos = int(tos)
    pmtu = netdev.value("Tunnel", "DiscoverPathMTU")
    if pmtu is not None and not ip6:
        tunnel.pmtudisc = pmtu.lower() in ("yes", "true", "1", "on")
    mtu = netdev.value("NetDev", "MTUBytes")
    if mtu is not None and _number(mtu):
        tunnel.mtu = int(mtu)
    if network is None:
        tunnel.notes.append(f"no .network file matches Name={name}: no address or routes carried")
        return tunnel
    addresses: list[tuple[str | None, str | None]] = [(a, None) for a in network.values("Network", "Address")]
    addresses += [(a, p) for section, pairs in network.sections if section == "Address"
                  for a, p in [(dict(pairs).get("Address"), dict(pairs).get("Peer"))] if a]
    for address, peer in addresses:
        assert address is not None
        if tunnel.address is not None:
            tunnel.notes.append(f"address not carried over (greupd manages one per tunnel): {address}")
        elif peer:
            tunnel.address, tunnel.peer = address.split("/")[0], peer.split("/")[0]
        else:
            tunnel.address = address
    routes = []
    for section, pairs in network.sections:
        if section != "Route":
            continue
        route = dict(pairs)
        destination = route.get("Destination")
        if not destination:
            tunnel.notes.append(f"route not carried over (no Destination=): {route}")
            continue
        if route.get("Gateway") and kind in ("gretap", "ip6gretap") and tunnel.peer is None:
            tunnel.peer = route["Gateway"]
        table = route.get("Table", "main")
        if table not in _TABLES and not _number(table):
            # A name from /etc/iproute2/rt_tables: greupd's table is a number (or "main").
            tunnel.notes.append(f"route not carried over (Table={table}: write its number from"
                                f" /etc/iproute2/rt_tables as the tunnel's table): Destination={destination}")
            continue
        metric = route.get("Metric", "0")
        if not _number(metric):
            tunnel.notes.append(f"route not carried over (Metric={metric} is not a number):"
                                f" Destination={destination}")
            continue
        try:
            dst = ipaddress.ip_network(destination, strict=False)
        except ValueError:
            tunnel.notes.append(f"route not carried over (Destination={destination} is not a prefix)")
            continue
        routes.append(FoundRoute(str(dst), int(metric), _TABLES.get(table) or int(table),
                                 f"Destination={destination}"))
    carry_routes(tunnel, routes)
    return tunnel


def _number(text: str) -> bool:
    return text.isascii() and text.isdigit()  # not str.isdigit alone: int("²") raises


def _key(option: str, value: str | None) -> int | None:
    """A GRE key as networkd reads Key=, InputKey=, OutputKey=: a number or a dotted quad."""
    if value is None:
        return None
    try:
        return int(ipaddress.IPv4Address(value)) if "." in value else int(value)
    except ValueError:
        raise ValueError(f"{option}={value}: not a GRE key (a number or a dotted quad)") from None
