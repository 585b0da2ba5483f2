"""The classic BPF programs the kernel runs on every GRE packet before it reaches the engine's sockets (pure).

A raw IPPROTO_GRE socket gets a copy of every GRE packet the host receives, tunnel traffic included, from any
source. The engine reads replies and requests on two such sockets, each behind its own program (review M6), so
that a flood has to get past the kernel, and then fills only the buffer of what it imitates:

- replies (`reply_filter`): the outer source is a configured remote and the destination a configured local;
  GRE protocol 0 with a sequence number; and that sequence number is the low half of a token the engine issued
  (sent, or drawn for one of the next probes). A forger who cannot see our probes guesses 32 bits per packet,
  so a flood of forged replies, even from a configured remote's address, stays in the kernel, and the real
  replies find room in the buffer.
- requests (`request_filter`): from a remote of a tunnel with answer = "daemon" to its local, IPv4 in GRE
  whose inner protocol is GRE. Forged requests (anyone can write a remote's address) can fill this socket's
  buffer, which costs answers to the peer, never our own verdicts.
Tunnel traffic never reaches Python either (`GRE_PROTOCOL_PROGRAM`, the protocol part alone, is what both fall
back to).

Address and token sets compile into a binary search tree of compares over sorted ranges of addresses (consecutive
addresses merge into one range), with leaves of up to `_LEAF` ranges tested in a row: about 1.2
instructions per address, so a program holds some 3,000 scattered remotes, and any number in a few subnets.
Classic BPF only jumps forward, a conditional jump at most 255 instructions: longer ones go through an
unconditional jump (32-bit offset). The kernel refuses programs of more than 4096 instructions
(BPF_MAXINSNS): what does not fit is left out, tokens first (`FilterKind` says what a program checks).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Literal

IPPROTO_GRE = 47
ETH_P_IP = 0x0800
KEEPALIVE_PROTO = 0
HUAWEI_PROTO = 0x0004  # codec.HUAWEI_PROTO: Huawei's outer GRE protocol of a keepalive probe
GRE_CSUM, GRE_KEY, GRE_SEQ = 0x8000, 0x2000, 0x1000

MAX_INSTRUCTIONS = 4096  # BPF_MAXINSNS: sk_attach_filter refuses longer classic programs

Instruction = tuple[int, int, int, int]  # (code, jt, jf, k) as in struct sock_filter
SocketFilter = tuple[Instruction, ...]

# Opcodes (linux/filter.h, linux/bpf_common.h)
LD_W_ABS = 0x20  # A = u32 at [k]
LD_H_IND = 0x48  # A = u16 at [X + k]
LD_B_IND = 0x50  # A = u8 at [X + k]
LDX_MSH = 0xB1  # X = 4 * (u8 at [k] & 0x0f)
LD_W_IND = 0x40  # A = u32 at [X + k]
JA = 0x05  # pc += k
JSET_K = 0x45  # A & k != 0
JEQ_K = 0x15
JGT_K = 0x25
JGE_K = 0x35
ST = 0x02  # M[k] = A
LD_MEM = 0x60  # A = M[k]
AND_K = 0x54
RSH_K = 0x74
ADD_K = 0x04
ADD_X = 0x0C
TAX = 0x07
RET_K = 0x06

_DROP: Instruction = (RET_K, 0, 0, 0)
_ACCEPT_WHOLE = 0x40000  # bytes kept: the whole packet
_OUTER_SOURCE, _OUTER_DESTINATION = 12, 16  # offsets in the IPv4 header (the socket's data starts there)
_LEAF = 16  # ranges tested in a row at the bottom of the search tree
_MAX_JUMP = 255  # a conditional jump's offset is a u8

GRE_PROTOCOL_PROGRAM: SocketFilter = (
    (LDX_MSH, 0, 0, 0),  # 0: X = outer IP header length
    (LD_H_IND, 0, 0, 2),  # 1: A = GRE protocol
    (JEQ_K, 22, 0, KEEPALIVE_PROTO),  # 2: protocol 0 -> accept
    (JEQ_K, 1, 0, ETH_P_IP),  # 3: IPv4 -> 5
    (JEQ_K, 0, 19, HUAWEI_PROTO),  # 4: nor Huawei's 0x0004 (codec.HUAWEI_PROTO) -> drop
    (LD_H_IND, 0, 0, 0),  # 5: A = GRE flags
    (ST, 0, 0, 0),  # 6: M[0] = flags
    (AND_K, 0, 0, GRE_CSUM),  # 7
    (RSH_K, 0, 0, 13),  # 8: A = 4 if checksum present
    (ADD_X, 0, 0, 0),  # 9
    (ADD_K, 0, 0, 4),  # 10
    (TAX, 0, 0, 0),  # 11: X = outer header + 4 + checksum
    (LD_MEM, 0, 0, 0),  # 12
    (AND_K, 0, 0, GRE_KEY),  # 13
    (RSH_K, 0, 0, 11),  # 14: A = 4 if key present
    (ADD_X, 0, 0, 0),  # 15
    (TAX, 0, 0, 0),  # 16
    (LD_MEM, 0, 0, 0),  # 17
    (AND_K, 0, 0, GRE_SEQ),  # 18
    (RSH_K, 0, 0, 10),  # 19: A = 4 if sequence present
    (ADD_X, 0, 0, 0),  # 20
    (TAX, 0, 0, 0),  # 21: X = offset of the inner IP header
    (LD_B_IND, 0, 0, 9),  # 22: A = inner IP protocol
    (JEQ_K, 1, 0, IPPROTO_GRE),  # 23
    _DROP,  # 24: drop
    (RET_K, 0, 0, _ACCEPT_WHOLE),  # 25: accept (the whole packet)
)

# Requests only: GRE_PROTOCOL_PROGRAM with protocol 0 (a reply) dropped instead of accepted.
_REQUEST_PROTOCOL_PROGRAM: SocketFilter = ((LDX_MSH, 0, 0, 0), (LD_H_IND, 0, 0, 2), (JEQ_K, 21, 0, KEEPALIVE_PROTO),
                                           *GRE_PROTOCOL_PROGRAM[3:])

# Replies only: GRE protocol 0 with a sequence number, whose value is left in A for the token tree.
_REPLY_SEQUENCE: tuple[Instruction, ...] = (
    (LDX_MSH, 0, 0, 0),  # X = outer IP header length
    (LD_H_IND, 0, 0, 2),  # A = GRE protocol
    (JEQ_K, 1, 0, KEEPALIVE_PROTO),
    _DROP,
    (LD_H_IND, 0, 0, 0),  # A = GRE flags
    (JSET_K, 1, 0, GRE_SEQ),
    _DROP,  # no sequence number: no token of ours (a Cisco's own probe reflected)
    (ST, 0, 0, 0),
    (AND_K, 0, 0, GRE_CSUM),
    (RSH_K, 0, 0, 13),  # A = 4 if checksum present
    (ADD_X, 0, 0, 0),
    (ADD_K, 0, 0, 4),
    (TAX, 0, 0, 0),  # X = outer header + 4 + checksum
    (LD_MEM, 0, 0, 0),
    (AND_K, 0, 0, GRE_KEY),
    (RSH_K, 0, 0, 11),  # A = 4 if key present
    (ADD_X, 0, 0, 0),
    (TAX, 0, 0, 0),  # X = offset of the sequence number
    (LD_W_IND, 0, 0, 0),  # A = the sequence number: the low 32 bits of the token
)
_ACCEPT: Instruction = (RET_K, 0, 0, _ACCEPT_WHOLE)

FilterKind = Literal["tokens", "addresses", "protocol"]

Range = tuple[int, int]  # first and last address, as 32-bit integers (network order read as a number)


def address_ranges(addresses: Collection[int]) -> list[Range]:
    """The addresses, sorted, with runs of consecutive ones merged into ranges."""
    ranges: list[Range] = []
    for address in sorted(set(addresses)):
        if ranges and ranges[-1][1] + 1 == address:
            ranges[-1] = (ranges[-1][0], address)
        else:
            ranges.append((address, address))
    return ranges


def _leaf(ranges: Sequence[Range]) -> list[Instruction]:
    """A's membership in up to _LEAF ranges, tested in order; falls through (last instruction) when A is in one,
    else drops. Each range either takes A (-> the end), or rules A out of it and of every later one (drop),
    or passes A on to the next one."""
    # Where each range's first instruction is; the drop and the way out follow the last range.
    starts, at = [], 0
    for first, last in ranges:
        starts.append(at)
        at += 1 if first == last else 2
    drop, out = at, at + 1
    code: list[Instruction] = []
    for (first, last), start in zip(ranges, starts, strict=True):
        if first == last:
            code.append((JEQ_K, out - start - 1, 0, first))
        else:
            code.append((JGT_K, 1, 0, last))  # above it: the next range's test (after the JGE below)
            code.append((JGE_K, out - start - 2, drop - start - 2, first))
    code.append(_DROP)
    code.append((JA, 0, 0, 0))  # patched by _membership: to the end of the whole tree
    return code


def _membership(ranges: Sequence[Range]) -> list[Instruction]:
    """A's membership in `ranges` (sorted, disjoint): falls through past the end when A is in one, else drops."""
    if not ranges:
        return [_DROP]
    code = _tree(ranges)
    # Every leaf's last instruction jumps to the end; patch those jumps now that the length is known.
    end = len(code)
    return [(JA, 0, 0, end - index - 1) if insn == (JA, 0, 0, -1) else insn for index, insn in enumerate(code)]


