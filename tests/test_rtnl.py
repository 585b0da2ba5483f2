"""The rtnetlink codec without a kernel: every request greupd sends, read back by pyroute2's own parser.

rtnl.py encodes requests and decodes the kernel's messages by hand (for speed); here each request of the
seed's story (tunnel My_Tunnel from A 172.19.1.1 to B 172.19.1.2, its address, its routes, and the ip6gre and
gretap variants) is encoded, framed, parsed by pyroute2's MarshalRtnl as if the kernel had sent it (an
independent reading of the wire format), and turned back into model values by rtnl's own decoders, which
read the same bytes as the kernel would send them. What comes out must be what went in.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from dataclasses import replace
from typing import Any

import pytest
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

from greupd.gre import GRE_ATTRIBUTES, IFLA_GRE_FLAGS
from greupd.model import LINK_ALIAS, ROUTE_PROTO, AddressSpec, LinkSpec, ObservedLink, RouteSpec
from greupd.netlink import nlmsg, rtnl

INDEX = 7
TUNNEL = "My_Tunnel"

SEED_LINK = LinkSpec(TUNNEL, "gre", ipaddress.ip_address("172.19.1.1"), ipaddress.ip_address("172.19.1.2"))
LINKS = [
    SEED_LINK,
    LinkSpec(TUNNEL, "gre", ipaddress.ip_address("172.19.1.1"), ipaddress.ip_address("172.19.1.2"),
             ikey=1, okey=0x2A, ttl=0, tos=0x10, pmtudisc=False, mtu=1400),
    LinkSpec(TUNNEL, "gretap", ipaddress.ip_address("172.19.1.1"), ipaddress.ip_address("172.19.1.2"),
             ikey=0, okey=None, ttl=255, tos=0, mtu=1462),
    LinkSpec(TUNNEL, "ip6gre", ipaddress.ip_address("fd00::1"), ipaddress.ip_address("fd00::2"),
             ikey=42, okey=42, ttl=64, tos=None, pmtudisc=None, encap_limit=4),
    LinkSpec(TUNNEL, "ip6gretap", ipaddress.ip_address("fd00::1"), ipaddress.ip_address("fd00::2"),
             ikey=None, okey=7, ttl=0, tos=None, pmtudisc=None, mtu=1448, encap_limit="none"),
    LinkSpec(TUNNEL, "ip6gre", ipaddress.ip_address("fd00::1"), ipaddress.ip_address("fd00::2"),
             tos=None, pmtudisc=None, encap_limit=0),
]
ADDRESSES = [
    AddressSpec(TUNNEL, ipaddress.ip_interface("10.0.0.1/30")),
    AddressSpec(TUNNEL, ipaddress.ip_interface("10.0.0.1/32"), ipaddress.ip_address("10.0.0.2")),
    AddressSpec(TUNNEL, ipaddress.ip_interface("fd01::1/64")),
]
ROUTES = [
    RouteSpec(TUNNEL, ipaddress.ip_network("20.10.1.0/24"), metric=10),
    RouteSpec(TUNNEL, ipaddress.ip_network("0.0.0.0/0"), table=1000, metric=0),
    RouteSpec(TUNNEL, ipaddress.ip_network("20.10.2.0/24"), table=100, gateway=ipaddress.ip_address("10.0.0.2")),
    RouteSpec(TUNNEL, ipaddress.ip_network("fd02::/48"), metric=1024),
]


def parsed(request: rtnl.Request) -> Any:
    """The request as pyroute2 reads it off the wire (one message, header included)."""
    data = nlmsg.message(request.type, request.flags, 1, 0, request.body)
    (msg,) = MarshalRtnl().parse(data)
    assert msg["header"]["type"] == request.type
    assert msg["header"]["flags"] == request.flags
    return msg


def wire(request: rtnl.Request) -> bytes:
    """The request as one framed message, as the kernel's answer or notification would carry it."""
    return nlmsg.message(request.type, request.flags, 1, 0, request.body)


