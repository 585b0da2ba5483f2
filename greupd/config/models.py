"""The pydantic models of tunnels.toml: the user's contract, each rule naming the key a person would change."""

from __future__ import annotations

import ipaddress
import math
import os
import re
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
    WithJsonSchema,
    model_validator,
)

from greupd.config.detectors import BfdConfig, DampeningConfig, KeepaliveHold
from greupd.config.fields import (
    DEFAULT_CONTROL_SOCKET,
    DEFAULT_STATE_DIR,
    DEFAULT_VICI_SOCKET,
    DURATION_TEXT,
    KEEPALIVE_MODES,
    MAX_MTU,
    TABLE_NAMES,
    Address,
    FieldProblem,
    GreKey,
    IfName,
    Interface,
    Network,
    TableId,
    TunnelName,
    absolute_path,
    dpd_delay_seconds,
    format_duration,
    keepalive_interval,
    keepalive_or_off,
    listen,
    nft_table_name,
    optional,
    tos_value,
    whole_number,
)
from greupd.config.keyfiles import secret_file_problem
from greupd.config.mtu_probe import MtuProbeConfig
from greupd.config.problems import ConfigProblem
from greupd.gre import ETHERNET_MODES, IPV6_MODES, IPAddress, Mode


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KeepaliveConfig(_Model):
    interval: Annotated[float, BeforeValidator(keepalive_interval), WithJsonSchema(
        {"anyOf": [{"type": "number", "minimum": 0.05, "maximum": 3600}, DURATION_TEXT]})] = 10.0
    retries: Annotated[StrictInt, Field(ge=1, le=255), BeforeValidator(whole_number("retries", 1, 255))] = 3
    up_after: Annotated[StrictInt, Field(ge=1, le=255), BeforeValidator(whole_number("up_after", 1, 255))] = 1
    action: Literal["routes", "link"] = "routes"
    answer: Literal["daemon", "kernel", "off"] = "daemon"
    # The probes' wire format; None: the mode's, "cisco" on gre, "mikrotik" (its GRE6 format) on ip6gre.
    format: Literal["cisco", "mikrotik"] | None = None
    # Junos style, instead of retries: down when no reply came for this long. Counted in probes, as retries
    # are. The last probe answered was sent about when its reply came; the next one is missed one interval
    # later, and the tunnel is down at the retries-th miss, (retries + 1) intervals after that reply: retries
    # becomes ceil(hold / interval) - 1 (at least 1), so the tunnel goes down between hold and hold + interval
    # after the last reply (less its round trip; tests/test_liveness_daemon_kernel.py measures it).
    hold: KeepaliveHold | None = None

    @model_validator(mode="after")
    def _hold_or_retries(self) -> KeepaliveConfig:
        if self.hold is None:
            return self
        if self.hold < self.interval:
            raise FieldProblem("hold", f"hold {format_duration(self.hold)} is shorter than the interval"
                                       f" {format_duration(self.interval)}: no probe could be answered in time")
        retries = max(1, math.ceil(self.hold / self.interval - 1e-9) - 1)
        if retries > 255:
            raise FieldProblem("hold", f"hold {format_duration(self.hold)} is more than 256 intervals of"
                                       f" {format_duration(self.interval)}")
        # Both given: only as a model_dump() writes them (retries made from hold), never two different wishes.
        if "retries" in self.model_fields_set and self.retries != retries:
            raise FieldProblem("hold", "give either hold (down after this long without a reply) or retries,"
                                       " not both")
        object.__setattr__(self, "retries", retries)  # frozen: set once, while validating
        return self


class MssConfig(_Model):
    # 536 is the smallest MSS every IPv4 host must accept (RFC 879); 65495 fits a 64 KiB loopback MTU.
    clamp: Annotated[Literal["pmtu", "off"] | Annotated[StrictInt, Field(ge=536, le=65495)],
                     BeforeValidator(whole_number("clamp", 536, 65495, "pmtu", "off"))] = "off"


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


