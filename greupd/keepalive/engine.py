"""The keepalive engine: Cisco-style GRE probes out, replies in, one Liveness per tunnel; and answering the
peers' probes ourselves so that a Linux peer of a Cisco needs neither ip_forward nor accept_local.

Three raw sockets serve every tunnel, registered with the daemon's asyncio loop:

- `socket(AF_INET, SOCK_RAW, IPPROTO_GRE)`, twice: each receives a copy of every GRE packet the host gets, also
  those a kernel tunnel consumes, and each has a socket filter (bpf.py, attached by gre_socket.py). The replies
  socket passes only replies from a configured remote to a configured local carrying a token we issued (the
  sent probes' and those drawn for the next ones, `_TOKENS_AHEAD`); the requests socket passes only requests
  from the remotes we answer. So neither tunnel traffic nor a flood, not even one that writes a configured
  remote's address, takes the replies' place in their socket's buffer (#21 M6).
  The replies socket also sends our probes, without IP_HDRINCL: the kernel builds the outer header, and each
  sendmsg names the tunnel's `local` as source (IP_PKTINFO). So the route lookup of a probe is the tunnel's own
  (ip_tunnel_xmit looks up saddr = local, protocol GRE): `ip rule from <local> lookup ispN` and
  `ipproto gre` rules pick the same uplink for both, and an IPsec policy for GRE applies to both (review H1);
  so do the link's underlay device or VRF (ipi_ifindex) and fwmark (SO_MARK), as the last pass saw them
  (underlay.py, #21 M2).
- `socket(AF_INET, SOCK_RAW, IPPROTO_RAW)` (IP_HDRINCL) sends our answers to a peer's probes: the reflected
  packet must leave exactly as the peer wrote it (a greupd peer's token rides in its IP ID, which a
  kernel-built header would replace), but its lookup too carries saddr = local (IP_PKTINFO, with the link's
  device), the link's mark, and protocol GRE (an IP_PROTOCOL control message; without it the flow of an
  IP_HDRINCL socket is IPPROTO_RAW).
Probes and answers leave by the underlay route to the remote, which does not depend on the tunnel's own link.
So a tunnel whose link greupd set down (`action = "link"`) keeps probing, and comes back up when its peer does.

Under IPsec the kernel looks up the ESP policy by the flow's protocol, and an IP_HDRINCL socket's flow is
IPPROTO_RAW: its GRE would miss the `dynamic[gre]` policy and leave in cleartext (seen in the lab). So for
tunnels with [tunnel.ipsec] each packet carries an IP_PROTOCOL control message saying GRE (see `_send`).

One timer serves every tunnel (a `loop.call_at` handle on the loop's monotonic clock, at the earliest entry
of a heap of next probes). A tunnel's first probe falls on a random point of a grid within its interval
(10 ms; 50 ms for intervals of a second or more), so that a thousand tunnels do not fire together, and as
intervals are nearly always multiples of the grid, the tunnels of one point share a wake-up: 1000 tunnels x
1 s are 20 wake-ups of 50 probes a second, not 1000.
A probe's deadline is the next probe's send time (Cisco counts a miss when it sends the next keepalive), so
the tick that sends also counts the misses, exactly at send time + interval. While replies keep coming, the
socket is read at the grid's points and after each batch of probes rather than on every arrival, each packet
taken at the kernel's receive time (SO_TIMESTAMPNS). A tick's probes go out in one sendmmsg and replies come
in 64 to a recvmmsg (batch.py), where libc has them.

ip6gre tunnels speak MikroTik's GRE6 keepalive (gre6.py) through three IPv6 sockets of the same roles
(gre6_socket.py, opened with the first such tunnel); their packets meet the IPv4 ones in `_on_reply` and
`_on_request`, which work on either family's addresses as integers. What a peer's probe gets back, also from
peers that address it otherwise (behind NAT, inner addresses, Huawei), is answering.py's decision.

`python -m greupd.keepalive` (__main__.py) runs this engine alone.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import heapq
import itertools
import logging
import math
import random
import socket
import struct
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface
from typing import Literal

from greupd.config import Config
from greupd.gre import IPV6_MODES
from greupd.keepalive.answering import Answer, AnswerRule, answer_for
from greupd.keepalive.batch import Datagram, Receiver, Sender, batching_available
from greupd.keepalive.bpf import reply_fallbacks, reply_filter, request_fallbacks, request_filter
from greupd.keepalive.codec import (
    IPPROTO_GRE,
    KeepaliveRequest,
    MalformedPacket,
    Packet,
    ProbeBytes,
    ProbeReply,
    ProbeToken,
    build_probe_template,
    new_token,
    parse_gre,
)
from greupd.keepalive.gre6 import ProbeBytes6, build_probe_template6, parse_gre6
from greupd.keepalive.gre6_socket import Gre6Sockets, source_address6
from greupd.keepalive.gre_socket import AttachedProgram, open_gre_socket, socket_drops
from greupd.keepalive.liveness import AnswerBudget, Liveness, LivenessChange, ProbeWindow
from greupd.keepalive.pmtu import PathMtuResult
from greupd.keepalive.pmtu_probe import (
    IP_MTU_DISCOVER,
    IP_PMTUDISC_PROBE,
    CiscoProbes,
    Gre6Probes,
    PaddedProbes,
    PathMtuProber,
    PathMtuTarget,
    dont_fragment6,
)
from greupd.keepalive.underlay import NO_UNDERLAY, Underlay, underlays_after_pass
from greupd.model import Observed
from greupd.status import KeepaliveSocketStatus as SocketStatus
from greupd.status import KeepaliveStatus, PathMtuStatus, TunnelStatus

__all__ = ["EngineCounters", "KeepaliveEngine", "KeepaliveTarget", "LivenessChange", "targets_from_config"]

log = logging.getLogger("greupd.keepalive")

AnswerMode = Literal["daemon", "kernel", "off"]
KeepaliveFormat = Literal["cisco", "mikrotik"]  # on gre the same bytes; on ip6gre MikroTik's GRE6 (gre6.py)

ANSWER_RATE = 20.0  # reflected requests per second and tunnel: a Cisco probes every 10 s by default
ANSWER_BURST = 20.0
_GRID = 0.01  # s: first probes fall on this grid, so tunnels with the same interval share their wake-ups
# s: the grid of intervals of a second or more. Every wake-up has a fixed cost (the timer, a drain, the reader's
# pause), which at 1000 tunnels x 1 s on the 10 ms grid was most of the engine's CPU (#26); a 50 ms grid is
# 20 wake-ups a second, and 50 ms of phase is nothing against an interval of seconds (a probe's deadline is
# its interval, whatever its phase). It is a multiple of _GRID: the two grids share their points.
_COARSE_GRID = 0.05
# s: probes due this soon go out in the wake-up at hand. At least the clock's resolution: asyncio runs a timer
# up to that early, and a tick that found nothing due would be re-armed for the same instant and spin.
_COALESCE = max(0.0005, time.get_clock_info("monotonic").resolution)
_RECEIVE_BATCH = 64  # datagrams per recvmmsg
_RECEIVE_SLOT = 2048  # bytes per datagram read by recvmmsg: keepalives are far smaller; longer is cut, malformed
_DRAIN_LIMIT = 512  # packets read per wake-up, so a flood cannot starve the rest of the loop
_TOKENS_AHEAD = 4  # tokens drawn per tunnel ahead of its probes: the replies filter is attached again this often
_DRAIN_BEFORE_MISS = 8192  # before counting a miss: more than the receive buffer holds of replies
_MAX_PACKET = 65535
_IP_PKTINFO = 8  # <linux/in.h>; Python has socket.IP_PKTINFO, typeshed does not
_IP_PROTOCOL = 52  # <linux/in.h>: the flow's protocol for an IP_HDRINCL packet, as a control message (5.19+)
_SO_TIMESTAMPNS = 35  # <asm-generic/socket.h> (also SCM_TIMESTAMPNS); not exported by Python's socket module
_TIMESPEC = struct.Struct("@qq")  # struct timespec on a 64-bit kernel
_TIMESTAMP_SPACE = socket.CMSG_SPACE(_TIMESPEC.size)
_GRE_FLOW = (socket.IPPROTO_IP, _IP_PROTOCOL, struct.pack("=i", IPPROTO_GRE))


def source_address(local: IPv4Address, underlay: Underlay = NO_UNDERLAY) -> list[tuple[int, int, bytes]]:
    """The control messages that route a packet as the tunnel's own (reviews H1 and M2): IP_PKTINFO makes
    `local` the source of the packet and of its route lookup, and the link's underlay device its output
    interface (struct in_pktinfo: ipi_ifindex, 0 = any; ipi_spec_dst = local; ipi_addr unused on send);
    SO_MARK gives it the link's fwmark (CAP_NET_ADMIN or CAP_NET_RAW, which the engine has)."""
    messages = [(socket.IPPROTO_IP, _IP_PKTINFO, struct.pack("=I4s4s", underlay.ifindex, local.packed, bytes(4)))]
    if underlay.fwmark:
        messages.append((socket.SOL_SOCKET, socket.SO_MARK, struct.pack("=I", underlay.fwmark)))
    return messages