def gre_data(msg: Any) -> dict[str, Any]:
    """IFLA_INFO_DATA of a link message as pyroute2 names it, without the family prefix."""
    data = msg.get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_DATA")
    return {name.split("GRE_", 1)[1]: value for name, value in data["attrs"] if "GRE_" in name}


def raw_gre_data(request: rtnl.Request) -> dict[int, bytes]:
    """IFLA_INFO_DATA by number, for what pyroute2 has no name for (an ip6gre link's IFLA_GRE_FWMARK)."""
    info = dict(nlmsg.attributes(dict(nlmsg.attributes(request.body, rtnl._IFINFO.size))[rtnl.IFLA_LINKINFO]))
    return dict(nlmsg.attributes(info[rtnl.IFLA_INFO_DATA]))


@pytest.mark.parametrize("spec", LINKS,
                         ids=lambda s: f"{s.kind}-mtu{s.mtu}-ikey{s.ikey}-okey{s.okey}-encaplimit{s.encap_limit}")
def test_new_link_reads_back_as_the_link_it_creates(spec: LinkSpec) -> None:
    msg = parsed(rtnl.new_link(spec))
    assert msg["header"]["flags"] & nlmsg.NLM_F_CREATE and msg["header"]["flags"] & nlmsg.NLM_F_EXCL
    assert msg.get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_KIND") == spec.kind
    # Not up and not ours yet: the alias comes with a second request (set_alias), the up state with a third.
    assert rtnl.link_from_message(wire(rtnl.new_link(spec))) == (TUNNEL, ObservedLink(0, spec, False, False))


@pytest.mark.parametrize("spec", LINKS, ids=lambda s: f"{s.kind}-mtu{s.mtu}-encaplimit{s.encap_limit}")
def test_change_link_carries_every_parameter_by_index(spec: LinkSpec) -> None:
    change, new = parsed(rtnl.change_link(INDEX, spec)), parsed(rtnl.new_link(spec))
    assert change["index"] == INDEX
    assert change.get_attr("IFLA_IFNAME") is None  # by index: the name might be what is wrong
    assert change.get_attr("IFLA_MTU") == spec.mtu
    assert change.get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_KIND") == spec.kind
    assert gre_data(change) == gre_data(new)
    assert not change["header"]["flags"] & nlmsg.NLM_F_CREATE


def test_ip6_modes_send_no_ipv4_only_parameter() -> None:
    sent = gre_data(parsed(rtnl.new_link(LINKS[3])))
    ipv4_only = {a.name for a in GRE_ATTRIBUTES if a.ipv4_only}
    assert ipv4_only and not ipv4_only & set(sent)
    assert {a.name for a in GRE_ATTRIBUTES if not a.ipv4_only} <= set(sent)


def test_ipv4_modes_send_no_ipv6_only_parameter() -> None:
    # ip_gre has no encapsulation limit: IFLA_GRE_ENCAP_LIMIT and IFLA_GRE_FLAGS are never sent to it.
    for spec in LINKS[:3]:
        sent = gre_data(parsed(rtnl.new_link(spec)))
        assert not {"ENCAP_LIMIT", "FLAGS"} & set(sent), sent


@pytest.mark.parametrize(("encap_limit", "limit", "flags"), [(4, 4, 0), (0, 0, 0), (255, 255, 0), ("none", 4, 1)])
def test_encap_limit_is_sent_as_ip_link_sends_encaplimit(encap_limit: int | str, limit: int, flags: int) -> None:
    """`ip link add ... type ip6gre encaplimit N|none`: the u8 limit, and IP6_TNL_F_IGN_ENCAP_LIMIT (0x1) in the
    u32 flags for "none" (the limit then stays iproute2's 4, which the kernel ignores). On create and change alike:
    ip6gre_changelink starts from zeroed parameters, so a change without them would set the limit to 0."""
    spec = LinkSpec(TUNNEL, "ip6gre", ipaddress.ip_address("fd00::1"), ipaddress.ip_address("fd00::2"),
                    tos=None, pmtudisc=None, encap_limit=encap_limit)  # type: ignore[arg-type]
    for request in (rtnl.new_link(spec), rtnl.change_link(INDEX, spec)):
        sent = gre_data(parsed(request))
        assert (sent["ENCAP_LIMIT"], sent["FLAGS"]) == (limit, flags)