FilePath = Annotated[Path, BeforeValidator(absolute_path("/etc/greupd/psk/My_Tunnel")),
                     WithJsonSchema({"type": "string"})]
Proposals = Annotated[str, BeforeValidator(_proposals), WithJsonSchema({"type": "string"})]



class IpsecConfig(_Model):
    """GRE over IPsec: ESP in transport mode for IP protocol 47 between local and remote, through strongSwan."""

    psk_file: FilePath | None = None  # the pre-shared key, in a mode 600 file (keyfiles.py); never in tunnels.toml
    cert: FilePath | None = None  # or certificates: ours, our private key, and the CA that signed the peer's
    key: FilePath | None = None
    ca: FilePath | None = None
    local_id: Annotated[str, BeforeValidator(_ike_identity)] | None = None  # default: local (PSK) or cert subject
    remote_id: Annotated[str, BeforeValidator(_ike_identity)] | None = None  # default: remote (PSK), any (cert)
    proposals: Proposals = DEFAULT_IKE_PROPOSALS  # IKE
    esp_proposals: Proposals = DEFAULT_ESP_PROPOSALS
    start_action: Literal["trap", "start"] = "trap"  # trap: negotiate on the first GRE packet; start: at once
    dpd_delay: Annotated[float, BeforeValidator(dpd_delay_seconds), WithJsonSchema(
        {"anyOf": [{"type": "number", "minimum": 1, "maximum": 3600}, DURATION_TEXT]}), Field(ge=1, le=3600)] = 10.0
    require: StrictBool = True  # GRE to/from the remote that is not ESP-protected is dropped (nftables)

    @model_validator(mode="after")
    def _one_way_to_authenticate(self) -> IpsecConfig:
        certs = [name for name in ("cert", "key", "ca") if getattr(self, name) is not None]
        if self.psk_file is not None and certs:
            raise FieldProblem(certs[0], "give either psk_file, or cert, key and ca, not both")
        if self.psk_file is None and not certs:
            raise FieldProblem("psk_file", "[tunnel.ipsec] needs psk_file, or cert, key and ca")
        if certs and len(certs) < 3:
            missing = next(name for name in ("cert", "key", "ca") if getattr(self, name) is None)
            raise FieldProblem(missing, f"certificate authentication needs cert, key and ca; {missing} is missing")
        # Checked here, so `greupd check` and a reload say it before anything is sent to charon.
        for name in ("psk_file", "key"):
            path: Path | None = getattr(self, name)
            if path is not None and (problem := secret_file_problem(path)) is not None:
                raise FieldProblem(name, problem)
        for name in ("cert", "ca"):
            path = getattr(self, name)
            if path is not None and not os.access(path, os.R_OK):
                raise FieldProblem(name, f"cannot read {path}")
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
                   BeforeValidator(whole_number("ttl", 1, 255, "inherit"))] = 64
    tos: Annotated[Annotated[StrictInt, Field(ge=0, le=255, multiple_of=4)] | Literal["inherit"],
                   BeforeValidator(tos_value)] = "inherit"
    pmtudisc: StrictBool = True
    # ip6 modes only; None: 4, as iproute2 makes an ip6gre tunnel (gre.DEFAULT_ENCAP_LIMIT).
    encap_limit: Annotated[Annotated[StrictInt, Field(ge=0, le=255)] | Literal["none"] | None,
                           BeforeValidator(whole_number("encap_limit", 0, 255, "none"))] = None
    # 68: the smallest MTU an IPv4 link may have (RFC 791), and the kernel's floor for GRE devices.
    # "probe": measured end to end by padded keepalives ([tunnel.mtu_probe], greupd/keepalive/pmtu.py).
    mtu: Annotated[Annotated[StrictInt, Field(ge=68, le=65535)] | Literal["probe"] | None,
                   BeforeValidator(whole_number("mtu", 68, 65535, "probe"))] = None
    mtu_probe: MtuProbeConfig | None = None
    address: Interface | None = None
    peer: Address | None = None
    routes: list[Network] = []
    metric: Annotated[StrictInt, Field(ge=0, le=0xFFFFFFFF),
                      BeforeValidator(whole_number("metric", 0, 0xFFFFFFFF))] = 0
    table: TableId = 254
    enabled: StrictBool = True
    # Take over a same-named link that is not greupd's when its kind, endpoints and keys match (spec.md).
    adopt: StrictBool = False
    keepalive: Annotated[KeepaliveConfig | None, BeforeValidator(keepalive_or_off),
                         Field(json_schema_extra=lambda schema: schema["anyOf"].append({"const": False}))] = None
    mss: MssConfig = MssConfig()
    nat: NatConfig = NatConfig()
    ipsec: IpsecConfig | None = None
    bfd: BfdConfig | None = None
    dampening: DampeningConfig | None = None

    @model_validator(mode="after")
    def _consistent(self) -> TunnelConfig:
        # Each rule names the key a person would change, so the error points at that key's line.
        underlay = 6 if self.mode in IPV6_MODES else 4
        for name in ("local", "remote"):
            addr: IPAddress = getattr(self, name)
            if addr.version != underlay:
                raise FieldProblem(name, f"{name} {addr} is IPv{addr.version} but mode {self.mode}"
                                          f" needs IPv{underlay}")
        if self.local == self.remote:
            raise FieldProblem("remote", "local and remote are the same address")
        if self.key is not None and (self.ikey is not None or self.okey is not None):
            raise FieldProblem("ikey" if self.ikey is not None else "okey",
                                "give either key, or ikey/okey, not both")
        if self.peer is not None:
            if self.address is None:
                raise FieldProblem("peer", "peer needs an address on this side")
            if self.peer.version != self.address.version:
                raise FieldProblem("peer", f"peer {self.peer} and address {self.address.ip}"
                                            " are of different families")
            if self.address.network.prefixlen != self.address.max_prefixlen:
                raise FieldProblem("address", "with peer, write address without a prefix length"
                                               " (ip addr add A peer P)")
        if self.mode in ETHERNET_MODES and self.routes and self.peer is None:
            raise FieldProblem("routes", f"mode {self.mode} carries Ethernet: its routes need a peer"
                                          " to use as gateway")
        if self.ttl != "inherit" and not self.pmtudisc:
            # The kernel refuses a fixed TTL with path-MTU discovery off (ip: "ttl != 0 and nopmtudisc").
            raise FieldProblem("pmtudisc", "pmtudisc = false needs ttl = \"inherit\""
                                            " (the kernel refuses a fixed ttl without it)")
        if self.keepalive is not None and self.mode not in KEEPALIVE_MODES:
            raise FieldProblem("keepalive", f"keepalive is defined for modes gre (Cisco) and ip6gre (MikroTik's GRE6),"
                                             f" not {self.mode} (keepalive = false switches off a default)")
        if self.keepalive is not None and self.mode == "ip6gre" and self.keepalive.format == "cisco":
            raise FieldProblem(("keepalive", "format"), "Cisco has no GRE6 keepalive: on mode ip6gre the format is"
                                                         " \"mikrotik\" (MikroTik's GRE6 keepalive), or leave it out")
        if self.keepalive is not None:
            self._check_keepalive_endpoints()
        if self.bfd is not None and (self.address is None or self.peer is None):
            raise FieldProblem("bfd", "[tunnel.bfd] runs between the tunnel's address and peer (RFC 5881 single"
                                      " hop, through the tunnel): give both")
        if self.bfd is not None and self.keepalive is not None and self.keepalive.action == "link":
            raise FieldProblem(("keepalive", "action"), "action = \"link\" cannot go with [tunnel.bfd]: BFD runs"
                                                         " through the tunnel, and a link set down could never"
                                                         " carry the packets that bring it back up")
        if self.dampening is not None and self.keepalive is None and self.bfd is None:
            raise FieldProblem("dampening", "[tunnel.dampening] dampens the flaps of a detector: give the"
                                            " tunnel [tunnel.keepalive] or [tunnel.bfd]")
        if self.mode in IPV6_MODES and self.tos != "inherit":
            raise FieldProblem("tos", f"greupd sets no tos on mode {self.mode} (the IPv6 traffic class);"
                                       " leave tos out")
        if self.mode in IPV6_MODES and not self.pmtudisc:
            raise FieldProblem("pmtudisc", f"pmtudisc is a setting of the IPv4 modes, not {self.mode}")
        if self.mode not in IPV6_MODES and self.encap_limit is not None:
            # IPv4 has no Tunnel Encapsulation Limit option: ip_gre would ignore it, so say so.
            raise FieldProblem("encap_limit", f"encap_limit is a setting of the IPv6 modes (ip6gre, ip6gretap),"
                                               f" not {self.mode}; leave it out")
        self._check_mtu_probe()
        if isinstance(self.mtu, int):
            highest = MAX_MTU[self.mode][self.output_key is not None]
            if self.mtu > highest:
                keyed = " with an output key" if self.output_key is not None else ""
                raise FieldProblem("mtu", f"mtu {self.mtu} is more than the kernel allows for mode {self.mode}"
                                           f"{keyed}: at most {highest} (65535 less the outer headers)")
        self._check_not_into_itself()
        return self

    def _check_mtu_probe(self) -> None:
        if self.mtu_probe is not None and self.mtu != "probe":
            raise FieldProblem("mtu_probe", "[tunnel.mtu_probe] goes with mtu = \"probe\"")
        if self.mtu != "probe":
            return
        if self.mode not in KEEPALIVE_MODES:
            raise FieldProblem("mtu", f"mtu = \"probe\" measures with keepalives (modes gre and ip6gre), not"
                                       f" {self.mode}; give the MTU as a number")
        if self.keepalive is None:
            # A lost padded probe says "too big" only while small keepalives come back (otherwise the peer is
            # down, which is the keepalives' verdict to make, not the search's).
            raise FieldProblem("mtu", "mtu = \"probe\" needs [tunnel.keepalive]: a padded probe that is lost"
                                       " counts against its size only while small keepalives come back")
        floor = self.mtu_probe_settings.floor
        highest = MAX_MTU[self.mode][self.output_key is not None]
        if floor > highest:
            raise FieldProblem("mtu_probe", f"floor {floor} is more than the kernel allows for mode {self.mode}:"
                                             f" at most {highest}")

    @property
    def mtu_probe_settings(self) -> MtuProbeConfig:
        """[tunnel.mtu_probe], or its defaults."""
        return self.mtu_probe if self.mtu_probe is not None else MtuProbeConfig()

    def _check_keepalive_endpoints(self) -> None:
        if self.local.is_unspecified:
            raise FieldProblem("keepalive", f"keepalive needs a fixed local address, not {self.local}: replies"
                                             " are matched to the tunnel by its local and remote")
        broadcast = ipaddress.IPv4Address("255.255.255.255")
        if self.remote.is_multicast or self.remote.is_unspecified or self.remote == broadcast:
            raise FieldProblem("keepalive", f"keepalive needs a unicast remote, not {self.remote}: a probe is"
                                             " answered by one peer")

    def _check_not_into_itself(self) -> None:
        # The outer packets to `remote` are routed like any other: a route of the tunnel's own that covers the
        # remote sends GRE into the tunnel itself (ip_tunnel_xmit drops it as a loop) whenever no more specific
        # route to the remote exists, which is exactly when the underlay's own route is gone.
        if self.peer is not None and self.peer == self.remote:
            raise FieldProblem("peer", f"peer {self.peer} is also the remote: packets to the remote would be"
                                        " routed into the tunnel itself")
        if self.address is not None and (self.address.ip == self.remote or (
                self.peer is None and self.address.network.prefixlen > 0 and self.remote in self.address.network)):
            raise FieldProblem("address", f"address {self.address} covers the remote {self.remote}: packets to"
                                           " the remote would be routed into the tunnel itself")
        if self.table == TABLE_NAMES["main"]:
            for number, prefix in enumerate(self.routes):
                if self.remote in prefix:
                    raise FieldProblem(("routes", number), (
                        f"route {prefix} in table main covers the tunnel's own remote {self.remote}: GRE packets"
                        " to the remote would be routed into the tunnel itself whenever no more specific route"
                        " to it exists. Put such routes in a table of their own (table = 100) that an"
                        " `ip rule` selects for your LAN's traffic, or leave the remote out of the prefix"))
        if self.mode in ETHERNET_MODES and self.peer is not None:
            for number, prefix in enumerate(self.routes):
                if prefix.version != self.peer.version:
                    raise FieldProblem(("routes", number), (
                        f"route {prefix} is IPv{prefix.version} but peer {self.peer} is IPv{self.peer.version}:"
                        f" mode {self.mode} routes via the peer, so only IPv{self.peer.version} routes can"
                        " resolve"))

    @property
    def names_key_files(self) -> bool:
        """Key files may change under an unchanged text: checked again on every load (review L4)."""
        return self.ipsec is not None or (self.bfd is not None and self.bfd.auth_file is not None)

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
    control_socket: Annotated[Path, BeforeValidator(absolute_path("/run/greupd/control.sock"))] = \
        DEFAULT_CONTROL_SOCKET
    # The last config that applied cleanly, and what must survive a restart (greupd/state.py);
    # $GREUPD_STATE_DIR and $STATE_DIRECTORY (systemd's StateDirectory=) take precedence.
    state_dir: Annotated[Path, BeforeValidator(absolute_path("/var/lib/greupd"))] = DEFAULT_STATE_DIR
    nft_table: Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_]{0,31}$"),
                         BeforeValidator(nft_table_name)] = "greupd"
    on_exit: Literal["keep", "remove"] = "keep"
    # strongSwan's control socket, for [tunnel.ipsec]
    vici_socket: Annotated[Path, BeforeValidator(absolute_path("/var/run/charon.vici"))] = DEFAULT_VICI_SOCKET
    # Prometheus metrics (greupd/metrics.py): a file for node_exporter's textfile collector, rewritten atomically
    # whenever it changes, and GET /metrics on a TCP address; `greupd metrics` prints the same text.
    metrics_textfile: Annotated[Path | None, BeforeValidator(optional(absolute_path(
        "/var/lib/prometheus/node-exporter/greupd.prom")))] = None
    metrics_listen: Annotated[str | None, BeforeValidator(optional(listen)), WithJsonSchema(
        {"type": "string", "pattern": r"^(\d{1,3}(\.\d{1,3}){3}|\[[0-9A-Fa-f:.]+\]):\d{1,5}$"})] = None


@dataclass(frozen=True)
class Config:
    """A whole validated configuration: what the daemon should make true."""

    daemon: DaemonConfig
    tunnels: tuple[TunnelConfig, ...]
    files: tuple[Path, ...] = ()
    # The text of each file as it was validated, for keeping this config as the last good one (state.py).
    sources: tuple[tuple[Path, str], ...] = field(default=(), compare=False, repr=False)
    # What validates but will not work as meant (two tunnels with the same peer): `greupd check` prints them.
    warnings: tuple[ConfigProblem, ...] = field(default=(), compare=False, repr=False)

    def tunnel(self, name: str) -> TunnelConfig | None:
        return next((t for t in self.tunnels if t.name == name), None)


def json_schema() -> dict[str, Any]:
    """JSON Schema of one config file, for editors (taplo, VS Code Even Better TOML)."""

    class TunnelsFile(_Model):
        daemon: DaemonConfig = DaemonConfig()
        defaults: dict[str, Any] = Field(default_factory=dict, description="any [[tunnel]] key, as a default")
        tunnel: list[TunnelConfig] = []

    return TunnelsFile.model_json_schema()
