"""The BFD session state machine, driven with plain numbers: two sessions on a simulated wire (encode, decode
and a latency between them), and single packets for the rules of RFC 5880 6.8.6 and 6.8.7."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field

import pytest

from greupd.liveness.bfd_auth import MeticulousSha1
from greupd.liveness.bfd_codec import ControlPacket, Diag, State, decode
from greupd.liveness.bfd_session import SLOW_TX, BfdChange, BfdSession, Step, Timers

FAST = Timers(desired_min_tx=0.3, required_min_rx=0.3, detect_mult=3)


@dataclass
class Wire:
    """Two sessions, a and b, and the packets between them (delivered after `latency`)."""

    a: BfdSession
    b: BfdSession | None
    latency: float = 0.001
    now: float = 0.0
    in_flight: list[tuple[float, str, bytes]] = field(default_factory=list)
    changes: list[tuple[float, str, BfdChange]] = field(default_factory=list)
    sent: list[tuple[float, str, ControlPacket]] = field(default_factory=list)
    cut: bool = False

    def session(self, side: str) -> BfdSession | None:
        return self.a if side == "a" else self.b

    def _handle(self, side: str, step: Step) -> None:
        session = self.session(side)
        assert session is not None
        if step.change is not None:
            self.changes.append((self.now, side, step.change))
        for packet in step.send:
            self.sent.append((self.now, side, packet))
            if not self.cut:
                self.in_flight.append((self.now + self.latency, "b" if side == "a" else "a", session.wire(packet)))

    def run_until(self, end: float) -> None:
        while True:
            times = [(when, "deliver") for when, _, _ in self.in_flight]
            for side in ("a", "b"):
                s = self.session(side)
                if s is not None and s.wake_at is not None:
                    times.append((s.wake_at, side))
            if not times:
                self.now = end
                return
            when, what = min(times)
            if when > end:
                self.now = end
                return
            self.now = max(self.now, when)
            if what == "deliver":
                self.in_flight.sort()
                _, side, data = self.in_flight.pop(0)
                s = self.session(side)
                if s is not None:
                    self._handle(side, s.receive(decode(data), data, self.now))
            else:
                s = self.session(what)
                assert s is not None
                self._handle(what, s.tick(self.now))


def pair(timers_a: Timers = FAST, timers_b: Timers = FAST, *, key: bytes | None = None) -> Wire:
    rng = random.Random(5880)
    auth_a = MeticulousSha1(key, rng) if key else None
    auth_b = MeticulousSha1(key, rng) if key else None
    return Wire(BfdSession(timers_a, 0x1111, 0.0, rng, auth=auth_a),
                BfdSession(timers_b, 0x2222, 0.0, rng, auth=auth_b))


def test_two_sessions_come_up_then_negotiate_fast_timers_with_poll_final() -> None:
    wire = pair()
    wire.run_until(5.0)
    assert wire.b is not None
    assert wire.a.state == wire.b.state == State.UP
    assert [c.state for _, side, c in wire.changes if side == "a"] == [State.INIT, State.UP] or \
        [c.state for _, side, c in wire.changes if side == "a"] == [State.UP]
    assert wire.a.up and wire.b.up
    assert wire.a.detect_time == pytest.approx(0.9) and wire.b.detect_time == pytest.approx(0.9)
    assert not wire.a.polling and not wire.b.polling  # the Poll of going Up was answered
    up_at = max(t for t, _, c in wire.changes if c.state == State.UP)
    late = [p for t, side, p in wire.sent if side == "a" and t > up_at + 1.0]
    assert late and all(p.desired_min_tx_us == 300_000 for p in late)
    polls = [p for _, _, p in wire.sent if p.poll]
    finals = [p for _, _, p in wire.sent if p.final]
    assert polls and finals and not any(p.poll and p.final for _, _, p in wire.sent)


def test_while_not_up_packets_go_at_the_slow_rate_with_jitter() -> None:
    wire = pair()
    wire.b = None  # nobody answers
    wire.run_until(20.0)
    times = [t for t, side, _ in wire.sent if side == "a"]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(0.75 * SLOW_TX - 1e-9 <= gap <= SLOW_TX + 1e-9 for gap in gaps)
    assert len(set(round(g, 6) for g in gaps)) > 5  # jittered, not a fixed period
    assert all(p.desired_min_tx_us == 1_000_000 and p.state == State.DOWN for _, _, p in wire.sent)


def test_the_jitter_is_75_to_90_percent_with_detect_mult_1() -> None:
    session = BfdSession(Timers(1.0, 1.0, detect_mult=1), 1, 0.0, random.Random(1), up=False)
    times = []
    now = 0.0
    for _ in range(200):
        session.tick(now)
        times.append(now)
        assert session.next_tx is not None
        now = session.next_tx
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 0.75 - 1e-9 and max(gaps) <= 0.9 + 1e-9


def test_a_silent_peer_is_down_within_the_detect_time() -> None:
    wire = pair()
    wire.run_until(5.0)
    wire.b = None  # B's daemon is killed
    killed = wire.now
    wire.run_until(10.0)
    down = [(t, c) for t, side, c in wire.changes if side == "a" and t > killed]
    assert len(down) == 1
    when, change = down[0]
    assert change.state == State.DOWN and change.diag == Diag.DETECTION_TIME_EXPIRED and not change.up
    assert when - killed <= 0.9 + 1e-9
    assert wire.a.remote_discriminator == 0  # 6.8.1: forgotten
    slow = [p for t, side, p in wire.sent if side == "a" and t > when]
    assert slow and all(p.desired_min_tx_us == 1_000_000 and p.your_discriminator == 0 for p in slow)


def test_the_session_comes_back_whichever_end_starts_first() -> None:
    rng = random.Random(3)
    wire = Wire(BfdSession(FAST, 0x1111, 0.0, rng), None)
    wire.run_until(7.3)
    wire.b = BfdSession(FAST, 0x2222, 7.3, rng)
    wire.run_until(12.0)
    assert (wire.a.state, wire.b.state) == (State.UP, State.UP)


def test_a_timer_change_renegotiates_without_a_flap() -> None:
    wire = pair()
    wire.run_until(5.0)
    changes = len(wire.changes)
    assert wire.b is not None
    wire.b.reconfigure(Timers(1.0, 1.0, 5), wire.now)  # B slows down (an increase: waits for A's Final)
    assert wire.b.polling
    wire.run_until(10.0)
    assert len(wire.changes) == changes  # nobody went down
    assert not wire.b.polling
    assert wire.a.detect_time == pytest.approx(5 * 1.0)  # B's multiplier x B's slower TX
    assert wire.b.detect_time == pytest.approx(3 * 1.0)  # A's multiplier x B's slower RX
    wire.a.reconfigure(Timers(0.05, 0.05, 3), wire.now)
    wire.run_until(15.0)
    assert len(wire.changes) == changes


def test_a_larger_tx_waits_for_the_final() -> None:
    session = BfdSession(FAST, 1, 0.0, random.Random(1))
    up(session)
    session.reconfigure(Timers(1.0, 0.3, 3), 1.0)
    assert session.polling and session.transmit_interval == pytest.approx(0.3)
    step = session.tick(session.next_tx or 0)
    assert step.send and step.send[0].poll and step.send[0].desired_min_tx_us == 1_000_000
    now = session.next_tx or 0
    session.receive(peer_packet(State.UP, final=True), b"", now)
    assert not session.polling and session.transmit_interval == pytest.approx(1.0)


def test_a_poll_gets_a_final_at_once() -> None:
    session = BfdSession(FAST, 1, 0.0, random.Random(1))
    up(session)
    step = session.receive(peer_packet(State.UP, poll=True, tx=50_000), b"", 2.0)
    assert [p.final for p in step.send] == [True] and not step.send[0].poll
    assert session.detect_time == pytest.approx(0.9)  # 3 x max(our 300 ms RX, their 50 ms TX)


def test_reception_discards_what_6_8_6_says() -> None:
    session = BfdSession(FAST, 1, 0.0, random.Random(1))
    assert session.receive(peer_packet(State.UP, your=0), b"", 0.1).change is None  # Up with Your Discr 0
    assert session.receive(peer_packet(State.DOWN, your=99), b"", 0.1).change is None  # not ours
    assert session.counters.discarded == 2 and session.state == State.DOWN
    signed = ControlPacket(state=State.DOWN, my_discriminator=7, auth=MeticulousSha1(b"k", random.Random(1))
                           .next_section())
    assert session.receive(signed, b"", 0.1).change is None  # authenticated, but we have no key
    assert session.counters.discarded == 3


def test_peer_admin_down_takes_us_down_with_diag_3() -> None:
    session = BfdSession(FAST, 1, 0.0, random.Random(1))
    up(session)
    change = session.receive(peer_packet(State.ADMIN_DOWN, diag=Diag.ADMIN_DOWN), b"", 3.0).change
    assert change is not None and change.state == State.DOWN and change.diag == Diag.NEIGHBOR_DOWN and not change.up


def test_admin_down_is_said_at_once_and_periodically() -> None:
    wire = pair()
    wire.run_until(5.0)
    step = wire.a.admin_down(wire.now)
    assert step.send[0].state == State.ADMIN_DOWN and step.send[0].diag == Diag.ADMIN_DOWN
    wire._handle("a", step)
    wire.run_until(8.0)
    assert wire.b is not None and wire.b.state == State.DOWN and wire.b.diag == Diag.NEIGHBOR_DOWN
    assert wire.a.state == State.ADMIN_DOWN  # it stays so whatever the peer says
    assert any(p.state == State.ADMIN_DOWN for t, side, p in wire.sent if side == "a" and t > 6.0)


def test_passive_waits_for_the_peer() -> None:
    rng = random.Random(2)
    wire = Wire(BfdSession(Timers(passive=True), 1, 0.0, rng), None)
    wire.run_until(10.0)
    assert not [p for _, side, p in wire.sent if side == "a"]
    wire.b = BfdSession(FAST, 2, 10.0, rng)
    wire.run_until(15.0)
    assert wire.a.state == State.UP


def test_the_verdict_starts_up_and_falls_when_nothing_comes_up_in_the_grace() -> None:
    session = BfdSession(FAST, 1, 0.0, random.Random(1))
    assert session.up
    changes = []
    now = 0.0
    while now < 10.0:
        step = session.tick(now)
        if step.change is not None:
            changes.append((now, step.change))
        now = session.wake_at or 10.0
    assert len(changes) == 1 and not changes[0][1].up and changes[0][0] == pytest.approx(4.0)
    assert not BfdSession(FAST, 1, 0.0, random.Random(1), up=False).up


def test_meticulous_sha1_sessions_come_up_and_a_replay_is_discarded() -> None:
    wire = pair(key=b"s3cret")
    wire.run_until(5.0)
    assert wire.a.state == wire.b.state == State.UP if wire.b else False
    assert wire.b is not None
    last_from_b = wire.b.wire(ControlPacket(state=State.UP, my_discriminator=0x2222, your_discriminator=0x1111,
                                            auth=wire.b.auth.next_section() if wire.b.auth else None))
    discarded = wire.a.counters.discarded
    wire.a.receive(decode(last_from_b), last_from_b, wire.now)
    wire.a.receive(decode(last_from_b), last_from_b, wire.now)  # the same sequence number again
    assert wire.a.counters.discarded == discarded + 1


def test_a_wrong_key_never_comes_up() -> None:
    rng = random.Random(4)
    wire = Wire(BfdSession(FAST, 1, 0.0, rng, auth=MeticulousSha1(b"one", rng)),
                BfdSession(FAST, 2, 0.0, rng, auth=MeticulousSha1(b"two", rng)))
    wire.run_until(5.0)
    assert wire.a.state == State.DOWN and wire.a.counters.discarded > 0


# --- helpers -------------------------------------------------------------------------------------------

def peer_packet(state: State, *, your: int = 1, poll: bool = False, final: bool = False, tx: int = 300_000,
                diag: Diag = Diag.NONE) -> ControlPacket:
    return ControlPacket(state=state, my_discriminator=7, your_discriminator=your, desired_min_tx_us=tx,
                         required_min_rx_us=300_000, poll=poll, final=final, diag=diag)


def up(session: BfdSession) -> None:
    session.tick(0.0)
    session.receive(peer_packet(State.INIT), b"", 0.5)
    assert session.state == State.UP
    session.receive(peer_packet(State.UP, final=True), b"", 0.6)
    assert not session.polling


def test_a_resumed_session_carries_on_when_the_gap_is_shorter_than_the_detect_time() -> None:
    wire = pair()
    wire.run_until(5.0)
    assert wire.b is not None
    old = wire.a
    changes = len(wire.changes)
    wire.a = BfdSession(FAST, old.my_discriminator, 5.5, random.Random(9))  # greupd restarted: 0.5 s of silence
    wire.a.resume(old.remote_discriminator, old.remote_min_rx, old.remote_desired_min_tx, old.remote_detect_mult,
                  5.5)
    wire.in_flight.clear()
    wire.run_until(10.0)
    assert len(wire.changes) == changes  # B never noticed
    assert wire.a.state == wire.b.state == State.UP


def test_a_resumed_session_after_the_peer_gave_up_comes_up_again() -> None:
    wire = pair()
    wire.run_until(5.0)
    assert wire.b is not None
    old = wire.a
    wire.a = None  # type: ignore[assignment]
    wire.run_until(7.0)  # B's detect time (0.9 s) passes: B is Down
    assert wire.b.state == State.DOWN
    wire.a = BfdSession(FAST, old.my_discriminator, 7.0, random.Random(9))
    wire.a.resume(old.remote_discriminator, old.remote_min_rx, old.remote_desired_min_tx, old.remote_detect_mult,
                  7.0)
    wire.run_until(12.0)
    assert (wire.a.state, wire.b.state) == (State.UP, State.UP)
