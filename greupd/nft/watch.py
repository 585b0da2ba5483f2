"""Watch nftables for changes, so greupd's table is kept in place (level-triggered: events only say "look again").

The kernel announces every committed nftables transaction on the netfilter netlink socket, multicast group
NFNLGRP_NFTABLES: one message per object created or deleted (table, chain, rule, set...), then one
NFT_MSG_NEWGEN that closes the transaction and names the process that committed it. NftWatch reads those on
the asyncio loop and calls `on_change()` once per read burst that had a transaction worth a look; the daemon
then asks `NftTable.matches()` and re-applies if the kernel differs. What an event said changed is never
acted on, so lost, merged or repeated events cannot leave the table wrong.

Our own apply is a transaction too. It cannot start a loop: after an apply `matches()` is true (NftTable
remembers how the kernel printed what it just installed), so the look it causes finds nothing to do. And as
a saving, transactions committed by this very process are not reported at all (the NEWGEN message carries
the committing task's pid; when it differs from os.getpid(), e.g. inside a pid namespace or from a worker
thread, the event is simply reported and the look finds nothing).
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

from greupd.netlink.nlmsg import NETLINK_ADD_MEMBERSHIP, SOL_NETLINK, attributes, messages

# include/uapi/linux/netfilter/nfnetlink.h, netfilter/nf_tables.h
NETLINK_NETFILTER = 12
NFNLGRP_NFTABLES = 7
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWGEN = 15
NFTA_GEN_PROC_PID = 2
NFTA_OBJECT_TABLE = 1  # NFTA_TABLE_NAME, NFTA_CHAIN_TABLE, NFTA_RULE_TABLE, NFTA_SET_TABLE, ... are all 1
NFPROTO_INET = 1
NFPROTO_IPV4, NFPROTO_IPV6 = 2, 10
ROUTED_FAMILIES = frozenset({NFPROTO_INET, NFPROTO_IPV4, NFPROTO_IPV6})
# Table and chain messages (NEW, DEL, DESTROY): a chain's policy change is a NEWCHAIN. Rules of other tables
# are left to the periodic resync: iptables-nft users such as kube-proxy rewrite theirs every few seconds.
TABLE_AND_CHAIN_MESSAGES = frozenset({0, 2, 3, 5, 26, 27})
_NFGENMSG = struct.Struct("=BBH")  # family, version, res_id
RECEIVE_BUFFER = 1 << 20  # a `flush ruleset` of a big ruleset is one message per rule


@dataclass(frozen=True)
class NftEvent:
    """One nftables notification: an object change (with its table) or the end of a transaction."""

    kind: int  # NFT_MSG_*
    family: int  # NFPROTO_*
    table: str | None  # the object's table; None for NEWGEN
    pid: int | None  # NEWGEN only: the process that committed the transaction


class NftWatchError(OSError):
    """The kernel would not let us watch nftables (no netfilter netlink, or the group refused); str() is the
    message alone, the errno is in its __cause__."""


def parse_events(datagram: bytes) -> list[NftEvent]:
    """The nftables notifications in one netlink datagram (other messages are skipped)."""
    events = []
    for kind, _, _, _, body, _ in messages(datagram):
        if kind >> 8 != NFNL_SUBSYS_NFTABLES or len(body) < _NFGENMSG.size:
            continue
        family = body[0]
        attrs = dict(attributes(body, _NFGENMSG.size))
        message = kind & 0xFF
        if message == NFT_MSG_NEWGEN:
            pid_attr = attrs.get(NFTA_GEN_PROC_PID)
            pid = struct.unpack(">I", pid_attr)[0] if pid_attr and len(pid_attr) == 4 else None
            events.append(NftEvent(message, family, None, pid))
        else:
            name = attrs.get(NFTA_OBJECT_TABLE)
            table = name.split(b"\0", 1)[0].decode(errors="replace") if name is not None else None
            events.append(NftEvent(message, family, table, None))
    return events


@dataclass
class TransactionFilter:
    """Decides, event by event, whether a committed transaction is worth a look.

    A transaction is worth it when it touched the watched table (any table if none is given), or a table or
    chain of another ip, ip6 or inet table (a forward chain with policy drop there defeats our accepts:
    nft/foreign.py), and was committed by another process. Its object events come before its NEWGEN, so
    they are held until then.
    """

    table: str | None
    own_pid: int
    _touched: bool = False

    def feed(self, event: NftEvent) -> bool:
        if event.kind == NFT_MSG_NEWGEN:
            worth = self._touched and event.pid != self.own_pid
            self._touched = False
            return worth
        ours = self.table is None or (event.family == NFPROTO_INET and event.table == self.table)
        routed_chains = event.kind in TABLE_AND_CHAIN_MESSAGES and event.family in ROUTED_FAMILIES
        self._touched |= ours or routed_chains
        return False


class NftWatch:
    """Calls `on_change()` on the loop when another process changes nftables (our table, if given)."""

    def __init__(self, on_change: Callable[[], None], table: str | None = None) -> None:
        self.on_change = on_change
        self.table = table
        self._filter = TransactionFilter(table, os.getpid())
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Join the nftables multicast group and read it on `loop`; raises NftWatchError if the kernel refuses."""
        if self._sock is not None:
            return
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                                 NETLINK_NETFILTER)
        except OSError as exc:
            raise NftWatchError(f"cannot open a netfilter netlink socket to watch nftables: {exc.strerror}") \
                from exc
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
            sock.bind((0, 0))
            sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
        except OSError as exc:
            sock.close()
            raise NftWatchError(f"cannot join the nftables netlink group: {exc.strerror}") from exc
        self._sock, self._loop = sock, loop
        loop.add_reader(sock.fileno(), self._readable)

    def close(self) -> None:
        if self._sock is None:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        self._sock = self._loop = None

    def _readable(self) -> None:
        if self._sock is None:
            return
        changed = False
        while True:
            try:
                datagram = self._sock.recv(1 << 16)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                # The kernel dropped notifications (our buffer was full): we cannot know what changed,
                # nor whose transaction it was, so look again.
                changed = True
                self._filter = TransactionFilter(self.table, self._filter.own_pid)
                continue
            for event in parse_events(datagram):
                changed |= self._filter.feed(event)
        if changed:
            self.on_change()

