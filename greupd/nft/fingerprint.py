"""A cheap look at nftables from its own netlink: the ruleset's generation and a digest of one table's bytes.

Why: reading our table back through libnftables (JSON of every chain, rule and element, then normalized on
both sides) cost ~0.7-2 s at 1000 tunnels, on every "look again" the watch raises, even when the change was
another program's (kube-proxy rewrites its rules every few seconds). This asks the kernel directly:

- `generation()`: nftables' ruleset generation (NFT_MSG_GETGEN), bumped by every committed transaction in
  the netns. Unchanged since our table was last verified: nothing can have changed in it.
- `table_digest(name)`: a hash of our table as the kernel dumps it (the table, its chains, rules, sets and
  set elements, handles included), or None when there is no such table. Equal to the digest taken when the
  table was last verified: the table is byte for byte what it was then. Any edit, even one that puts the
  same rule back, changes a handle, so equality is never a false "unchanged"; a different digest only sends
  the caller to the full comparison (libnftables), which decides.

The kernel stamps each dumped message with the generation (nfgenmsg.res_id): that field is left out of the
digest. A dump the kernel marks interrupted (NLM_F_DUMP_INTR: a transaction meanwhile) is an error here.
Same netlink layout as watch.py (include/uapi/linux/netfilter/nf_tables.h).
"""

from __future__ import annotations

import errno
import hashlib
import socket
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from greupd.netlink.nlmsg import (
    ATTR,
    ATTR_TYPE_MASK,
    HEADER,
    NLM_F_DUMP,
    NLM_F_DUMP_INTR,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    aligned,
    attr,
    attributes,
    done_code,
    error_code,
    message,
    messages,
)

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFPROTO_UNSPEC, NFPROTO_INET = 0, 1
NFT_MSG_GETTABLE, NFT_MSG_GETCHAIN, NFT_MSG_GETRULE, NFT_MSG_GETSET, NFT_MSG_GETSETELEM = 1, 4, 7, 10, 13
NFT_MSG_GETGEN = 16
NFTA_GEN_ID = 1
NFTA_TABLE_NAME = 1
NFTA_CHAIN_TABLE, NFTA_CHAIN_NAME, NFTA_CHAIN_HOOK, NFTA_CHAIN_POLICY, NFTA_CHAIN_TYPE = 1, 3, 4, 5, 7
NFTA_HOOK_HOOKNUM, NFTA_HOOK_PRIORITY = 1, 2
NFTA_RULE_TABLE, NFTA_RULE_CHAIN = 1, 2
NFTA_SET_TABLE, NFTA_SET_NAME = 1, 2
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET = 1, 2
_NFGENMSG = struct.Struct("=BBH")  # family, version, res_id (the generation, in dumps)
_BE32 = struct.Struct(">I")
_BE32_SIGNED = struct.Struct(">i")
NF_INET_FORWARD = 2
NF_DROP = 0
RECEIVE = 1 << 16
_ZERO8, _ZERO2 = bytes(8), bytes(2)
TIMEOUT = 5.0  # the kernel answers inside the system call; this only bounds a wedged socket


class FingerprintError(OSError):
    """The kernel could not be asked (no nf_tables, a refused or interrupted dump): use the full comparison."""


def _string(value: str) -> bytes:
    return value.encode() + b"\0"


def _text(payload: bytes) -> str:
    return payload.split(b"\0", 1)[0].decode(errors="replace")


@dataclass(frozen=True)
class ChainInfo:
    """One chain as the kernel dumps it: what forward-drop detection needs (nft/foreign.py)."""

    family: int  # NFPROTO_*
    table: str
    name: str
    hook: int | None  # NF_INET_* of a base chain; None for a regular chain
    priority: int
    policy: int | None  # NF_ACCEPT (1) / NF_DROP (0) of a base chain
    type: str | None  # "filter", "nat", "route"


def parse_chain(raw: bytes) -> ChainInfo:
    """One chain of chain_dump()."""
    family, body = raw[0], raw[1:]
    table = name = kind = ""
    hook = policy = None
    priority = 0
    for key, payload in attributes(body):
        if key == NFTA_CHAIN_TABLE:
            table = _text(payload)
        elif key == NFTA_CHAIN_NAME:
            name = _text(payload)
        elif key == NFTA_CHAIN_TYPE:
            kind = _text(payload)
        elif key == NFTA_CHAIN_POLICY and len(payload) == 4:
            policy = _BE32.unpack(payload)[0]
        elif key == NFTA_CHAIN_HOOK:
            for hook_key, value in attributes(payload):
                if hook_key == NFTA_HOOK_HOOKNUM and len(value) == 4:
                    hook = _BE32.unpack(value)[0]
                elif hook_key == NFTA_HOOK_PRIORITY and len(value) == 4:
                    priority = _BE32_SIGNED.unpack(value)[0]
    return ChainInfo(family, table, name, hook, priority, policy, kind or None)


