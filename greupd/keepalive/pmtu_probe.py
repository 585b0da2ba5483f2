"""The path MTU search's I/O side for the keepalive engine (issue #23): padded probes out, their replies matched
by token, one timer for every tunnel's search (pmtu.py decides; this module only sends, waits and reports).

The probes leave by the engine's replies socket, like keepalives: the kernel builds the outer header with the
tunnel's `local` as source and the link's device and fwmark (engine.source_address), so they take the tunnel's
own route, and under [tunnel.ipsec] its ESP policy: the ESP overhead is measured, not assumed. That socket has
IP_PMTUDISC_PROBE: DF is set on every packet it sends, and the kernel checks a probe against the device's MTU
only, not against a path MTU it learned (or failed to learn, where ICMP is filtered) for the remote. An ip6gre
tunnel's probes (GRE6, Gre6Probes) leave by the IPv6 replies socket, which has the same by IPV6_MTU_DISCOVER and
IPV6_DONTFRAG (dont_fragment6).

Each probe carries a token of its own (never a keepalive's), drawn ahead like keepalives' so the replies
socket's filter passes its reply. A reply is matched here and never reaches the tunnel's Liveness: a padded
probe lost is not a keepalive missed. While the peer is down (small keepalives lost too) the search holds;
when the peer is back, it measures again.

A measurement starts at once when a route that covers the remote changes: the daemon's netlink watch hands
every route notification that is not greupd's to `route_changed` (netlink/kernel.py), and underlay.Remotes finds
the tunnels concerned. Measurements start at most 100 a second (start, peer back, a default route replaced), so
a router with 1000 tunnels never sends their searches in one burst (bench/pmtu.py, BENCHMARKS.md section 8).
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
import logging
import socket
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from greupd.gre import IPAddress, IPNetwork
from greupd.keepalive.codec import (
    ProbeBytes,
    ProbeTemplate,
    ProbeToken,
    gre_overhead,
    new_token,
    padded_probe_template,
)
from greupd.keepalive.gre6 import ProbeBytes6, ProbeTemplate6, gre6_overhead, padded_probe_template6
from greupd.keepalive.pmtu import CONFIRM_EVERY, PROBE_TIMEOUT, PathMtuResult, PathMtuSearch, PathMtuTiming
from greupd.keepalive.underlay import Remotes
from greupd.status import PathMtuStatus

log = logging.getLogger("greupd.keepalive")

IP_MTU = 14  # <linux/in.h>: getsockopt on a connected socket, the route's MTU
IPV6_MTU = 24  # <linux/in6.h>: the same for IPv6
IP_MTU_DISCOVER = 10
IP_PMTUDISC_PROBE = 3  # DF set, the device MTU checked, learned path MTUs ignored
IPV6_MTU_DISCOVER = 23  # <linux/in6.h>
IPV6_PMTUDISC_PROBE = 3  # as IP_PMTUDISC_PROBE: the device's MTU checked, learned path MTUs ignored
IPV6_DONTFRAG = 62  # never fragmented by the sender either: too big for the device is EMSGSIZE
ENCAP_LIMIT_OPTION = 8  # ip6gre's destination option (RFC 2473 tunnel encapsulation limit), unless encap_limit = "none"
_TOKENS_AHEAD = 8  # per tunnel: a measurement sends ~10-30 probes, so the filter is attached a few times
_SENT_KEPT = 16  # tokens of sent probes kept per tunnel: a reply later than that many probes counts for nothing
_FALLBACK_UNDERLAY_MTU = 1500
_WAIT_FOR_KEEPALIVES = 0.25  # s between looks at a tunnel whose keepalives are being missed
_ROUTE_SETTLE = 0.2  # s from a route notification to the measurement: `ip route replace` is a delete and an add
_START_SPREAD = 0.01  # s between two measurements started: at most 100 a second, so that 1000 tunnels starting,
#                       coming back or behind a default route that changed are measured over 10 s, not at once,
#                       and their next measurements (`every` after each result) stay spread


@dataclass(frozen=True)
class PathMtuTarget:
    """What the search needs of one tunnel with mtu = "probe"."""

    name: str
    local: IPAddress
    remote: IPAddress
    okey: int | None
    floor: int
    every: float
    timeout: float = PROBE_TIMEOUT


class PaddedProbes(Protocol):
    """How one tunnel's padded probes are built: all the search needs of a keepalive format. CiscoProbes for gre;
    Gre6Probes for ip6gre (MikroTik's GRE6 keepalive, issue #22)."""

    @property
    def overhead(self) -> int:
        """Bytes the tunnel adds on the wire: the probe for MTU m is m + overhead bytes."""
        ...

    def padded(self, mtu: int) -> ProbeBytes | ProbeBytes6:
        """The probe for MTU `mtu`, padded, DF set inside, ready for tokens to be stamped in."""
        ...


@dataclass(frozen=True)
class CiscoProbes:
    """A Cisco keepalive padded (codec.padded_probe_template): gre over IPv4, 24 bytes of overhead, 28 with okey."""

    template: ProbeTemplate
    okey: int | None

    @property
    def overhead(self) -> int:
        return gre_overhead(self.okey)

    def padded(self, mtu: int) -> ProbeBytes:
        return ProbeBytes(padded_probe_template(self.template, mtu + self.overhead))


@dataclass(frozen=True)
class Gre6Probes:
    """A GRE6 keepalive padded (gre6.padded_probe_template6): ip6gre, 44 bytes of overhead, 48 with okey, and 8
    more while the link sends the encapsulation limit option (encap_limit not "none"). The probe itself never
    carries that option (the engine's socket builds a plain IPv6 header), so a probe for MTU m is padded to the
    m + overhead bytes a full packet of the link takes on the wire."""

    template: ProbeTemplate6
    okey: int | None
    encap_option: bool

    @property
    def overhead(self) -> int:
        return gre6_overhead(self.okey) + (ENCAP_LIMIT_OPTION if self.encap_option else 0)

    def padded(self, mtu: int) -> ProbeBytes6:
        return ProbeBytes6(padded_probe_template6(self.template, mtu + self.overhead))


def dont_fragment6(sock: socket.socket) -> None:
    """IPv6's DF for the probes an ip6gre tunnel's socket sends (IPv6 routers never fragment; the sending host
    would): a probe larger than the device's MTU fails with EMSGSIZE, and a path MTU the kernel learned (or not)
    for the remote is not applied to it, as IP_PMTUDISC_PROBE does for IPv4."""
    sock.setsockopt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, IPV6_PMTUDISC_PROBE)
    sock.setsockopt(socket.IPPROTO_IPV6, IPV6_DONTFRAG, 1)