def _tree(ranges: Sequence[Range]) -> list[Instruction]:
    if len(ranges) <= _LEAF:
        leaf = _leaf(ranges)
        leaf[-1] = (JA, 0, 0, -1)  # a placeholder for "to the end", unique: real offsets are never negative
        return leaf
    middle = len(ranges) // 2
    left, right = _tree(ranges[:middle]), _tree(ranges[middle:])
    split = ranges[middle][0]  # every range on the left ends below it
    if len(left) <= _MAX_JUMP:
        return [(JGE_K, len(left), 0, split), *left, *right]
    # Too far for a conditional jump: A >= split falls onto an unconditional jump over the left subtree.
    return [(JGE_K, 0, 1, split), (JA, 0, 0, len(left)), *left, *right]


def address_program(remotes: Collection[int], locals_: Collection[int]) -> list[Instruction]:
    """Outer source in `remotes` and outer destination in `locals_`, else drop; falls through past its end."""
    return [(LD_W_ABS, 0, 0, _OUTER_SOURCE), *_membership(address_ranges(remotes)),
            (LD_W_ABS, 0, 0, _OUTER_DESTINATION), *_membership(address_ranges(locals_))]


def reply_filter(remotes: Collection[int], locals_: Collection[int],
                 tokens: Collection[int]) -> tuple[SocketFilter, FilterKind]:
    """The replies socket's program: configured addresses, the reply's shape, and the sequence number among the
    low halves of `tokens`; without the tokens, or the addresses too, where the program would not fit."""
    addresses = address_program(remotes, locals_)
    values = {token & 0xFFFFFFFF for token in tokens}
    # Each value costs at least one instruction: with thousands of tunnels, do not build what cannot fit.
    fits = len(addresses) + len(_REPLY_SEQUENCE) + len(values) < MAX_INSTRUCTIONS
    sequences = _membership(address_ranges(values)) if fits else [_DROP] * MAX_INSTRUCTIONS
    candidates: tuple[tuple[SocketFilter, FilterKind], ...] = (
        ((*addresses, *_REPLY_SEQUENCE, *sequences, _ACCEPT), "tokens"),
        ((*addresses, *_REPLY_SEQUENCE, _ACCEPT), "addresses"),
    )
    for program, kind in candidates:
        if len(program) <= MAX_INSTRUCTIONS:
            return program, kind
    return (*_REPLY_SEQUENCE, _ACCEPT), "protocol"