class NftNetlink:
    """A netfilter netlink socket for requests (not the watch's multicast one); opened on first use."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._seq = 0
        self._buffer = bytearray(RECEIVE)
        self._chains: tuple[int, dict[tuple[int, str], list[bytes]]] | None = None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _socket(self) -> socket.socket:
        if self._sock is None:
            try:
                sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
                sock.settimeout(TIMEOUT)
                sock.bind((0, 0))
            except OSError as exc:
                raise FingerprintError(exc.errno, f"cannot open a netfilter netlink socket: {exc.strerror}") from exc
            self._sock = sock
        return self._sock

    def _ask(self, kind: int, family: int, attrs: bytes, dump: bool) -> Iterator[tuple[int, bytes]]:
        """(family, body after nfgenmsg) of each answer to one request; raises FingerprintError(ENOENT) for a
        missing object, FingerprintError for anything else that goes wrong."""
        sock = self._socket()
        self._seq = seq = (self._seq + 1) & 0xFFFFFFFF
        body = _NFGENMSG.pack(family, 0, 0) + attrs
        flags = NLM_F_REQUEST | (NLM_F_DUMP if dump else 0)
        try:
            sock.send(message((NFNL_SUBSYS_NFTABLES << 8) | kind, flags, seq, 0, body))
            while True:
                data = sock.recv(RECEIVE)
                for msg in messages(data):
                    if msg.seq != seq:
                        continue  # an answer to an earlier request we stopped reading (an exception)
                    if msg.kind == NLMSG_ERROR:
                        code = error_code(msg.body)
                        if code:
                            raise FingerprintError(code, f"nftables netlink: {errno.errorcode.get(code, code)}")
                        return
                    if msg.kind == NLMSG_DONE:
                        code, _ = done_code(msg.body)
                        if code:
                            raise FingerprintError(code, f"nftables netlink dump: {errno.errorcode.get(code, code)}")
                        return
                    if msg.flags & NLM_F_DUMP_INTR:
                        raise FingerprintError(errno.EINTR, "nftables changed during the dump")
                    if len(msg.body) < _NFGENMSG.size:
                        continue
                    yield msg.body[0], msg.body[_NFGENMSG.size:]
                    if not dump:
                        return
        except FingerprintError:
            self.close()  # unread answers would otherwise wait in the socket
            raise
        except OSError as exc:
            self.close()
            raise FingerprintError(exc.errno, f"nftables netlink: {exc}") from exc

    def _digest_dump(self, kind: int, family: int, attrs: bytes, digest: Any) -> None:
        """Feed `digest` the messages of one dump as the kernel sent them, with what differs between two dumps
        of the same objects zeroed (sequence, port, generation): tens of thousands of messages on a hub, so
        whole datagrams are hashed, never a message at a time."""
        self._dump(kind, family, attrs, None, digest)

    def _dump(self, kind: int, family: int, attrs: bytes, each: Callable[[bytes], None] | None,
              digest: Any = None) -> None:
        """One dump, read a datagram at a time: `each` gets every message's body (nfgenmsg first), or `digest`
        the datagrams (see _digest_dump)."""
        sock = self._socket()
        self._seq = seq = (self._seq + 1) & 0xFFFFFFFF
        body = _NFGENMSG.pack(family, 0, 0) + attrs
        buffer = self._buffer
        view = memoryview(buffer)
        unpack = HEADER.unpack_from
        try:
            sock.send(message((NFNL_SUBSYS_NFTABLES << 8) | kind, NLM_F_REQUEST | NLM_F_DUMP, seq, 0, body))
            while True:
                size = sock.recv_into(buffer)
                offset = 0
                while offset + HEADER.size <= size:
                    length, msg_kind, flags, msg_seq, _ = unpack(buffer, offset)
                    if length < HEADER.size or msg_seq != seq:
                        raise FingerprintError(errno.EPROTO, "nftables netlink: an unexpected message in a dump")
                    if msg_kind in (NLMSG_DONE, NLMSG_ERROR):
                        if digest is not None:
                            digest.update(view[:offset])
                        code = error_code(bytes(view[offset + HEADER.size:offset + length])) \
                            if length >= HEADER.size + 4 else 0
                        if code:
                            raise FingerprintError(code, f"nftables netlink dump: {errno.errorcode.get(code, code)}")
                        return
                    if flags & NLM_F_DUMP_INTR:
                        raise FingerprintError(errno.EINTR, "nftables changed during the dump")
                    if digest is not None:
                        buffer[offset + 8:offset + 16] = _ZERO8  # seq, pid
                        buffer[offset + 18:offset + 20] = _ZERO2  # nfgenmsg.res_id: the generation
                    elif each is not None:
                        each(bytes(view[offset + HEADER.size:offset + length]))
                    offset += aligned(length)
                if digest is not None:
                    digest.update(view[:size])
        except FingerprintError:
            self.close()
            raise
        except OSError as exc:
            self.close()
            raise FingerprintError(exc.errno, f"nftables netlink: {exc}") from exc
        finally:
            view.release()

    def generation(self) -> int:
        """nftables' ruleset generation in this netns: changes with every committed transaction."""
        for _, body in self._ask(NFT_MSG_GETGEN, NFPROTO_UNSPEC, b"", dump=False):
            for kind, payload in attributes(body):
                if kind == NFTA_GEN_ID and len(payload) == 4:
                    gen: int = _BE32.unpack(payload)[0]
                    return gen
        raise FingerprintError(errno.EPROTO, "nftables netlink: no generation in the answer")

    def chain_dump(self) -> dict[tuple[int, str], list[bytes]]:
        """Every chain of every table, by (family, table), as the kernel sent it: the kernel does not filter a
        chain dump by table, so one dump serves our tables' digests and the look at other tables' forward
        hooks alike (kept while the generation stays; our own thousands of chains are never parsed)."""
        generation = self.generation()
        if self._chains is not None and self._chains[0] == generation:
            return self._chains[1]
        found: dict[tuple[int, str], list[bytes]] = {}

        def add(body: bytes) -> None:
            # NFTA_CHAIN_TABLE comes first (nf_tables_fill_chain_info); any other order is parsed in full.
            length, key = ATTR.unpack_from(body, _NFGENMSG.size) if len(body) >= _NFGENMSG.size + ATTR.size \
                else (0, 0)
            if key & ATTR_TYPE_MASK == NFTA_CHAIN_TABLE and length >= ATTR.size:
                table = _text(body[_NFGENMSG.size + ATTR.size:_NFGENMSG.size + length])
            else:
                table = next((_text(v) for k, v in attributes(body, _NFGENMSG.size) if k == NFTA_CHAIN_TABLE), "")
            found.setdefault((body[0], table), []).append(bytes(body[:1]) + body[_NFGENMSG.size:])

        self._dump(NFT_MSG_GETCHAIN, NFPROTO_UNSPEC, b"", add)
        self._chains = (generation, found)
        return found

    def rules_digest(self, family: int, table: str, chain: str | None = None) -> bytes:
        """A hash of the rules of `table` (of one chain of it, if given), handles included."""
        attrs = attr(NFTA_RULE_TABLE, _string(table)) + (attr(NFTA_RULE_CHAIN, _string(chain)) if chain else b"")
        digest = hashlib.blake2b(digest_size=16)
        self._digest_dump(NFT_MSG_GETRULE, family, attrs, digest)
        return digest.digest()

    def table_digest(self, table: str) -> bytes | None:
        """A hash of everything in inet table `table` (see the module's doc), or None when the kernel has no such
        table."""
        family = NFPROTO_INET
        digest = hashlib.blake2b(digest_size=16)

        def add(body: bytes) -> None:
            digest.update(struct.pack("=I", len(body)))
            digest.update(body)

        try:
            for _, body in self._ask(NFT_MSG_GETTABLE, family, attr(NFTA_TABLE_NAME, _string(table)), dump=False):
                add(body)
        except FingerprintError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise
        chains = self.chain_dump().get((family, table), [])
        digest.update(struct.pack(f"={len(chains)}I", *map(len, chains)))
        digest.update(b"".join(chains))
        digest.update(self.rules_digest(family, table))
        names = []
        for _, body in self._ask(NFT_MSG_GETSET, family, attr(NFTA_SET_TABLE, _string(table)), dump=True):
            add(body)
            names += [_text(payload) for key, payload in attributes(body) if key == NFTA_SET_NAME]
        for name in names:
            attrs = attr(NFTA_SET_ELEM_LIST_TABLE, _string(table)) + attr(NFTA_SET_ELEM_LIST_SET, _string(name))
            self._digest_dump(NFT_MSG_GETSETELEM, family, attrs, digest)
        return digest.digest()
