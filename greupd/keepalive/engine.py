"""The keepalive engine: Cisco-style GRE probes out, replies in, one Liveness per tunnel; and answering the
peers' probes ourselves so that a Linux peer of a Cisco needs neither ip_forward nor accept_local.

Two raw sockets serve every tunnel, both registered with the daemon's asyncio loop:

- `socket(AF_INET, SOCK_RAW, IPPROTO_RAW)` sends whole IP packets (IP_HDRINCL): our probes and our answers.
  They leave by the underlay route to the remote, which does not depend on the tunnel's own link. So a
  tunnel whose link greupd set down (`action = "link"`) keeps probing, and comes back up when its peer does.
- `socket(AF_INET, SOCK_RAW, IPPROTO_GRE)` receives a copy of every GRE packet the host gets, also those a
  kernel tunnel consumes; a socket filter (codec.GRE_SOCKET_FILTER) keeps tunnel traffic out of Python.

Under IPsec the kernel looks up the ESP policy by the flow's protocol, and an IP_HDRINCL socket's flow is
IPPROTO_RAW: its GRE would miss the `dynamic[gre]` policy and leave in cleartext (seen in the lab). So for
tunnels with [tunnel.ipsec] each packet carries an IP_PROTOCOL control message saying GRE (see `_send`).

Timers are `loop.call_at` handles on the loop's monotonic clock, one per tunnel, their first probe spread at
random over the interval so that a thousand tunnels do not fire together.

`python -m greupd.keepalive` (__main__.py) runs this engine alone.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import random
import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Literal

from greupd.config import Config
from greupd.keepalive.codec import (
    GRE_SOCKET_FILTER,
    IPPROTO_GRE,
    KeepaliveRequest,
    MalformedPacket,
    ProbeReply,
    ProbeTemplate,
    SocketFilter,
    build_probe_template,
    new_token,
    parse_gre,
)
from greupd.keepalive.liveness import AnswerBudget, Liveness, LivenessChange, ProbeWindow
from greupd.netlink.nlmsg import SO_RCVBUFFORCE
from greupd.status import KeepaliveStatus

__all__ = ["EngineCounters", "KeepaliveEngine", "KeepaliveTarget", "LivenessChange", "targets_from_config"]

log = logging.getLogger("greupd.keepalive")

AnswerMode = Literal["daemon", "kernel", "off"]

ANSWER_RATE = 20.0  # reflected requests per second and tunnel: a Cisco probes every 10 s by default
ANSWER_BURST = 20.0
_DRAIN_LIMIT = 512  # packets read per wake-up, so a flood cannot starve the rest of the loop
_MAX_PACKET = 65535
_RECEIVE_BUFFER = 1 << 20
_SO_ATTACH_FILTER = 26  # <asm-generic/socket.h>; not exported by Python's socket module
_IP_PROTOCOL = 52  # <linux/in.h>: the protocol of an IP_HDRINCL packet's flow, as a control message
_GRE_FLOW = (socket.IPPROTO_IP, _IP_PROTOCOL, struct.pack("=i", IPPROTO_GRE))


@dataclass(frozen=True)
class KeepaliveTarget:
    """What the engine needs of one tunnel with `[tunnel.keepalive]`."""

    name: str
    local: IPv4Address
    remote: IPv4Address
    ikey: int | None
    okey: int | None
    interval: float
    retries: int
    up_after: int
    answer: AnswerMode
    esp: bool = False  # [tunnel.ipsec]: probes and answers must go through the IPsec policy (see _send)

    @property
    def endpoints(self) -> tuple[IPv4Address, IPv4Address, int | None, int | None]:
        return self.local, self.remote, self.ikey, self.okey


def targets_from_config(config: Config) -> list[KeepaliveTarget]:
    """One target per enabled tunnel that has keepalives (config allows them for mode gre only)."""
    targets = []
    for tunnel in config.tunnels:
        if not tunnel.enabled or tunnel.keepalive is None:
            continue
        if not isinstance(tunnel.local, IPv4Address) or not isinstance(tunnel.remote, IPv4Address):
            continue  # unreachable: config.py rejects keepalives on anything but gre over IPv4
        targets.append(KeepaliveTarget(
            name=tunnel.name, local=tunnel.local, remote=tunnel.remote,
            ikey=tunnel.input_key, okey=tunnel.output_key,
            interval=tunnel.keepalive.interval, retries=tunnel.keepalive.retries,
            up_after=tunnel.keepalive.up_after, answer=tunnel.keepalive.answer, esp=tunnel.ipsec is not None,
        ))
    return targets


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
    send_errors: int = 0


# (remote, local, key as it arrives = our ikey), addresses as 32-bit ints like codec.parse_gre returns them
_Endpoints = tuple[int, int, int | None]


class _Tunnel:
    """The engine's mutable state of one target."""

    def __init__(self, target: KeepaliveTarget, up: bool = True) -> None:
        self.target = target
        self.template: ProbeTemplate = build_probe_template(target.local, target.remote, target.okey, target.ikey)
        self.liveness = Liveness(target.interval, target.retries, target.up_after, up=up)
        # retries+1 tokens: a reply may arrive up to `retries` intervals late and still count, once.
        self.window = ProbeWindow(target.retries + 1)
        self.budget = AnswerBudget(ANSWER_RATE, ANSWER_BURST)
        self.address = (str(target.remote), 0)
        self.next_at = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.send_failing = False

    @property
    def endpoints(self) -> _Endpoints:
        return int(self.target.remote), int(self.target.local), self.target.ikey

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