@dataclass(frozen=True)
class KeepaliveTarget:
    """What the engine needs of one tunnel with `[tunnel.keepalive]`."""

    name: str
    local: IPv4Address | IPv6Address  # IPv6: an ip6gre tunnel, MikroTik's GRE6 format
    remote: IPv4Address | IPv6Address
    ikey: int | None
    okey: int | None
    interval: float
    retries: int
    up_after: int
    answer: AnswerMode
    mtu_probe: tuple[int, float, float] | None = None  # mtu = "probe": (floor, every, timeout), pmtu_probe.py
    encap_option: bool = False  # ip6gre: the link's packets carry the 8-byte encapsulation limit option
    # (our `address`, first and last address the peer's may be): probes addressed with the tunnel's inner
    # addresses are answered through the tunnel (answering.py); None: no such probes are answered.
    inner: tuple[int, int, int] | None = None

    @property
    def endpoints(self) -> tuple[IPv4Address | IPv6Address, IPv4Address | IPv6Address, int | None, int | None]:
        return self.local, self.remote, self.ikey, self.okey

    def answer_rule(self) -> AnswerRule:
        return AnswerRule(int(self.local), int(self.remote), self.okey, 6 if self.local.version == 6 else 4,
                          *(self.inner[0], self.inner[1:]) if self.inner is not None else (None, None))


def targets_from_config(config: Config) -> list[KeepaliveTarget]:
    """One target per enabled tunnel that has keepalives (config allows them for modes gre and ip6gre)."""
    targets = []
    for tunnel in config.tunnels:
        if not tunnel.enabled or tunnel.keepalive is None:
            continue
        targets.append(KeepaliveTarget(
            name=tunnel.name, local=tunnel.local, remote=tunnel.remote,
            ikey=tunnel.input_key, okey=tunnel.output_key,
            interval=tunnel.keepalive.interval, retries=tunnel.keepalive.retries,
            up_after=tunnel.keepalive.up_after, answer=tunnel.keepalive.answer,
            mtu_probe=(tunnel.mtu_probe_settings.floor, tunnel.mtu_probe_settings.every,
                       tunnel.mtu_probe_settings.timeout)
            if tunnel.mtu == "probe" else None,
            inner=_inner_addresses(tunnel.address, tunnel.peer),
            encap_option=tunnel.mode in IPV6_MODES and tunnel.encap_limit != "none",
        ))
    return targets


def _inner_addresses(address: IPv4Interface | IPv6Interface | None,
                     peer: IPv4Address | IPv6Address | None) -> tuple[int, int, int] | None:
    """KeepaliveTarget.inner: the peer's address is `peer`, or any other of `address`'s network."""
    if address is None:
        return None
    if peer is not None:
        return int(address.ip), int(peer), int(peer)
    network = address.network
    if network.prefixlen == network.max_prefixlen:
        return None
    return int(address.ip), int(network.network_address), int(network.broadcast_address)


