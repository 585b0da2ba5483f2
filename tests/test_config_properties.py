"""Properties of tunnels.toml loading, checked on generated configs.

- Whatever a valid config says, loading its TOML text gives exactly those values (spelt any allowed way,
  with keys left to [defaults] or to the spec's defaults), and dumping what was loaded loads the same again.
- Whatever text is thrown at the loader (random TOML, a valid config with a key renamed, a value replaced,
  a line dropped), it either loads or raises ConfigError whose every problem names the file, a line and
  what is wrong. Nothing else escapes.

The expected values below are the spec's (docs: /etc/greupd/tunnels.toml), written out here rather than
read from the models, so a changed default in config.py shows up as a failure.
"""

from __future__ import annotations

import datetime
import ipaddress
import math
import string
from collections.abc import Mapping
from pathlib import Path
from typing import TypeAlias

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from greupd.config import Config, ConfigError, load_config_text

# A TOML value as tomllib returns it (and our emitter writes it).
TomlValue: TypeAlias = (
    "bool | int | float | str | datetime.date | datetime.time | list[TomlValue] | dict[str, TomlValue]"
)
Table: TypeAlias = dict[str, TomlValue]
IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

FILE = Path("/etc/greupd/tunnels.toml")
PROPERTY = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --- a tiny TOML emitter --------------------------------------------------------------------------------


def toml_string(text: str) -> str:
    escaped = []
    for char in text:
        if char in '"\\':
            escaped.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:  # TOML allows no raw control characters in strings
            escaped.append(f"\\u{ord(char):04x}")
        else:
            escaped.append(char)
    return '"' + "".join(escaped) + '"'


def toml_key(key: str) -> str:
    bare = key and all(c in string.ascii_letters + string.digits + "_-" for c in key)
    return key if bare else toml_string(key)


def toml_value(value: TomlValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)  # the shortest text that reads back as the same float
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


def is_array_of_tables(value: TomlValue) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def emit(document: Mapping[str, TomlValue], path: tuple[str, ...] = ()) -> str:
    """TOML text for `document`: plain keys first, then [tables], then [[arrays of tables]]."""
    lines = [f"{toml_key(k)} = {toml_value(v)}" for k, v in document.items()
             if not isinstance(v, dict) and not is_array_of_tables(v)]
    for key, value in document.items():
        header = ".".join(toml_key(p) for p in (*path, key))
        if isinstance(value, dict):
            lines += ["", f"[{header}]", emit(value, (*path, key))]
        elif is_array_of_tables(value):
            assert isinstance(value, list)
            for entry in value:
                assert isinstance(entry, dict)
                lines += ["", f"[[{header}]]", emit(entry, (*path, key))]
    return "\n".join(lines)


# --- valid configs: what is written, and what it must mean ---------------------------------------------

SPEC_TUNNEL: dict[str, object] = {
    "mode": "gre", "key": None, "ikey": None, "okey": None, "ttl": 64, "tos": "inherit", "pmtudisc": True,
    "encap_limit": None, "mtu": None, "address": None, "peer": None, "routes": [], "metric": 0, "table": 254,
    "enabled": True,
    "adopt": False, "keepalive": None, "mss": {"clamp": "off"}, "nat": {"into_tunnel": [], "from_tunnel": []},
    "ipsec": None, "bfd": None, "dampening": None, "mtu_probe": None,
}
SPEC_KEEPALIVE: dict[str, object] = {"interval": 10.0, "retries": 3, "up_after": 1, "action": "routes",
                                     "answer": "daemon", "hold": None, "format": None}
SPEC_DAEMON: dict[str, object] = {"ip_forward": True, "control_socket": Path("/run/greupd/control.sock"),
                                  "state_dir": Path("/var/lib/greupd"), "nft_table": "greupd", "on_exit": "keep",
                                  "vici_socket": Path("/var/run/charon.vici"),
                                  "metrics_textfile": None, "metrics_listen": None}
