"""Merging the parsed files and validating them: [daemon] and [defaults] key by key, [[tunnel]] appended, and the
rules across tunnels; every problem placed at its file and line."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from greupd.config.fields import DEFAULTS_NOT_FOR, FieldProblem
from greupd.config.lines import Path_, field_text, line_of, locate_fields
from greupd.config.models import Config, DaemonConfig, TunnelConfig
from greupd.config.problems import ConfigError, ConfigProblem
from greupd.gre import ETHERNET_MODES, IPV6_MODES

_TOP_KEYS = ("daemon", "defaults", "tunnel")


@dataclass
class ParsedFile:
    """One config file: its name, its TOML parsed, and its text (for the lines of errors)."""

    file: Path
    data: dict[str, Any]
    text: str = ""

    @functools.cached_property
    def lines(self) -> dict[Path_, int]:
        """Where each field stands; worked out only when a problem needs a line (it costs half a load)."""
        return locate_fields(self.text)


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
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
    name = field_text(loc) or "value"
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
_Place = Callable[[Path_], "tuple[ParsedFile, Path_] | None"]


def _problems(exc: ValidationError, place: _Place, rules_across_keys: bool = True) -> list[ConfigProblem]:
    found = []
    for error in exc.errors(include_url=False):
        loc: Path_ = tuple(p for p in error["loc"] if not (isinstance(p, str) and (
            p.startswith(("function-", "literal[", "constrained-", "lax-", "json-")) or p in ("int", "str"))))
        cause = error.get("ctx", {}).get("error")
        if isinstance(cause, FieldProblem):
            if not rules_across_keys:
                continue
            loc = (*loc, *cause.path)
        where = place(loc)
        if where is None:
            continue
        source, prefix = where
        full = (*prefix, *loc)
        found.append(ConfigProblem(source.file, line_of(source.lines, full), field_text(full),
                                   _message(error, loc)))
    # pydantic reports each branch of a union; keep one line per field
    unique: dict[tuple[Path, str], ConfigProblem] = {}
    for problem in found:
        unique.setdefault((problem.file, problem.field), problem)
    return list(unique.values())


def _last_writer(sources: list[ParsedFile], section: str, loc: Path_) -> ParsedFile | None:
    """The last file whose [section] writes `loc`: merging lets later files win, so its line is the one in force."""
    return next((s for s in reversed(sources) if _written(s.data.get(section), loc)), None)


# The tunnels of the last config validated, by the text of their merged table: a reload that changes one
# tunnel among thousands validates that one (pydantic costs ~0.1 ms a table). TunnelConfig is frozen, so a
# tunnel object can be shared by the old config and the new one. A tunnel with [tunnel.ipsec] is validated at
# every load all the same: the key files it names live on disk, not in the text.
_VALIDATED: dict[str, TunnelConfig] = {}


def validate(sources: list[ParsedFile]) -> Config:
    problems: list[ConfigProblem] = []
    daemon_raw: dict[str, Any] = {}
    defaults_raw: dict[str, Any] = {}
    for source in sources:
        for key in source.data:
            if key not in _TOP_KEYS:
                problems.append(ConfigProblem(source.file, line_of(source.lines, (key,)), key,
                                              f"unknown key {key!r} (expected [daemon], [defaults], [[tunnel]])"))
        for section in ("daemon", "defaults"):
            if section in source.data and not isinstance(source.data[section], dict):
                problems.append(ConfigProblem(source.file, line_of(source.lines, (section,)), section,
                                              f"{section} must be a table: [{section}]"))
        if isinstance(source.data.get("daemon"), dict):
            daemon_raw = deep_merge(daemon_raw, source.data["daemon"])
        if isinstance(source.data.get("defaults"), dict):
            defaults_raw = deep_merge(defaults_raw, source.data["defaults"])

    def in_daemon(loc: Path_) -> tuple[ParsedFile, Path_]:
        owner = _last_writer(sources, "daemon", loc) or _last_writer(sources, "daemon", ()) or sources[0]
        return owner, ("daemon",)

    def in_defaults(loc: Path_) -> tuple[ParsedFile, Path_] | None:
        owner = _last_writer(sources, "defaults", loc) if loc else None
        return (owner, ("defaults",)) if owner is not None else None

    try:
        daemon = DaemonConfig.model_validate(daemon_raw)
    except ValidationError as exc:
        daemon = DaemonConfig()
        problems += _problems(exc, in_daemon)
    named_default = _last_writer(sources, "defaults", ("name",))
    if named_default is not None:
        problems.append(ConfigProblem(named_default.file, line_of(named_default.lines, ("defaults", "name")),
                                      "defaults.name", "a name cannot be a default: every tunnel needs its own"))
    problems += _defaults_problems(defaults_raw, in_defaults)

    tunnels: list[tuple[TunnelConfig, ParsedFile, int]] = []
    validated: dict[str, TunnelConfig] = {}
    for source in sources:
        entries = source.data.get("tunnel", [])
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            problems.append(ConfigProblem(source.file, line_of(source.lines, ("tunnel",)), "tunnel",
                                          "tunnels are written as [[tunnel]] tables"))
            continue
        for index, entry in enumerate(entries):

            def in_tunnel(loc: Path_, source: ParsedFile = source, index: int = index,
                          entry: dict[str, Any] = entry) -> tuple[ParsedFile, Path_] | None:
                # A value the tunnel does not write itself came from [defaults]: point at that line instead.
                if loc and not _written(entry, loc):
                    return in_defaults(loc) or (source, ("tunnel", index))
                return source, ("tunnel", index)

            merged = deep_merge(_defaults_for(defaults_raw, entry), entry)
            key = repr(merged)  # TOML values only: the text of the table as validated, defaults included
            tunnel_or_none = _VALIDATED.get(key)
            if tunnel_or_none is not None and tunnel_or_none.names_key_files:
                # Its text is unchanged, but the key files it names may not be (chmod 644 since): check them again
                # (review L4). Validating the whole tunnel again places the error as a first load would.
                tunnel_or_none = None
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
                  tuple((s.file, s.text) for s in sources), tuple(_inner_warnings(tunnels)))


def _defaults_for(defaults_raw: dict[str, Any], entry: Mapping[str, Any]) -> dict[str, Any]:
    """[defaults] as they apply to one tunnel: without the keys its mode has no use for."""
    mode = entry.get("mode", defaults_raw.get("mode", "gre"))
    unused = DEFAULTS_NOT_FOR.get(mode, frozenset()) if isinstance(mode, str) else frozenset()
    return {key: value for key, value in defaults_raw.items() if key not in unused}


def _forwarding_problems(tunnels: list[tuple[TunnelConfig, ParsedFile, int]],
                         in_defaults: _Place) -> list[ConfigProblem]:
    """With [daemon] ip_forward = false the kernel forwards nothing, so it cannot reflect a peer's keepalive."""
    problems = []
    for tunnel, source, index in tunnels:
        if tunnel.keepalive is None or tunnel.keepalive.answer != "kernel" or not tunnel.enabled:
            continue
        loc: Path_ = ("keepalive", "answer")
        where: tuple[ParsedFile, Path_] = (source, ("tunnel", index))
        if not _written(source.data["tunnel"][index], loc):
            where = in_defaults(loc) or where
        owner, prefix = where
        problems.append(ConfigProblem(
            owner.file, line_of(owner.lines, (*prefix, *loc)), field_text((*prefix, *loc)),
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


def _cross_tunnel_problems(tunnels: list[tuple[TunnelConfig, ParsedFile, int]]) -> list[ConfigProblem]:
    problems = []
    names: dict[str, tuple[ParsedFile, int]] = {}
    # Keyed by (version, int), not ipaddress objects: an IPv4Address hashes through hex(), and a thousand
    # tunnels' endpoints and routes made this check a third of a reload.
    endpoints: dict[tuple[str, int, int, int, int | None], str] = {}
    # The kernel keeps one route per (prefix, table, metric): the second tunnel's would be refused (EEXIST).
    routes: dict[tuple[int, int, int, int, int], str] = {}
    for tunnel, source, index in tunnels:
        if tunnel.name in names:
            other, other_index = names[tunnel.name]
            problems.append(ConfigProblem(source.file, line_of(source.lines, ("tunnel", index, "name")),
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
                source.file, line_of(source.lines, ("tunnel", index)), f"tunnel[{index}]",
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
                    source.file, line_of(source.lines, ("tunnel", index, "routes")),
                    f"tunnel[{index}].routes[{number}]",
                    f"route {prefix} (table {tunnel.table}, metric {metric}) is already in {owner}: the kernel keeps"
                    " one route per prefix, table and metric; give a backup tunnel another metric"))
            else:
                routes[route] = tunnel.name
    return problems


def _inner_warnings(tunnels: list[tuple[TunnelConfig, ParsedFile, int]]) -> list[ConfigProblem]:
    """The same peer, or the same inner subnet, on two enabled tunnels (newcomer-3 N17): a warning, not an error.

    The kernel takes both, each address with its connected route, but reaches that peer or subnet through one
    device only (the connected route that came first), so one tunnel's inner traffic leaves through the other.
    Not an error: a config may mean it (a tunnel kept for a failover by hand), and the same local address with
    different peers (unnumbered point-to-point links) is common and fine.
    """
    inner: dict[tuple[int, int, int], str] = {}  # (version, peer or subnet, prefix length) -> tunnel
    found = []
    for tunnel, source, index in tunnels:
        if tunnel.enabled and (warning := _inner_warning(tunnel, source, index, inner)) is not None:
            found.append(warning)
    return found


def _inner_warning(tunnel: TunnelConfig, source: ParsedFile, index: int,
                   inner: dict[tuple[int, int, int], str]) -> ConfigProblem | None:
    if tunnel.address is None:
        return None
    key: tuple[int, int, int]
    if tunnel.peer is not None:
        key = (tunnel.peer.version, int(tunnel.peer), tunnel.peer.max_prefixlen)
        field, what = "peer", f"peer {tunnel.peer}"
    elif tunnel.address.network.prefixlen < tunnel.address.max_prefixlen:
        network = tunnel.address.network
        key = (network.version, int(network.network_address), network.prefixlen)
        field, what = "address", f"inner network {network} (address {tunnel.address})"
    else:
        return None
    other = inner.setdefault(key, tunnel.name)
    if other == tunnel.name:
        return None
    return ConfigProblem(source.file, line_of(source.lines, ("tunnel", index, field)), f"tunnel[{index}].{field}",
                         f"{what} is also tunnel {other!r}'s: the kernel accepts both, but reaches it through one"
                         " of the two devices only (the connected route that came first), so one tunnel's inner"
                         " traffic would leave through the other; give each tunnel its own")


