"""tunnels.toml: the pydantic models of the user's contract, and loading them with errors a person can act on.

A config is the main file plus `tunnels.d/*.toml` beside it, merged in name order: `[daemon]` and
`[defaults]` are merged key by key (later files win), `[[tunnel]]` entries are appended. Every error names
the file, the line where the TOML text shows the field, and the field path (`tunnel[1].keepalive.interval`).
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
import stat
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import ErrorDetails

from greupd.gre import ETHERNET_MODES, IPV6_MODES, IPAddress, IPInterface, IPNetwork, Mode

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

# Cisco keepalives are defined for GRE over IPv4 carrying IP (the reply is an inner GRE packet the peer routes back).
KEEPALIVE_MODES: frozenset[str] = frozenset({"gre"})
# [defaults] keys a mode has no use for: a default applies to the tunnels it fits, and is not an error on the
# others (a [defaults.keepalive] beside an ip6gre tunnel). Written in the tunnel itself they are errors.
_DEFAULTS_NOT_FOR: Mapping[str, frozenset[str]] = {
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
_DURATION = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m)?\s*")
_UNIT_SECONDS = {"s": 1.0, "m": 60.0, None: 1.0}
_TABLE_NAMES = {"main": 254}


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


def _duration(value: object) -> float:
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
    raise ValueError(f"{value!r} is not a duration: seconds, or a string such as \"300ms\", \"2s\", \"1m\"")


def format_duration(seconds: float) -> str:
    """1.0 -> "1s", 0.2 -> "200ms", 2.5 -> "2.5s": the way this file lets a person write a duration."""
    if seconds < 1:
        return f"{seconds * 1000:.4g}ms"
    return f"{seconds:.4g}s"


def _table(value: object) -> int:
    if isinstance(value, str) and value in _TABLE_NAMES:
        return _TABLE_NAMES[value]
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


def _tos(value: object) -> object:
    checked = _whole_number("tos", 0, 255, "inherit")(value)
    if isinstance(checked, int) and checked % 4:
        # ip_tunnel reads bit 0 as "inherit from the inner packet", and always takes the ECN bits (the low
        # two) from the inner packet: tos = 1, 2 or 3 would not do what it says.
        raise ValueError(f"tos {checked} sets the low two bits: an odd tos means \"inherit\" to the kernel, and"
                         f" the ECN bits are always copied from the inner packet; write DSCP x 4"
                         f" (the nearest: {checked & ~3}) or \"inherit\"")
    return checked


def _keepalive_or_off(value: object) -> object:
    # `keepalive = false` switches off a keepalive a tunnel would inherit from [defaults].
    if value is False:
        return None
    if value is True:
        raise ValueError("keepalive is a table ([tunnel.keepalive]), or false to switch off the one from"
                         " [defaults]")
    return value


def _whole_number(what: str, low: int, high: int, *words: str) -> Callable[[object], object]:
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


def _keepalive_interval(value: object) -> float:
    seconds = _duration(value)
    if not 0.05 <= seconds <= 3600:  # also false for nan
        raise ValueError(f"interval must be 0.05..3600 seconds (\"50ms\"..\"60m\"), not {value!r}")
    return seconds


def _nft_table(value: object) -> object:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,31}", value):
        raise ValueError(f"{value!r} is not an nftables table name: a letter, then up to 31 of A-Z a-z 0-9 _")
    return value


def _absolute_path(example: str) -> Callable[[object], object]:
    def check(value: object) -> object:
        if not isinstance(value, str | Path) or not str(value) or "\0" in str(value):
            raise ValueError(f"{value!r} is not a path: write it as a string, e.g. \"{example}\"")
        if not Path(value).is_absolute():
            # The daemon's working directory is / under systemd and anything elsewhere: say where, not relative.
            raise ValueError(f"{str(value)!r} is a relative path: write it from /, e.g. \"{example}\"")
        return value

    return check


def _optional(check: Callable[[object], object]) -> Callable[[object], object]:
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


def _listen(value: object) -> object:
    listen_address(value)
    return value


Address = Annotated[IPAddress, BeforeValidator(_address)]
Network = Annotated[IPNetwork, BeforeValidator(_network)]
Interface = Annotated[IPInterface, BeforeValidator(_interface)]
# The JSON Schema says what a person may write (editors check tunnels.toml against it), not the parsed type.
_DURATION_TEXT = {"type": "string", "pattern": r"^\s*(\d+(\.\d*)?|\.\d+)\s*(ms|s|m)?\s*$"}
GreKey = Annotated[int, BeforeValidator(_gre_key), WithJsonSchema(
    {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 0xFFFFFFFF}, {"type": "string", "format": "ipv4"}]})]
Seconds = Annotated[float, BeforeValidator(_duration), WithJsonSchema(
    {"anyOf": [{"type": "number", "minimum": 0}, _DURATION_TEXT]})]
TableId = Annotated[int, BeforeValidator(_table), WithJsonSchema(
    {"anyOf": [{"enum": sorted(_TABLE_NAMES)}, {"type": "integer", "minimum": 1, "maximum": 0xFFFFFFFF}]})]
IfName = Annotated[str, BeforeValidator(_ifname), WithJsonSchema(
    {"type": "string", "pattern": f"^{_IFNAME.pattern}$"})]
TunnelName = Annotated[str, BeforeValidator(_tunnel_name), WithJsonSchema(
    {"type": "string", "pattern": f"^{_IFNAME.pattern}$", "not": {"enum": sorted(KERNEL_NAMES)}})]


class _FieldProblem(ValueError):
    """A rule across several keys, naming the key (or ("routes", 1): the item) whose line the error points at."""

    def __init__(self, field: str | tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.path: tuple[str | int, ...] = (field,) if isinstance(field, str) else field


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KeepaliveConfig(_Model):
    interval: Annotated[float, BeforeValidator(_keepalive_interval), WithJsonSchema(
        {"anyOf": [{"type": "number", "minimum": 0.05, "maximum": 3600}, _DURATION_TEXT]})] = 10.0
    retries: Annotated[StrictInt, Field(ge=1, le=255), BeforeValidator(_whole_number("retries", 1, 255))] = 3
    up_after: Annotated[StrictInt, Field(ge=1, le=255), BeforeValidator(_whole_number("up_after", 1, 255))] = 1
    action: Literal["routes", "link"] = "routes"
    answer: Literal["daemon", "kernel", "off"] = "daemon"


class MssConfig(_Model):
    # 536 is the smallest MSS every IPv4 host must accept (RFC 879); 65495 fits a 64 KiB loopback MTU.
    clamp: Annotated[Literal["pmtu", "off"] | Annotated[StrictInt, Field(ge=536, le=65495)],
                     BeforeValidator(_whole_number("clamp", 536, 65495, "pmtu", "off"))] = "off"


class NatConfig(_Model):
    into_tunnel: list[Network] = []
    from_tunnel: list[IfName] = []


# strongSwan proposal syntax: algorithms joined by "-", several proposals by ","; e.g. aes256gcm16-prfsha384-ecp384.
_PROPOSALS = re.compile(r"[a-z0-9_]+(-[a-z0-9_]+)*(\s*,\s*[a-z0-9_]+(-[a-z0-9_]+)*)*")
# Strong defaults (AES-GCM-256, SHA-384 PRF, NIST P-384), CNSA-like, offered by every strongSwan and most vendors.
DEFAULT_IKE_PROPOSALS = "aes256gcm16-prfsha384-ecp384"
DEFAULT_ESP_PROPOSALS = "aes256gcm16-ecp384"


def _proposals(value: object) -> object:
    if not isinstance(value, str) or not _PROPOSALS.fullmatch(value.strip()) or "default" in value.split("-"):
        raise ValueError(f"{value!r} is not a strongSwan proposal list, e.g. \"{DEFAULT_IKE_PROPOSALS}\""
                         " (algorithms joined by \"-\", proposals by \",\")")
    return value.strip()


def _ike_identity(value: object) -> object:
    if not isinstance(value, str) or not value.strip() or any(c in value for c in "\0\n"):
        raise ValueError(f"{value!r} is not an IKE identity, e.g. \"172.19.1.1\", \"router-a.example.net\","
                         " \"C=CH, O=example, CN=router-a\"")
    return value


FilePath = Annotated[Path, BeforeValidator(_absolute_path("/etc/greupd/psk/My_Tunnel")),
                     WithJsonSchema({"type": "string"})]
Proposals = Annotated[str, BeforeValidator(_proposals), WithJsonSchema({"type": "string"})]


def secret_file_problem(path: Path) -> str | None:
    """Why a pre-shared key (or private key) file cannot be used, or None: it must exist, hold a key, and be
    root's alone.

    A key that others can read is a key others may have: refuse it rather than negotiate with it.
    """
    try:
        info = path.stat()
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror or exc}"
    if not stat.S_ISREG(info.st_mode):
        return f"{path} is not a regular file"
    if info.st_mode & 0o077:
        return (f"{path} is readable or writable by others (mode {stat.S_IMODE(info.st_mode):04o}):"
                f" chmod 600 {path}")
    if info.st_uid != 0 and info.st_uid != os.geteuid():
        return f"{path} is owned by uid {info.st_uid}, not root: chown root {path}"
    try:
        if not path.read_bytes().strip():
            return f"{path} is empty: write the key into it"
    except PermissionError:
        # Under the shipped unit the daemon runs as user greupd: the key must be that user's (mode 600).
        return f"cannot read {path} as uid {os.geteuid()}: chown it to the user greupd runs as, mode 600"
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror or exc}"
    return None


class IpsecConfig(_Model):
    """GRE over IPsec: ESP in transport mode for IP protocol 47 between local and remote, through strongSwan."""

    psk_file: FilePath | None = None  # the pre-shared key, in a root-only file; never in tunnels.toml
    cert: FilePath | None = None  # or certificates: ours, our private key, and the CA that signed the peer's
    key: FilePath | None = None
    ca: FilePath | None = None
    local_id: Annotated[str, BeforeValidator(_ike_identity)] | None = None  # default: local (PSK) or cert subject
    remote_id: Annotated[str, BeforeValidator(_ike_identity)] | None = None  # default: remote (PSK), any (cert)
    proposals: Proposals = DEFAULT_IKE_PROPOSALS  # IKE
    esp_proposals: Proposals = DEFAULT_ESP_PROPOSALS
    start_action: Literal["trap", "start"] = "trap"  # trap: negotiate on the first GRE packet; start: at once
    dpd_delay: Annotated[float, BeforeValidator(_duration), WithJsonSchema(
        {"anyOf": [{"type": "number", "minimum": 1}, _DURATION_TEXT]}), Field(ge=1, le=3600)] = 10.0
    require: StrictBool = True  # GRE to/from the remote that is not ESP-protected is dropped (nftables)

    @model_validator(mode="after")
    def _one_way_to_authenticate(self) -> IpsecConfig:
        certs = [name for name in ("cert", "key", "ca") if getattr(self, name) is not None]
        if self.psk_file is not None and certs:
            raise _FieldProblem(certs[0], "give either psk_file, or cert, key and ca, not both")
        if self.psk_file is None and not certs:
            raise _FieldProblem("psk_file", "[tunnel.ipsec] needs psk_file, or cert, key and ca")
        if certs and len(certs) < 3:
            missing = next(name for name in ("cert", "key", "ca") if getattr(self, name) is None)
            raise _FieldProblem(missing, f"certificate authentication needs cert, key and ca; {missing} is missing")
        # Checked here, so `greupd check` and a reload say it before anything is sent to charon.
        for name in ("psk_file", "key"):
            path: Path | None = getattr(self, name)
            if path is not None and (problem := secret_file_problem(path)) is not None:
                raise _FieldProblem(name, problem)
        for name in ("cert", "ca"):
            path = getattr(self, name)
            if path is not None and not os.access(path, os.R_OK):
                raise _FieldProblem(name, f"cannot read {path}")
        return self


class TunnelConfig(_Model):
    name: TunnelName
    mode: Mode = "gre"
    local: Address
    remote: Address
    key: GreKey | None = None
    ikey: GreKey | None = None
    okey: GreKey | None = None
    ttl: Annotated[Annotated[StrictInt, Field(ge=1, le=255)] | Literal["inherit"],
                   BeforeValidator(_whole_number("ttl", 1, 255, "inherit"))] = 64
    tos: Annotated[Annotated[StrictInt, Field(ge=0, le=255, multiple_of=4)] | Literal["inherit"],
                   BeforeValidator(_tos)] = "inherit"
    pmtudisc: StrictBool = True
    # ip6 modes only; None: 4, as iproute2 makes an ip6gre tunnel (gre.DEFAULT_ENCAP_LIMIT).
    encap_limit: Annotated[Annotated[StrictInt, Field(ge=0, le=255)] | Literal["none"] | None,
                           BeforeValidator(_whole_number("encap_limit", 0, 255, "none"))] = None
    # 68: the smallest MTU an IPv4 link may have (RFC 791), and the kernel's floor for GRE devices.
    mtu: Annotated[Annotated[StrictInt, Field(ge=68, le=65535)] | None,
                   BeforeValidator(_whole_number("mtu", 68, 65535))] = None
    address: Interface | None = None
    peer: Address | None = None
    routes: list[Network] = []
    metric: Annotated[StrictInt, Field(ge=0, le=0xFFFFFFFF),
                      BeforeValidator(_whole_number("metric", 0, 0xFFFFFFFF))] = 0
    table: TableId = 254
    enabled: StrictBool = True
    # Take over a same-named link that is not greupd's when its kind, endpoints and keys match (spec.md).
    adopt: StrictBool = False
    keepalive: Annotated[KeepaliveConfig | None, BeforeValidator(_keepalive_or_off),
                         Field(json_schema_extra=lambda schema: schema["anyOf"].append({"const": False}))] = None
    mss: MssConfig = MssConfig()
    nat: NatConfig = NatConfig()
    ipsec: IpsecConfig | None = None

    @model_validator(mode="after")
    def _consistent(self) -> TunnelConfig:
        # Each rule names the key a person would change, so the error points at that key's line.
        underlay = 6 if self.mode in IPV6_MODES else 4
        for name in ("local", "remote"):
            addr: IPAddress = getattr(self, name)
            if addr.version != underlay:
                raise _FieldProblem(name, f"{name} {addr} is IPv{addr.version} but mode {self.mode}"
                                          f" needs IPv{underlay}")
        if self.local == self.remote:
            raise _FieldProblem("remote", "local and remote are the same address")
        if self.key is not None and (self.ikey is not None or self.okey is not None):
            raise _FieldProblem("ikey" if self.ikey is not None else "okey",
                                "give either key, or ikey/okey, not both")
        if self.peer is not None:
            if self.address is None:
                raise _FieldProblem("peer", "peer needs an address on this side")
            if self.peer.version != self.address.version:
                raise _FieldProblem("peer", f"peer {self.peer} and address {self.address.ip}"
                                            " are of different families")
            if self.address.network.prefixlen != self.address.max_prefixlen:
                raise _FieldProblem("address", "with peer, write address without a prefix length"
                                               " (ip addr add A peer P)")
        if self.mode in ETHERNET_MODES and self.routes and self.peer is None:
            raise _FieldProblem("routes", f"mode {self.mode} carries Ethernet: its routes need a peer"
                                          " to use as gateway")
        if self.ttl != "inherit" and not self.pmtudisc:
            # The kernel refuses a fixed TTL with path-MTU discovery off (ip: "ttl != 0 and nopmtudisc").
            raise _FieldProblem("pmtudisc", "pmtudisc = false needs ttl = \"inherit\""
                                            " (the kernel refuses a fixed ttl without it)")
        if self.keepalive is not None and self.mode not in KEEPALIVE_MODES:
            raise _FieldProblem("keepalive", f"keepalive is defined for mode gre only (Cisco GRE/IPv4),"
                                             f" not {self.mode} (keepalive = false switches off a default)")
        if self.keepalive is not None:
            self._check_keepalive_endpoints()
        if self.mode in IPV6_MODES and self.tos != "inherit":
            raise _FieldProblem("tos", f"greupd sets no tos on mode {self.mode} (the IPv6 traffic class);"
                                       " leave tos out")
        if self.mode in IPV6_MODES and not self.pmtudisc:
            raise _FieldProblem("pmtudisc", f"pmtudisc is a setting of the IPv4 modes, not {self.mode}")
        if self.mode not in IPV6_MODES and self.encap_limit is not None:
            # IPv4 has no Tunnel Encapsulation Limit option: ip_gre would ignore it, so say so.
            raise _FieldProblem("encap_limit", f"encap_limit is a setting of the IPv6 modes (ip6gre, ip6gretap),"
                                               f" not {self.mode}; leave it out")
        if self.mtu is not None:
            highest = MAX_MTU[self.mode][self.output_key is not None]
            if self.mtu > highest:
                keyed = " with an output key" if self.output_key is not None else ""
                raise _FieldProblem("mtu", f"mtu {self.mtu} is more than the kernel allows for mode {self.mode}"
                                           f"{keyed}: at most {highest} (65535 less the outer headers)")
        self._check_not_into_itself()
        return self

    def _check_keepalive_endpoints(self) -> None:
        if self.local.is_unspecified:
            raise _FieldProblem("keepalive", f"keepalive needs a fixed local address, not {self.local}: replies"
                                             " are matched to the tunnel by its local and remote")
        broadcast = ipaddress.IPv4Address("255.255.255.255")
        if self.remote.is_multicast or self.remote.is_unspecified or self.remote == broadcast:
            raise _FieldProblem("keepalive", f"keepalive needs a unicast remote, not {self.remote}: a probe is"
                                             " answered by one peer")

    def _check_not_into_itself(self) -> None:
        # The outer packets to `remote` are routed like any other: a route of the tunnel's own that covers the
        # remote sends GRE into the tunnel itself (ip_tunnel_xmit drops it as a loop) whenever no more specific
        # route to the remote exists, which is exactly when the underlay's own route is gone.
        if self.peer is not None and self.peer == self.remote:
            raise _FieldProblem("peer", f"peer {self.peer} is also the remote: packets to the remote would be"
                                        " routed into the tunnel itself")
        if self.address is not None and (self.address.ip == self.remote or (
                self.peer is None and self.address.network.prefixlen > 0 and self.remote in self.address.network)):
            raise _FieldProblem("address", f"address {self.address} covers the remote {self.remote}: packets to"
                                           " the remote would be routed into the tunnel itself")
        if self.table == _TABLE_NAMES["main"]:
            for number, prefix in enumerate(self.routes):
                if self.remote in prefix:
                    raise _FieldProblem(("routes", number), (
                        f"route {prefix} in table main covers the tunnel's own remote {self.remote}: GRE packets"
                        " to the remote would be routed into the tunnel itself whenever no more specific route"
                        " to it exists. Put such routes in a table of their own (table = 100) that an"
                        " `ip rule` selects for your LAN's traffic, or leave the remote out of the prefix"))
        if self.mode in ETHERNET_MODES and self.peer is not None:
            for number, prefix in enumerate(self.routes):
                if prefix.version != self.peer.version:
                    raise _FieldProblem(("routes", number), (
                        f"route {prefix} is IPv{prefix.version} but peer {self.peer} is IPv{self.peer.version}:"
                        f" mode {self.mode} routes via the peer, so only IPv{self.peer.version} routes can"
                        " resolve"))

    @property
    def input_key(self) -> int | None:
        return self.key if self.key is not None else self.ikey

    @property
    def output_key(self) -> int | None:
        return self.key if self.key is not None else self.okey


class DaemonConfig(_Model):
    ip_forward: StrictBool = True
    # Under the shipped unit (ProtectSystem=strict) only /run/greupd is writable: a socket elsewhere needs a
    # ReadWritePaths= drop-in, or the daemon stops at start with "cannot create the control socket".
    control_socket: Annotated[Path, BeforeValidator(_absolute_path("/run/greupd/control.sock"))] = \
        DEFAULT_CONTROL_SOCKET
    # The last config that applied cleanly, and what must survive a restart (greupd/state.py);
    # $GREUPD_STATE_DIR and $STATE_DIRECTORY (systemd's StateDirectory=) take precedence.
    state_dir: Annotated[Path, BeforeValidator(_absolute_path("/var/lib/greupd"))] = DEFAULT_STATE_DIR
    nft_table: Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_]{0,31}$"), BeforeValidator(_nft_table)] = "greupd"
    on_exit: Literal["keep", "remove"] = "keep"
    # strongSwan's control socket, for [tunnel.ipsec]
    vici_socket: Annotated[Path, BeforeValidator(_absolute_path("/var/run/charon.vici"))] = DEFAULT_VICI_SOCKET
    # Prometheus metrics (greupd/metrics.py): a file for node_exporter's textfile collector, rewritten atomically
    # whenever it changes, and GET /metrics on a TCP address; `greupd metrics` prints the same text.
    metrics_textfile: Annotated[Path | None, BeforeValidator(_optional(_absolute_path(
        "/var/lib/prometheus/node-exporter/greupd.prom")))] = None
    metrics_listen: Annotated[str | None, BeforeValidator(_optional(_listen)), WithJsonSchema(
        {"type": "string", "pattern": r"^(\d{1,3}(\.\d{1,3}){3}|\[[0-9A-Fa-f:.]+\]):\d{1,5}$"})] = None


@dataclass(frozen=True)
class Config:
    """A whole validated configuration: what the daemon should make true."""

    daemon: DaemonConfig
    tunnels: tuple[TunnelConfig, ...]
    files: tuple[Path, ...] = ()
    # The text of each file as it was validated, for keeping this config as the last good one (state.py).
    sources: tuple[tuple[Path, str], ...] = field(default=(), compare=False, repr=False)

    def tunnel(self, name: str) -> TunnelConfig | None:
        return next((t for t in self.tunnels if t.name == name), None)


# --- errors -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigProblem:
    file: Path
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else str(self.file)
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


class ConfigError(Exception):
    """One or more problems in the configuration; each names file, line and field."""

    def __init__(self, problems: Iterable[ConfigProblem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


# --- where fields stand in the TOML text ---------------------------------------------------------------

Path_ = tuple[str | int, ...]
_SIMPLE_KEY = r"""(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|'[^']*')"""
_DOTTED_KEY = rf"{_SIMPLE_KEY}(?:\s*\.\s*{_SIMPLE_KEY})*"
_HEADER = re.compile(rf"^\s*(\[\[?)\s*({_DOTTED_KEY})\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(rf"^\s*({_DOTTED_KEY})\s*=")


def _split_dotted(text: str) -> list[str]:
    """The parts of a dotted key as TOML reads them: `a."b.c"` is ["a", "b.c"], `"\\u0041"` is ["A"]."""
    try:
        nested: object = tomllib.loads(f"{text} = 0")
    except tomllib.TOMLDecodeError:
        return []
    parts = []
    while isinstance(nested, dict) and len(nested) == 1:
        [(part, nested)] = nested.items()
        parts.append(part)
    return parts


def locate_fields(text: str) -> dict[Path_, int]:
    """Map field paths to the line where they are written, e.g. ("tunnel", 1, "keepalive", "interval") -> 23.

    A line-oriented reading of TOML headers and `key =` lines, good enough to point a person at the right
    place; tomllib itself keeps no positions.
    """
    lines: dict[Path_, int] = {}
    counters: dict[tuple[str, ...], int] = {}
    table: Path_ = ()
    for number, raw in _statement_lines(text):
        header = _HEADER.match(raw)
        if header and (parts := _split_dotted(header.group(2))):
            if header.group(1) == "[[":
                base = tuple(parts)
                counters[base] = counters.get(base, -1) + 1
                table = (*parts, counters[base])
            else:
                # [tunnel.keepalive] belongs to the latest [[tunnel]]
                resolved: list[str | int] = []
                for i, part in enumerate(parts):
                    resolved.append(part)
                    array = tuple(parts[: i + 1])
                    if array in counters:
                        resolved.append(counters[array])
                table = tuple(resolved)
            _first_seen(lines, table, number)
            continue
        key = _KEY.match(raw)
        if key:
            _first_seen(lines, (*table, *_split_dotted(key.group(1))), number)
    return lines


def _statement_lines(text: str) -> Iterator[tuple[int, str]]:
    """The lines where a TOML statement (a [header] or `key = ...`) may start, numbered from 1.

    Skipped: lines inside a multi-line string or inside a value spanning lines (an array), where text that
    looks like `[x]` or `k =` is data.
    """
    closing: str | None = None  # the quotes that end the multi-line string we are in
    depth = 0  # brackets of a value left open at the end of a line
    # TOML ends lines at \n only; str.splitlines would also split inside strings (at \u2028, \x0c, ...).
    for number, line in enumerate(text.split("\n"), start=1):
        header = False
        if closing is None and depth == 0:
            yield number, line
            header = line.lstrip().startswith("[")
        i = 0
        while i < len(line):
            if closing is not None:
                if closing == '"""' and line[i] == "\\":
                    i += 2
                elif line.startswith(closing, i):
                    i += 3
                    for _ in range(2):  # up to two quotes right before the closing three are content
                        i += line.startswith(closing[0], i)
                    closing = None
                else:
                    i += 1
            elif line[i] == "#":
                break
            elif line.startswith(('"""', "'''"), i):
                closing, i = line[i:i + 3], i + 3
            elif line[i] in "\"'":
                end = i + 1
                while end < len(line) and line[end] != line[i]:
                    end += 2 if line[i] == '"' and line[end] == "\\" else 1
                i = end + 1
            else:
                if not header and line[i] in "[{":
                    depth += 1
                elif not header and line[i] in "]}":
                    depth = max(0, depth - 1)
                i += 1


def _first_seen(lines: dict[Path_, int], path: Path_, number: int) -> None:
    # Every enclosing table is written here too if not before: `[[tunnels]]` is where the key `tunnels` is.
    for end in range(1, len(path) + 1):
        lines.setdefault(path[:end], number)


def _line_of(lines: Mapping[Path_, int], path: Path_) -> int | None:
    for end in range(len(path), 0, -1):
        if path[:end] in lines:
            return lines[path[:end]]
    return None


def _field_text(path: Path_) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


# --- loading -----------------------------------------------------------------------------------------


@dataclass
class _Source:
    file: Path
    data: dict[str, Any]
    text: str = ""

    @functools.cached_property
    def lines(self) -> dict[Path_, int]:
        """Where each field stands; worked out only when a problem needs a line (it costs half a load)."""
        return locate_fields(self.text)


def config_files(path: Path) -> list[Path]:
    """The main file, then tunnels.d/*.toml beside it in name order."""
    dropins = path.parent / "tunnels.d"
    extra = sorted(p for p in dropins.glob("*.toml") if p.is_file()) if dropins.is_dir() else []
    return [path, *extra]


def _read(file: Path) -> _Source:
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([ConfigProblem(file, None, "", f"cannot read: {exc.strerror or exc}")]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([ConfigProblem(file, None, "", f"not UTF-8 text: {exc.reason}")]) from None
    return _parse(file, text)


_TOML_AT = re.compile(r"\s*\((?:at line (\d+), column \d+|at end of document)\)\s*$")


# `[[tunnel]]` alone on its line (a comment may follow): where a tunnel's table starts.
_TUNNEL_HEADER = re.compile(r"^[ \t]*\[\[tunnel\]\][ \t]*(?:#.*)?$", re.MULTILINE)
# The parsed pieces of the last texts read (see _parse_in_pieces), by their text.
_PIECES: dict[str, dict[str, Any]] = {}


def _parse_in_pieces(text: str) -> dict[str, Any] | None:
    """tomllib.loads(text), from pieces cut at each `[[tunnel]]` line, each piece parsed once and kept.

    A reload that changes one tunnel among thousands then parses that tunnel's table only (tomllib, pure
    Python, takes ~40 us a table natively and several times that in a slow VM). None whenever the cut might
    not give what the whole text gives, and the caller parses the whole text (which also places any error):
    a piece that does not parse (a cut inside a multi-line string or array leaves it unterminated), or a key
    other than `tunnel` in two pieces, or `tunnel` as anything but an array of tables.
    """
    starts = [0, *(m.start() for m in _TUNNEL_HEADER.finditer(text))]
    pieces = [text[a:b] for a, b in zip(starts, [*starts[1:], len(text)], strict=True) if b > a]
    data: dict[str, Any] = {"tunnel": []}
    for number, piece in enumerate(pieces):
        parsed = _PIECES.get(piece)
        if parsed is None:
            try:
                parsed = tomllib.loads(piece)
            except tomllib.TOMLDecodeError:
                return None
        _PIECES[piece] = parsed
        for key, value in parsed.items():
            if key == "tunnel":
                # Only from a piece that starts with its [[tunnel]] line: `tunnel = [...]` before the first
                # one would be an error in the whole text (a static array cannot be appended to).
                if not isinstance(value, list) or (number == 0 and starts[1:2] != [0]):
                    return None
                data["tunnel"] += value
            elif key in data:
                return None
            else:
                data[key] = value
    if not data["tunnel"]:
        del data["tunnel"]
    return data


def _parse(file: Path, text: str) -> _Source:
    if len(_PIECES) > 4 * text.count("[[tunnel]]") + 64:
        _PIECES.clear()  # old pieces, of texts edited since: keep the cache about the size of the config
    data = _parse_in_pieces(text)
    if data is not None:
        return _Source(file, data, text)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # Python 3.11's TOMLDecodeError keeps the position only in its message ("... (at line 5, column 7)").
        position = _TOML_AT.search(str(exc))
        line: int | None = getattr(exc, "lineno", None)
        if line is None and position is not None:
            line = int(position.group(1)) if position.group(1) else text.count("\n") + 1
        message = _TOML_AT.sub("", str(exc))
        raise ConfigError([ConfigProblem(file, line, "", f"TOML syntax: {message}")]) from None
    return _Source(file, data, text)


def _deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _written(data: object, path: Path_) -> bool:
    """Whether `path` is written in this raw TOML data, i.e. whether an error at `path` comes from it."""
    for part in path:
        in_list = isinstance(part, int) and isinstance(data, list) and 0 <= part < len(data)
        in_table = isinstance(part, str) and isinstance(data, dict) and part in data
        if not (in_list or in_table):
            return False
        data = data[part]  # type: ignore[index]
    return True


def _message(error: ErrorDetails, loc: Path_) -> str:
    name = _field_text(loc) or "value"
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"unknown key {loc[-1]!r}" if loc else "unknown key"
    if kind == "missing":
        return f"required key {name!r} is missing"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{name} must be a table"
    if kind == "list_type":
        return f"{name} must be a list, e.g. [\"...\"]"
    if kind == "bool_type":
        return f"{name} must be true or false"
    if kind == "string_type":
        return f"{name} must be a string"
    if kind == "literal_error":
        expected = error.get("ctx", {}).get("expected", "one of the listed words")
        return f"{name} must be {expected}, not {error['input']!r}"
    return error["msg"].removeprefix("Value error, ")


# Where an error at a model-relative path stands: the source, and the path of that model in it
# (("tunnel", 1) or ("defaults",)); None drops the error.
_Place = Callable[[Path_], "tuple[_Source, Path_] | None"]


def _problems(exc: ValidationError, place: _Place, rules_across_keys: bool = True) -> list[ConfigProblem]:
    found = []
    for error in exc.errors(include_url=False):
        loc: Path_ = tuple(p for p in error["loc"] if not (isinstance(p, str) and (
            p.startswith(("function-", "literal[", "constrained-", "lax-", "json-")) or p in ("int", "str"))))
        cause = error.get("ctx", {}).get("error")
        if isinstance(cause, _FieldProblem):
            if not rules_across_keys:
                continue
            loc = (*loc, *cause.path)
        where = place(loc)
        if where is None:
            continue
        source, prefix = where
        full = (*prefix, *loc)
        found.append(ConfigProblem(source.file, _line_of(source.lines, full), _field_text(full),
                                   _message(error, loc)))
    # pydantic reports each branch of a union; keep one line per field
    unique: dict[tuple[Path, str], ConfigProblem] = {}
    for problem in found:
        unique.setdefault((problem.file, problem.field), problem)
    return list(unique.values())


_TOP_KEYS = ("daemon", "defaults", "tunnel")


def load_config(path: Path) -> Config:
    """Read, merge and validate the config at `path` (and its tunnels.d); raise ConfigError listing every problem."""
    return _validate([_read(file) for file in config_files(path)])


def load_config_sources(sources: Sequence[tuple[Path, str]]) -> Config:
    """Validate files given as (name, text), main file first: a config kept as text (the last good one)."""
    if not sources:
        raise ConfigError([ConfigProblem(Path("<none>"), None, "", "no config files")])
    return _validate([_parse(file, text) for file, text in sources])


def read_daemon_table(path: Path) -> dict[str, object]:
    """[daemon] as the files on disk write it, merged like load_config, with tomllib alone: nothing validated.

    For what must work while the config is half-edited: `greupd reload` and `status` finding the control
    socket, `greupd run` finding state_dir. A file that does not parse adds nothing.
    """
    merged: dict[str, Any] = {}
    for file in config_files(path):
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        try:
            daemon = tomllib.loads(text).get("daemon")
        except tomllib.TOMLDecodeError:
            # The syntax error is usually in the tunnel being edited: try the [daemon] table on its own.
            try:
                daemon = tomllib.loads(_daemon_block(text)).get("daemon")
            except tomllib.TOMLDecodeError:
                continue
        if isinstance(daemon, dict):
            merged = _deep_merge(merged, daemon)
    return merged


_DAEMON_HEADER = re.compile(r"^\s*\[\s*daemon\s*\]\s*(#.*)?$")


def _daemon_block(text: str) -> str:
    """The lines of the `[daemon]` table: from its header to the next header."""
    block: list[str] = []
    for line in text.split("\n"):
        if _DAEMON_HEADER.match(line):
            block = [line]
        elif block and line.lstrip().startswith("["):
            break
        elif block:
            block.append(line)
    return "\n".join(block)


def unvalidated_path(path: Path, key: str, default: Path) -> Path:
    """[daemon] `key` of the config at `path` if it is written as an absolute path, else `default`."""
    value = read_daemon_table(path).get(key)
    if isinstance(value, str) and value.startswith("/") and "\0" not in value:
        return Path(value)
    return default


def _last_writer(sources: list[_Source], section: str, loc: Path_) -> _Source | None:
    """The last file whose [section] writes `loc`: merging lets later files win, so its line is the one in force."""
    return next((s for s in reversed(sources) if _written(s.data.get(section), loc)), None)


# The tunnels of the last config validated, by the text of their merged table: a reload that changes one
# tunnel among thousands validates that one (pydantic costs ~0.1 ms a table). TunnelConfig is frozen, so a
# tunnel object can be shared by the old config and the new one.
_VALIDATED: dict[str, TunnelConfig] = {}


def _validate(sources: list[_Source]) -> Config:
    problems: list[ConfigProblem] = []
    daemon_raw: dict[str, Any] = {}
    defaults_raw: dict[str, Any] = {}
    for source in sources:
        for key in source.data:
            if key not in _TOP_KEYS:
                problems.append(ConfigProblem(source.file, _line_of(source.lines, (key,)), key,
                                              f"unknown key {key!r} (expected [daemon], [defaults], [[tunnel]])"))
        for section in ("daemon", "defaults"):
            if section in source.data and not isinstance(source.data[section], dict):
                problems.append(ConfigProblem(source.file, _line_of(source.lines, (section,)), section,
                                              f"{section} must be a table: [{section}]"))
        if isinstance(source.data.get("daemon"), dict):
            daemon_raw = _deep_merge(daemon_raw, source.data["daemon"])
        if isinstance(source.data.get("defaults"), dict):
            defaults_raw = _deep_merge(defaults_raw, source.data["defaults"])

    def in_daemon(loc: Path_) -> tuple[_Source, Path_]:
        owner = _last_writer(sources, "daemon", loc) or _last_writer(sources, "daemon", ()) or sources[0]
        return owner, ("daemon",)

    def in_defaults(loc: Path_) -> tuple[_Source, Path_] | None:
        owner = _last_writer(sources, "defaults", loc) if loc else None
        return (owner, ("defaults",)) if owner is not None else None

    try:
        daemon = DaemonConfig.model_validate(daemon_raw)
    except ValidationError as exc:
        daemon = DaemonConfig()
        problems += _problems(exc, in_daemon)
    named_default = _last_writer(sources, "defaults", ("name",))
    if named_default is not None:
        problems.append(ConfigProblem(named_default.file, _line_of(named_default.lines, ("defaults", "name")),
                                      "defaults.name", "a name cannot be a default: every tunnel needs its own"))
    problems += _defaults_problems(defaults_raw, in_defaults)

    tunnels: list[tuple[TunnelConfig, _Source, int]] = []
    validated: dict[str, TunnelConfig] = {}
    for source in sources:
        entries = source.data.get("tunnel", [])
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            problems.append(ConfigProblem(source.file, _line_of(source.lines, ("tunnel",)), "tunnel",
                                          "tunnels are written as [[tunnel]] tables"))
            continue
        for index, entry in enumerate(entries):

            def in_tunnel(loc: Path_, source: _Source = source, index: int = index,
                          entry: dict[str, Any] = entry) -> tuple[_Source, Path_] | None:
                # A value the tunnel does not write itself came from [defaults]: point at that line instead.
                if loc and not _written(entry, loc):
                    return in_defaults(loc) or (source, ("tunnel", index))
                return source, ("tunnel", index)

            merged = _deep_merge(_defaults_for(defaults_raw, entry), entry)
            key = repr(merged)  # TOML values only: the text of the table as validated, defaults included
            tunnel_or_none = _VALIDATED.get(key)
            if tunnel_or_none is None:
                try:
                    tunnel_or_none = TunnelConfig.model_validate(merged)
                except ValidationError as exc:
                    problems += _problems(exc, in_tunnel)
                    continue
            validated[key] = tunnel_or_none
            tunnels.append((tunnel_or_none, source, index))
    _VALIDATED.clear()
    _VALIDATED.update(validated)
    problems += _cross_tunnel_problems(tunnels)
    if not daemon.ip_forward:
        problems += _forwarding_problems(tunnels, in_defaults)
    if problems:
        # A bad default shows up once per tunnel that inherits it: say it once, and in reading order.
        order = {source.file: number for number, source in enumerate(sources)}
        raise ConfigError(sorted(dict.fromkeys(problems), key=lambda p: (order.get(p.file, 0), p.line or 0)))
    return Config(daemon, tuple(t for t, _, _ in tunnels), tuple(s.file for s in sources),
                  tuple((s.file, s.text) for s in sources))


def _defaults_for(defaults_raw: dict[str, Any], entry: Mapping[str, Any]) -> dict[str, Any]:
    """[defaults] as they apply to one tunnel: without the keys its mode has no use for."""
    mode = entry.get("mode", defaults_raw.get("mode", "gre"))
    unused = _DEFAULTS_NOT_FOR.get(mode, frozenset()) if isinstance(mode, str) else frozenset()
    return {key: value for key, value in defaults_raw.items() if key not in unused}


def _forwarding_problems(tunnels: list[tuple[TunnelConfig, _Source, int]], in_defaults: _Place) -> list[ConfigProblem]:
    """With [daemon] ip_forward = false the kernel forwards nothing, so it cannot reflect a peer's keepalive."""
    problems = []
    for tunnel, source, index in tunnels:
        if tunnel.keepalive is None or tunnel.keepalive.answer != "kernel" or not tunnel.enabled:
            continue
        loc: Path_ = ("keepalive", "answer")
        where: tuple[_Source, Path_] = (source, ("tunnel", index))
        if not _written(source.data["tunnel"][index], loc):
            where = in_defaults(loc) or where
        owner, prefix = where
        problems.append(ConfigProblem(
            owner.file, _line_of(owner.lines, (*prefix, *loc)), _field_text((*prefix, *loc)),
            'answer = "kernel" needs [daemon] ip_forward = true: the kernel answers a keepalive by forwarding'
            ' the decapsulated probe back out of the tunnel (answer = "daemon" needs no forwarding)'))
    return problems


def _defaults_problems(defaults_raw: dict[str, Any], place: _Place) -> list[ConfigProblem]:
    """Check [defaults] on their own, so a typo there is reported even when no tunnel inherits it yet."""
    if not defaults_raw:
        return []
    mode = defaults_raw.get("mode")
    v6 = isinstance(mode, str) and mode in IPV6_MODES
    # Stand-ins for the keys only a tunnel can give; errors about them are dropped (place returns None).
    stand_in = {"name": "defaults", "local": "::1" if v6 else "127.0.0.1", "remote": "::2" if v6 else "127.0.0.2"}
    try:
        # A name in [defaults] is a problem of its own, reported by the caller.
        TunnelConfig.model_validate({**stand_in, **defaults_raw, "name": stand_in["name"]})
    except ValidationError as exc:
        # Rules across keys depend on what each tunnel adds; they are checked per tunnel.
        return _problems(exc, place, rules_across_keys=False)
    return []


def _cross_tunnel_problems(tunnels: list[tuple[TunnelConfig, _Source, int]]) -> list[ConfigProblem]:
    problems = []
    names: dict[str, tuple[_Source, int]] = {}
    # Keyed by (version, int), not ipaddress objects: an IPv4Address hashes through hex(), and a thousand
    # tunnels' endpoints and routes made this check a third of a reload.
    endpoints: dict[tuple[str, int, int, int, int | None], str] = {}
    # The kernel keeps one route per (prefix, table, metric): the second tunnel's would be refused (EEXIST).
    routes: dict[tuple[int, int, int, int, int], str] = {}
    for tunnel, source, index in tunnels:
        if tunnel.name in names:
            other, other_index = names[tunnel.name]
            problems.append(ConfigProblem(source.file, _line_of(source.lines, ("tunnel", index, "name")),
                                          f"tunnel[{index}].name",
                                          f"name {tunnel.name!r} is already used by tunnel[{other_index}]"
                                          f" ({other.file})"))
        else:
            names[tunnel.name] = (source, index)
        # The kernel demultiplexes received GRE by (local, remote, key): two tunnels sharing all three collide.
        kind = "l2" if tunnel.mode in ETHERNET_MODES else "l3"
        ident = (kind, tunnel.local.version, int(tunnel.local), int(tunnel.remote), tunnel.input_key)
        if ident in endpoints and tunnel.enabled:
            problems.append(ConfigProblem(
                source.file, _line_of(source.lines, ("tunnel", index)), f"tunnel[{index}]",
                f"same local {tunnel.local}, remote {tunnel.remote} and key as tunnel {endpoints[ident]!r}:"
                " give one of them a different key"))
        elif tunnel.enabled:
            endpoints[ident] = tunnel.name
        for number, prefix in enumerate(tunnel.routes if tunnel.enabled else ()):
            # IPv6 stores metric 0 as 1024 (IP6_RT_PRIO_USER), so the two are the same route.
            metric = 1024 if prefix.version == 6 and tunnel.metric == 0 else tunnel.metric
            route = (prefix.version, int(prefix.network_address), prefix.prefixlen, tunnel.table, metric)
            if route in routes:
                owner = "this tunnel" if routes[route] == tunnel.name else f"tunnel {routes[route]!r}"
                problems.append(ConfigProblem(
                    source.file, _line_of(source.lines, ("tunnel", index, "routes")),
                    f"tunnel[{index}].routes[{number}]",
                    f"route {prefix} (table {tunnel.table}, metric {metric}) is already in {owner}: the kernel keeps"
                    " one route per prefix, table and metric; give a backup tunnel another metric"))
            else:
                routes[route] = tunnel.name
    return problems


def load_config_text(text: str, file: Path = Path("<string>")) -> Config:
    """Validate TOML text alone, with no drop-ins (tests, `greupd check -`)."""
    return _validate([_parse(file, text)])


def json_schema() -> dict[str, Any]:
    """JSON Schema of one config file, for editors (taplo, VS Code Even Better TOML)."""

    class TunnelsFile(_Model):
        daemon: DaemonConfig = DaemonConfig()
        defaults: dict[str, Any] = Field(default_factory=dict, description="any [[tunnel]] key, as a default")
        tunnel: list[TunnelConfig] = []

    return TunnelsFile.model_json_schema()
