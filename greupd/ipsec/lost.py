"""Which of greupd's connections lost their kernel state behind charon's back (issue #21, I2).

After an XFRM deletion or flush (xfrm.py's watch), the supervisor asks, for each connection charon holds:
are its policies still in the kernel (GRE from local to remote out, and back in: what charon installs for
`dynamic[gre]` in transport mode, the trap included), and, for each CHILD_SA charon lists as INSTALLED, are
both its SAs (inbound SPI at the local address, outbound SPI at the remote)? A connection where one is missing
is lost: charon will not notice by itself, so the supervisor has it terminated and loaded again.

`expected` is pure (charon's list-sas answer -> what the kernel should hold); `lost` asks the kernel through
an XfrmQuery-like object.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from greupd.gre import IPAddress
from greupd.ipsec.connections import CHILD_NAME, IpsecConnection
from greupd.ipsec.vici import ViciReply
from greupd.ipsec.xfrm import XFRM_POLICY_IN, XFRM_POLICY_OUT


class Lookup(Protocol):
    def has_sa(self, daddr: IPAddress, spi: int) -> bool: ...

    def has_policy(self, src: IPAddress, dst: IPAddress, direction: int) -> bool: ...


@dataclass(frozen=True)
class Expected:
    """What the kernel should hold for one connection: its two policies, and the SAs (destination, SPI)."""

    local: IPAddress
    remote: IPAddress
    sas: tuple[tuple[IPAddress, int], ...]


def endpoints(connection: IpsecConnection) -> tuple[IPAddress, IPAddress]:
    message = connection.message
    local, remote = message["local_addrs"], message["remote_addrs"]
    assert isinstance(local, list) and isinstance(remote, list)
    return ipaddress.ip_address(local[0]), ipaddress.ip_address(remote[0])


def expected(connections: Mapping[str, IpsecConnection], loaded: Iterable[str], sas: list[ViciReply]
             ) -> dict[str, Expected]:
    """For each loaded connection, what the kernel should hold given charon's list-sas answer (pure)."""
    spis: dict[str, list[tuple[int, int]]] = {}
    for entry in sas:
        for name, ike in entry.items():
            children = ike.get("child-sas") if isinstance(ike, dict) else None
            if name not in connections or not isinstance(children, dict):
                continue
            for child in children.values():
                if (isinstance(child, dict) and child.get("name") == CHILD_NAME and child.get("state") == "INSTALLED"
                        and child.get("spi-in") and child.get("spi-out")):
                    spis.setdefault(name, []).append((int(str(child["spi-in"]), 16), int(str(child["spi-out"]), 16)))
    found = {}
    for name in loaded:
        if (connection := connections.get(name)) is None:
            continue
        local, remote = endpoints(connection)
        pairs = spis.get(name, [])
        found[name] = Expected(local, remote, tuple(sa for spi_in, spi_out in pairs
                                                    for sa in ((local, spi_in), (remote, spi_out))))
    return found


def lost(lookup: Lookup, wanted: Mapping[str, Expected]) -> dict[str, str]:
    """The connections whose kernel state is not all there, and what is missing (OSError: cannot ask)."""
    missing: dict[str, str] = {}
    for name, what in wanted.items():
        gone = []
        if not lookup.has_policy(what.local, what.remote, XFRM_POLICY_OUT):
            gone.append("outbound policy")
        if not lookup.has_policy(what.remote, what.local, XFRM_POLICY_IN):
            gone.append("inbound policy")
        gone += [f"SA {spi:08x}" for daddr, spi in what.sas if not lookup.has_sa(daddr, spi)]
        if gone:
            missing[name] = ", ".join(gone)
    return missing