def reply_fallbacks(remotes: Collection[int], locals_: Collection[int]) -> list[tuple[SocketFilter, FilterKind]]:
    """What the replies socket takes, smallest last, when the kernel refuses a program for its size (ENOMEM:
    the socket's option memory, net.core.optmem_max, is 20480 bytes on Linux 6.1)."""
    addresses = (*address_program(remotes, locals_), *_REPLY_SEQUENCE, _ACCEPT)
    smaller: list[tuple[SocketFilter, FilterKind]] = [(addresses, "addresses")] if len(addresses) <= MAX_INSTRUCTIONS \
        else []
    return [*smaller, ((*_REPLY_SEQUENCE, _ACCEPT), "protocol")]


def request_fallbacks() -> list[tuple[SocketFilter, FilterKind]]:
    """The requests socket's program when its addresses cost the kernel too much memory (reply_fallbacks)."""
    return [(_REQUEST_PROTOCOL_PROGRAM, "protocol")]


def request_filter(remotes: Collection[int], locals_: Collection[int]) -> tuple[SocketFilter, FilterKind]:
    """The requests socket's program: from a remote of a tunnel that answers to its local, a request's shape."""
    program = (*address_program(remotes, locals_), *_REQUEST_PROTOCOL_PROGRAM)
    if len(program) <= MAX_INSTRUCTIONS:
        return program, "addresses"
    return _REQUEST_PROTOCOL_PROGRAM, "protocol"


# --- the IPv6 GRE sockets (ip6gre, MikroTik's GRE6 format: gre6.py) -------------------------------------------
# A raw IPv6 socket's packet starts at the GRE header (the kernel has pulled the IPv6 header): the addresses are
# read at negative offsets from the network header (SKF_NET_OFF). Their low 32 bits only: the tree compares
# words, and the engine checks the whole address (a remote that shares its low word with a configured one is
# let through to be refused there; it is no flood of strangers).
LD_H_ABS = 0x28  # A = u16 at [k]
ETH_P_IPV6 = 0x86DD
_SKF_NET_OFF = -0x100000 & 0xFFFFFFFF
_SOURCE6_LOW, _DESTINATION6_LOW = _SKF_NET_OFF + 20, _SKF_NET_OFF + 36  # the last words of saddr and daddr
_LOW_WORD = 0xFFFFFFFF