def test_the_kernels_own_flag_bits_do_not_change_the_encap_limit_read() -> None:
    """The kernel reports IP6_TNL_F_CAP_XMIT / CAP_RCV (0x10000, 0x20000) in the same flags word it dumps."""
    spec = LINKS[3]
    body = rtnl.new_link(spec).body
    for flags, expected in ((0x30000, 4), (0x30001, "none")):
        dumped = body.replace(nlmsg.attr(IFLA_GRE_FLAGS, struct.pack("=I", 0)),
                              nlmsg.attr(IFLA_GRE_FLAGS, struct.pack("=I", flags)))
        assert dumped != body
        _, link = rtnl.link_from_message(nlmsg.message(rtnl.RTM_NEWLINK, 0, 0, 0, dumped))  # type: ignore[misc]
        assert link.spec.encap_limit == expected


def test_the_marker_and_up_down_requests() -> None:
    # By ifindex and without a name: a mark by name could land on whichever link holds the name (review H2).
    alias = parsed(rtnl.set_alias(INDEX, LINK_ALIAS))
    assert (alias["index"], alias.get_attr("IFLA_IFNAME"), alias.get_attr("IFLA_IFALIAS")) == (INDEX, None, "greupd")
    for up in (True, False):
        msg = parsed(rtnl.set_link_up(INDEX, up))
        assert (msg["index"], msg["flags"], msg["change"]) == (INDEX, rtnl.IFF_UP if up else 0, rtnl.IFF_UP)
    deleted = parsed(rtnl.del_link(INDEX))
    assert (deleted["header"]["type"], deleted["index"]) == (rtnl.RTM_DELLINK, INDEX)
    looked_up = parsed(rtnl.get_link(TUNNEL))
    assert (looked_up["header"]["type"], looked_up.get_attr("IFLA_IFNAME")) == (rtnl.RTM_GETLINK, TUNNEL)


def test_link_messages_of_the_ready_link_and_a_foreign_one() -> None:
    """What the kernel answers about A's tunnel once greupd marked and raised it; a foreign link of B."""
    up = rtnl.set_link_up(INDEX, True)
    body = (up.body + rtnl._str(rtnl.IFLA_IFNAME, TUNNEL) + rtnl._str(rtnl.IFLA_IFALIAS, LINK_ALIAS)
            + rtnl._linkinfo(SEED_LINK))
    raw = nlmsg.message(rtnl.RTM_NEWLINK, 0, 0, 0, body)
    (msg,) = MarshalRtnl().parse(raw)
    assert msg.get_attr("IFLA_IFALIAS") == LINK_ALIAS
    assert rtnl.link_from_message(raw) == (TUNNEL, ObservedLink(INDEX, SEED_LINK, True, True))
    assert rtnl.link_name_and_index(raw) == (TUNNEL, INDEX)

    dummy = rtnl.set_link_up(3, False).body + rtnl._str(rtnl.IFLA_IFNAME, TUNNEL) + nlmsg.attr(
        rtnl.IFLA_LINKINFO, rtnl._str(rtnl.IFLA_INFO_KIND, "dummy"))
    name, link = rtnl.link_from_message(nlmsg.message(rtnl.RTM_NEWLINK, 0, 0, 0, dummy))  # type: ignore[misc]
    assert (name, link.index, link.spec.kind, link.up, link.owned) == (TUNNEL, 3, "dummy", False, False)


