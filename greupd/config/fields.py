"""The values of tunnels.toml one at a time: defaults, limits, and a parser per kind of field.

Each parser takes the raw TOML value and returns the typed one or raises ValueError with a message a person can act
on; they also take the typed value itself, so models can be built, and model_dump() re-validated, in code.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import BeforeValidator, WithJsonSchema

from greupd.gre import IPAddress, IPInterface, IPNetwork

DEFAULT_CONFIG = Path("/etc/greupd/tunnels.toml")
DEFAULT_CONTROL_SOCKET = Path("/run/greupd/control.sock")
DEFAULT_VICI_SOCKET = Path("/var/run/charon.vici")
DEFAULT_STATE_DIR = Path("/var/lib/greupd")


@dataclass(frozen=True)
class NetnsInstance:
    """What greupd@NETNS.service uses (systemd/greupd@.service; tests/test_systemd_unit.py compares):
    the daemon in network namespace /run/netns/NETNS. `greupd -n NETNS ...` finds it here, as `ip -n` does."""

    netns: str
    config: Path
    control_socket: Path
    state_dir: Path

    @property
    def netns_path(self) -> Path:
        return Path("/run/netns") / self.netns


def netns_instance(netns: str) -> NetnsInstance:
    """The paths of greupd@NETNS; ValueError for a name `ip netns` could not have made (it becomes a path)."""
    if not netns or netns in (".", "..") or "/" in netns or "\0" in netns or len(netns) > 255:
        raise ValueError(f"{netns!r} is not a network namespace name (as `ip netns list` prints them)")
    return NetnsInstance(netns, Path("/etc/greupd") / netns / "tunnels.toml",
                         Path("/run/greupd-netns") / netns / "control.sock", DEFAULT_STATE_DIR / "netns" / netns)

# Keepalives are defined for GRE carrying IP (the reply is an inner GRE packet the peer routes back): Cisco's (and
# MikroTik's, the same bytes) over IPv4, MikroTik's GRE6 format over IPv6 (keepalive/gre6.py).
KEEPALIVE_MODES: frozenset[str] = frozenset({"gre", "ip6gre"})
# [defaults] keys a mode has no use for: a default applies to the tunnels it fits, and is not an error on the
# others (a [defaults.keepalive] beside an ip6gre tunnel). Written in the tunnel itself they are errors.
DEFAULTS_NOT_FOR: Mapping[str, frozenset[str]] = {
    "gre": frozenset({"encap_limit"}),
    "gretap": frozenset({"keepalive", "encap_limit"}),
    "ip6gre": frozenset({"keepalive", "tos", "pmtudisc"}),
    "ip6gretap": frozenset({"keepalive", "tos", "pmtudisc"}),
}
# The largest MTU the kernel takes for each mode, without and with an output key (4 more header bytes): 65535
# less the outer headers. Above it ip_tunnel clamps the MTU on create (ip6_gre ignores it), so what the kernel
# holds never equals the config, and every change request is refused with EINVAL. Measured on Debian 12's 6.1
# (UML): `ip link add ... mtu N` and `ip link set mtu N`, bisected.
MAX_MTU: Mapping[str, tuple[int, int]] = {
    "gre": (65511, 65507), "gretap": (65497, 65493), "ip6gre": (65531, 65527), "ip6gretap": (65455, 65447)}
# Names the kernel gives devices of its own. ip_gre, ip6_gre, ip6_tunnel, ipip, sit and ip_vti create these
# fallback devices when they load: a create under that name ends in EEXIST (and greupd's marker would land on the
# kernel's device), and the kernel refuses to change or delete them. `all` and `default` clash with
# /proc/sys/net/*/conf/{all,default}.
KERNEL_NAMES: Mapping[str, str] = {
    **{name: f"the fallback device the kernel creates when {module} loads" for name, module in (
        ("gre0", "ip_gre"), ("gretap0", "ip_gre"), ("erspan0", "ip_gre"), ("ip6gre0", "ip6_gre"),
        ("ip6tnl0", "ip6_tunnel"), ("tunl0", "ipip"), ("sit0", "sit"), ("ip_vti0", "ip_vti"),
        ("ip6_vti0", "ip6_vti"))},
    "all": "the name of the settings for all interfaces in /proc/sys/net/*/conf/all",
    "default": "the name of the settings for new interfaces in /proc/sys/net/*/conf/default",
}

_IFNAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")
_DURATION = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*")
_UNIT_SECONDS = {"s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
TABLE_NAMES = {"main": 254}


# --- field parsers: each takes the raw TOML value and returns the typed one or raises ValueError ---------
# They also take the typed value itself, so models can be built, and model_dump() re-validated, in code.


def _address(value: object) -> IPAddress:
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return value
    if not isinstance(value, str):
        raise ValueError("an IP address is written as a string, e.g. \"172.19.1.1\"")
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an IPv4 or IPv6 address") from None


def _network(value: object) -> IPNetwork:
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return value
    if not isinstance(value, str):
        raise ValueError("a prefix is written as a string, e.g. \"20.10.1.0/24\"")
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        if "host bits set" in str(exc):
            fixed = ipaddress.ip_network(value, strict=False)
            raise ValueError(f"{value!r} has host bits set (did you mean {fixed}?)") from None
        raise ValueError(f"{value!r} is not an IP prefix") from None


def _interface(value: object) -> IPInterface:
    if isinstance(value, ipaddress.IPv4Interface | ipaddress.IPv6Interface):
        return value
    if not isinstance(value, str):
        raise ValueError("an address is written as a string, \"A\" or \"A/len\"")
    try:
        return ipaddress.ip_interface(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an address (\"A\" or \"A/len\")") from None


def _gre_key(value: object) -> int:
    """A GRE key as Cisco and iproute2 write it: a 32-bit number or a dotted quad."""
    if isinstance(value, bool):
        raise ValueError("a key is a number 0..4294967295 or a dotted quad")
    if isinstance(value, int):
        if not 0 <= value <= 0xFFFFFFFF:
            raise ValueError(f"key {value} is outside 0..4294967295")
        return value
    if isinstance(value, str):
        try:
            return int(ipaddress.IPv4Address(value))
        except ValueError:
            pass
    raise ValueError(f"{value!r} is not a key: a number 0..4294967295 or a dotted quad such as \"0.0.0.42\"")


def parse_duration(value: object) -> float:
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string such as \"300ms\"")
    if isinstance(value, int | float):
        try:
            return float(value)
        except OverflowError:  # TOML integers are unbounded in tomllib; float() is not
            raise ValueError(f"{value} seconds is not a usable duration") from None
    if isinstance(value, str):
        match = _DURATION.fullmatch(value)
        if match:
            number, unit = float(match.group(1)), match.group(2)
            # Divide rather than multiply by 0.001, so "51ms" is the float nearest 0.051, equal to 0.051.
            return number / 1000 if unit == "ms" else number * _UNIT_SECONDS[unit]
    raise ValueError(f"{value!r} is not a duration: seconds, or a string such as \"300ms\", \"2s\", \"1m\", \"1h\"")


def format_duration(seconds: float) -> str:
    """1.0 -> "1s", 0.2 -> "200ms", 2.5 -> "2.5s": the way this file lets a person write a duration."""
    if seconds < 1:
        return f"{seconds * 1000:.4g}ms"
    return f"{seconds:.4g}s"


def _table(value: object) -> int:
    if isinstance(value, str) and value in TABLE_NAMES:
        return TABLE_NAMES[value]
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 0xFFFFFFFF:
        if value in (253, 255):
            raise ValueError(f"table {value} is the kernel's default/local table, not for tunnel routes")
        return value
    raise ValueError(f"{value!r} is not a routing table: \"main\" or a number 1..4294967295")


def _ifname(value: object) -> str:
    if not isinstance(value, str) or not _IFNAME.fullmatch(value) or value in (".", ".."):
        raise ValueError(f"{value!r} is not an interface name: 1-15 characters of A-Z a-z 0-9 _ . -")
    return value


def _tunnel_name(value: object) -> str:
    name = _ifname(value)
    if name in KERNEL_NAMES:
        raise ValueError(f"{name!r} is {KERNEL_NAMES[name]}; give the tunnel another name")
    return name


def tos_value(value: object) -> object:
    checked = whole_number("tos", 0, 255, "inherit")(value)
    if isinstance(checked, int) and checked % 4:
        # ip_tunnel reads bit 0 as "inherit from the inner packet", and always takes the ECN bits (the low
        # two) from the inner packet: tos = 1, 2 or 3 would not do what it says.
        raise ValueError(f"tos {checked} sets the low two bits: an odd tos means \"inherit\" to the kernel, and"
                         f" the ECN bits are always copied from the inner packet; write DSCP x 4"
                         f" (the nearest: {checked & ~3}) or \"inherit\"")
    return checked


def keepalive_or_off(value: object) -> object:
    # `keepalive = false` switches off a keepalive a tunnel would inherit from [defaults].
    if value is False:
        return None
    if value is True:
        raise ValueError("keepalive is a table ([tunnel.keepalive]), or false to switch off the one from"
                         " [defaults]")
    return value


def whole_number(what: str, low: int, high: int, *words: str) -> Callable[[object], object]:
    """A validator for "an integer low..high, or one of these words", with one message a person can act on.

    pydantic would report each branch of the union separately ("Input should be less than or equal to 255").
    """
    choices = [f"{low}..{high}", *(f'"{word}"' for word in words)]
    allowed = " or ".join(choices) if len(choices) < 3 else f"{', '.join(choices[:-1])} or {choices[-1]}"

    def check(value: object) -> object:
        if value is None or (isinstance(value, str) and value in words):
            return value
        if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
            return value
        raise ValueError(f"{what} must be {allowed}, not {value!r}")

    return check


def keepalive_interval(value: object) -> float:
    seconds = parse_duration(value)
    if not 0.05 <= seconds <= 3600:  # also false for nan
        raise ValueError(f"interval must be 0.05..3600 seconds (\"50ms\"..\"1h\"), not {value!r}")
    return seconds


def dpd_delay_seconds(value: object) -> float:
    seconds = parse_duration(value)
    if not 1 <= seconds <= 3600:  # also false for nan
        raise ValueError(f"dpd_delay must be 1..3600 seconds (\"1s\"..\"1h\"), not {value!r}")
    return seconds


def nft_table_name(value: object) -> object:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,31}", value):
        raise ValueError(f"{value!r} is not an nftables table name: a letter, then up to 31 of A-Z a-z 0-9 _")
    return value


def absolute_path(example: str) -> Callable[[object], object]:
    def check(value: object) -> object:
        if not isinstance(value, str | Path) or not str(value) or "\0" in str(value):
            raise ValueError(f"{value!r} is not a path: write it as a string, e.g. \"{example}\"")
        if not Path(value).is_absolute():
            # The daemon's working directory is / under systemd and anything elsewhere: say where, not relative.
            raise ValueError(f"{str(value)!r} is a relative path: write it from /, e.g. \"{example}\"")
        return value

    return check


def optional(check: Callable[[object], object]) -> Callable[[object], object]:
    # TOML has no null: None only comes from code (a default, model_dump() validated again).
    return lambda value: value if value is None else check(value)


def listen_address(value: object) -> tuple[str, int]:
    """`[daemon] metrics_listen` as (host, port): "127.0.0.1:9474", "[::1]:9474", "0.0.0.0:9474" for every address.

    Only IP literals: a name would be resolved by asyncio in a thread, and at every start (review: no threads).
    """
    example = 'e.g. "127.0.0.1:9474" or "[::1]:9474"'
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not an address and port: write it as a string, {example}")
    host, colon, port = value.rpartition(":")
    if not colon or not host or value.endswith("]"):
        raise ValueError(f"{value!r} is not HOST:PORT, {example}")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address (host names are not resolved), {example}") from None
    if address.version == 6 and not bracketed:
        raise ValueError(f"{value!r}: an IPv6 address is written in brackets, e.g. \"[{host}]:9474\"")
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(f"{port!r} is not a TCP port: 1..65535, {example}")
    return str(address), int(port)


def listen(value: object) -> object:
    listen_address(value)
    return value


Address = Annotated[IPAddress, BeforeValidator(_address)]
Network = Annotated[IPNetwork, BeforeValidator(_network)]
Interface = Annotated[IPInterface, BeforeValidator(_interface)]
# The JSON Schema says what a person may write (editors check tunnels.toml against it), not the parsed type.
DURATION_TEXT = {"type": "string", "pattern": r"^\s*(\d+(\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*$"}
GreKey = Annotated[int, BeforeValidator(_gre_key), WithJsonSchema(
    {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 0xFFFFFFFF}, {"type": "string", "format": "ipv4"}]})]
Seconds = Annotated[float, BeforeValidator(parse_duration), WithJsonSchema(
    {"anyOf": [{"type": "number", "minimum": 0}, DURATION_TEXT]})]
TableId = Annotated[int, BeforeValidator(_table), WithJsonSchema(
    {"anyOf": [{"enum": sorted(TABLE_NAMES)}, {"type": "integer", "minimum": 1, "maximum": 0xFFFFFFFF}]})]
IfName = Annotated[str, BeforeValidator(_ifname), WithJsonSchema(
    {"type": "string", "pattern": f"^{_IFNAME.pattern}$"})]
TunnelName = Annotated[str, BeforeValidator(_tunnel_name), WithJsonSchema(
    {"type": "string", "pattern": f"^{_IFNAME.pattern}$", "not": {"enum": sorted(KERNEL_NAMES)}})]


class FieldProblem(ValueError):
    """A rule across several keys, naming the key (or ("routes", 1): the item) whose line the error points at."""

    def __init__(self, field: str | tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.path: tuple[str | int, ...] = (field,) if isinstance(field, str) else field


