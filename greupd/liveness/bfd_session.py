"""One BFD session (RFC 5880 asynchronous mode), as a pure state machine driven by (time, event).

The caller (the engine) feeds it received packets, the time, and new settings; it answers with the packets to
send and the state change, if any, and says when it wants to be woken (`wake_at`). No sockets, no clock, and
the jitter comes from an injected random.Random, so the tests drive it with plain numbers.

What small BFD speakers get wrong, and this one does as the RFC says:
- timer negotiation (6.8.2, 6.8.4): we send every max(our DesiredMinTx, their RequiredMinRx); they are dead
  after their DetectMult x max(our RequiredMinRx, their DesiredMinTx) without a packet;
- jitter (6.8.7): each interval is 75-100 % of the negotiated one (75-90 % with DetectMult 1);
- the slow rate (6.8.3): DesiredMinTx is at least 1 s while the session is not Up;
- Poll/Final (6.5, 6.8.3): a change of our timers while Up is announced with the Poll bit until the peer's
  Final; a larger DesiredMinTx or a smaller RequiredMinRx takes effect only then; a Poll from the peer gets a
  Final at once, besides the periodic packets;
- AdminDown (6.8.16): a disabled session says so with Diag 7, and a peer's AdminDown takes ours Down (Diag 3).

The verdict (`up`) is what the tunnel's routes follow. It starts True, as the keepalive's does, so a restarted
greupd keeps a tunnel's routes while the session comes back (about 2 s); a session that is not Up within the
grace of (DetectMult + 1) slow intervals after the start is down. After that it is simply "state is Up".
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from greupd.liveness.bfd_auth import MeticulousSha1
from greupd.liveness.bfd_codec import ControlPacket, Diag, State, encode

SLOW_TX = 1.0  # s: the least DesiredMinTx while not Up (RFC 5880 6.8.3)
_US = 1_000_000


@dataclass(frozen=True)
class Timers:
    """A session's settings: [tunnel.bfd] interval is both desired_min_tx and required_min_rx (seconds)."""

    desired_min_tx: float = 0.3
    required_min_rx: float = 0.3
    detect_mult: int = 3
    passive: bool = False


@dataclass(frozen=True)
class BfdChange:
    """The session's state moved; `up` is the verdict after it, `message` the sentence for the journal."""

    state: State
    previous: State
    diag: Diag
    up: bool
    message: str


@dataclass
class Step:
    """What the engine does after feeding the session: send these packets (in order), report the change."""

    send: list[ControlPacket] = field(default_factory=list)
    change: BfdChange | None = None


@dataclass
class SessionCounters:
    sent: int = 0
    received: int = 0  # accepted (passed every check of 6.8.6)
    discarded: int = 0
    polls: int = 0  # poll sequences we started
    went_down: int = 0


def _us(seconds: float) -> int:
    return max(1, round(seconds * _US))