@pytest.mark.parametrize("spec", ADDRESSES, ids=str)
@pytest.mark.parametrize("add", [True, False], ids=["add", "delete"])
def test_address_reads_back(spec: AddressSpec, add: bool) -> None:
    msg = parsed(rtnl.address(add, INDEX, spec))
    assert msg["header"]["type"] == (rtnl.RTM_NEWADDR if add else rtnl.RTM_DELADDR)
    assert msg["index"] == INDEX
    assert msg["family"] == (socket.AF_INET6 if spec.local.version == 6 else socket.AF_INET)
    raw = wire(rtnl.address(add, INDEX, spec))
    assert rtnl.address_from_message(raw, {INDEX: TUNNEL}) == spec
    assert rtnl.address_from_message(raw, {INDEX + 1: "other"}) is None
    assert rtnl.address_index(raw) == INDEX


@pytest.mark.parametrize("spec", ROUTES, ids=str)
@pytest.mark.parametrize("add", [True, False], ids=["add", "delete"])
def test_route_reads_back(spec: RouteSpec, add: bool) -> None:
    msg = parsed(rtnl.route(add, INDEX, spec, ROUTE_PROTO))
    assert msg["header"]["type"] == (rtnl.RTM_NEWROUTE if add else rtnl.RTM_DELROUTE)
    assert msg["proto"] == ROUTE_PROTO  # a delete too: only a route of ours goes
    assert msg["table"] == (spec.table if spec.table < 256 else rtnl.RT_TABLE_COMPAT)
    device_route = spec.gateway is None and spec.dst.version == 4
    assert msg["scope"] == (rtnl.RT_SCOPE_LINK if device_route else rtnl.RT_SCOPE_UNIVERSE)
    raw = wire(rtnl.route(add, INDEX, spec, ROUTE_PROTO))
    assert rtnl.route_from_message(raw, {INDEX: TUNNEL}) == spec
    assert rtnl.route_from_message(raw, {INDEX + 1: "other"}) is None
    assert rtnl.route_protocol_and_type(raw) == (ROUTE_PROTO, rtnl.RTN_UNICAST)
    assert rtnl.route_oif(raw) == INDEX


def test_adoption_marks_by_index_and_replaces_routes() -> None:
    """`adopt = true`: the hand-made link is marked by its ifindex, its route replaced (ip route replace)."""
    alias = parsed(rtnl.set_alias_by_index(INDEX, LINK_ALIAS))
    assert (alias["index"], alias.get_attr("IFLA_IFNAME"), alias.get_attr("IFLA_IFALIAS")) == (INDEX, None, "greupd")
    for spec in ROUTES:
        msg = parsed(rtnl.replace_route(INDEX, spec, ROUTE_PROTO))
        assert msg["header"]["flags"] & nlmsg.NLM_F_REPLACE and not msg["header"]["flags"] & nlmsg.NLM_F_EXCL
        assert msg["proto"] == ROUTE_PROTO
        assert rtnl.route_from_message(wire(rtnl.replace_route(INDEX, spec, ROUTE_PROTO)), {INDEX: TUNNEL}) == spec


def test_dumps_ask_the_kernel_to_filter() -> None:
    addresses = parsed(rtnl.dump_addresses(INDEX))
    assert addresses["header"]["flags"] & nlmsg.NLM_F_DUMP == nlmsg.NLM_F_DUMP and addresses["index"] == INDEX
    routes = parsed(rtnl.dump_routes(socket.AF_INET6, ROUTE_PROTO, INDEX))
    assert (routes["family"], routes["proto"], routes.get_attr("RTA_OIF")) == (socket.AF_INET6, ROUTE_PROTO, INDEX)
    assert parsed(rtnl.dump_routes(socket.AF_INET, ROUTE_PROTO)).get_attr("RTA_OIF") is None
    assert parsed(rtnl.dump_links())["header"]["type"] == rtnl.RTM_GETLINK


