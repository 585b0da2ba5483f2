"""iptables rules that belong to a tunnel (the seed's step 3, and TCPMSS clamps) -> commented tunnels.toml lines.

They are never carried over live: greupd's own nftables table would then do the same work a second time
beside the iptables rules. The person uncomments the suggestion and deletes the iptables rules together.
"""

from __future__ import annotations

import ipaddress
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field

from greupd.importer import FoundTunnel


@dataclass(frozen=True)
class IptablesRule:
    table: str
    chain: str
    target: str
    text: str  # as a person would type it again: iptables [-t T] -A CHAIN ...
    source: str | None = None
    in_interface: str | None = None
    out_interface: str | None = None
    mss: int | str | None = None  # TCPMSS: --set-mss N, or "pmtu" for --clamp-mss-to-pmtu


def parse_rule(argv: list[str], table: str = "filter") -> IptablesRule | None:
    """One rule from iptables' arguments (`-t nat -A POSTROUTING -o eth1 -s X -j MASQUERADE`); None if not a rule."""
    chain = target = None
    source = in_if = out_if = None
    mss: int | str | None = None
    words = iter(argv)
    for word in words:
        if word in ("-t", "--table"):
            table = next(words, table)
        elif word in ("-A", "--append", "-I", "--insert"):
            chain = next(words, None)
        elif word in ("-s", "--source", "--src"):
            source = next(words, None)
        elif word in ("-i", "--in-interface"):
            in_if = next(words, None)
        elif word in ("-o", "--out-interface"):
            out_if = next(words, None)
        elif word in ("-j", "--jump"):
            target = next(words, None)
        elif word == "--set-mss":
            value = next(words, "")
            mss = int(value) if value.isascii() and value.isdigit() else None  # int("²") raises
        elif word == "--clamp-mss-to-pmtu":
            mss = "pmtu"
    if chain is None or target is None:
        return None
    flag = "" if table == "filter" else f"-t {table} "
    rest = [w for w in argv if w not in ("-t", "--table", table)]
    return IptablesRule(table, chain, target, f"iptables {flag}{shlex.join(rest)}".strip(), source, in_if, out_if,
                        mss)


def rules_from_save(text: str) -> list[IptablesRule]:
    """The rules of `iptables-save` output (its `*nat` lines say which table the `-A` lines below are in)."""
    rules: list[IptablesRule] = []
    table = "filter"
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.startswith("-A "):
            rule = parse_rule(shlex.split(line), table)
            if rule is not None:
                rules.append(rule)
    return rules


def running_rules() -> tuple[list[IptablesRule], str | None]:
    """The running iptables ruleset (iptables-nft or legacy, whichever `iptables-save` is); a note if unreadable."""
    save = shutil.which("iptables-save")
    if save is None:
        return [], None  # no iptables here: nothing of the kind to carry
    try:
        done = subprocess.run([save], capture_output=True, text=True, timeout=30, check=False)
    except OSError as exc:
        return [], f"iptables-save failed ({exc}): iptables rules were not looked at"
    if done.returncode != 0:
        return [], f"iptables-save failed ({done.stderr.strip()}): iptables rules were not looked at"
    return rules_from_save(done.stdout), None


def _within(address: str | None, tunnel: FoundTunnel) -> bool:
    """Is `address` (an iptables -s value) the tunnel's peer, or inside a prefix routed through it?"""
    if address is None:
        return False
    try:
        source = ipaddress.ip_network(address, strict=False)
        # The peer and routes come from the source's files as written (ifupdown's dstaddr): not always addresses.
        if tunnel.peer is not None and source == ipaddress.ip_network(tunnel.peer, strict=False):
            return True
        for route in tunnel.routes:
            prefix = ipaddress.ip_network(route, strict=False)
            if source.version == prefix.version and source.subnet_of(prefix):  # type: ignore[arg-type]
                return True
    except ValueError:
        return False
    return False


@dataclass
class _Suggestion:
    into_tunnel: list[str] = field(default_factory=list)
    from_tunnel: list[str] = field(default_factory=list)
    clamp: int | str | None = None
    used: list[str] = field(default_factory=list)

    def add(self, values: list[str], value: str) -> None:
        if value not in values:
            values.append(value)


def suggest(tunnels: list[FoundTunnel], rules: list[IptablesRule]) -> None:
    """Attach to each tunnel the rules that serve it (as notes) and the tunnels.toml lines that replace them."""
    for tunnel in tunnels:
        found = _Suggestion()
        for rule in rules:
            if _serve(tunnel, rule, found):
                found.used.append(rule.text)
        tunnel.notes += [f"not carried over: {text}" for text in found.used]
        if found.into_tunnel or found.from_tunnel:
            tunnel.suggestions.append("[tunnel.nat]")
            if found.into_tunnel:
                tunnel.suggestions.append(f"into_tunnel = [{', '.join(_q(p) for p in found.into_tunnel)}]")
            if found.from_tunnel:
                tunnel.suggestions.append(f"from_tunnel = [{', '.join(_q(i) for i in found.from_tunnel)}]")
        if found.clamp is not None:
            clamp = _q(found.clamp) if found.clamp == "pmtu" else str(found.clamp)
            tunnel.suggestions += ["[tunnel.mss]", f"clamp = {clamp}"]


def _serve(tunnel: FoundTunnel, rule: IptablesRule, found: _Suggestion) -> bool:
    name = tunnel.name
    if rule.target == "MASQUERADE" and rule.table == "nat" and rule.chain == "POSTROUTING":
        if rule.out_interface == name and rule.source is not None:
            found.add(found.into_tunnel, _prefix(rule.source))
            return True
        if rule.out_interface not in (None, name) and _within(rule.source, tunnel):
            found.add(found.from_tunnel, str(rule.out_interface))
            return True
    if rule.target == "ACCEPT" and rule.table == "filter" and rule.chain == "FORWARD":
        if rule.out_interface == name and rule.source is not None:
            found.add(found.into_tunnel, _prefix(rule.source))
            return True
        if rule.out_interface not in (None, name) and (rule.in_interface == name or _within(rule.source, tunnel)):
            found.add(found.from_tunnel, str(rule.out_interface))
            return True
    if rule.target == "TCPMSS" and rule.mss is not None and name in (rule.in_interface, rule.out_interface):
        found.clamp = rule.mss
        return True
    return False


def _prefix(source: str) -> str:
    try:
        return str(ipaddress.ip_network(source, strict=False))
    except ValueError:
        return source


def _q(value: object) -> str:
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
