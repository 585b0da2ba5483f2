"""`greupd import --from ifupdown`: `iface NAME inet tunnel` stanzas of mode gre (or inet6 with ip6gre) in
/etc/network/interfaces and the files it sources, with their `up ip route add ...` and iptables lines.

What ifupdown runs for such a stanza is `ip tunnel add NAME mode gre remote ENDPOINT [local L] [ttl T]`,
`ip addr add ADDRESS/NETMASK dev NAME [peer DSTADDR]`: so ttl defaults to inherit, tos to 0, path-MTU
discovery on. `up`/`post-up` commands that route through the tunnel are carried; iptables ones become
suggestions (iptables.py); anything else is a note.
"""

from __future__ import annotations

import glob
import ipaddress
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from greupd.importer import FoundRoute, FoundTunnel, ImportProblem, carry_routes, unreadable
from greupd.importer.iptables import IptablesRule, parse_rule, suggest

DEFAULT_PATH = Path("/etc/network/interfaces")
_STANZAS = ("iface", "auto", "allow-", "mapping", "source", "source-directory", "rename", "no-auto-down",
            "no-scripts")
_MODES = {"gre": "gre", "ip6gre": "ip6gre", "gretap": "gretap", "ip6gretap": "ip6gretap"}
_UP = ("up", "post-up")


@dataclass
class Stanza:
    name: str
    family: str
    method: str
    file: Path
    options: list[tuple[str, str]] = field(default_factory=list)

    def option(self, key: str) -> str | None:
        return next((v for k, v in reversed(self.options) if k == key), None)


def _logical_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ImportProblem(f"{path}: cannot read: {exc}") from None
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        line = (pending + raw).strip()
        pending = ""
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def read_stanzas(path: Path, seen: set[Path] | None = None, notes: list[str] | None = None) -> list[Stanza]:
    """The stanzas of `path` and of the files it sources; a `source` line that cannot be read (a path with a NUL
    byte) becomes a note in `notes` (for the file's head), and reading goes on."""
    seen = seen if seen is not None else set()
    notes = notes if notes is not None else []
    if path in seen:
        return []
    seen.add(path)
    stanzas: list[Stanza] = []
    current: Stanza | None = None
    for line in _logical_lines(path):
        word, _, rest = line.partition(" ")
        if word.startswith(_STANZAS):
            current = None
            if word == "iface":
                parts = rest.split()
                if len(parts) >= 3:
                    current = Stanza(parts[0], parts[1], parts[2], path)
                    stanzas.append(current)
            elif word in ("source", "source-directory") and "\0" in rest:
                # glob and stat refuse a path with a NUL byte (ValueError); no file has such a name.
                notes.append(f"{path}: not read (a NUL byte in the path): {line}")
            elif word == "source":
                pattern = rest.strip() if rest.strip().startswith("/") else str(path.parent / rest.strip())
                for included in sorted(glob.glob(pattern)):
                    stanzas += read_stanzas(Path(included), seen, notes)
            elif word == "source-directory":
                directory = Path(rest.strip()) if rest.strip().startswith("/") else path.parent / rest.strip()
                if directory.is_dir():
                    for file in sorted(p for p in directory.iterdir() if p.is_file()):
                        stanzas += read_stanzas(file, seen, notes)
        elif current is not None:
            current.options.append((word, rest.strip()))
    return stanzas


def tunnels_from_ifupdown(path: Path = DEFAULT_PATH, notes: list[str] | None = None) -> list[FoundTunnel]:
    """The tunnels; what could not be read outside a tunnel (a `source` line) is appended to `notes`."""
    if path.is_dir():  # /etc/network: its interfaces file
        path = path / "interfaces"
    tunnels = []
    rules: list[IptablesRule] = []
    for stanza in read_stanzas(path, notes=notes):
        mode = (stanza.option("mode") or "").lower()
        if stanza.method != "tunnel" or mode not in _MODES:
            continue
        try:
            tunnel, found_rules = _tunnel(stanza, _MODES[mode])
        except ValueError as exc:  # an address or key ifupdown would not take either: this tunnel only
            tunnels.append(unreadable(stanza.name, f"{stanza.file} (iface {stanza.name})", exc))
            continue
        tunnels.append(tunnel)
        rules += found_rules
    suggest(tunnels, rules)
    return tunnels