# The kernel's own device names, and the largest MTU per mode without/with an output key (spec: review M7).
KERNEL_NAMES = {"gre0", "gretap0", "erspan0", "ip6gre0", "ip6tnl0", "tunl0", "sit0", "ip_vti0", "ip6_vti0", "all",
                "default"}
MAX_MTU = {"gre": (65511, 65507), "gretap": (65497, 65493), "ip6gre": (65531, 65527), "ip6gretap": (65455, 65447)}
IPV4_BROADCAST = ipaddress.IPv4Address("255.255.255.255")

# Strategies are built once here: building them inside each draw costs more than the test itself.
BOOLS = st.booleans()
IFNAMES = st.text(string.ascii_letters + string.digits + "_.-", min_size=1, max_size=15).filter(
    lambda name: name not in (".", ".."))
TUNNEL_NAMES = IFNAMES.filter(lambda name: name not in KERNEL_NAMES)
MODES = st.sampled_from(["gre", "ip6gre", "gretap", "ip6gretap"])
VERSIONS = st.sampled_from([4, 6])
ADDRESSES: dict[int, st.SearchStrategy[IPAddress]] = {4: st.ip_addresses(v=4), 6: st.ip_addresses(v=6)}
PREFIX_LENGTHS = {4: st.integers(0, 32), 6: st.integers(0, 128)}
GRE_KEYS = st.integers(0, 0xFFFFFFFF)
KEYINGS = st.sampled_from([(), ("key",), ("ikey",), ("okey",), ("ikey", "okey")])
TTLS: st.SearchStrategy[int | str] = st.one_of(st.integers(1, 255), st.just("inherit"))
# A tos is DSCP x 4: the kernel reads an odd one as "inherit" and takes the ECN bits from the inner packet.
TOSES: st.SearchStrategy[int | str] = st.one_of(st.integers(0, 63).map(lambda dscp: dscp * 4), st.just("inherit"))
MTUS = {mode: {keyed: st.integers(68, highest[keyed]) for keyed in (False, True)} for mode, highest in MAX_MTU.items()}
DEFAULT_MTUS = st.integers(68, min(min(highest) for highest in MAX_MTU.values()))
METRICS = st.integers(0, 0xFFFFFFFF)
TABLES = st.integers(1, 0xFFFFFFFF).filter(lambda t: t not in (253, 255))
INNER = st.sampled_from(["none", "prefix", "peer"])
ENCAP_LIMITS: st.SearchStrategy[int | str] = st.one_of(st.integers(0, 255), st.just("none"))
CLAMPS: st.SearchStrategy[int | str] = st.one_of(st.sampled_from(["pmtu", "off"]), st.integers(536, 65495))
ONE_TO_255 = st.integers(1, 255)
ACTIONS = st.sampled_from(["routes", "link"])
ANSWERS = st.sampled_from(["daemon", "kernel", "off"])
SOCKETS = st.from_regex(r"/[A-Za-z0-9_.-]{1,12}(/[A-Za-z0-9_.-]{1,12}){0,3}", fullmatch=True)
NFT_TABLES = st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,31}", fullmatch=True)
ON_EXIT = st.sampled_from(["keep", "remove"])
LISTEN = st.one_of(st.builds("{}:{}".format, st.ip_addresses(v=4), st.integers(1, 65535)),
                   st.builds("[{}]:{}".format, st.ip_addresses(v=6), st.integers(1, 65535)))
DURATION_KINDS = st.sampled_from(["ms", "ms as float", "s", "s as int", "m", "float"])
MILLISECONDS = st.integers(50, 3_600_000)
SECONDS = st.integers(1, 3600)
MINUTES = st.integers(1, 60)
FLOAT_SECONDS = st.floats(0.05, 3600)


@st.composite
def networks(draw: st.DrawFn) -> IPNetwork:
    version = draw(VERSIONS)
    address = draw(ADDRESSES[version])
    return ipaddress.ip_network(f"{address}/{draw(PREFIX_LENGTHS[version])}", strict=False)


ROUTES = st.lists(networks(), max_size=3)