def test_notification_prefilter_reads_the_fixed_header() -> None:
    """A link-local address and a kernel route on our link are skipped before any attribute is decoded."""
    ours = nlmsg.message(rtnl.RTM_NEWROUTE, 0, 0, 0, rtnl.route(True, INDEX, ROUTES[0], ROUTE_PROTO).body)
    kernels = nlmsg.message(rtnl.RTM_NEWROUTE, 0, 0, 0, rtnl.route(True, INDEX, ROUTES[0], 2).body)
    assert rtnl.may_concern_us(rtnl.RTM_NEWROUTE, ours, ROUTE_PROTO)
    assert not rtnl.may_concern_us(rtnl.RTM_NEWROUTE, kernels, ROUTE_PROTO)
    link_local = rtnl.address(True, INDEX, AddressSpec(TUNNEL, ipaddress.ip_interface("fe80::1/64"))).body
    link_local = link_local[:3] + bytes([rtnl.RT_SCOPE_LINK]) + link_local[4:]  # ifa_scope
    assert not rtnl.may_concern_us(rtnl.RTM_NEWADDR, nlmsg.message(rtnl.RTM_NEWADDR, 0, 0, 0, link_local),
                                   ROUTE_PROTO)


# --- the kernel's answers, as they arrive on the request socket --------------------------------------------


def _done(seq: int, errno_: int = 0, text: str = "", flags: int = nlmsg.NLM_F_MULTI) -> bytes:
    """NLMSG_DONE as netlink_dump_done() writes it: the dump's errno negated, the extended ACK text after it."""
    body = struct.pack("=i", -errno_)
    if text:
        flags |= nlmsg.NLM_F_ACK_TLVS
        body += nlmsg.attr(nlmsg.NLMSGERR_ATTR_MSG, text.encode() + b"\0")
    return nlmsg.message(nlmsg.NLMSG_DONE, flags, seq, 0, body)


def _link_reply(seq: int, flags: int = nlmsg.NLM_F_MULTI) -> bytes:
    return nlmsg.message(rtnl.RTM_NEWLINK, flags, seq, 0, rtnl.new_link(SEED_LINK).body)


def test_a_complete_dump_is_its_replies() -> None:
    answers = rtnl.Answers([5], [rtnl.dump_links()])
    answers.feed(_link_reply(5) + _link_reply(5))
    assert not answers.complete
    answers.feed(_done(5))
    assert answers.complete
    (outcome,) = answers.outcomes()
    assert (outcome.errno, len(outcome.replies), outcome.interrupted) == (0, 2, False)


def test_a_dump_that_failed_part_way_is_an_error_not_a_shorter_list() -> None:
    """Review M2: the dumpit callback's error arrives in NLMSG_DONE, after the entries it got to."""
    answers = rtnl.Answers([5], [rtnl.dump_links()])
    answers.feed(_link_reply(5) + _done(5, errno.EINVAL, "invalid header for link dump"))
    (outcome,) = answers.outcomes()
    assert outcome.errno == errno.EINVAL
    assert str(outcome) == "Invalid argument: invalid header for link dump"


@pytest.mark.parametrize("kind", ["done", "error"])
def test_an_errno_past_a_c_int_reads_as_an_unknown_error(kind: str) -> None:
    """fuzz/crashes/rtnl/min-errno-int-min-in-done.bin: error -2**31 in NLMSG_DONE (or NLMSG_ERROR) is errno
    2**31, past a C int: os.strerror raised OverflowError from Outcome.__str__."""
    answers = rtnl.Answers([2], [rtnl.dump_links()])
    message = nlmsg.NLMSG_DONE if kind == "done" else nlmsg.NLMSG_ERROR
    body = struct.pack("=i", -(2**31)) + (bytes(nlmsg.HEADER.size) if kind == "error" else b"")
    answers.feed(nlmsg.message(message, nlmsg.NLM_F_MULTI, 2, 0, body))
    (outcome,) = answers.outcomes()
    assert outcome.errno == 2**31
    assert str(outcome) == "Unknown error 2147483648"


def test_an_interrupted_dump_says_so() -> None:
    """Review M2: NLM_F_DUMP_INTR on any message of the dump (a link went away meanwhile, an entry may be
    missing): the caller asks again."""
    answers = rtnl.Answers([5, 6], [rtnl.dump_links(), rtnl.get_link(TUNNEL)])
    answers.feed(_link_reply(6, flags=0) + _link_reply(5) + _link_reply(5, nlmsg.NLM_F_MULTI | nlmsg.NLM_F_DUMP_INTR)
                 + _done(5, flags=nlmsg.NLM_F_MULTI | nlmsg.NLM_F_DUMP_INTR))
    dumped, looked_up = answers.outcomes()
    assert dumped.interrupted and dumped.errno == 0
    assert not looked_up.interrupted and len(looked_up.replies) == 1


