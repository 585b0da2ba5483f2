"""`greupd import --from netplan`: the `network.tunnels` entries of netplan YAML with a GRE-family mode.

Files are read in name order and later definitions of a tunnel replace earlier ones, as netplan merges them.
Defaults are those of the backend (systemd-networkd) and the kernel: ttl inherit (IPv4; 64 for ip6 modes),
tos 0, path-MTU discovery on, metric 0, table main.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import yaml

from greupd.importer import GRE_MODES, FoundRoute, FoundTunnel, ImportProblem, carry_routes, unreadable

DEFAULT_PATH = Path("/etc/netplan")
# Keys this reader carries; any other key of a tunnel becomes a note.
_KNOWN = {"mode", "local", "remote", "key", "keys", "ttl", "mtu", "addresses", "routes"}


def netplan_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
    return [path]


def tunnels_from_netplan(path: Path = DEFAULT_PATH) -> list[FoundTunnel]:
    found: dict[str, FoundTunnel] = {}
    for file in netplan_files(path):
        try:
            data = yaml.safe_load(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ImportProblem(f"{file}: cannot read it as YAML: {exc}") from None
        except RecursionError:  # PyYAML composes nested collections recursively
            raise ImportProblem(f"{file}: cannot read it as YAML: nested too deep") from None
        if not isinstance(data or {}, dict):  # netplan refuses such a file too
            raise ImportProblem(f"{file}: a netplan file is a mapping with a `network` key, not {_kind(data)}")
        network = (data or {}).get("network") or {}
        if not isinstance(network, dict):
            raise ImportProblem(f"{file}: network must be a mapping (of tunnels, ...), not {_kind(network)}")
        tunnels = network.get("tunnels") or {}
        if not isinstance(tunnels, dict):
            raise ImportProblem(f"{file}: network.tunnels must be a mapping of tunnel names")
        for name, body in tunnels.items():
            if isinstance(body, dict) and str(body.get("mode", "")).lower() in GRE_MODES:
                try:
                    found[str(name)] = _tunnel(str(name), body, file)
                except (ValueError, TypeError) as exc:  # a key "abc", a metric [1]: this tunnel only
                    found[str(name)] = unreadable(str(name), str(file), exc)
    return list(found.values())


def _tunnel(name: str, body: dict[str, Any], file: Path) -> FoundTunnel:
    mode = str(body["mode"]).lower()
    ip6 = mode.startswith("ip6")
    tunnel = FoundTunnel(name=name, mode=mode, local=str(body.get("local", "")), remote=str(body.get("remote", "")),
                         origin=str(file), ttl=64 if ip6 else "inherit", tos=None if ip6 else 0,
                         pmtudisc=None if ip6 else True)
    keys = body.get("keys", body.get("key"))
    if isinstance(keys, dict):
        tunnel.ikey, tunnel.okey = _key(keys.get("input")), _key(keys.get("output"))
    elif keys is not None:
        tunnel.ikey = tunnel.okey = _key(keys)
    if isinstance(body.get("ttl"), int):
        tunnel.ttl = "inherit" if body["ttl"] == 0 else body["ttl"]
    if isinstance(body.get("mtu"), int):
        tunnel.mtu = body["mtu"]
    addresses = body.get("addresses") or []
    if not isinstance(addresses, list):
        raise ValueError(f"addresses: a list of addresses, not {_kind(addresses)}")
    for address in addresses:
        if isinstance(address, dict) and len(address) != 1:
            tunnel.notes.append(f"address not carried over (one address with its options): {address}")
            continue
        text = str(next(iter(address)) if isinstance(address, dict) else address)
        if tunnel.address is None:
            tunnel.address = text
        else:
            tunnel.notes.append(f"address not carried over (greupd manages one per tunnel): {text}")
    routes = []
    if not isinstance(body.get("routes") or [], list):
        raise ValueError(f"routes: a list of routes, not {_kind(body['routes'])}")
    for route in body.get("routes") or []:
        if not isinstance(route, dict) or "to" not in route:
            tunnel.notes.append(f"route not carried over (no `to`): {route}")
            continue
        dst = "0.0.0.0/0" if route["to"] == "default" else str(route["to"])
        try:
            dst = str(ipaddress.ip_network(dst, strict=False))
        except ValueError:
            tunnel.notes.append(f"route not carried over (not a prefix): {route['to']}")
            continue
        if "via" in route and mode in ("gretap", "ip6gretap") and tunnel.peer is None:
            tunnel.peer = str(route["via"])
        text = f"to {route['to']}" + (f" via {route['via']}" if "via" in route else "")
        table, metric = route.get("table", 254), route.get("metric", 0)
        if table == "main":
            table = 254
        if not _whole(table):
            # A name from /etc/iproute2/rt_tables: greupd's table is a number (or "main").
            tunnel.notes.append(f"route not carried over (table: {table}: write its number from"
                                f" /etc/iproute2/rt_tables as the tunnel's table): {text}")
            continue
        if not _whole(metric):
            tunnel.notes.append(f"route not carried over (metric: {metric} is not a number): {text}")
            continue
        routes.append(FoundRoute(dst, int(metric), int(table), text))
    carry_routes(tunnel, routes)
    for key in sorted(set(body) - _KNOWN, key=str):
        tunnel.notes.append(f"netplan key not carried over: {key}: {body[key]}")
    return tunnel


def _kind(value: object) -> str:
    return "a list" if isinstance(value, list) else f"{value!r}"[:40]


def _whole(value: object) -> bool:
    """A YAML number netplan takes as a table or metric (`254`, `"254"`), not a name, a fraction or a bool."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, str) and value.isascii() and value.isdigit())


def _key(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, int):
        return value
    try:
        return int(ipaddress.IPv4Address(str(value)))
    except ValueError:
        pass
    try:
        return int(str(value))
    except ValueError:
        raise ValueError(f"key {value!r} is not a GRE key (a number or a dotted quad)") from None
