"""The BFD engine: one BfdSession per tunnel with [tunnel.bfd], its sockets, and its timer on the daemon's loop.

RFC 5881 single hop, through the tunnel, between the tunnel's `address` and `peer`:
- a receive socket per tunnel, UDP bound to (address, 3784), with IP_RECVTTL (IPV6_RECVHOPLIMIT): a packet
  whose TTL (hop limit) is not 255 came from further than the tunnel's other end and is dropped (RFC 5881 5),
  as is one whose source is not the peer;
- a send socket per tunnel, bound to (address, a random port in 49152..65535) (RFC 5881 4: the kernel's
  ip_local_port_range need not be IANA's), TTL/hop limit 255, sending to (peer, 3784). The peer's route is the
  tunnel's own, so the packets go through the tunnel.
Both sockets have IP_FREEBIND (IPV6_FREEBIND): greupd opens them before its pass has put the address on the
link, and a link that is recreated does not close them.

Each session has its own asyncio timer at `session.wake_at` (sending, detection, the start's grace). The
sessions' verdicts reach the daemon through `on_change`, like the keepalive engine's.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import random
import socket
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from greupd.config import Config
from greupd.config.detectors import read_bfd_key
from greupd.liveness.bfd_auth import MeticulousSha1
from greupd.liveness.bfd_codec import MAX_PACKET, MalformedPacket, State, decode
from greupd.liveness.bfd_memory import SessionMemo
from greupd.liveness.bfd_session import BfdChange, BfdSession, Step, Timers
from greupd.status import BfdStatus

log = logging.getLogger("greupd.bfd")

BFD_PORT = 3784  # RFC 5881 4: single-hop control packets
SOURCE_PORTS = range(49152, 65536)
TTL = 255
_IP_FREEBIND = 15  # <linux/in.h>
_IPV6_FREEBIND = 78  # <linux/in6.h>
_IP_RECVTTL = 12
_IP_TTL = 2
_IPV6_RECVHOPLIMIT = 51
_IPV6_HOPLIMIT = 52
_IPV6_UNICAST_HOPS = 16
_COALESCE = 0.001  # s
_INT = struct.Struct("=i")
_ANCILLARY = socket.CMSG_SPACE(_INT.size)


@dataclass(frozen=True)
class BfdTarget:
    name: str
    address: IPv4Address | IPv6Address
    peer: IPv4Address | IPv6Address
    timers: Timers
    key: bytes | None = None

    @property
    def endpoints(self) -> tuple[object, ...]:
        return self.address, self.peer, self.key


def targets_from_config(config: Config) -> list[BfdTarget]:
    """One per enabled tunnel with [tunnel.bfd] (config requires address and peer for it)."""
    targets = []
    for tunnel in config.tunnels:
        if not tunnel.enabled or tunnel.bfd is None or tunnel.address is None or tunnel.peer is None:
            continue
        bfd = tunnel.bfd
        key = read_bfd_key(bfd.auth_file) if bfd.auth_file is not None else None
        targets.append(BfdTarget(tunnel.name, tunnel.address.ip, tunnel.peer,
                                 Timers(bfd.interval, bfd.interval, bfd.multiplier, bfd.passive), key))
    return targets


class _Tunnel:
    def __init__(self, target: BfdTarget, session: BfdSession) -> None:
        self.target = target
        self.session = session
        self.receiver: socket.socket | None = None
        self.sender: socket.socket | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.dropped = 0
        self.send_failing = False
        self.open_failing = False
        self.address = (str(target.peer), BFD_PORT)


class BfdEngine:
    def __init__(self, on_change: Callable[[str, BfdChange], None], rng: random.Random | None = None) -> None:
        self._on_change = on_change
        self._rng = rng or random.SystemRandom()  # discriminators, source ports, SHA1 sequence numbers
        # The jitter of every packet needs no secret: a PRNG seeded once, not a getrandom(2) per packet (a
        # syscall, which costs most in the UML lab: bench/bfd.py's profile).
        self._jitter = rng or random.Random(self._rng.getrandbits(64))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tunnels: dict[str, _Tunnel] = {}
        self._pending: list[BfdTarget] = []
        self._resume: dict[str, SessionMemo] = {}

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        pending, self._pending = self._pending, []
        self.configure(pending)

    def names(self) -> list[str]:
        return list(self._tunnels)

    def watches(self, name: str) -> bool:
        return name in self._tunnels

    def is_up(self, name: str) -> bool:
        tunnel = self._tunnels.get(name)
        return tunnel is None or tunnel.session.up

    def status(self, name: str) -> BfdStatus | None:
        tunnel = self._tunnels.get(name)
        if tunnel is None:
            return None
        session = tunnel.session
        return {"state": session.state.label, "remote_state": session.remote_state.label,
                "detect_time_ms": round(session.detect_time * 1000), "sent": session.counters.sent,
                "received": session.counters.received, "dropped": tunnel.dropped + session.counters.discarded}

    def snapshot(self) -> dict[str, SessionMemo]:
        """Every Up session, for the next greupd to carry on (bfd_memory.py)."""
        memos = {}
        for name, tunnel in self._tunnels.items():
            session = tunnel.session
            if session.state != State.UP:
                continue
            memos[name] = SessionMemo(
                str(tunnel.target.address), str(tunnel.target.peer), session.my_discriminator,
                session.remote_discriminator, round(session.remote_min_rx * 1e6),
                round(session.remote_desired_min_tx * 1e6), session.remote_detect_mult,
                session.auth.last_sequence if session.auth is not None else None)
        return memos

    def resume(self, memos: Mapping[str, SessionMemo]) -> None:
        """Sessions to carry on rather than start: used by the next configure() for tunnels it adds."""
        self._resume = dict(memos)

    def configure(self, targets: Sequence[BfdTarget]) -> None:
        """The sessions `targets` ask for: new ones start, removed ones say AdminDown and go, changed timers
        are renegotiated (Poll/Final, no flap), changed endpoints or keys start a new session."""
        if self._loop is None:
            self._pending = list(targets)
            return
        now = self._loop.time()
        wanted = {target.name: target for target in targets}
        for name in [n for n in self._tunnels if n not in wanted]:
            self._remove(name, admin_down=True)
        resume, self._resume = self._resume, {}
        for target in targets:
            tunnel = self._tunnels.get(target.name)
            if tunnel is not None and tunnel.target.endpoints != target.endpoints:
                self._remove(target.name, admin_down=True)
                tunnel = None
            if tunnel is None:
                self._add(target, now, resume.get(target.name))
            elif tunnel.target != target:
                tunnel.target = target
                self._handle(tunnel, tunnel.session.reconfigure(target.timers, now))

    def close(self, admin_down: bool = False) -> None:
        """Stop every session; with admin_down (a daemon that removes its tunnels), tell the peers first."""
        for name in list(self._tunnels):
            self._remove(name, admin_down=admin_down)
        self._loop = None

    # --- sessions ------------------------------------------------------------------------------------

    def _add(self, target: BfdTarget, now: float, memo: SessionMemo | None = None) -> None:
        used = {t.session.my_discriminator for t in self._tunnels.values()}
        if memo is not None and (memo.address, memo.peer) != (str(target.address), str(target.peer)):
            memo = None  # the tunnel's endpoints changed meanwhile: a new session
        discriminator = memo.my_discriminator if memo is not None and memo.my_discriminator not in used else 0
        while discriminator == 0 or discriminator in used:
            discriminator = self._rng.getrandbits(32)
        auth = MeticulousSha1(target.key, self._rng) if target.key is not None else None
        session = BfdSession(target.timers, discriminator, now, self._jitter, auth=auth)
        if memo is not None and discriminator == memo.my_discriminator:
            session.resume(memo.remote_discriminator, memo.remote_min_rx_us / 1e6,
                           memo.remote_desired_min_tx_us / 1e6, memo.remote_detect_mult, now)
            if auth is not None and memo.auth_sequence is not None:
                auth.continue_from(memo.auth_sequence)
            log.info("tunnel %s: BFD session carried on from the previous greupd", target.name)
        tunnel = _Tunnel(target, session)
        self._tunnels[target.name] = tunnel
        self._open(tunnel)
        self._arm(tunnel)

    def _remove(self, name: str, *, admin_down: bool) -> None:
        tunnel = self._tunnels.pop(name)
        if tunnel.timer is not None:
            tunnel.timer.cancel()
        if admin_down and self._loop is not None and tunnel.sender is not None:
            # The session goes with this: no periodic AdminDown follows (RFC 5880 6.8.16 asks for them during
            # a detection time), so say it three times, that one lost datagram does not leave it unsaid.
            for _ in range(3):
                for packet in tunnel.session.admin_down(self._loop.time()).send:
                    self._send(tunnel, tunnel.session.wire(packet))
        self._close_sockets(tunnel)

    def _handle(self, tunnel: _Tunnel, step: Step) -> None:
        for packet in step.send:
            self._send(tunnel, tunnel.session.wire(packet))
        if step.change is not None:
            change = step.change
            log.info("tunnel %s: %s", tunnel.target.name, change.message)
            try:
                self._on_change(tunnel.target.name, change)
            except Exception as exc:  # the loop's handler logs it; this session's timer must still be armed
                assert self._loop is not None
                self._loop.call_exception_handler({"message": f"BFD verdict of {tunnel.target.name}",
                                                   "exception": exc})
        self._arm(tunnel)

    def _arm(self, tunnel: _Tunnel) -> None:
        """The session's timer at its wake_at. One that is set for no later is kept (a received packet only
        pushes the detection time out; the tick finds nothing due and arms again): no cancel and new handle
        per packet."""
        when = tunnel.session.wake_at
        if tunnel.timer is not None:
            if when is not None and tunnel.timer.when() <= when:
                return
            tunnel.timer.cancel()
            tunnel.timer = None
        if when is not None and self._loop is not None:
            tunnel.timer = self._loop.call_at(when, self._tick, tunnel)

    def _tick(self, tunnel: _Tunnel) -> None:
        assert self._loop is not None
        tunnel.timer = None
        if tunnel.receiver is None:
            self._open(tunnel)  # the address was not usable yet (EADDRINUSE by another BFD daemon, say)
        # asyncio may run a timer up to its clock's resolution early: what is due that soon is due now.
        self._handle(tunnel, tunnel.session.tick(self._loop.time() + _COALESCE))

    # --- sockets -------------------------------------------------------------------------------------

    def _open(self, tunnel: _Tunnel) -> None:
        assert self._loop is not None
        target = tunnel.target
        six = target.address.version == 6
        family = socket.AF_INET6 if six else socket.AF_INET
        level = socket.IPPROTO_IPV6 if six else socket.IPPROTO_IP
        receiver = sender = None
        try:
            receiver = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
            receiver.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            receiver.setsockopt(level, _IPV6_FREEBIND if six else _IP_FREEBIND, 1)
            receiver.setsockopt(level, _IPV6_RECVHOPLIMIT if six else _IP_RECVTTL, 1)
            if six:
                receiver.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            receiver.bind((str(target.address), BFD_PORT))
            sender = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
            sender.setsockopt(level, _IPV6_FREEBIND if six else _IP_FREEBIND, 1)
            sender.setsockopt(level, _IPV6_UNICAST_HOPS if six else _IP_TTL, TTL)
            self._bind_source_port(sender, str(target.address))
        except OSError as exc:
            for sock in (receiver, sender):
                if sock is not None:
                    sock.close()
            if not tunnel.open_failing:
                log.warning("tunnel %s: cannot open BFD sockets on %s: %s; trying again every second",
                            target.name, target.address, exc.strerror or exc)
            tunnel.open_failing = True
            return
        tunnel.open_failing = False
        tunnel.receiver, tunnel.sender = receiver, sender
        self._loop.add_reader(receiver.fileno(), self._readable, tunnel)

    def _bind_source_port(self, sender: socket.socket, address: str) -> None:
        for _ in range(64):
            try:
                sender.bind((address, self._rng.choice(SOURCE_PORTS)))
                return
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
        raise OSError(errno.EADDRINUSE, "no free source port in 49152..65535")

    def _close_sockets(self, tunnel: _Tunnel) -> None:
        if tunnel.receiver is not None:
            if self._loop is not None:
                self._loop.remove_reader(tunnel.receiver.fileno())
            tunnel.receiver.close()
        if tunnel.sender is not None:
            tunnel.sender.close()
        tunnel.receiver = tunnel.sender = None

    def _send(self, tunnel: _Tunnel, data: bytes) -> None:
        if tunnel.sender is None:
            return
        try:
            tunnel.sender.sendto(data, tunnel.address)
        except OSError as exc:  # no route to the peer yet (the link is being made), say: lost like any packet
            if not tunnel.send_failing:
                log.info("tunnel %s: cannot send BFD to %s: %s", tunnel.target.name, tunnel.target.peer,
                         exc.strerror or exc)
            tunnel.send_failing = True
        else:
            tunnel.send_failing = False

    def _readable(self, tunnel: _Tunnel) -> None:
        assert self._loop is not None
        receiver = tunnel.receiver
        if receiver is None:
            return
        # One datagram per readiness: a session's peer sends one every interval, and epoll (level-triggered)
        # says so again if more wait. Reading on until EAGAIN cost a second recvmsg(2) per packet.
        try:
            data, ancillary, _, source = receiver.recvmsg(MAX_PACKET, _ANCILLARY)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.debug("tunnel %s: reading the BFD socket: %s", tunnel.target.name, exc)
            return
        self.on_datagram(tunnel.target.name, data, ancillary, source[0], self._loop.time())

    def on_datagram(self, name: str, data: bytes, ancillary: list[tuple[int, int, bytes]], source: str,
                    now: float) -> None:
        """One datagram to a tunnel's port 3784: RFC 5881's checks, then the session's."""
        tunnel = self._tunnels.get(name)
        if tunnel is None:
            return
        ttl = next((_INT.unpack(value[:_INT.size])[0] for level, kind, value in ancillary
                    if (level, kind) in ((socket.IPPROTO_IP, _IP_TTL), (socket.IPPROTO_IPV6, _IPV6_HOPLIMIT))
                    and len(value) >= _INT.size), None)
        if ttl != TTL or source.split("%")[0] != str(tunnel.target.peer):
            tunnel.dropped += 1
            return
        try:
            packet = decode(data)
        except MalformedPacket as exc:
            tunnel.dropped += 1
            log.debug("tunnel %s: malformed BFD packet: %s", name, exc)
            return
        self._handle(tunnel, tunnel.session.receive(packet, data, now))

    def session_state(self, name: str) -> State | None:
        tunnel = self._tunnels.get(name)
        return tunnel.session.state if tunnel is not None else None