@dataclass
class EngineCounters:
    """Packets the engine saw, for `status` and for tests; replies and probes per tunnel are in Liveness."""

    packets: int = 0  # read from the GRE socket (after the socket filter)
    traffic: int = 0  # GRE that is not a keepalive (passed the filter, e.g. small GRE-in-GRE)
    malformed: int = 0
    replies: int = 0  # counted by a tunnel's Liveness
    unmatched_replies: int = 0  # unknown tunnel, unknown/claimed token (forged, replayed, too late)
    requests_answered: int = 0
    requests_ignored: int = 0  # not for a tunnel of ours with answer = "daemon", or not reflected to its remote
    requests_rate_limited: int = 0
    requests_not_plain: int = 0  # inner IP header with options or fragment bits: never reflected (review L6)
    requests_unanswerable: int = 0  # for a tunnel of ours whose own end does not work (set_answerable)
    answered_behind_nat: int = 0  # answered to the outer source, the inner destination a private one (answering.py)
    answered_inner_addresses: int = 0  # probes addressed with the tunnel's inner addresses, answered through it
    send_errors: int = 0
    mtu_replies: int = 0  # replies to the path MTU search's padded probes (never counted by a Liveness)


# (remote, local, key as it arrives = our ikey), addresses as 32-bit ints like codec.parse_gre returns them
_Endpoints = tuple[int, int, int | None]


class _Tunnel:
    """The engine's mutable state of one target."""

    __slots__ = ("address", "budget", "datagram", "endpoints", "entry", "family", "liveness", "next_at", "probe",
                 "rule", "send_failing", "source", "target", "tokens_ahead", "underlay", "window")

    def __init__(self, target: KeepaliveTarget, up: bool = True) -> None:
        self.target = target
        self.family = target.local.version
        self.probe: ProbeBytes | ProbeBytes6
        if isinstance(target.local, IPv6Address) and isinstance(target.remote, IPv6Address):
            self.probe = ProbeBytes6(build_probe_template6(target.local, target.remote, target.okey, target.ikey))
        else:
            assert isinstance(target.local, IPv4Address) and isinstance(target.remote, IPv4Address)
            self.probe = ProbeBytes(build_probe_template(target.local, target.remote, target.okey, target.ikey))
        self.rule = target.answer_rule()
        self.liveness = Liveness(target.interval, target.retries, target.up_after, up=up)
        # retries+1 tokens: a reply may arrive up to `retries` intervals late and still count, once.
        self.window = ProbeWindow(target.retries + 1)
        # The tokens of its next probes, drawn before they are needed: the replies socket's filter lets their
        # replies through (bpf.reply_filter) from before the probe leaves.
        self.tokens_ahead: collections.deque[ProbeToken] = collections.deque()
        self.budget = AnswerBudget(ANSWER_RATE, ANSWER_BURST)
        self.address = (str(target.remote), 0)
        self.follow(NO_UNDERLAY)
        self.endpoints: _Endpoints = (int(target.remote), int(target.local), target.ikey)
        self.next_at = 0.0
        self.entry = -1  # the number of its current entry in the engine's schedule; -1: not scheduled
        self.send_failing = False

    def follow(self, underlay: Underlay) -> None:
        """Send as the tunnel's link does, by its underlay device and fwmark (review M2)."""
        self.underlay = underlay
        local, remote = self.target.local, self.target.remote
        if isinstance(local, IPv6Address):
            self.source = source_address6(local, underlay.ifindex, underlay.fwmark)
            self.datagram = None  # one sendmsg per probe (gre6_socket.py): batch.py speaks IPv4
            return
        assert isinstance(remote, IPv4Address)
        self.source = source_address(local, underlay)
        # The same probe as a message for sendmmsg (batch.py), pointing into the probe's own buffer
        self.datagram = Datagram(self.probe.buffer, local, remote, _IP_PKTINFO,
                                 underlay.ifindex, underlay.fwmark) if batching_available() else None