class BfdSession:
    def __init__(self, timers: Timers, my_discriminator: int, now: float, rng: random.Random, *,
                 auth: MeticulousSha1 | None = None, up: bool = True) -> None:
        if not 1 <= my_discriminator <= 0xFFFFFFFF:
            raise ValueError("my discriminator is 1..2**32-1")
        self.timers = timers
        self.my_discriminator = my_discriminator
        self.auth = auth
        self._rng = rng
        self.state = State.DOWN
        self.diag = Diag.NONE
        self.remote_state = State.DOWN
        self.remote_discriminator = 0
        self.remote_min_rx = 1e-6  # bfd.RemoteMinRxInterval starts at 1 us (6.8.1)
        self.remote_desired_min_tx = 0.0  # what the peer's last packet said; 0: nothing heard yet
        self.remote_detect_mult = 0
        # Our timers: what the packets say, what is in force (they differ during a Poll sequence).
        self._adv_tx = self._tx = max(timers.desired_min_tx, SLOW_TX)
        self._adv_rx = self._rx = timers.required_min_rx
        self.polling = False
        self._final_due = False
        self.detect_deadline: float | None = None
        self.last_heard: float | None = None
        self.last_sent: float | None = None
        self.next_tx: float | None = None if timers.passive else now
        self.up = up
        self._grace_until: float | None = now + (timers.detect_mult + 1) * SLOW_TX if up else None
        self.counters = SessionCounters()

    # --- what the engine asks ------------------------------------------------------------------------

    @property
    def wake_at(self) -> float | None:
        times = [t for t in (self.next_tx, self.detect_deadline, self._grace_until) if t is not None]
        return min(times) if times else None

    @property
    def detect_time(self) -> float:
        """The peer is down after this long without a packet from it (6.8.4); 0 before it said anything."""
        return self.remote_detect_mult * max(self._rx, self.remote_desired_min_tx)

    @property
    def transmit_interval(self) -> float:
        """Before jitter (6.8.2, 6.8.7)."""
        return max(self._tx, self.remote_min_rx)

    def wire(self, packet: ControlPacket) -> bytes:
        return encode(packet, self.auth.key if self.auth is not None else None)

    # --- events --------------------------------------------------------------------------------------

    def tick(self, now: float) -> Step:
        """Time passed: the detection time may be over, a periodic packet may be due, the grace may end."""
        step = Step()
        if self.detect_deadline is not None and now >= self.detect_deadline:
            self.detect_deadline = None
            self.remote_discriminator = 0  # 6.8.1: forgotten when the detection time passes
            self.remote_state = State.DOWN
            self.remote_detect_mult = 0
            self.remote_desired_min_tx = 0.0
            self.remote_min_rx = 1e-6
            if self.state in (State.INIT, State.UP):
                step.change = self._move(State.DOWN, Diag.DETECTION_TIME_EXPIRED, now)
        if self._grace_until is not None and now >= self._grace_until:
            self._grace_until = None
            if self.state != State.UP and self.up:
                self.up = False
                step.change = step.change or BfdChange(self.state, self.state, self.diag, False,
                                                       "no BFD session came up since greupd started")
        if self.next_tx is not None and now >= self.next_tx:
            if self._may_send_periodic():
                step.send.append(self._packet(poll=self.polling))
                self._sent(now)
            else:
                self.next_tx = None  # passive and nothing heard, or the peer asked for silence
        return step

    def receive(self, packet: ControlPacket, data: bytes, now: float) -> Step:
        """A decoded packet for this session (the engine picked it by Your Discriminator, or by address when
        that is 0), with its bytes for the authentication check: RFC 5880 6.8.6 from "If the Your
        Discriminator field is nonzero" on."""
        step = Step()
        if packet.your_discriminator not in (0, self.my_discriminator) or (
                packet.your_discriminator == 0 and packet.state not in (State.DOWN, State.ADMIN_DOWN)):
            self.counters.discarded += 1
            return step
        if (packet.auth is None) != (self.auth is None) or (
                self.auth is not None and not self.auth.accept(packet, data, now, self.detect_time)):
            self.counters.discarded += 1
            return step
        self.counters.received += 1
        self.remote_discriminator = packet.my_discriminator
        self.remote_state = packet.state
        self.remote_min_rx = packet.required_min_rx_us / _US
        self.remote_desired_min_tx = packet.desired_min_tx_us / _US
        self.remote_detect_mult = packet.detect_mult
        if packet.final and self.polling:
            self._end_poll()
        self.last_heard = now
        self.detect_deadline = now + self.detect_time
        self._reschedule(now)
        if self.state == State.ADMIN_DOWN:
            return step
        if packet.state == State.ADMIN_DOWN:
            if self.state != State.DOWN:
                step.change = self._move(State.DOWN, Diag.NEIGHBOR_DOWN, now)
        elif self.state == State.DOWN:
            if packet.state == State.DOWN:
                step.change = self._move(State.INIT, Diag.NONE, now)
            elif packet.state == State.INIT:
                step.change = self._move(State.UP, Diag.NONE, now)
        elif self.state == State.INIT:
            if packet.state in (State.INIT, State.UP):
                step.change = self._move(State.UP, Diag.NONE, now)
        elif packet.state == State.DOWN:  # we are Up
            step.change = self._move(State.DOWN, Diag.NEIGHBOR_DOWN, now)
        if packet.poll:
            # 6.8.7: a Final goes out at once whatever the transmit timer says, besides the periodic ones;
            # it is never a Poll too.
            step.send.append(self._packet(poll=False, final=True))
            self.counters.sent += 1
        if self.next_tx is None and self._may_send_periodic():
            self.next_tx = now  # passive, and the peer has spoken: now we send too
        return step

    def reconfigure(self, timers: Timers, now: float) -> Step:
        """New settings from a reload: renegotiated with Poll/Final while Up, never a flap."""
        self.timers = timers
        if self._grace_until is not None:
            self._grace_until = max(self._grace_until, now + (timers.detect_mult + 1) * SLOW_TX)
        self._apply_timers(now)
        if not timers.passive and self.next_tx is None and self.state != State.ADMIN_DOWN:
            self.next_tx = now
        return Step()

    def resume(self, remote_discriminator: int, remote_min_rx: float, remote_desired_min_tx: float,
               remote_detect_mult: int, now: float) -> None:
        """Carry on an Up session a previous greupd left (on_exit = "keep", the same discriminators): the peer
        sees no new session, only a gap in the packets, which it survives when the restart was shorter than its
        detect time; otherwise it answers Down and the session is brought up again as usual. The peer gets its
        detect time from now to be heard."""
        self.state, self.diag, self.remote_state = State.UP, Diag.NONE, State.UP
        self.remote_discriminator = remote_discriminator
        self.remote_min_rx, self.remote_desired_min_tx = remote_min_rx, remote_desired_min_tx
        self.remote_detect_mult = remote_detect_mult
        self._adv_tx = self._tx = self.timers.desired_min_tx
        self._adv_rx = self._rx = self.timers.required_min_rx
        self.up, self._grace_until = True, None
        self.last_heard, self.detect_deadline = now, now + self.detect_time
        self.next_tx = now

    def admin_down(self, now: float) -> Step:
        """The tunnel was disabled, or greupd stops and removes it: tell the peer (Diag 7) at once."""
        step = Step()
        if self.state != State.ADMIN_DOWN:
            step.change = self._move(State.ADMIN_DOWN, Diag.ADMIN_DOWN, now)
        step.send.append(self._packet(poll=False))
        self._sent(now)
        return step

    def admin_up(self, now: float) -> Step:
        step = Step()
        if self.state == State.ADMIN_DOWN:
            step.change = self._move(State.DOWN, Diag.NONE, now)
            if not self.timers.passive:
                self.next_tx = now
        return step

    # --- inside --------------------------------------------------------------------------------------

    def _move(self, state: State, diag: Diag, now: float) -> BfdChange:
        previous, self.state, self.diag = self.state, state, diag
        if state == State.UP:
            self.up, self._grace_until = True, None
        elif previous == State.UP:
            self.up = False
            self.counters.went_down += 1
        # else: Down <-> Init <-> AdminDown without having been Up: the verdict stays (the start's grace)
        self._apply_timers(now)
        why = f" ({diag.text})" if diag != Diag.NONE else ""
        if state == State.UP:
            why = f" (detect time {self.detect_time * 1000:.0f} ms)"
        return BfdChange(state, previous, diag, self.up, f"BFD session {previous.label} -> {state.label}{why}")

    def _apply_timers(self, now: float) -> None:
        """Our DesiredMinTx and RequiredMinRx as the state wants them (slow while not Up), with a Poll
        sequence when they change while Up (6.8.3)."""
        tx = self.timers.desired_min_tx if self.state == State.UP else max(self.timers.desired_min_tx, SLOW_TX)
        rx = self.timers.required_min_rx
        if (tx, rx) == (self._adv_tx, self._adv_rx):
            return
        self._adv_tx, self._adv_rx = tx, rx
        if self.state == State.UP and self.remote_discriminator != 0:
            # A faster TX and a longer detection are safe at once; the rest waits for the Final.
            if tx < self._tx:
                self._tx = tx
            if rx > self._rx:
                self._rx = rx
            if not self.polling:
                self.counters.polls += 1
            self.polling = True
        else:
            self._tx, self._rx = tx, rx
            self.polling = False
        self._redetect()
        self._reschedule(now)

    def _redetect(self) -> None:
        if self.detect_deadline is not None and self.last_heard is not None:
            self.detect_deadline = self.last_heard + self.detect_time

    def _end_poll(self) -> None:
        self.polling = False
        self._tx, self._rx = self._adv_tx, self._adv_rx
        self._redetect()

    def _may_send_periodic(self) -> bool:
        # 6.8.7: not while the peer asks for no packets (RequiredMinRx 0), nor, when passive, before it spoke.
        if self.remote_min_rx == 0:
            return False
        return not (self.timers.passive and self.remote_discriminator == 0)

    def _jittered(self) -> float:
        low, high = (0.75, 0.9) if self.timers.detect_mult == 1 else (0.75, 1.0)
        return self.transmit_interval * self._rng.uniform(low, high)

    def _sent(self, now: float) -> None:
        self.counters.sent += 1
        self.last_sent = now
        self.next_tx = now + self._jittered()

    def _reschedule(self, now: float) -> None:
        """A shorter interval takes effect now, not after the long one that is running (going Up: 1 s ->
        300 ms); a longer one from the next packet."""
        if self.next_tx is None or self.last_sent is None:
            return
        sooner = self.last_sent + self._jittered()
        if sooner < self.next_tx:
            self.next_tx = max(now, sooner)

    def _packet(self, *, poll: bool, final: bool = False) -> ControlPacket:
        return ControlPacket(
            state=self.state, diag=self.diag, my_discriminator=self.my_discriminator,
            your_discriminator=self.remote_discriminator, desired_min_tx_us=_us(self._adv_tx),
            required_min_rx_us=_us(self._adv_rx), detect_mult=self.timers.detect_mult, poll=poll, final=final,
            auth=self.auth.next_section() if self.auth is not None else None)