@st.composite
def durations(draw: st.DrawFn) -> tuple[TomlValue, float]:
    """A keepalive interval: (how it is written, the seconds it means)."""
    kind = draw(DURATION_KINDS)
    if kind.startswith("ms"):
        ms = draw(MILLISECONDS)
        return (f"{ms}ms" if kind == "ms" else ms / 1000), ms / 1000
    if kind.startswith("s"):
        seconds = draw(SECONDS)
        return (f"{seconds}s" if kind == "s" else seconds), float(seconds)
    if kind == "m":
        minutes = draw(MINUTES)
        return f"{minutes}m", minutes * 60.0
    seconds_float = draw(FLOAT_SECONDS)
    return seconds_float, seconds_float


class Written:
    """A valid config as generated: the document to write, and the values loading it must give."""

    def __init__(self) -> None:
        self.document: Table = {}
        self.daemon: dict[str, object] = dict(SPEC_DAEMON)
        self.tunnels: list[dict[str, object]] = []


@st.composite
def keepalives(draw: st.DrawFn) -> tuple[Table, dict[str, object]]:
    written: Table = {}
    meant = dict(SPEC_KEEPALIVE)
    if draw(BOOLS):
        written["interval"], meant["interval"] = draw(durations())
    choices: tuple[tuple[str, st.SearchStrategy[int | str]], ...] = (
        ("retries", ONE_TO_255), ("up_after", ONE_TO_255), ("action", ACTIONS), ("answer", ANSWERS),
        ("format", st.just("mikrotik")))  # valid on both modes: gre's bytes are Cisco's, ip6gre's MikroTik's
    for key, values in choices:
        if draw(BOOLS):
            value: int | str = draw(values)
            written[key] = meant[key] = value
    return written, meant


KEEPALIVES = keepalives()