class KeepaliveEngine:
    """Probes every target, reads replies and requests, reports each tunnel's verdict as it flips.

    `on_change(name, change)` is called from the loop when a tunnel goes down or comes back; `configure`
    never calls it (a tunnel keeps its verdict across any update of its target, and a new one starts up:
    read `is_up` after configuring).
    """

    def __init__(self, on_change: Callable[[str, LivenessChange], None], spread: bool = True,
                 on_path_mtu: Callable[[str, PathMtuResult], None] | None = None) -> None:
        """`spread` False: every tunnel's first probe goes out at once (tests that need them together).
        `on_path_mtu(name, result)`: a tunnel with mtu = "probe" measured a new MTU (path_mtus())."""
        self._on_change = on_change
        self.path_mtu = PathMtuProber(self._send_mtu_probe, self._draw_tokens, on_path_mtu,
                                      answering=self._answering)
        self._spread = spread
        self._loop: asyncio.AbstractEventLoop | None = None
        self._send_socket: socket.socket | None = None
        self._receive_socket: socket.socket | None = None
        self._tunnels: dict[str, _Tunnel] = {}
        self._by_endpoints: dict[_Endpoints, _Tunnel] = {}
        # Tunnels whose own end works (set_answerable); None: not told, answer for all (the engine alone).
        self._answerable: frozenset[str] | None = None
        self._answer_flow: list[tuple[int, int, bytes]] = [_GRE_FLOW]
        self._random = random.Random()
        # (when, entry number, tunnel): every tunnel's next probe; entries a tunnel no longer holds are skipped
        self._schedule: list[tuple[float, int, _Tunnel]] = []
        self._entries = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        # While replies keep coming the socket is read at the grid's points, not on every arrival: when the
        # reader is paused, until when (see _on_readable).
        self._reader_paused_until: float | None = None
        self._view = memoryview(bytearray(_MAX_PACKET))
        self._sender: Sender | None = None  # sendmmsg/recvmmsg when libc has them (batch.py)
        self._receiver: Receiver | None = None
        self.counters = EngineCounters()
        # The requests socket (its program drops everything while no tunnel answers); its reader pauses like
        # the replies socket's (see _on_requests).
        self._request_socket: socket.socket | None = None
        self._requests_paused = False
        self._reply_program = AttachedProgram("replies", "tokens")
        self._request_program = AttachedProgram("requests", "addresses")
        self._gre6: Gre6Sockets | None = None  # opened with the first ip6gre tunnel (_follow_gre6)
        self.generation = 0  # configure() calls: verdicts set without a callback may have changed (room.alive)

    # --- the API the daemon calls ---------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Open the raw sockets (needs CAP_NET_RAW), start reading, and start probing configured targets."""
        send = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)  # IP_HDRINCL implied
        send.setblocking(False)
        try:
            receive = open_gre_socket()
            try:
                requests = open_gre_socket()
            except OSError:
                receive.close()
                raise
        except OSError:
            send.close()
            raise
        self._loop, self._send_socket, self._receive_socket, self._request_socket = loop, send, receive, requests
        # DF on what this socket sends, checked against the device's MTU only: the path MTU search's padded
        # probes must not be fragmented, nor refused for a path MTU the kernel learned (keepalives are small).
        receive.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_PROBE)
        self._follow_tunnels()
        loop.add_reader(requests.fileno(), self._on_requests)
        if batching_available():
            self._sender = Sender(receive)
            self._receiver = Receiver(receive, _RECEIVE_BATCH, _RECEIVE_SLOT, _SO_TIMESTAMPNS)
        loop.add_reader(receive.fileno(), self._on_readable)
        for tunnel in self._tunnels.values():
            self._schedule_first(tunnel)
        self.path_mtu.start(loop)

    def configure(self, targets: Sequence[KeepaliveTarget], initial: Mapping[str, bool] | None = None) -> None:
        """Make the engine probe exactly `targets`: new ones start up (or as `initial` says: the verdicts a
        restart kept, review H3), removed ones stop, changed ones keep their verdict (and, if only timing
        changed, their counters); unchanged ones are not touched."""
        wanted = {target.name: target for target in targets}
        self.generation += 1
        for name in set(self._tunnels) - set(wanted):
            self._tunnels.pop(name).entry = -1  # its entry in the schedule is skipped
        for name, target in wanted.items():
            tunnel = self._tunnels.get(name)
            if tunnel is None:
                up = initial.get(name, True) if initial is not None else True
                self._tunnels[name] = tunnel = _Tunnel(target, up=up)
                self._schedule_first(tunnel)
            elif tunnel.target == target:
                continue
            elif tunnel.target.endpoints != target.endpoints:
                tunnel.entry = -1
                underlay = tunnel.underlay  # the same link, until the reload's pass says otherwise
                self._tunnels[name] = tunnel = _Tunnel(target, up=tunnel.liveness.up)
                tunnel.follow(underlay)
                self._schedule_first(tunnel)
            else:
                old_interval = tunnel.target.interval
                tunnel.target = target
                tunnel.liveness.reconfigure(target.interval, target.retries, target.up_after)
                tunnel.window.resize(target.retries + 1)
                if target.interval != old_interval:
                    self._schedule_first(tunnel)
        self._by_endpoints = {}
        self._configure_path_mtu()
        self._follow_tunnels()
        for tunnel in self._tunnels.values():
            other = self._by_endpoints.setdefault(tunnel.endpoints, tunnel)
            if other is not tunnel:
                # config.py refuses this; if it happens anyway, replies can only go to one of them
                log.warning("tunnels %s and %s share remote, local and key: keepalive replies go to %s",
                            other.target.name, tunnel.target.name, other.target.name)

    def _configure_path_mtu(self) -> None:
        measured: list[tuple[PathMtuTarget, PaddedProbes]] = []
        for t in self._tunnels.values():
            local, remote, ikey, okey = t.target.endpoints
            if t.target.mtu_probe is None:
                continue
            builder: PaddedProbes
            if isinstance(local, IPv6Address) and isinstance(remote, IPv6Address):  # ip6gre: GRE6, padded
                builder = Gre6Probes(build_probe_template6(local, remote, okey, ikey), okey, t.target.encap_option)
            else:
                assert isinstance(local, IPv4Address) and isinstance(remote, IPv4Address)
                builder = CiscoProbes(build_probe_template(local, remote, okey, ikey), okey)
            measured.append((PathMtuTarget(t.target.name, local, remote, okey, *t.target.mtu_probe), builder))
        self.path_mtu.configure(measured)
        for tunnel in self._tunnels.values():
            if tunnel.target.mtu_probe is not None and not tunnel.liveness.up:
                self.path_mtu.peer_down(tunnel.target.name)

    def path_mtus(self) -> dict[str, int]:
        """The MTU measured for each tunnel with mtu = "probe" that has a result (the planner sets it)."""
        return self.path_mtu.results()

    def path_mtu_status(self, name: str) -> PathMtuStatus | None:
        return self.path_mtu.status(name)

    def annotate(self, statuses: list[TunnelStatus]) -> list[TunnelStatus]:
        """`path_mtu` in the status of each tunnel with mtu = "probe" (spec.md, "Added 2026-12-06")."""
        for status in statuses:
            path_mtu = self.path_mtu.status(status["name"])
            if path_mtu is not None:
                status["path_mtu"] = path_mtu
        return statuses

    def _answering(self, name: str) -> bool:
        """No keepalive of the tunnel missed since its last reply: a padded probe lost now is lost for its size."""
        tunnel = self._tunnels.get(name)
        return tunnel is not None and tunnel.liveness.up and tunnel.liveness.missed_in_a_row == 0

    def _send_mtu_probe(self, name: str, buffer: bytearray) -> OSError | None:
        """One padded probe, as the tunnel's keepalives leave (source, device, fwmark: review H1, #21 M2)."""
        tunnel = self._tunnels.get(name)
        if tunnel is None or self._receive_socket is None or (tunnel.family == 6 and self._gre6 is None):
            return None
        try:
            self._probe_socket(tunnel).sendmsg([buffer], tunnel.source, 0, tunnel.address)
        except OSError as exc:
            return exc
        return None

    def _follow_tunnels(self) -> None:
        """Both sockets' filters after a change of tunnels: each new tunnel gets its tokens ahead (#21 M6)."""
        if self._receive_socket is None:
            return  # start() does it
        self._draw_tokens(tunnels_changed=True)
        if self._request_socket is not None:
            answering = [t.target for t in self._tunnels.values() if t.target.answer == "daemon"
                         and t.family == 4]
            program, kind = request_filter([int(t.remote) for t in answering], [int(t.local) for t in answering])
            self._request_program.attach(self._request_socket, program, kind, len(answering), request_fallbacks())

    def _draw_tokens(self, tunnels_changed: bool = False) -> None:
        """Every tunnel's stock of tokens back to _TOKENS_AHEAD, and the replies filter for them: it passes the
        replies to the probes sent (window) and to be sent (stock), from the configured remotes."""
        tunnels = self._tunnels.values()
        for tunnel in tunnels:
            while len(tunnel.tokens_ahead) < _TOKENS_AHEAD:
                tunnel.tokens_ahead.append(new_token())
        self.path_mtu.refill()
        if self._receive_socket is None:
            return
        self._follow_gre6()
        if not tunnels_changed and self._reply_program.kind not in (None, "tokens"):
            return  # the tokens did not fit: the program checks what does, and new tokens change nothing there
        ipv4 = [t for t in tunnels if t.family == 4]
        program, kind = reply_filter(
            [int(t.target.remote) for t in ipv4], [int(t.target.local) for t in ipv4],
            [*(token for t in ipv4 for token in itertools.chain(t.window.tokens(), t.tokens_ahead)),
             *self.path_mtu.tokens(4)])
        self._reply_program.attach(self._receive_socket, program, kind, len(self._tunnels), reply_fallbacks(
            [int(t.target.remote) for t in ipv4], [int(t.target.local) for t in ipv4]))

    def _follow_gre6(self) -> None:
        """The IPv6 sockets' programs for the ip6gre tunnels (opened with the first of them, gre6_socket.py)."""
        tunnels = [t for t in self._tunnels.values() if t.family == 6]
        if self._loop is None or (self._gre6 is None and not tunnels):
            return
        if self._gre6 is None:
            self._gre6 = Gre6Sockets(self._loop, self.on_packet6)
            dont_fragment6(self._gre6.replies)  # padded probes leave by it, as IPv4's by the replies socket
        self._gre6.follow([int(t.target.remote) for t in tunnels], [int(t.target.local) for t in tunnels],
                          [*(token for t in tunnels for token in itertools.chain(t.window.tokens(), t.tokens_ahead)),
                           *self.path_mtu.tokens(6)],
                          [(int(t.target.remote), int(t.target.local)) for t in tunnels
                           if t.target.answer == "daemon"])

    def socket_status(self) -> SocketStatus:
        """The GRE sockets' filter and drops (drops None before start): `keepalive_socket` in `greupd status`."""
        drops = [socket_drops(sock) for sock in (self._receive_socket, self._request_socket) if sock is not None]
        if self._gre6 is not None:
            drops.append(self._gre6.drops())
        return {"filter": self._reply_program.kind or "protocol",
                "remotes": len({t.target.remote for t in self._tunnels.values()}),
                "drops": None if not drops or None in drops else sum(d for d in drops if d is not None)}

    def after_pass(self, answerable: Collection[str], before: Observed, after: Observed) -> None:
        """What a reconcile pass (which saw `before` and left `after`) tells the engine: the tunnels whose own
        end works (set_answerable), and the underlay of the links it looked at (follow_underlays)."""
        self.set_answerable(answerable)
        self.follow_underlays(underlays_after_pass(before, after, self._tunnels))

    def follow_underlays(self, underlays: Mapping[str, Underlay]) -> None:
        """The underlay device and fwmark of these tunnels' links, as the last pass saw them (underlay.py): their
        probes and answers leave as the tunnels' own packets do (review M2). Others keep what they had."""
        for name, underlay in underlays.items():
            tunnel = self._tunnels.get(name)
            if tunnel is not None:
                self.path_mtu.follow_fwmark(name, underlay.fwmark)
            if tunnel is not None and tunnel.underlay != underlay:
                log.info("tunnel %s: keepalives leave by ifindex %d, fwmark %#x, as the link's own packets",
                         name, underlay.ifindex, underlay.fwmark)
                tunnel.follow(underlay)
                self.path_mtu.remeasure(name, "the link's underlay changed")

    def set_answerable(self, names: Collection[str]) -> None:
        """The tunnels whose own end works (owned link present and up, not in error): answer = "daemon"
        reflects a peer's probes for these only. A reply tells a Cisco that our tunnel carries traffic;
        for a tunnel whose link is missing or foreign, our kernel would drop that traffic (review H5)."""
        self._answerable = frozenset(names)

    def is_up(self, name: str) -> bool:
        """The keepalive verdict; a tunnel without keepalives is up as far as the engine can tell."""
        tunnel = self._tunnels.get(name)
        return tunnel.liveness.up if tunnel is not None else True

    def watches(self, name: str) -> bool:
        """Whether the tunnel has keepalives (cheaper than status(name) is not None: no status is built)."""
        return name in self._tunnels

    def status(self, name: str) -> KeepaliveStatus | None:
        tunnel = self._tunnels.get(name)
        return tunnel.liveness.status() if tunnel is not None else None

    def names(self) -> list[str]:
        return list(self._tunnels)

    def verdicts(self) -> dict[str, bool]:
        """Every tunnel's keepalive verdict (is_up), for the planner."""
        return {name: tunnel.liveness.up for name, tunnel in self._tunnels.items()}

    def close(self) -> None:
        self.path_mtu.close()
        self._reader_paused_until = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._schedule.clear()
        for tunnel in self._tunnels.values():
            tunnel.entry = -1  # start() schedules them again
        for reading in (self._receive_socket, self._request_socket):
            if self._loop is not None and reading is not None:
                self._loop.remove_reader(reading.fileno())
        for sock in (self._send_socket, self._receive_socket, self._request_socket):
            if sock is not None:
                sock.close()
        self._send_socket = self._receive_socket = self._request_socket = None
        self._requests_paused = False
        self._reply_program.forget()
        self._request_program.forget()
        self._sender = self._receiver = None
        if self._gre6 is not None:
            self._gre6.close()
            self._gre6 = None
        self._loop = None

    # --- probing --------------------------------------------------------------------------------------

    def _schedule_first(self, tunnel: _Tunnel) -> None:
        """The tunnel's first probe: now (spread False), or at a random point of the grid within one interval,
        so that a thousand tunnels neither fire together nor each on their own."""
        if self._loop is None:
            return  # start() schedules it
        now = self._loop.time()
        if self._spread:
            grid = _COARSE_GRID if tunnel.target.interval >= 1.0 else _GRID
            slots = max(1, int(tunnel.target.interval / grid))
            first = (math.floor(now / grid) + 1 + self._random.randrange(slots)) * grid
        else:
            first = now
        self._schedule_at(tunnel, first)

    def _schedule_at(self, tunnel: _Tunnel, when: float) -> None:
        tunnel.next_at = when
        tunnel.entry = entry = next(self._entries)
        heapq.heappush(self._schedule, (when, entry, tunnel))
        if self._timer is None or when < self._timer.when():
            self._arm()

    def _arm(self) -> None:
        """The engine's one timer, at the earliest valid entry of the schedule or the end of a read pause."""
        assert self._loop is not None
        schedule = self._schedule
        while schedule and schedule[0][2].entry != schedule[0][1]:
            heapq.heappop(schedule)  # the tunnel was removed or rescheduled since
        when = schedule[0][0] if schedule else None
        if self._reader_paused_until is not None and (when is None or self._reader_paused_until < when):
            when = self._reader_paused_until
        if self._timer is not None:
            if when is not None and self._timer.when() <= when:
                return
            self._timer.cancel()
            self._timer = None
        if when is not None:
            self._timer = self._loop.call_at(when, self._tick)

    def _tick(self) -> None:
        """Every probe that is due, in one wake-up: the first probes of tunnels are spread on a grid of
        _GRID and their intervals are (nearly always) multiples of it, so with a thousand tunnels each
        wake-up sends many probes instead of one. Then what the socket holds is read: replies that came back
        during the sends (a peer in the same kernel answers inside our sendmsg), or while reading was
        paused."""
        assert self._loop is not None
        self._timer = None
        now = self._loop.time()
        due: list[_Tunnel] = []
        try:
            limit = now + _COALESCE
            schedule = self._schedule
            while schedule and schedule[0][0] <= limit:
                _, entry, tunnel = heapq.heappop(schedule)
                if tunnel.entry == entry:
                    due.append(tunnel)
            if any(not tunnel.tokens_ahead for tunnel in due):
                self._draw_tokens()  # every _TOKENS_AHEAD intervals or so: one attach for all tunnels
            if any(tunnel.liveness.awaiting_reply for tunnel in due):
                # Misses are about to be counted: first read what is queued, so that a reply that arrived
                # while the loop was busy (a long pass, or more replies than one wake-up reads) counts as the
                # reply it is, not as a miss (review M8).
                self._drain(_DRAIN_BEFORE_MISS, now)
            if self._sender is not None and due:
                self._probe_batch(due, now)
            else:
                for tunnel in due:
                    self._probe(tunnel, now)
            paused_until = self._reader_paused_until
            if due or (paused_until is not None and paused_until <= limit):
                read = self._drain(_DRAIN_LIMIT, now)
                if paused_until is not None and paused_until <= limit:
                    if read:
                        self._pause_reader(now)  # still busy: the next point of the grid reads again
                    else:
                        self._resume_reader()
        finally:
            # Whatever raised on the way (a bug: none is known), no popped tunnel leaves the schedule for good,
            # which would leave it "up" with no probes at all (review L5): the ones not rescheduled yet get
            # their next slot, as if this probe had been lost.
            for tunnel in due:
                if tunnel.entry >= 0 and tunnel.next_at <= now + _COALESCE:
                    self._advance(tunnel, now)
            self._arm()

    def _probe(self, tunnel: _Tunnel, now: float) -> None:
        """One probe, one sendmsg (where libc has no sendmmsg)."""
        assert self._receive_socket is not None
        missed = self._next_probe(tunnel, now)
        try:
            # Our probe from the GRE socket: its GRE part only, the kernel adds the outer header (source
            # `local` by IP_PKTINFO, TTL 255), so it takes the route the tunnel's own packets take (review H1).
            self._probe_socket(tunnel).sendmsg([tunnel.probe.buffer], tunnel.source, 0, tunnel.address)
        except OSError as exc:
            self._probe_sent(tunnel, now, missed, exc)
        else:
            self._probe_sent(tunnel, now, missed, None)

    def _probe_batch(self, due: list[_Tunnel], now: float) -> None:
        """Every due probe in one sendmmsg: the same messages as _probe's, from the same GRE socket (H1)."""
        assert self._sender is not None
        if any(tunnel.datagram is None for tunnel in due):  # ip6gre tunnels: one sendmsg each (gre6_socket.py)
            for tunnel in due:
                if tunnel.datagram is None:
                    self._probe(tunnel, now)
            due = [tunnel for tunnel in due if tunnel.datagram is not None]
        missed = [self._next_probe(tunnel, now) for tunnel in due]
        datagrams = []
        for tunnel in due:
            assert tunnel.datagram is not None  # made with every tunnel where batching is available
            datagrams.append(tunnel.datagram)
        refused = dict(self._sender.send(datagrams))
        for index, tunnel in enumerate(due):
            self._probe_sent(tunnel, now, missed[index], refused.get(index))

    def _next_probe(self, tunnel: _Tunnel, now: float) -> LivenessChange | None:
        """Schedule the tunnel's next probe, count the outstanding one missed if its interval is over (this
        is its deadline), and write a fresh token into the probe's buffer. Scheduling comes first, so that
        one tunnel's trouble never stops its probing; a loop that stalled skips the probes it missed rather
        than sending them in a burst, on the same grid."""
        self._advance(tunnel, now)
        missed = tunnel.liveness.on_timer(now)
        token = tunnel.tokens_ahead.popleft() if tunnel.tokens_ahead else new_token()
        tunnel.window.issue(token, now)
        tunnel.probe.stamp(token)
        return missed

    def _advance(self, tunnel: _Tunnel, now: float) -> None:
        """Put the tunnel's next probe in the schedule, one interval after the last slot (or later, on the
        same grid, if the loop stalled)."""
        interval = tunnel.target.interval
        next_at = tunnel.next_at + interval
        if next_at <= now:
            next_at += interval * (math.floor((now - next_at) / interval) + 1)
        tunnel.next_at = next_at
        tunnel.entry = entry = next(self._entries)
        heapq.heappush(self._schedule, (next_at, entry, tunnel))

    def _probe_sent(self, tunnel: _Tunnel, now: float, missed: LivenessChange | None,
                    error: OSError | None) -> None:
        if error is not None:
            # No route to the remote, say: the probe is lost like any other and counts as a miss.
            self.counters.send_errors += 1
            if not tunnel.send_failing:
                log.warning("tunnel %s: cannot send keepalive to %s: %s", tunnel.target.name,
                            tunnel.target.remote, error.strerror or error)
        tunnel.send_failing = error is not None
        missed = tunnel.liveness.on_probe_sent(now) or missed
        if missed is not None:
            self._report(tunnel, missed)

    def _probe_socket(self, tunnel: _Tunnel) -> socket.socket:
        """The socket a tunnel's probes leave by: the replies socket of its family."""
        if tunnel.family == 6:
            assert self._gre6 is not None
            return self._gre6.replies
        assert self._receive_socket is not None
        return self._receive_socket

    def _send_in_tunnel(self, tunnel: _Tunnel, gre: bytes) -> None:
        """An answer that goes through the tunnel (answering.py): GRE that the probe socket sends to the remote
        with a kernel-built outer header, as the tunnel's own packets leave."""
        self._probe_socket(tunnel).sendmsg([gre], tunnel.source, 0, tunnel.address)

    def _send_answer(self, tunnel: _Tunnel, packet: bytes) -> None:
        """A reflected probe, header and all, to the tunnel's remote, routed as the tunnel's own GRE: source
        `local`, protocol GRE."""
        if tunnel.family == 6:
            # An IPPROTO_RAW socket's port is the flow's protocol (rawv6_sendmsg): GRE, so that an IPsec policy
            # for GRE applies to the answer, as the IP_PROTOCOL control message below does for IPv4.
            assert self._gre6 is not None
            self._gre6.answers.sendmsg([packet], tunnel.source, 0, (tunnel.address[0], IPPROTO_GRE))
            return
        assert self._send_socket is not None
        try:
            self._send_socket.sendmsg([packet], [*tunnel.source, *self._answer_flow], 0, tunnel.address)
        except OSError as exc:
            if exc.errno != errno.EINVAL or not self._answer_flow:
                raise
            # A kernel before 5.19 has no IP_PROTOCOL control message: the source alone still picks the
            # tunnel's `from <local>` rules.
            log.info("this kernel takes no IP_PROTOCOL control message: answers are routed as protocol 255")
            self._answer_flow = []
            self._send_socket.sendmsg([packet], tunnel.source, 0, tunnel.address)

    def _report(self, tunnel: _Tunnel, change: LivenessChange) -> None:
        log.debug("tunnel %s %s: %s", tunnel.target.name, "up" if change.up else "down", change.message)
        if change.up:  # the search holds while small keepalives are lost too: a dead peer says nothing of sizes
            self.path_mtu.peer_up(tunnel.target.name)
        else:
            self.path_mtu.peer_down(tunnel.target.name)
        try:
            self._on_change(tunnel.target.name, change)
        except Exception as exc:
            # The loop's handler logs it, as for any callback; the tick that called us still has other
            # tunnels' probes to send and replies to read, and must go on.
            assert self._loop is not None
            self._loop.call_exception_handler({"message": f"keepalive verdict of {tunnel.target.name}",
                                               "exception": exc})

    # --- receiving ------------------------------------------------------------------------------------

    def _on_readable(self) -> None:
        """A packet arrived: read what is there, then leave the socket to the timer until the next point of
        the grid, so that a thousand replies a second cost a hundred wake-ups, not a thousand. A reply
        is read at most _GRID after it arrived; if nothing came meanwhile, reading on arrival resumes."""
        assert self._loop is not None
        now = self._loop.time()
        if self._drain(_DRAIN_LIMIT, now):
            self._pause_reader(now)
            self._arm()

    def _pause_reader(self, now: float) -> None:
        assert self._loop is not None and self._receive_socket is not None
        if self._reader_paused_until is None:
            self._loop.remove_reader(self._receive_socket.fileno())
        self._reader_paused_until = (math.floor(now / _GRID) + 1) * _GRID

    def _resume_reader(self) -> None:
        assert self._loop is not None and self._receive_socket is not None
        self._reader_paused_until = None
        self._loop.add_reader(self._receive_socket.fileno(), self._on_readable)

    def _drain(self, limit: int, now: float) -> int:
        """Read and handle what the GRE socket holds, up to `limit` packets, into one buffer (no allocation
        per packet but what a message keeps); return how many were read.

        Each packet is handled at the time the kernel received it (SO_TIMESTAMPNS, on the real-time clock,
        brought onto the loop's clock here), not when we read it: a reply read at the next point of the
        grid, or after a long pass, still shows the round trip it had."""
        assert self._receive_socket is not None
        real_minus_loop = time.time() - time.monotonic()  # the loop's clock is time.monotonic()
        if self._receiver is not None:
            return self._drain_batches(limit, now, real_minus_loop)
        receive, view = self._receive_socket.recvmsg_into, self._view
        buffers = [view]
        for count in range(limit):
            try:
                size, control, _, _ = receive(buffers, _TIMESTAMP_SPACE)
            except (BlockingIOError, InterruptedError):
                return count
            except OSError as exc:  # a pending socket error is reported once; the next read goes on
                log.warning("reading the GRE socket: %s", exc.strerror or exc)
                return count
            received = now
            for level, kind, data in control:
                if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS and len(data) >= _TIMESPEC.size:
                    seconds, nanoseconds = _TIMESPEC.unpack_from(data)
                    received = seconds + nanoseconds * 1e-9 - real_minus_loop
            self.on_packet(view[:size], received)
        return limit

    def _drain_batches(self, limit: int, now: float, real_minus_loop: float) -> int:
        """_drain with recvmmsg: up to _RECEIVE_BATCH packets per system call."""
        assert self._receiver is not None
        count = 0
        while count < limit:
            try:
                packets = self._receiver.receive()
            except OSError as exc:  # a pending socket error is reported once; the next read goes on
                log.warning("reading the GRE socket: %s", exc.strerror or exc)
                return count
            for data, received in packets:
                self.on_packet(data, received - real_minus_loop if received is not None else now)
            count += len(packets)
            if len(packets) < _RECEIVE_BATCH:
                return count  # the queue is empty (a packet that came meanwhile wakes the reader)
        return count

    def _on_requests(self) -> None:
        """Peers' probes arrived on their own socket: read up to _DRAIN_LIMIT. If more are queued (a flood of
        forged requests), leave the socket alone until the next point of the grid: such a flood then costs
        answers to the peer (their buffer overflows), never the loop's time for our own probes and replies."""
        assert self._loop is not None and self._request_socket is not None
        now, sock, view = self._loop.time(), self._request_socket, self._view
        for _ in range(_DRAIN_LIMIT):
            try:
                size = sock.recv_into(view)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # a pending socket error is reported once; the next read goes on
                log.warning("reading the GRE socket for requests: %s", exc.strerror or exc)
                return
            self.on_packet(view[:size], now)
        self._loop.remove_reader(sock.fileno())
        self._requests_paused = True
        self._loop.call_at((math.floor(now / _GRID) + 1) * _GRID, self._resume_requests)

    def _resume_requests(self) -> None:
        if self._requests_paused and self._loop is not None and self._request_socket is not None:
            self._requests_paused = False
            self._loop.add_reader(self._request_socket.fileno(), self._on_requests)

    def on_packet(self, data: Packet, now: float) -> None:
        """One packet from the GRE socket, received at `now`; never raises for what the packet contains."""
        self.counters.packets += 1
        try:
            message = parse_gre(data)
        except MalformedPacket as exc:
            self.counters.malformed += 1
            log.debug("malformed GRE packet (%s): %s", exc, bytes(data[:64]).hex())
            return
        if message is None:
            self.counters.traffic += 1
        elif isinstance(message, ProbeReply):
            self._on_reply(message, now)
        else:
            self._on_request(message, now)

    def _on_reply(self, reply: ProbeReply, now: float) -> None:
        tunnel = self._by_endpoints.get((reply.src, reply.dst, reply.key))
        sent_at = tunnel.window.claim(reply.token) if tunnel is not None and reply.token is not None else None
        if (sent_at is None and tunnel is not None and reply.token is not None
                and self.path_mtu.claim(tunnel.target.name, reply.token, now)):
            self.counters.mtu_replies += 1  # a padded probe's: the search's, never the Liveness's
            return
        if tunnel is None or sent_at is None:
            self.counters.unmatched_replies += 1
            return
        self.counters.replies += 1
        change = tunnel.liveness.on_reply(now, max(0.0, now - sent_at))
        if change is not None:
            self._report(tunnel, change)

    def on_packet6(self, data: Packet, src: int, dst: int, flow_label: int, now: float) -> None:
        """on_packet for the IPv6 GRE sockets: `data` from the GRE header on, the IPv6 header's addresses and
        flow label beside it (gre6_socket.py)."""
        self.counters.packets += 1
        try:
            message = parse_gre6(data, src, dst, flow_label)
        except MalformedPacket as exc:
            self.counters.malformed += 1
            log.debug("malformed GRE6 packet (%s): %s", exc, bytes(data[:64]).hex())
            return
        if message is None:
            self.counters.traffic += 1
        elif isinstance(message, ProbeReply):
            self._on_reply(message, now)
        else:
            self._on_request(message, now)

    def _on_request(self, request: KeepaliveRequest, now: float) -> None:
        """Answer a peer's probe, as its kernel-side partner would route it: only for a tunnel of ours with
        answer = "daemon", only when the probe comes from that tunnel's remote (with our key), and only back
        to that remote, so greupd is never a reflector towards arbitrary addresses (answering.py: also the
        peers that address their probes otherwise)."""
        tunnel = self._by_endpoints.get((request.src, request.dst, request.key))
        if tunnel is None or tunnel.target.answer != "daemon":
            self.counters.requests_ignored += 1
            return
        answer = answer_for(request, tunnel.rule)
        if answer == "not_plain":
            self.counters.requests_not_plain += 1
            return
        if not isinstance(answer, Answer):
            self.counters.requests_ignored += 1
            return
        if self._answerable is not None and tunnel.target.name not in self._answerable:
            # Our end of this tunnel does not work: silence, as a Cisco's own peer would give (review H5).
            self.counters.requests_unanswerable += 1
            return
        if not tunnel.budget.take(now):
            self.counters.requests_rate_limited += 1
            return
        try:
            if answer.encapsulated:
                self._send_in_tunnel(tunnel, answer.packet)
            else:
                self._send_answer(tunnel, answer.packet)
        except OSError as exc:
            self.counters.send_errors += 1
            log.debug("tunnel %s: cannot answer keepalive: %s", tunnel.target.name, exc.strerror or exc)
            return
        self.counters.requests_answered += 1
        if answer.case == "behind_nat":
            self.counters.answered_behind_nat += 1
        elif answer.case == "inner_addresses":
            self.counters.answered_inner_addresses += 1
