"""What strongSwan should hold for greupd's tunnels: one IKE connection (and one secret) per [tunnel.ipsec].

Pure: `desired_connections(config)` turns the config into the VICI `load-conn` messages, by name. Every name
starts with `greupd-`, so the session loads, compares and unloads exactly these and never touches another
program's connections (an operator's own swanctl.conf stays as it is).

The recipe (anchors.md section 6): IKEv2, ESP in transport mode whose traffic selectors are GRE (IP protocol
47) between the tunnel's local and remote address, `dynamic[gre]` on both sides as swanctl writes it, so a
hand-written swanctl.conf on the peer interoperates. Tunnel mode would add a second IP header for nothing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from greupd.gre import IPV6_MODES

if TYPE_CHECKING:  # types only: model imports this module, and the wire codec must not load pydantic
    from greupd.config import Config, IpsecConfig, TunnelConfig

CONNECTION_PREFIX = "greupd-"
CHILD_NAME = "gre"
# One a line in swanctl.conf syntax, as VICI carries them: a value or a list of strings, or a section.
ViciValue = str | list[str] | dict[str, "ViciValue"]
ViciMessage = dict[str, ViciValue]

# ESP's worst-case addition to a GRE packet in transport mode, in bytes: SPI and sequence number (8), an IV
# (up to 16, AES-CBC), padding to the cipher's block (up to 15), pad length and next header (2), and the
# integrity check value (up to 32, HMAC-SHA-512), plus 8 for the UDP header when NAT-T encapsulates ESP.
# AES-GCM (the default) needs 37 of these 81; the margin keeps any proposal an operator picks from fragmenting.
ESP_OVERHEAD = 8 + 16 + 15 + 2 + 32 + 8
# What ip_gre adds to each packet (outer IP header + GRE header, + 4 with a key); ip6gre's encapsulation
# limit adds an 8-byte destination option, unless encap_limit = "none"; gretap carries an Ethernet header inside.
_OUTER_IP = {4: 20, 6: 40}
_ENCAP_LIMIT_OPTION = 8
_GRE_HEADER = 4
_GRE_KEY = 4
_ETHERNET = 14
# The underlay MTU the default tunnel MTU is worked out from: Ethernet's. Other underlays set `mtu` themselves.
UNDERLAY_MTU = 1500


def connection_name(tunnel_name: str) -> str:
    return CONNECTION_PREFIX + tunnel_name


def tunnel_of(connection: str) -> str | None:
    """The tunnel a connection name belongs to, or None for a connection greupd did not load."""
    return connection.removeprefix(CONNECTION_PREFIX) if connection.startswith(CONNECTION_PREFIX) else None


@dataclass(frozen=True)
class IpsecConnection:
    """One tunnel's connection as VICI's load-conn takes it, plus what must be loaded beside it.

    `message` holds no secret and no file content: the PSK, the private key and the certificates are read
    from their files by the session when it loads them, so a connection can be compared and logged freely.
    """

    name: str
    tunnel: str
    message_text: str  # the load-conn message as canonical JSON (frozen, comparable)
    auth: Literal["psk", "pubkey"]
    psk_file: Path | None
    cert: Path | None
    key: Path | None
    ca: Path | None
    local_id: str
    remote_id: str | None  # None: any identity the CA vouches for (certificates without remote_id)

    @property
    def message(self) -> ViciMessage:
        value: ViciMessage = json.loads(self.message_text)
        return value

    @property
    def secret_id(self) -> str:
        """The `id` the shared secret is loaded under (load-shared/unload-shared)."""
        return self.name


def _proposal_list(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def connection_message(tunnel: TunnelConfig, ipsec: IpsecConfig) -> ViciMessage:
    """The body of VICI's load-conn for one tunnel (swanctl.conf's `connections.<name>` section)."""
    local, remote = str(tunnel.local), str(tunnel.remote)
    if ipsec.psk_file is not None:
        local_auth: dict[str, ViciValue] = {"auth": "psk", "id": ipsec.local_id or local}
        remote_auth: dict[str, ViciValue] = {"auth": "psk", "id": ipsec.remote_id or remote}
    else:
        # The certificate itself (and the CA's) is added by the session as file content: "certs"/"cacerts".
        local_auth = {"auth": "pubkey"}
        if ipsec.local_id:
            local_auth["id"] = ipsec.local_id
        remote_auth = {"auth": "pubkey", "id": ipsec.remote_id or "%any"}
    # trap: the kernel holds a policy for GRE at once and asks charon for an SA on the first packet; after a
    # dead peer (DPD) or a close, charon puts the trap back, so the next keepalive renegotiates.
    after_loss = "trap" if ipsec.start_action == "trap" else "restart"
    child: dict[str, ViciValue] = {
        "mode": "transport",
        "local_ts": ["dynamic[gre]"],
        "remote_ts": ["dynamic[gre]"],
        "esp_proposals": _proposal_list(ipsec.esp_proposals),
        "start_action": ipsec.start_action,
        "dpd_action": after_loss,
        "close_action": after_loss,
    }
    return {
        "version": "2",
        "local_addrs": [local],
        "remote_addrs": [remote],
        "proposals": _proposal_list(ipsec.proposals),
        # The endpoints are the GRE link's, fixed: nothing for MOBIKE to move, and without it IKE stays on
        # port 500 and ESP stays unencapsulated unless a NAT is found.
        "mobike": "no",
        "dpd_delay": f"{ipsec.dpd_delay:g}s",
        "local-1": local_auth,
        "remote-1": remote_auth,
        "children": {CHILD_NAME: child},
    }


def tunnel_connection(tunnel: TunnelConfig) -> IpsecConnection | None:
    ipsec = tunnel.ipsec
    if ipsec is None or not tunnel.enabled:
        return None
    message = connection_message(tunnel, ipsec)
    remote_id = ipsec.remote_id or (str(tunnel.remote) if ipsec.psk_file is not None else None)
    return IpsecConnection(
        name=connection_name(tunnel.name),
        tunnel=tunnel.name,
        message_text=json.dumps(message),  # in the order swanctl.conf would list it (plan shows it)
        auth="psk" if ipsec.psk_file is not None else "pubkey",
        psk_file=ipsec.psk_file,
        cert=ipsec.cert,
        key=ipsec.key,
        ca=ipsec.ca,
        local_id=ipsec.local_id or str(tunnel.local),
        remote_id=remote_id,
    )


def desired_connections(config: Config) -> Mapping[str, IpsecConnection]:
    """Every connection greupd should have loaded into charon, by connection name."""
    found = (tunnel_connection(t) for t in config.tunnels)
    return {c.name: c for c in found if c is not None}


def describe_connections(connections: Mapping[str, IpsecConnection]) -> str:
    """The connections in swanctl.conf syntax (what `swanctl --list-conns` will show once loaded); no secret."""
    def section(name: str, value: ViciValue, indent: str) -> list[str]:
        if isinstance(value, dict):
            inner = [line for key, item in value.items() for line in section(key, item, indent + "  ")]
            return [f"{indent}{name} {{", *inner, f"{indent}}}"]
        return [f"{indent}{name} = {', '.join(value) if isinstance(value, list) else value}"]

    lines: list[str] = []
    for connection in connections.values():
        lines += section(connection.name, connection.message, "")
        secret = (f"psk from {connection.psk_file}" if connection.psk_file is not None
                  else f"key {connection.key}, cert {connection.cert}, ca {connection.ca}")
        lines.append(f"# {connection.name}: {secret}")
    return "\n".join(lines) + "\n"


def default_ipsec_mtu(tunnel: TunnelConfig) -> int:
    """The tunnel MTU that leaves room for ESP on a 1500-byte underlay (Cisco's usual 1400 for GRE/IPsec)."""
    family = 6 if tunnel.mode in IPV6_MODES else 4
    keyed = tunnel.input_key is not None or tunnel.output_key is not None
    overhead = _OUTER_IP[family] + _GRE_HEADER + (_GRE_KEY if keyed else 0) + ESP_OVERHEAD
    if family == 6 and tunnel.encap_limit != "none":
        overhead += _ENCAP_LIMIT_OPTION
    if tunnel.mode in ("gretap", "ip6gretap"):
        overhead += _ETHERNET
    return UNDERLAY_MTU - overhead