def route_mtu(local: IPAddress, remote: IPAddress, fwmark: int = 0) -> int:
    """The MTU of the route from `local` to `remote` as the kernel holds it now (device MTU, a route's `mtu`,
    or a path MTU it learned): a connected UDP socket's IP_MTU (IPV6_MTU). Nothing is sent."""
    v6 = remote.version == 6
    probe = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        if fwmark:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, fwmark)
        probe.bind((str(local), 0))
        probe.connect((str(remote), 9))
        level, option = (socket.IPPROTO_IPV6, IPV6_MTU) if v6 else (socket.IPPROTO_IP, IP_MTU)
        return int(probe.getsockopt(level, option))
    except OSError as exc:
        log.debug("the route to %s: %s; assuming %d", remote, exc.strerror or exc, _FALLBACK_UNDERLAY_MTU)
        return _FALLBACK_UNDERLAY_MTU
    finally:
        probe.close()


class _Measured:
    """One tunnel's search and the probes of it in flight."""

    def __init__(self, target: PathMtuTarget, builder: PaddedProbes) -> None:
        self.target = target
        self.builder = builder
        self.search = PathMtuSearch(target.floor, target.every, PathMtuTiming(timeout=target.timeout))
        self.tokens_ahead: collections.deque[ProbeToken] = collections.deque()
        self.sent: collections.OrderedDict[ProbeToken, int] = collections.OrderedDict()  # token -> size
        self.probes: dict[int, ProbeBytes | ProbeBytes6] = {}  # size -> its padded probe, kept for the confirmations
        self.result: PathMtuResult | None = None
        self.measured_at: str | None = None
        self.entry = -1
        self.peer_up = True
        self.ceiling = target.floor
        self.route_checked_at = 0.0
        self.wait_until = 0.0  # a keepalive was missed too: losses are not judged before this
        self.start_due: float | None = None  # a measurement to start then (spread, _START_SPREAD)
        self.start_reason = "start"

    def probe(self, size: int) -> ProbeBytes | ProbeBytes6:
        probe = self.probes.get(size)
        if probe is None:
            if len(self.probes) > 4:
                self.probes.clear()  # a search visits ~10 sizes once; keep only what repeats
            probe = self.probes[size] = self.builder.padded(size)
        return probe