def _tunnel(stanza: Stanza, mode: str) -> tuple[FoundTunnel, list[IptablesRule]]:
    ip6 = mode.startswith("ip6")
    tunnel = FoundTunnel(name=stanza.name, mode=mode, local=stanza.option("local") or "",
                         remote=stanza.option("endpoint") or "", origin=f"{stanza.file} (iface {stanza.name})",
                         ttl=64 if ip6 else "inherit", tos=None if ip6 else 0, pmtudisc=None if ip6 else True)
    ttl = stanza.option("ttl")
    if ttl is not None and _number(ttl):
        tunnel.ttl = "inherit" if int(ttl) == 0 else int(ttl)
    mtu = stanza.option("mtu")
    if mtu is not None and _number(mtu):
        tunnel.mtu = int(mtu)
    for direction in ("ikey", "okey"):
        option = direction if stanza.option(direction) else "key"
        value = stanza.option(option)
        if value is not None:
            setattr(tunnel, direction, _key(option, value))
    address, netmask, peer = stanza.option("address"), stanza.option("netmask"), stanza.option("dstaddr")
    if address is not None:
        if "/" not in address:
            address = f"{address}/{_prefix_length(netmask, ip6)}"
        try:
            local = ipaddress.ip_interface(address)
        except ValueError:
            raise ValueError(f"address {stanza.option('address')}: not an address") from None
        if peer is not None and local.network.prefixlen == local.max_prefixlen:
            try:
                tunnel.address, tunnel.peer = str(local.ip), str(ipaddress.ip_address(peer))
            except ValueError:
                raise ValueError(f"dstaddr {peer}: not an address") from None
        else:
            tunnel.address = str(local)
    if stanza.option("gateway"):
        tunnel.notes.append(f"default route via {stanza.option('gateway')} not carried over: add \"0.0.0.0/0\""
                            " to routes if the tunnel should carry it")
    routes: list[FoundRoute] = []
    rules: list[IptablesRule] = []
    for key_word, command in stanza.options:
        if key_word not in _UP:
            continue
        try:
            argv = shlex.split(command)
        except ValueError as exc:  # `up echo "it's`: a line the shell would refuse too
            tunnel.notes.append(f"not carried over ({exc}): {key_word} {command}")
            continue
        route = _route(argv, stanza.name)
        if route is not None:
            routes.append(route)
            continue
        program = Path(argv[0]).name if argv else ""
        rule = parse_rule(argv[1:]) if program in ("iptables", "iptables-nft", "iptables-legacy") else None
        if rule is not None:
            rules.append(rule)
        else:
            tunnel.notes.append(f"not carried over: {key_word} {command}")
    carry_routes(tunnel, routes)
    return tunnel, rules


def _number(text: str) -> bool:
    return text.isascii() and text.isdigit()  # not str.isdigit alone: int("²") raises


def _key(option: str, value: str) -> int:
    """A GRE key as ifupdown passes it to `ip tunnel add ... key K`: a number or a dotted quad."""
    try:
        return int(ipaddress.IPv4Address(value)) if "." in value else int(value)
    except ValueError:
        raise ValueError(f"{option} {value}: not a GRE key (a number or a dotted quad)") from None


def _prefix_length(netmask: str | None, ip6: bool) -> int:
    """The prefix length of `netmask` (255.255.255.0 or 24); a host's without one."""
    try:
        if netmask and "." in netmask:
            return ipaddress.ip_network(f"0.0.0.0/{netmask}").prefixlen
        return int(netmask) if netmask else (128 if ip6 else 32)
    except ValueError:
        raise ValueError(f"netmask {netmask}: not a netmask (255.255.255.0 or 24)") from None


def _route(argv: list[str], ifname: str) -> FoundRoute | None:
    """`ip [-4|-6] route add|replace P dev IF [metric M] [table T]`, or `route add -net N netmask M dev IF`."""
    words = [w for w in argv[1:] if w not in ("-4", "-6")]
    if not words:  # `up /usr/local/bin/tunnel-up`: a program alone is no route (and zip below needs a word)
        return None
    program = Path(argv[0]).name
    options = dict(zip(words, [*words[1:], ""], strict=True))  # each word -> the word after it
    if options.get("dev") != ifname:
        return None
    try:
        if program == "ip" and words[:1] in (["route"], ["r"], ["ro"]) and words[1:2] in (["add"], ["replace"]):
            target = words[2]
            dst = "0.0.0.0/0" if target == "default" else str(ipaddress.ip_network(target, strict=False))
            table = options.get("table", "main")
            return FoundRoute(dst, int(options.get("metric", options.get("preference", "0"))),
                              254 if table == "main" else int(table), " ".join(argv))
        if program == "route" and "add" in words:
            if "-net" in options:
                net = options["-net"]
                mask = options.get("netmask", "255.255.255.255")
                return FoundRoute(str(ipaddress.ip_network(f"{net}/{mask}", strict=False)),
                                  int(options.get("metric", "0")), 254, " ".join(argv))
            if "-host" in options:
                return FoundRoute(str(ipaddress.ip_network(options["-host"])), int(options.get("metric", "0")), 254,
                                  " ".join(argv))
    except (ValueError, IndexError):
        return None
    return None
