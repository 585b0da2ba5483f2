"""The one TOML writer of `greupd import`: FoundTunnel values -> tunnels.toml text that passes `greupd check`.

Each entry is validated on its own before it is printed; one that greupd would refuse (a name it does not
accept, an Ethernet tunnel with routes but no peer, ...) is printed commented out, with the reason, so the
file as a whole always validates.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from greupd.config import ConfigError, load_config_text
from greupd.importer import FoundTunnel

_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _string(value: str) -> str:
    # A TOML basic string; tunnel fields are addresses, names and prefixes, but quote safely anyway: a control
    # character (a newline in a netplan name) is escaped, so the string cannot end the line it stands on.
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + _CONTROL.sub(lambda m: f"\\u{ord(m.group()):04x}", escaped) + '"'


def one_line(text: str) -> str:
    """Text for a `# ` comment: its line breaks and other control characters as spaces. A newline in a source's
    value (a netplan `description: |`) would otherwise end the comment, and the rest be live TOML (review L2)."""
    return _CONTROL.sub(" ", text)


def _comment(text: str) -> str:
    return f"# {one_line(text)}"


def _value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return _string(str(value))


def entry_lines(tunnel: FoundTunnel) -> list[str]:
    """The [[tunnel]] table, keys in the order spec.md lists them."""
    fields: list[tuple[str, object]] = [("name", tunnel.name), ("mode", tunnel.mode), ("local", tunnel.local),
                                        ("remote", tunnel.remote)]
    if tunnel.ikey is not None and tunnel.ikey == tunnel.okey:
        fields.append(("key", tunnel.ikey))
    else:
        fields += [(k, v) for k, v in (("ikey", tunnel.ikey), ("okey", tunnel.okey)) if v is not None]
    fields.append(("ttl", tunnel.ttl))
    fields += [(k, v) for k, v in (("tos", tunnel.tos), ("pmtudisc", tunnel.pmtudisc),
                                   ("encap_limit", tunnel.encap_limit), ("mtu", tunnel.mtu),
                                   ("address", tunnel.address), ("peer", tunnel.peer)) if v is not None]
    if tunnel.routes:
        fields.append(("routes", tunnel.routes))
    if tunnel.metric:
        fields.append(("metric", tunnel.metric))
    if tunnel.table != 254:
        fields.append(("table", tunnel.table))
    fields.append(("adopt", True))
    return ["[[tunnel]]", *(f"{key} = {_value(value)}" for key, value in fields)]


def render(tunnels: Iterable[FoundTunnel], source: str, notes: Iterable[str] = (),
           ip_forward: bool | None = None) -> str:
    """The whole file. `ip_forward` False: write `ip_forward = false` (the host does not forward today)."""
    lines = [f"# Written by `greupd import --from {source}`. Every tunnel has adopt = true: `greupd run` takes the",
             "# existing link over in place (same ifindex, no flap) and replaces its routes for the prefixes",
             "# below with greupd's, in one step each. Check it first: greupd check FILE; greupd plan FILE.",
             *(_comment(note) for note in notes)]
    daemon = ["", "[daemon]", "ip_forward = false  # net.ipv4.ip_forward is off on this host today"] \
        if ip_forward is False else []
    lines += daemon
    accepted: list[str] = []  # entries printed live so far: a later one must not clash with them (names, keys)
    for tunnel in tunnels:
        lines += ["", _comment(f"{tunnel.name}: from {tunnel.origin}")]
        if tunnel.problem is not None:
            lines.append(_comment(f"not carried over, its description cannot be read: {tunnel.problem}"))
            continue
        entry = entry_lines(tunnel)
        problem = _problem("\n".join([*daemon, *accepted, *entry]) + "\n")
        if problem is None:
            accepted += entry
            lines += entry
        else:
            lines.append(_comment(f"not carried over, greupd would refuse it: {problem}"))
            lines += [_comment(line) for line in entry]
        lines += [_comment(note) for note in tunnel.notes]
        if tunnel.suggestions:
            lines.append("# greupd's nftables table does the same; uncomment and delete the iptables rules together:")
            lines += [_comment(line) for line in tunnel.suggestions]
    return "\n".join(lines) + "\n"


def _problem(text: str) -> str | None:
    try:
        load_config_text(text, file=Path("<import>"))
    except ConfigError as exc:
        return "; ".join(f"{p.field}: {p.message}" if p.field else p.message for p in exc.problems)
    return None