class PathMtuProber:
    """Every tunnel's search, for the keepalive engine: `send(name, buffer)` sends one probe as the tunnel's
    keepalives leave (None, or the OSError); `reattach()` recompiles the replies filter (after `refill`);
    `on_result(name, result)` tells the daemon a measurement changed the MTU to set."""

    def __init__(self, send: Callable[[str, bytearray], OSError | None], reattach: Callable[[], None],
                 on_result: Callable[[str, PathMtuResult], None] | None = None,
                 route_mtu: Callable[[IPAddress, IPAddress, int], int] = route_mtu,
                 answering: Callable[[str], bool] = lambda name: True) -> None:
        """`answering(name)`: the tunnel's last keepalive came back (none missed since)."""
        self._send, self._reattach, self._on_result, self._route_mtu = send, reattach, on_result, route_mtu
        self._answering = answering
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tunnels: dict[str, _Measured] = {}
        self._next_start = 0.0  # the earliest time the next measurement may start (_START_SPREAD)
        self._remotes = Remotes({})
        self._fwmarks: dict[str, int] = {}
        self._schedule: list[tuple[float, int, _Measured]] = []
        self._entries = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self.probes_sent = 0

    # --- the engine's side ----------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        for measured in self._tunnels.values():
            if measured.peer_up:
                self._start_soon(measured, "start")

    def configure(self, targets: Iterable[tuple[PathMtuTarget, PaddedProbes]]) -> None:
        """Measure exactly these tunnels; one whose target changed starts over (the link keeps its MTU)."""
        wanted = {target.name: (target, builder) for target, builder in targets}
        for name in set(self._tunnels) - set(wanted):
            self._tunnels.pop(name).entry = -1
        for name, (target, builder) in wanted.items():
            measured = self._tunnels.get(name)
            if measured is not None and measured.target == target and measured.builder == builder:
                continue
            if measured is not None:
                measured.entry = -1
            self._tunnels[name] = measured = _Measured(target, builder)
            if self._loop is not None and measured.peer_up:
                self._start_soon(measured, "configured")
        self._remotes = Remotes({name: m.target.remote for name, m in self._tunnels.items()})

    def follow_fwmark(self, name: str, fwmark: int) -> None:
        self._fwmarks[name] = fwmark

    def refill(self) -> None:
        """Every tunnel's stock of tokens back to _TOKENS_AHEAD (the engine attaches the filter after it)."""
        for measured in self._tunnels.values():
            while len(measured.tokens_ahead) < _TOKENS_AHEAD:
                measured.tokens_ahead.append(new_token())

    def tokens(self, version: int | None = None) -> Iterator[ProbeToken]:
        """The tokens whose replies the filter must pass: sent and drawn ahead (of tunnels over IPv`version`)."""
        for measured in self._tunnels.values():
            if version is not None and measured.target.remote.version != version:
                continue
            yield from measured.sent
            yield from measured.tokens_ahead

    def claim(self, name: str, token: ProbeToken, now: float) -> bool:
        """A reply of `name`'s with a token that was no keepalive's: True if it was one of our probes."""
        measured = self._tunnels.get(name)
        size = measured.sent.pop(token, None) if measured is not None else None
        if measured is None or size is None:
            return False
        self._report(measured, measured.search.on_reply(size, now))
        self._schedule_next(measured)
        return True

    def peer_down(self, name: str) -> None:
        measured = self._tunnels.get(name)
        if measured is not None:
            measured.peer_up = False
            measured.start_due = None
            measured.search.hold()
            measured.entry = -1

    def peer_up(self, name: str) -> None:
        measured = self._tunnels.get(name)
        if measured is not None and not measured.peer_up:
            measured.peer_up = True
            self._start_soon(measured, "peer back")

    def remeasure(self, name: str | None = None, reason: str = "route changed") -> None:
        """Measure again now (a route to the remote changed): `name`, or every tunnel."""
        if self._loop is None:
            return  # start() measures every tunnel
        for measured in ([self._tunnels[name]] if name in self._tunnels else []) if name else self._tunnels.values():
            if measured.peer_up:
                self._start_soon(measured, reason)

    def route_changed(self, prefix: IPNetwork) -> None:
        """A route not greupd's changed (the daemon's netlink watch): the tunnels whose remote `prefix` covers
        are measured again shortly, since their packets may now take another path. One notification (or a
        burst of them) measures each tunnel once; many tunnels are started `_START_SPREAD` apart, not at once."""
        if self._loop is None:
            return
        for name in self._remotes.covered_by(prefix):
            measured = self._tunnels[name]
            if measured.peer_up:
                self._start_soon(measured, f"the route to {measured.target.remote} changed", _ROUTE_SETTLE)

    def results(self) -> dict[str, int]:
        """The MTU to set per tunnel that has a result (measured, or the floor when even that failed)."""
        return {name: m.result.mtu for name, m in self._tunnels.items() if m.result is not None}

    def status(self, name: str) -> PathMtuStatus | None:
        measured = self._tunnels.get(name)
        if measured is None:
            return None
        return {"bytes": measured.result.mtu if measured.result is not None else None,
                "state": measured.search.state, "measured_at": measured.measured_at,
                "ipv6": measured.result.ipv6 if measured.result is not None else None}

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._schedule.clear()
        for measured in self._tunnels.values():
            measured.entry = -1
        self._loop = None

    # --- inside ---------------------------------------------------------------------------------------

    def _start_soon(self, measured: _Measured, reason: str, settle: float = 0.0) -> None:
        """Start a measurement in `settle` s, or later when others were just started (_START_SPREAD); one
        already due keeps its time."""
        assert self._loop is not None
        if measured.start_due is not None:
            return
        measured.start_due = when = max(self._loop.time() + settle, self._next_start)
        measured.start_reason = reason
        self._next_start = when + _START_SPREAD
        self._schedule_next(measured)

    def _restart(self, measured: _Measured, reason: str, now: float | None = None) -> None:
        assert self._loop is not None
        now = self._loop.time() if now is None else now
        target = measured.target
        underlay = self._route_mtu(target.local, target.remote, self._fwmarks.get(target.name, 0))
        measured.ceiling = underlay - measured.builder.overhead
        measured.route_checked_at = now
        measured.search.restart(now, measured.ceiling, reason)
        self._schedule_next(measured)

    def _schedule_next(self, measured: _Measured) -> None:
        when = measured.search.next_wakeup()
        if when is not None:
            when = max(when, measured.wait_until)
        if measured.start_due is not None:
            when = measured.start_due if when is None else min(when, measured.start_due)
        if self._loop is None or when is None or not measured.peer_up:
            measured.entry = -1
            return
        measured.entry = entry = next(self._entries)
        heapq.heappush(self._schedule, (when, entry, measured))
        self._arm()

    def _arm(self) -> None:
        assert self._loop is not None
        while self._schedule and self._schedule[0][2].entry != self._schedule[0][1]:
            heapq.heappop(self._schedule)
        if not self._schedule:
            return
        when = self._schedule[0][0]
        if self._timer is not None:
            if self._timer.when() <= when:
                return
            self._timer.cancel()
        self._timer = self._loop.call_at(when, self._tick)

    def _tick(self) -> None:
        assert self._loop is not None
        self._timer = None
        now = self._loop.time()
        due: list[_Measured] = []
        while self._schedule and self._schedule[0][0] <= now + 0.0005:
            _, entry, measured = heapq.heappop(self._schedule)
            if measured.entry == entry:
                measured.entry = -1
                due.append(measured)
        try:
            if any(len(m.tokens_ahead) < 2 for m in due):
                self._reattach()  # refills every stock and attaches the filter once for all of them
            for measured in due:
                self._step(measured, now)
        finally:
            for measured in due:
                if measured.entry < 0:
                    self._schedule_next(measured)
            self._arm()

    def _step(self, measured: _Measured, now: float) -> None:
        if measured.start_due is not None and now >= measured.start_due - 0.0005:
            measured.start_due = None
            self._restart(measured, measured.start_reason, now)
        elif (measured.start_due is None and now - measured.route_checked_at >= CONFIRM_EVERY
              and not measured.search.searching):
            # The route to the remote changed its MTU (another uplink, a route's `mtu`): measure again at once.
            measured.route_checked_at = now
            target = measured.target
            ceiling = self._route_mtu(target.local, target.remote, self._fwmarks.get(target.name, 0)) \
                - measured.builder.overhead
            if ceiling != measured.ceiling:
                self._restart(measured, f"the route's MTU changed to {ceiling + measured.builder.overhead}", now)
        if self._answering(measured.target.name):
            self._report(measured, measured.search.expire(now))
        else:
            # A keepalive was missed too: a lost probe says nothing of its size until small ones come back
            # (or the peer is declared down, and the search holds).
            measured.wait_until = now + _WAIT_FOR_KEEPALIVES
        for size in measured.search.due(now):
            token = measured.tokens_ahead.popleft() if measured.tokens_ahead else new_token()
            measured.sent[token] = size
            while len(measured.sent) > _SENT_KEPT:
                measured.sent.popitem(last=False)
            self.probes_sent += 1
            error = self._send(measured.target.name, measured.probe(size).stamp(token))
            if error is not None:
                # EMSGSIZE: larger than the device's MTU; anything else: no route. Either way it is lost.
                log.debug("tunnel %s: MTU probe of %d bytes not sent: %s", measured.target.name, size,
                          error.strerror or error)

    def _report(self, measured: _Measured, result: PathMtuResult | None) -> None:
        if result is None:
            return
        name = measured.target.name
        before = measured.result
        measured.result = result
        measured.measured_at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        if result.state == "failed":
            log.warning("tunnel %s: path MTU: %s; the link keeps %d bytes (floor)", name, result.reason, result.mtu)
        elif before is None or before.mtu != result.mtu or before.state != result.state:
            log.info("tunnel %s: path MTU %d bytes (%s; %d probes)", name, result.mtu, result.reason,
                     measured.search.probes_sent)
        if not result.ipv6 and (before is None or before.ipv6):
            log.warning("tunnel %s: path MTU %d is below 1280: IPv6 through this tunnel will break (RFC 8200)",
                        name, result.mtu)
        if self._on_result is not None and (before is None or before.mtu != result.mtu):
            self._on_result(name, result)

