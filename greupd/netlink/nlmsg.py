"""Netlink framing, written once: the message header, the attribute (TLV) layout, and the socket options.

Every netlink family greupd speaks (rtnetlink for links, addresses and routes; nfnetlink for nftables
events) and the benchmarks' own probes share this layout (include/uapi/linux/netlink.h): a 16-byte header
`struct nlmsghdr` (length, type, flags, seq, pid), a family-specific fixed header, then attributes
`struct nlattr` (length, type, payload), each padded to 4 bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import NamedTuple

# message types every family shares
NLMSG_ERROR, NLMSG_DONE = 2, 3
# header flags
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK = 0x1, 0x2, 0x4
NLM_F_DUMP_INTR = 0x10  # on a dump's messages: the table changed meanwhile, the dump may miss entries
NLM_F_ACK_TLVS = 0x200  # on NLMSG_ERROR / NLMSG_DONE: extended ACK attributes follow
NLM_F_DUMP = 0x300
NLM_F_EXCL, NLM_F_CREATE = 0x200, 0x400
NLM_F_REPLACE = 0x100
# socket options (level SOL_NETLINK) and the extended ACK's attribute
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NETLINK_CAP_ACK, NETLINK_EXT_ACK, NETLINK_GET_STRICT_CHK = 10, 11, 12
NLMSGERR_ATTR_MSG = 1
SO_RCVBUFFORCE = 33  # <asm-generic/socket.h>; not exported by Python's socket module

HEADER = struct.Struct("=IHHII")  # struct nlmsghdr: len, type, flags, seq, pid
ATTR = struct.Struct("=HH")  # struct nlattr: len, type
ATTR_TYPE_MASK = 0x3FFF  # the type without NLA_F_NESTED / NLA_F_NET_BYTEORDER


class Message(NamedTuple):
    """One netlink message of a datagram."""

    kind: int  # nlmsg_type
    flags: int
    seq: int
    pid: int  # the sender's port; on a notification, the port whose request caused it
    body: bytes  # after the header
    raw: bytes  # header included


def aligned(length: int) -> int:
    """NLMSG_ALIGN / NLA_ALIGN: messages and attributes start on 4-byte boundaries."""
    return (length + 3) & ~3


def attr(kind: int, payload: bytes) -> bytes:
    """One attribute, padded."""
    length = ATTR.size + len(payload)
    return ATTR.pack(length, kind) + payload + b"\0" * (aligned(length) - length)


def message(kind: int, flags: int, seq: int, pid: int, body: bytes) -> bytes:
    """One message: the header (its length filled in) and `body`."""
    return HEADER.pack(HEADER.size + len(body), kind, flags, seq, pid) + body


def messages(data: bytes) -> Iterator[Message]:
    """The messages of one datagram; a truncated tail is dropped."""
    offset = 0
    while offset + HEADER.size <= len(data):
        length, kind, flags, seq, pid = HEADER.unpack_from(data, offset)
        if length < HEADER.size:
            break
        yield Message(kind, flags, seq, pid, data[offset + HEADER.size:offset + length], data[offset:offset + length])
        offset += aligned(length)


def attributes(data: bytes, offset: int = 0) -> Iterator[tuple[int, bytes]]:
    """(type, payload) of each attribute in `data` from `offset`, type without its two flag bits."""
    while offset + ATTR.size <= len(data):
        length, kind = ATTR.unpack_from(data, offset)
        if length < ATTR.size:
            return
        yield kind & ATTR_TYPE_MASK, data[offset + ATTR.size:offset + length]
        offset += aligned(length)


def error_code(body: bytes) -> int:
    """The errno of an NLMSG_ERROR message's body (0 for an ACK): the kernel sends it negated."""
    code: int = -struct.unpack_from("=i", body)[0]
    return code


def ext_ack_message(body: bytes, offset: int = 4 + HEADER.size) -> str:
    """The kernel's text in an NLMSG_ERROR (NETLINK_EXT_ACK), or ""."""
    # struct nlmsgerr: int error; struct nlmsghdr msg (no payload: NETLINK_CAP_ACK); then attributes.
    for kind, payload in attributes(body, offset):
        if kind == NLMSGERR_ATTR_MSG:
            return payload.split(b"\0", 1)[0].decode(errors="replace")
    return ""


def done_code(body: bytes) -> tuple[int, str]:
    """The errno a dump ended with, and the kernel's text, from NLMSG_DONE's body (0, "" for a complete dump).

    A dump that fails part-way does not answer NLMSG_ERROR: netlink_dump_done() puts the dumpit callback's
    error in NLMSG_DONE (negated, as in NLMSG_ERROR), extended ACK attributes right after it. Old kernels
    sent an empty body.
    """
    if len(body) < 4:
        return 0, ""
    code = error_code(body)
    return code, ext_ack_message(body, 4) if code else ""