def test_acks_and_refusals_by_sequence_number() -> None:
    requests = [rtnl.del_link(INDEX), rtnl.set_link_up(INDEX, True)]
    answers = rtnl.Answers([0xFFFFFFFF, 1], requests)

    def ack(seq: int, code: int) -> bytes:
        return nlmsg.message(nlmsg.NLMSG_ERROR, 0, seq, 0, struct.pack("=i", -code) + bytes(nlmsg.HEADER.size))

    answers.feed(ack(1, errno.ENODEV) + ack(7, 0))  # 7: not ours, ignored
    assert not answers.complete
    answers.feed(ack(0xFFFFFFFF, 0))
    assert [o.errno for o in answers.outcomes()] == [0, errno.ENODEV]


def test_sequence_numbers_wrap_at_32_bits_and_skip_0() -> None:
    """Review L1: nlmsg_seq is a u32 (struct.pack raised past it), and 0 is what notifications carry."""
    assert rtnl.next_seq(0) == 1
    assert rtnl.next_seq(41) == 42
    assert rtnl.next_seq(0xFFFFFFFE) == 0xFFFFFFFF
    assert rtnl.next_seq(0xFFFFFFFF) == 1


# --- a change keeps what greupd does not manage (gre.KEPT_ON_CHANGE) ------------------------------------------

GRE_CSUM, GRE_KEY, GRE_SEQ = 0x8000, 0x2000, 0x1000
IP6_TNL_F_USE_ORIG_TCLASS, IP6_TNL_F_USE_ORIG_FLOWLABEL, IP6_TNL_F_CAPS = 0x2, 0x4, 0x30000


def kernel_link(kind: str, data: list[tuple[int, bytes]]) -> bytes:
    """An RTM_NEWLINK as the kernel dumps a link of ours (IFLA_INFO_DATA attributes in its fill_info order)."""
    body = (rtnl.set_link_up(INDEX, True).body + rtnl._str(rtnl.IFLA_IFNAME, TUNNEL)
            + rtnl._str(rtnl.IFLA_IFALIAS, LINK_ALIAS)
            + nlmsg.attr(rtnl.IFLA_LINKINFO, rtnl._str(rtnl.IFLA_INFO_KIND, kind) + nlmsg.attr(
                rtnl.IFLA_INFO_DATA, b"".join(nlmsg.attr(number, payload) for number, payload in data))))
    return nlmsg.message(rtnl.RTM_NEWLINK, 0, 0, 0, body)


