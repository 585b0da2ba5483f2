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
        tunnels = ((data or {}).get("network") or {}).get("tunnels") or {}
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
    for address in body.get("addresses") or []:
        text = str(next(iter(address)) if isinstance(address, dict) else address)
        if tunnel.address is None:
            tunnel.address = text
        else:
            tunnel.notes.append(f"address not carried over (greupd manages one per tunnel): {text}")
    routes = []
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
        table = route.get("table", 254)
        routes.append(FoundRoute(dst, int(route.get("metric", 0)), int(table) if table != "main" else 254,
                                 f"to {route['to']}" + (f" via {route['via']}" if "via" in route else "")))
    carry_routes(tunnel, routes)
    for key in sorted(set(body) - _KNOWN):
        tunnel.notes.append(f"netplan key not carried over: {key}: {body[key]}")
    return tunnel


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