def attach_socket_filter(sock: socket.socket, program: SocketFilter) -> None:
    """SO_ATTACH_FILTER takes a struct sock_fprog, which points at the instructions: build both with ctypes."""

    class SockFilter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                    ("k", ctypes.c_uint32)]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(SockFilter))]

    instructions = (SockFilter * len(program))(*(SockFilter(*insn) for insn in program))
    fprog = SockFprog(len(program), instructions)
    sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, ctypes.string_at(ctypes.addressof(fprog),
                                                                           ctypes.sizeof(fprog)))


class KeepaliveEngine:
    """Probes every target, reads replies and requests, reports each tunnel's verdict as it flips.

    `on_change(name, change)` is called from the loop when a tunnel goes down or comes back; `configure`
    never calls it (a tunnel keeps its verdict across any update of its target, and a new one starts up:
    read `is_up` after configuring).
    """

    def __init__(self, on_change: Callable[[str, LivenessChange], None]) -> None:
        self._on_change = on_change
        self._loop: asyncio.AbstractEventLoop | None = None
        self._send_socket: socket.socket | None = None
        self._receive_socket: socket.socket | None = None
        self._tunnels: dict[str, _Tunnel] = {}
        self._by_endpoints: dict[_Endpoints, _Tunnel] = {}
        self._random = random.Random()
        self.counters = EngineCounters()

    # --- the API the daemon calls ---------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Open the raw sockets (needs CAP_NET_RAW), start reading, and start probing configured targets."""
        send = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)  # IP_HDRINCL implied
        send.setblocking(False)
        receive = socket.socket(socket.AF_INET, socket.SOCK_RAW, IPPROTO_GRE)
        try:
            attach_socket_filter(receive, GRE_SOCKET_FILTER)
            try:
                # Thousands of tunnels answer in bursts; the default limit (rmem_max) would drop some.
                receive.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, _RECEIVE_BUFFER)
            except PermissionError:  # without CAP_NET_ADMIN, as much as rmem_max allows
                receive.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RECEIVE_BUFFER)
            receive.setblocking(False)
        except OSError:
            send.close()
            receive.close()
            raise
        self._loop, self._send_socket, self._receive_socket = loop, send, receive
        loop.add_reader(receive.fileno(), self._on_readable)
        for tunnel in self._tunnels.values():
            self._schedule_first(tunnel)

    def configure(self, targets: Sequence[KeepaliveTarget]) -> None:
        """Make the engine probe exactly `targets`: new ones start (up), removed ones stop, changed ones keep
        their verdict (and, if only timing changed, their counters); unchanged ones are not touched."""
        wanted = {target.name: target for target in targets}
        for name in set(self._tunnels) - set(wanted):
            self._tunnels.pop(name).cancel()
        for name, target in wanted.items():
            tunnel = self._tunnels.get(name)
            if tunnel is None:
                self._tunnels[name] = tunnel = _Tunnel(target)
                self._schedule_first(tunnel)
            elif tunnel.target == target:
                continue
            elif tunnel.target.endpoints != target.endpoints:
                tunnel.cancel()
                self._tunnels[name] = tunnel = _Tunnel(target, up=tunnel.liveness.up)
                self._schedule_first(tunnel)
            else:
                old_interval = tunnel.target.interval
                tunnel.target = target
                tunnel.liveness.reconfigure(target.interval, target.retries, target.up_after)
                tunnel.window.resize(target.retries + 1)
                if target.interval != old_interval:
                    tunnel.cancel()
                    self._schedule_first(tunnel)
        self._by_endpoints = {}
        for tunnel in self._tunnels.values():
            other = self._by_endpoints.setdefault(tunnel.endpoints, tunnel)
            if other is not tunnel:
                # config.py refuses this; if it happens anyway, replies can only go to one of them
                log.warning("tunnels %s and %s share remote, local and key: keepalive replies go to %s",
                            other.target.name, tunnel.target.name, other.target.name)

    def is_up(self, name: str) -> bool:
        """The keepalive verdict; a tunnel without keepalives is up as far as the engine can tell."""
        tunnel = self._tunnels.get(name)
        return tunnel.liveness.up if tunnel is not None else True

    def status(self, name: str) -> KeepaliveStatus | None:
        tunnel = self._tunnels.get(name)
        return tunnel.liveness.status() if tunnel is not None else None

    def names(self) -> list[str]:
        return list(self._tunnels)

    def close(self) -> None:
        for tunnel in self._tunnels.values():
            tunnel.cancel()
        if self._loop is not None and self._receive_socket is not None:
            self._loop.remove_reader(self._receive_socket.fileno())
        for sock in (self._send_socket, self._receive_socket):
            if sock is not None:
                sock.close()
        self._send_socket = self._receive_socket = None
        self._loop = None

    # --- probing --------------------------------------------------------------------------------------

    def _schedule_first(self, tunnel: _Tunnel) -> None:
        if self._loop is None:
            return  # start() schedules it
        tunnel.next_at = self._loop.time() + self._random.uniform(0, tunnel.target.interval)
        tunnel.timer = self._loop.call_at(tunnel.next_at, self._tick, tunnel)

    def _tick(self, tunnel: _Tunnel) -> None:
        assert self._loop is not None and self._send_socket is not None
        now = self._loop.time()
        interval = tunnel.target.interval
        # Scheduled before anything can raise, so that one tunnel's trouble never stops its probing. A loop
        # that stalled skips the probes it missed rather than sending them in a burst, and gives the probe it
        # sends now a whole interval.
        tunnel.next_at += interval
        if tunnel.next_at <= now:
            tunnel.next_at = now + interval
        tunnel.timer = self._loop.call_at(tunnel.next_at, self._tick, tunnel)

        missed = tunnel.liveness.on_timer(now)
        token = new_token()
        tunnel.window.issue(token, now)
        try:
            self._send(tunnel, tunnel.template.with_token(token))
        except OSError as exc:
            # No route to the remote, say: the probe is lost like any other and counts as a miss.
            self.counters.send_errors += 1
            if not tunnel.send_failing:
                log.warning("tunnel %s: cannot send keepalive to %s: %s", tunnel.target.name,
                            tunnel.target.remote, exc.strerror or exc)
            tunnel.send_failing = True
        else:
            tunnel.send_failing = False
        missed = tunnel.liveness.on_probe_sent(now) or missed
        if missed is not None:
            self._report(tunnel, missed)

    def _send(self, tunnel: _Tunnel, packet: bytes) -> None:
        """Send a whole IPv4 packet (our probe, or our answer) towards the tunnel's remote.

        Under IPsec the kernel must see the flow as GRE to apply the tunnel's ESP policy (`dynamic[gre]`);
        an IP_HDRINCL socket's flow is IPPROTO_RAW unless an IP_PROTOCOL control message says otherwise
        (seen working on Debian 12's 6.1; a kernel without it answers EINVAL, counted as a send error). The
        header stays ours: the reply's token rides in the reflected header's IP ID, which a socket that
        builds the header itself (IPPROTO_GRE without IP_HDRINCL) would not keep.
        """
        assert self._send_socket is not None
        if not tunnel.target.esp:
            self._send_socket.sendto(packet, tunnel.address)
            return
        self._send_socket.sendmsg([packet], [_GRE_FLOW], 0, tunnel.address)

    def _report(self, tunnel: _Tunnel, change: LivenessChange) -> None:
        log.debug("tunnel %s %s: %s", tunnel.target.name, "up" if change.up else "down", change.message)
        self._on_change(tunnel.target.name, change)

    # --- receiving ------------------------------------------------------------------------------------

    def _on_readable(self) -> None:
        assert self._loop is not None and self._receive_socket is not None
        for _ in range(_DRAIN_LIMIT):
            try:
                data = self._receive_socket.recv(_MAX_PACKET)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # a pending socket error is reported once; the next read goes on
                log.warning("reading the GRE socket: %s", exc.strerror or exc)
                return
            self.on_packet(data, self._loop.time())

    def on_packet(self, data: bytes, now: float) -> None:
        """One packet from the GRE socket, received at `now`; never raises for what the packet contains."""
        self.counters.packets += 1
        try:
            message = parse_gre(data)
        except MalformedPacket as exc:
            self.counters.malformed += 1
            log.debug("malformed GRE packet (%s): %s", exc, data[:64].hex())
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
        if tunnel is None or sent_at is None:
            self.counters.unmatched_replies += 1
            return
        self.counters.replies += 1
        change = tunnel.liveness.on_reply(now, now - sent_at)
        if change is not None:
            self._report(tunnel, change)

    def _on_request(self, request: KeepaliveRequest, now: float) -> None:
        """Reflect a peer's probe, as its kernel-side partner would route it: only for a tunnel of ours with
        answer = "daemon", only when the probe comes from that tunnel's remote (with our key), and only back
        to that remote, so greupd is never a reflector towards arbitrary addresses."""
        tunnel = self._by_endpoints.get((request.src, request.dst, request.key))
        if (tunnel is None or tunnel.target.answer != "daemon"
                or request.inner_src != request.dst or request.inner_dst != request.src):
            self.counters.requests_ignored += 1
            return
        if not tunnel.budget.take(now):
            self.counters.requests_rate_limited += 1
            return
        assert self._send_socket is not None
        try:
            self._send(tunnel, request.reflection)
        except OSError as exc:
            self.counters.send_errors += 1
            log.debug("tunnel %s: cannot answer keepalive: %s", tunnel.target.name, exc.strerror or exc)
            return
        self.counters.requests_answered += 1