# X = the length of the GRE header whose flags are in A (checksum, key and sequence number as present).
_GRE_LENGTH_INTO_X: tuple[Instruction, ...] = (
    (ST, 0, 0, 0),
    (AND_K, 0, 0, GRE_CSUM),
    (RSH_K, 0, 0, 13),  # A = 4 if checksum present
    (ADD_K, 0, 0, 4),
    (TAX, 0, 0, 0),
    (LD_MEM, 0, 0, 0),
    (AND_K, 0, 0, GRE_KEY),
    (RSH_K, 0, 0, 11),  # A = 4 if key present
    (ADD_X, 0, 0, 0),
    (TAX, 0, 0, 0),  # X = offset of the sequence number (or of the payload, without one)
)

# Replies: GRE 0x86DD with a sequence number, whose value is left in A for the token tree.
_REPLY6_SEQUENCE: tuple[Instruction, ...] = (
    (LD_H_ABS, 0, 0, 2),  # A = GRE protocol
    (JEQ_K, 1, 0, ETH_P_IPV6),
    _DROP,
    (LD_H_ABS, 0, 0, 0),  # A = GRE flags
    (JSET_K, 1, 0, GRE_SEQ),
    _DROP,
    *_GRE_LENGTH_INTO_X,
    (LD_W_IND, 0, 0, 0),  # A = the sequence number: the low 32 bits of the token
)

# Requests: GRE 0x86DD carrying IPv6 whose next header is GRE.
_REQUEST6_SHAPE: tuple[Instruction, ...] = (
    (LD_H_ABS, 0, 0, 2),
    (JEQ_K, 1, 0, ETH_P_IPV6),
    _DROP,
    (LD_H_ABS, 0, 0, 0),
    *_GRE_LENGTH_INTO_X,
    (LD_MEM, 0, 0, 0),
    (AND_K, 0, 0, GRE_SEQ),
    (RSH_K, 0, 0, 10),  # A = 4 if sequence present
    (ADD_X, 0, 0, 0),
    (TAX, 0, 0, 0),  # X = offset of the inner IPv6 header
    (LD_B_IND, 0, 0, 6),  # A = its next header
    (JEQ_K, 1, 0, IPPROTO_GRE),
    _DROP,
    (RET_K, 0, 0, _ACCEPT_WHOLE),
)


def address_program6(remotes: Collection[int], locals_: Collection[int]) -> list[Instruction]:
    """address_program for IPv6 addresses (as 128-bit integers), on their low 32 bits."""
    return [(LD_W_ABS, 0, 0, _SOURCE6_LOW), *_membership(address_ranges({r & _LOW_WORD for r in remotes})),
            (LD_W_ABS, 0, 0, _DESTINATION6_LOW), *_membership(address_ranges({a & _LOW_WORD for a in locals_}))]


def reply_filter6(remotes: Collection[int], locals_: Collection[int],
                  tokens: Collection[int]) -> tuple[SocketFilter, FilterKind]:
    """reply_filter for the IPv6 replies socket."""
    addresses = address_program6(remotes, locals_)
    values = {token & 0xFFFFFFFF for token in tokens}
    if len(addresses) + len(_REPLY6_SEQUENCE) + len(values) < MAX_INSTRUCTIONS:
        program = (*addresses, *_REPLY6_SEQUENCE, *_membership(address_ranges(values)), _ACCEPT)
        if len(program) <= MAX_INSTRUCTIONS:
            return program, "tokens"
    return reply_fallbacks6(remotes, locals_)[0]


def reply_fallbacks6(remotes: Collection[int], locals_: Collection[int]) -> list[tuple[SocketFilter, FilterKind]]:
    """reply_fallbacks for the IPv6 replies socket, smallest last."""
    addresses = (*address_program6(remotes, locals_), *_REPLY6_SEQUENCE, _ACCEPT)
    smaller: list[tuple[SocketFilter, FilterKind]] = [(addresses, "addresses")] if len(addresses) <= MAX_INSTRUCTIONS \
        else []
    return [*smaller, ((*_REPLY6_SEQUENCE, _ACCEPT), "protocol")]


def request_filter6(remotes: Collection[int], locals_: Collection[int]) -> tuple[SocketFilter, FilterKind]:
    """request_filter for the IPv6 requests socket."""
    program = (*address_program6(remotes, locals_), *_REQUEST6_SHAPE)
    if len(program) <= MAX_INSTRUCTIONS:
        return program, "addresses"
    return _REQUEST6_SHAPE, "protocol"


def request_fallbacks6() -> list[tuple[SocketFilter, FilterKind]]:
    return [(_REQUEST6_SHAPE, "protocol")]