def test_a_change_sends_back_csum_seq_underlay_and_mark_of_a_gre_link_made_by_hand() -> None:
    """`ip link add My_Tunnel type gre local .. remote .. key 42 icsum ocsum iseq dev eth0 fwmark 7 encap fou ..
    ignore-df nopmtudisc`: ipgre_changelink resets the link (IFLA_GRE_LINK), the csum and seq flags unless a change
    sends them; the FOU encapsulation, ignore-df and the mark it keeps by itself, so only the mark goes back."""
    reply = kernel_link("gre", [
        (1, struct.pack("=I", 2)), (2, struct.pack(">H", GRE_KEY | GRE_CSUM | GRE_SEQ)),
        (3, struct.pack(">H", GRE_KEY | GRE_CSUM)), (4, struct.pack(">I", 42)), (5, struct.pack(">I", 42)),
        (6, ipaddress.ip_address("172.19.1.1").packed), (7, ipaddress.ip_address("172.19.1.2").packed),
        (8, b"\x00"), (9, b"\x00"), (10, b"\x00"), (20, struct.pack("=I", 7)),
        (14, struct.pack("=H", 1)), (16, struct.pack(">H", 0)), (17, struct.pack(">H", 5555)), (15, b"\0\0"),
        (19, b"\x01"), (18, b""),
    ])
    _, link = rtnl.link_from_message(reply)  # type: ignore[misc]
    assert (link.spec.ikey, link.spec.okey, link.spec.ttl, link.spec.pmtudisc) == (42, 42, 0, False)
    assert [number for number, _ in link.kept] == [1, 2, 3, 20]

    wanted = replace(link.spec, ttl=64)
    sent = gre_data(parsed(rtnl.change_link(INDEX, wanted, link.kept)))
    assert (sent["IFLAGS"], sent["OFLAGS"]) == (GRE_KEY | GRE_CSUM | GRE_SEQ, GRE_KEY | GRE_CSUM)
    assert (sent["LINK"], sent["FWMARK"], sent["TTL"], sent["IKEY"]) == (2, 7, 64, 42)
    assert not {"ENCAP_TYPE", "ENCAP_DPORT", "IGNORE_DF", "COLLECT_METADATA"} & set(sent), sent
    # The key bit is greupd's alone: a link changed to no key keeps its checksums and loses the key.
    unkeyed = gre_data(parsed(rtnl.change_link(INDEX, replace(wanted, ikey=None, okey=None), link.kept)))
    assert (unkeyed["IFLAGS"], unkeyed["OFLAGS"]) == (GRE_CSUM | GRE_SEQ, GRE_CSUM)
    # Nothing to keep (a create, or a link nobody touched): what greupd sends alone, as before.
    assert gre_data(parsed(rtnl.change_link(INDEX, wanted)))["IFLAGS"] == GRE_KEY
    assert "LINK" not in gre_data(parsed(rtnl.change_link(INDEX, wanted)))


def test_a_change_sends_back_tclass_and_flowlabel_inherit_of_an_ip6gre_link() -> None:
    """`ip link add ... type ip6gre ... encaplimit none tclass inherit flowlabel inherit fwmark 7`: ip6gre_netlink_parms
    zeroes the flags word, the flow info and the mark unless a change sends them. The encap-limit bit stays greupd's,
    the capability bits the kernel's (it computes them), and the ERSPAN ones are not a GRE tunnel's."""
    reply = kernel_link("ip6gre", [
        (1, struct.pack("=I", 0)), (2, b"\0\0"), (3, b"\0\0"), (4, b"\0" * 4), (5, b"\0" * 4),
        (6, ipaddress.ip_address("fd00::1").packed), (7, ipaddress.ip_address("fd00::2").packed), (8, b"\x40"),
        (11, b"\x04"), (12, struct.pack(">I", 0x00012345)),
        (13, struct.pack("=I", 1 | IP6_TNL_F_USE_ORIG_TCLASS | IP6_TNL_F_USE_ORIG_FLOWLABEL | IP6_TNL_F_CAPS)),
        (20, struct.pack("=I", 7)), (22, b"\x01"), (21, struct.pack("=I", 0)),
    ])
    _, link = rtnl.link_from_message(reply)  # type: ignore[misc]
    assert link.spec.encap_limit == "none"
    assert [number for number, _ in link.kept] == [1, 2, 3, 12, 13, 20]

    for limit, ignore in ((4, 0), ("none", 1)):
        request = rtnl.change_link(INDEX, replace(link.spec, encap_limit=limit), link.kept)
        sent = gre_data(parsed(request))
        assert sent["FLAGS"] == ignore | IP6_TNL_F_USE_ORIG_TCLASS | IP6_TNL_F_USE_ORIG_FLOWLABEL
        assert (sent["LINK"], sent["ENCAP_LIMIT"], sent["FLOWINFO"]) == (0, 4, 0x00012345)
        by_number = raw_gre_data(request)  # pyroute2 names no ip6gre attribute past ENCAP_DPORT (17)
        assert by_number[20] == struct.pack("=I", 7)  # IFLA_GRE_FWMARK
        assert not {21, 22} & set(by_number)  # IFLA_GRE_ERSPAN_INDEX, _VER