@st.composite
def tunnels(draw: st.DrawFn, name: str, defaults: Mapping[str, TomlValue],
            forwarding: bool = True) -> tuple[Table, dict[str, object]]:
    """One [[tunnel]]: (what is written, what the loaded model must hold)."""
    written: Table = {"name": name}
    meant: dict[str, object] = {**SPEC_TUNNEL, "name": name}
    ip6_mode = False

    def inherited(key: str) -> object:
        if (ip6_mode and key in ("tos", "pmtudisc")) or (not ip6_mode and key == "encap_limit"):
            return SPEC_TUNNEL[key]  # a default of one family's modes only
        return defaults.get(key, SPEC_TUNNEL[key])

    def choose(key: str, value: TomlValue, spelling: TomlValue | None = None) -> None:
        """Mean `value`; write it (as `spelling`), or leave it out when it is what the tunnel inherits."""
        meant[key] = value
        if value != inherited(key) or draw(BOOLS):
            written[key] = value if spelling is None else spelling

    mode = SPEC_TUNNEL["mode"] if draw(BOOLS) else draw(MODES)
    assert isinstance(mode, str)
    choose("mode", mode)
    version = 6 if mode.startswith("ip6") else 4
    ip6_mode = version == 6
    local = draw(ADDRESSES[version])
    remote = draw(ADDRESSES[version])
    if remote == local:
        remote = type(local)(int(local) ^ 1)
    written["local"], written["remote"] = str(local), str(remote)
    meant.update(local=local, remote=remote)

    keying = draw(KEYINGS)
    for key in keying:
        value = draw(GRE_KEYS)
        choose(key, value, str(ipaddress.IPv4Address(value)) if draw(BOOLS) else value)

    # Half the time the inherited value, so that leaving keys out gets exercised.
    ttl = draw(TTLS)
    choose("ttl", ttl)
    # The kernel refuses pmtudisc off with a fixed ttl.
    choose("pmtudisc", draw(BOOLS) if ttl == "inherit" and not ip6_mode else True)
    tos = "inherit" if ip6_mode else draw(TOSES)
    choose("tos", tos)
    if ip6_mode and draw(BOOLS):
        choose("encap_limit", draw(ENCAP_LIMITS))
    else:
        meant["encap_limit"] = inherited("encap_limit")
    if draw(BOOLS):
        choose("mtu", draw(MTUS[mode][bool({"key", "okey"} & set(keying))]))
    else:
        meant["mtu"] = inherited("mtu")  # TOML has no null: a tunnel cannot unset an mtu from [defaults]
    metric = inherited("metric") if draw(BOOLS) else draw(METRICS)
    assert isinstance(metric, int)
    choose("metric", metric)
    choose("enabled", draw(BOOLS))
    table = inherited("table") if draw(BOOLS) else draw(TABLES)
    assert isinstance(table, int)
    choose("table", table, draw(st.sampled_from(["main", 254])) if table == 254 else table)

    inner = draw(INNER)
    if inner != "none":
        inner_version = draw(VERSIONS)
        address = draw(ADDRESSES[inner_version])
        if address == remote:  # the remote would be a local address
            address = type(address)(int(address) ^ 1)
        if inner == "peer":
            peer = draw(ADDRESSES[inner_version])
            if peer == remote:  # the remote routed into the tunnel itself
                peer = type(peer)(int(peer) ^ 1)
            written["address"], written["peer"] = str(address), str(peer)
            meant["address"], meant["peer"] = ipaddress.ip_interface(address), peer
        else:
            interface = ipaddress.ip_interface(f"{address}/{draw(PREFIX_LENGTHS[inner_version])}")
            if interface.network.prefixlen > 0 and remote in interface.network:  # covers the remote
                interface = ipaddress.ip_interface(f"{address}/{interface.max_prefixlen}")
            written["address"], meant["address"] = str(interface), interface
    routes = list(dict.fromkeys(draw(ROUTES)))  # a prefix twice would be the same route twice
    if mode in ("gretap", "ip6gretap"):
        # An Ethernet tunnel routes via its peer: without one it carries no routes, with one only its family's.
        gateway = meant["peer"]
        routes = [r for r in routes if isinstance(gateway, IPAddress) and r.version == gateway.version]
    if table == 254:
        routes = [r for r in routes if remote not in r]  # in main, that would route GRE into the tunnel itself
    write_empty = draw(BOOLS)
    if routes or write_empty:
        written["routes"], meant["routes"] = [str(r) for r in routes], routes

    unicast = not (remote.is_multicast or remote.is_unspecified or remote == IPV4_BROADCAST)
    if mode in ("gre", "ip6gre") and not local.is_unspecified and unicast and draw(BOOLS):
        written["keepalive"], meant["keepalive"] = keepalive_written, keepalive_meant = draw(KEEPALIVES)
        if not forwarding and keepalive_meant["answer"] == "kernel":
            keepalive_written["answer"] = keepalive_meant["answer"] = "daemon"  # the kernel answers by forwarding
    if draw(BOOLS):
        clamp = draw(CLAMPS)
        written["mss"], meant["mss"] = {"clamp": clamp}, {"clamp": clamp}
    if draw(BOOLS):
        into, out = draw(ROUTES), draw(st.lists(IFNAMES, max_size=3))
        written["nat"] = {"into_tunnel": [str(n) for n in into], "from_tunnel": list(out)}
        meant["nat"] = {"into_tunnel": into, "from_tunnel": out}
    return written, meant


