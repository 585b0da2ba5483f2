"""What a GRE tunnel is, in words every layer shares: its modes, the address types, and its kernel attributes.

A leaf: config (pydantic), model (value types) and the rtnetlink codec all import it, and it imports none of
them, so the wire codec does not depend on pydantic. GRE_ATTRIBUTES is the one list of a link's GRE
parameters: rtnl encodes and decodes by it, model compares and describes links by it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Literal, get_args

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

# The mode is the kernel's link kind (IFLA_INFO_KIND).
Mode = Literal["gre", "ip6gre", "gretap", "ip6gretap"]
MODES: frozenset[str] = frozenset(get_args(Mode))
IPV6_MODES: frozenset[str] = frozenset({"ip6gre", "ip6gretap"})
ETHERNET_MODES: frozenset[str] = frozenset({"gretap", "ip6gretap"})

# An ip6 tunnel's Tunnel Encapsulation Limit (RFC 2473 section 4.1.1): how many more tunnel entry points a packet
# may pass, sent as an 8-byte destination option in every packet; "none" sends no option (the kernel's
# IP6_TNL_F_IGN_ENCAP_LIMIT, `ip link ... encaplimit none`). 4 is iproute2's default, so a tunnel made by hand
# and greupd's are alike; a request without the attribute gives 0 (a limit of 0: no nested tunnel passes it).
EncapLimit = int | Literal["none"]
DEFAULT_ENCAP_LIMIT = 4
IP6_TNL_F_IGN_ENCAP_LIMIT = 0x1  # include/uapi/linux/ip6_tunnel.h


@dataclass(frozen=True)
class GreAttribute:
    """One tunnel parameter: its `model.LinkSpec` field, its kernel attribute, and how it travels.

    rtnl's encoder and decoder walk GRE_ATTRIBUTES, and model compares and describes links by it, so a new
    parameter is one row here (and its config field).
    """

    field: str  # LinkSpec field
    number: int  # IFLA_GRE_* (include/uapi/linux/if_tunnel.h); ip6gre shares the numbering
    name: str  # the attribute's name after IFLA_GRE_ / IFLA_IP6GRE_, as pyroute2 decodes it
    # key: __be32 key plus GRE_KEY in its __be16 flags attribute; encap_limit: u8 limit plus
    # IP6_TNL_F_IGN_ENCAP_LIMIT in the ip6 tunnel's u32 flags attribute ("none")
    codec: Literal["address", "u8", "flag", "key", "encap_limit"]
    # key: IFLA_GRE_[IO]FLAGS, where GRE_KEY says whether there is a key; encap_limit: IFLA_GRE_FLAGS
    flags_number: int = 0
    flags_name: str = ""  # key, encap_limit: its name, as `name`
    ipv4_only: bool = False  # None in a LinkSpec of an ip6 mode: not applicable there, neither sent nor compared
    ipv6_only: bool = False  # None in a LinkSpec of an IPv4 mode: likewise
    shown: Literal["always", "keyed", "never"] = "always"  # in a link's one-line description; keyed: with a key
    zero: str | None = None  # how the description writes 0 (ttl 0 is "inherit")

    def applies_to(self, kind: str) -> bool:
        """Does a link of this kind (mode) have the parameter at all?"""
        ip6 = kind in IPV6_MODES
        return not (self.ipv4_only and ip6) and not (self.ipv6_only and not ip6)


IFLA_GRE_IFLAGS, IFLA_GRE_OFLAGS, IFLA_GRE_IKEY, IFLA_GRE_OKEY = 2, 3, 4, 5
IFLA_GRE_LOCAL, IFLA_GRE_REMOTE, IFLA_GRE_TTL, IFLA_GRE_TOS, IFLA_GRE_PMTUDISC = 6, 7, 8, 9, 10
IFLA_GRE_LINK, IFLA_GRE_ENCAP_LIMIT, IFLA_GRE_FLOWINFO, IFLA_GRE_FLAGS = 1, 11, 12, 13
IFLA_GRE_FWMARK = 20

GRE_ATTRIBUTES: tuple[GreAttribute, ...] = (
    GreAttribute("local", IFLA_GRE_LOCAL, "LOCAL", "address"),
    GreAttribute("remote", IFLA_GRE_REMOTE, "REMOTE", "address"),
    GreAttribute("ikey", IFLA_GRE_IKEY, "IKEY", "key", flags_number=IFLA_GRE_IFLAGS, flags_name="IFLAGS",
                  shown="keyed"),
    GreAttribute("okey", IFLA_GRE_OKEY, "OKEY", "key", flags_number=IFLA_GRE_OFLAGS, flags_name="OFLAGS",
                  shown="keyed"),
    GreAttribute("ttl", IFLA_GRE_TTL, "TTL", "u8", zero="inherit"),
    GreAttribute("tos", IFLA_GRE_TOS, "TOS", "u8", ipv4_only=True, shown="never"),
    GreAttribute("pmtudisc", IFLA_GRE_PMTUDISC, "PMTUDISC", "flag", ipv4_only=True, shown="never"),
    GreAttribute("encap_limit", IFLA_GRE_ENCAP_LIMIT, "ENCAP_LIMIT", "encap_limit", flags_number=IFLA_GRE_FLAGS,
                 flags_name="FLAGS", ipv6_only=True, shown="never"),
)

# --- what a change keeps --------------------------------------------------------------------------------------
#
# A change (RTM_NEWLINK on the existing ifindex) is decoded by ipgre_netlink_parms (net/ipv4/ip_gre.c) and
# ip6gre_netlink_parms (net/ipv6/ip6_gre.c), which start from a zeroed parameter struct: every parameter a request
# leaves out is reset, also those greupd does not manage and somebody set by hand on a link greupd adopted (`ip
# tunnel ... csum`, `tclass inherit`, `dev eth0`). So a change echoes them as the kernel reported them, an allowlist
# of what those two functions read back as a plain value. Left out on purpose:
# - IFLA_GRE_ENCAP_TYPE/FLAGS/SPORT/DPORT (FOU/GUE): ipgre_newlink_encap_setup and ip6gre_changelink_common apply
#   them only when one is present, so the kernel keeps them when a change sends none.
# - IFLA_GRE_IGNORE_DF (IPv4): ipgre_netlink_parms sets t->ignore_df only when present, so it is kept as well.
# - IFLA_GRE_COLLECT_METADATA: a one-way switch (ipgre_netlink_parms sets collect_md and turns the device type to
#   ARPHRD_NONE whenever it is present), not a value to echo; a metadata device is no point-to-point tunnel.
# - IFLA_GRE_ERSPAN_*: erspan kinds only; greupd's modes never carry an ERSPAN header.
KeptAttributes = tuple[tuple[int, bytes], ...]  # (IFLA_GRE_* number, the payload as the kernel reported it)
KEPT_ON_CHANGE: frozenset[int] = frozenset({
    IFLA_GRE_LINK,  # both: parms->link, the underlay device bound to (`ip link ... dev eth0`); absent: unbound
    IFLA_GRE_IFLAGS, IFLA_GRE_OFLAGS,  # both: GRE_CSUM, GRE_SEQ beside greupd's GRE_KEY; merged, see below
    IFLA_GRE_FLOWINFO,  # ip6gre_netlink_parms: parms->flowinfo (`flowlabel`, `tclass` values)
    IFLA_GRE_FLAGS,  # ip6gre_netlink_parms: parms->flags (`tclass inherit`, ...) beside greupd's; merged
    # ip6gre_netlink_parms: parms->fwmark, zeroed when absent. (ipgre_changelink starts from t->fwmark and keeps
    # it; echoing the same mark changes nothing there.)
    IFLA_GRE_FWMARK,
})
GRE_KEY = 0x2000  # in IFLA_GRE_[IO]FLAGS (__be16): there is a key; greupd's, from the key fields
# Bits of the ip6 tunnel's u32 flags (include/uapi/linux/ip6_tunnel.h) a change does not echo: greupd's own, and
# IP6_TNL_F_CAP_XMIT / CAP_RCV / CAP_PER_PACKET, which the kernel computes itself (ip6gre_tnl_link_config_common).
IP6_TNL_FLAGS_NOT_KEPT = IP6_TNL_F_IGN_ENCAP_LIMIT | 0x10000 | 0x20000 | 0x40000