@st.composite
def valid_configs(draw: st.DrawFn) -> Written:
    config = Written()
    daemon: Table = {}
    if draw(BOOLS):
        daemon["ip_forward"] = config.daemon["ip_forward"] = draw(BOOLS)
    if draw(BOOLS):
        daemon["control_socket"] = socket = draw(SOCKETS)
        config.daemon["control_socket"] = Path(socket)
    if draw(BOOLS):
        daemon["state_dir"] = state_dir = draw(SOCKETS)
        config.daemon["state_dir"] = Path(state_dir)
    if draw(BOOLS):
        daemon["nft_table"] = config.daemon["nft_table"] = draw(NFT_TABLES)
    if draw(BOOLS):
        daemon["on_exit"] = config.daemon["on_exit"] = draw(ON_EXIT)
    if draw(BOOLS):
        daemon["metrics_textfile"] = textfile = draw(SOCKETS)
        config.daemon["metrics_textfile"] = Path(textfile)
    if draw(BOOLS):
        daemon["metrics_listen"] = config.daemon["metrics_listen"] = draw(LISTEN)
    write_empty = draw(BOOLS)
    if daemon or write_empty:
        config.document["daemon"] = daemon

    # [defaults], for keys that no rule ties to another key.
    defaults: Table = {}
    if draw(BOOLS):
        defaults["tos"] = draw(TOSES)
    if draw(BOOLS):
        defaults["mtu"] = draw(DEFAULT_MTUS)
    if draw(BOOLS):
        defaults["encap_limit"] = draw(ENCAP_LIMITS)
    if draw(BOOLS):
        defaults["metric"] = draw(METRICS)
    if draw(BOOLS):
        defaults["table"] = draw(TABLES)
    if defaults:
        config.document["defaults"] = defaults

    entries: list[TomlValue] = []
    endpoints = set()
    installed: set[tuple[object, ...]] = set()
    for name in draw(st.lists(TUNNEL_NAMES, max_size=4, unique=True)):
        written, meant = draw(tunnels(name, defaults, forwarding=bool(config.daemon["ip_forward"])))
        ident = (meant["local"], meant["remote"])
        if ident in endpoints:
            continue  # the same endpoints twice would need distinct keys; one tunnel is enough here
        # The kernel keeps one route per (prefix, table, metric), IPv6 metric 0 being 1024.
        routes = {(r, meant["table"], 1024 if r.version == 6 and meant["metric"] == 0 else meant["metric"])
                  for r in meant["routes"]} if meant["enabled"] else set()  # type: ignore[attr-defined]
        if routes & installed:
            continue
        installed |= routes
        endpoints.add(ident)
        entries.append(written)
        config.tunnels.append(meant)
    if entries:
        config.document["tunnel"] = entries
    return config


VALID_CONFIGS = valid_configs()


def dump(config: Config) -> str:
    """TOML text of a loaded config, as `greupd` could write it back."""
    def without_none(value: object) -> TomlValue:
        if isinstance(value, dict):
            return {k: without_none(v) for k, v in value.items() if v is not None}
        return value  # type: ignore[return-value]

    return emit({"daemon": without_none(config.daemon.model_dump(mode="json")),
                 "tunnel": [without_none(t.model_dump(mode="json")) for t in config.tunnels]})


@PROPERTY
@given(VALID_CONFIGS)
def test_a_valid_config_loads_as_written(config: Written) -> None:
    text = emit(config.document)
    loaded = load_config_text(text, FILE)

    assert loaded.daemon.model_dump() == config.daemon, text
    assert [t.model_dump() for t in loaded.tunnels] == config.tunnels, text
    assert loaded.files == (FILE,)


@PROPERTY
@given(VALID_CONFIGS)
def test_dumping_a_loaded_config_and_loading_it_again_gives_the_same_config(config: Written) -> None:
    loaded = load_config_text(emit(config.document), FILE)
    assert load_config_text(dump(loaded), FILE) == loaded


# --- anything else: only ConfigError, and every problem says where and what ----------------------------

TOP_KEYS = ["daemon", "defaults", "tunnel"]
TUNNEL_KEYS = [*SPEC_TUNNEL, "name", "local", "remote"]
SUB_KEYS = [*SPEC_KEEPALIVE, *SPEC_DAEMON, "clamp", "into_tunnel", "from_tunnel"]
VOCABULARY = TOP_KEYS + TUNNEL_KEYS + SUB_KEYS

KEYS_ANY = st.one_of(st.sampled_from(VOCABULARY), st.text(max_size=8))
SCALARS: st.SearchStrategy[TomlValue] = st.one_of(
    st.booleans(), st.integers(), st.floats(), st.text(max_size=20), st.dates(), st.times(),
    st.sampled_from(["inherit", "main", "pmtu", "off", "gre", "ip6gre", "300ms", "5 parsecs", "0.0.0.42",
                     "172.19.1.1", "fd00::1", "20.10.1.0/24", "20.10.1.1/24", "eth1", "My_Tunnel"]),
)
TOML_VALUES: st.SearchStrategy[TomlValue] = st.recursive(
    SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(KEYS_ANY, inner, max_size=4)),
    max_leaves=12)


RANDOM_TOP = st.dictionaries(KEYS_ANY, TOML_VALUES, max_size=3)
RANDOM_DAEMON = st.dictionaries(st.sampled_from(SUB_KEYS), TOML_VALUES, max_size=4)
RANDOM_TUNNEL = st.dictionaries(st.sampled_from(TUNNEL_KEYS), TOML_VALUES, max_size=8)
RANDOM_TUNNELS = st.lists(RANDOM_TUNNEL, max_size=3)


@st.composite
def random_documents(draw: st.DrawFn) -> Table:
    """A TOML document shaped roughly like a config, so the loader gets past the first check."""
    document: Table = draw(RANDOM_TOP)
    if draw(BOOLS):
        document["daemon"] = draw(RANDOM_DAEMON)
    if draw(BOOLS):
        document["defaults"] = draw(RANDOM_TUNNEL)
    if draw(BOOLS):
        entries: list[TomlValue] = list(draw(RANDOM_TUNNELS))
        document["tunnel"] = entries
    return document


def assert_loads_or_explains(text: str) -> None:
    try:
        load_config_text(text, FILE)
    except ConfigError as error:
        assert error.problems, "a ConfigError with no problem in it"
        for problem in error.problems:
            assert problem.file == FILE, problem
            assert problem.line is not None and problem.line >= 1, problem
            assert problem.message.strip(), problem
            assert str(problem).startswith(f"{FILE}:{problem.line}: ")


@PROPERTY
@given(random_documents())
def test_random_toml_loads_or_raises_config_error(document: Table) -> None:
    assert_loads_or_explains(emit(document))


@PROPERTY
@given(st.text(max_size=200))
def test_random_text_loads_or_raises_config_error(text: str) -> None:
    assert_loads_or_explains(text)


def paths_in(value: TomlValue, path: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    found = [path] if path else []
    if isinstance(value, dict):
        for key, inner in value.items():
            found += paths_in(inner, (*path, key))
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            found += paths_in(inner, (*path, index))
    return found


def container_of(document: Table, path: tuple[str | int, ...]) -> Table | list[TomlValue]:
    value: TomlValue = document
    for part in path[:-1]:
        value = value[part]  # type: ignore[index]
    assert isinstance(value, dict | list)
    return value


STRUCTURE_CHANGES = st.sampled_from(["replace", "delete", "rename", "add"])
LINE_EDITS = st.sampled_from(["drop", "repeat", "insert"])
JUNK = st.text(max_size=20)


@st.composite
def mutated_configs(draw: st.DrawFn) -> str:
    """A valid config with one thing changed in its structure, and maybe one line broken in its text."""
    document = draw(VALID_CONFIGS).document
    paths = paths_in(document)
    if paths:
        path = draw(st.sampled_from(paths))
        container, last = container_of(document, path), path[-1]
        change = draw(STRUCTURE_CHANGES)
        if change == "replace":
            container[last] = draw(TOML_VALUES)  # type: ignore[index]
        elif change == "delete":
            del container[last]  # type: ignore[arg-type]
        elif isinstance(container, dict):
            key = draw(KEYS_ANY)
            if change == "rename":
                container[key] = container.pop(str(last))
            else:
                container[key] = draw(TOML_VALUES)
    text = emit(document)
    if draw(st.booleans()):
        lines = text.split("\n")
        at = draw(st.integers(0, len(lines) - 1))
        edit = draw(LINE_EDITS)
        if edit == "drop":
            del lines[at]
        elif edit == "repeat":
            lines.insert(at, lines[at])
        else:
            lines.insert(at, draw(JUNK).replace("\r", ""))
        text = "\n".join(lines)
    return text


@PROPERTY
@given(mutated_configs())
def test_a_mutated_config_loads_or_raises_config_error(text: str) -> None:
    assert_loads_or_explains(text)
