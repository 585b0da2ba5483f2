"""A tunnel's keepalive verdict, driven with plain numbers for the loop's clock: the seed's dead peer is
declared down after `retries` unanswered probes, and back up after `up_after` replies; replies count once."""

from __future__ import annotations

from ipaddress import IPv4Address

from hypothesis import given
from hypothesis import strategies as st

from greupd.config import format_duration, load_config_text
from greupd.keepalive.engine import KeepaliveTarget, targets_from_config
from greupd.keepalive.liveness import AnswerBudget, Liveness, LivenessChange, ProbeWindow


def probe_and_wait(liveness: Liveness, now: float) -> list[LivenessChange]:
    """What the engine does on each tick: look at the outstanding probe, then send the next one."""
    changes = [liveness.on_timer(now), liveness.on_probe_sent(now)]
    return [c for c in changes if c is not None]


def test_a_new_tunnel_starts_up_so_a_restarted_daemon_keeps_adopted_routes() -> None:
    liveness = Liveness(interval=1.0, retries=3, up_after=1)
    assert liveness.up
    assert liveness.status() == {"interval": 1.0, "retries": 3, "sent": 0, "received": 0,
                                 "missed_in_a_row": 0, "last_rtt_ms": None}


def test_dead_peer_is_declared_down_after_retries_missed_probes() -> None:
    liveness = Liveness(interval=1.0, retries=3, up_after=1)
    changes = [change for t in range(5) for change in probe_and_wait(liveness, float(t))]
    # probes at 0, 1, 2 are missed when the next tick looks at them: the third miss is seen at t=3
    assert changes == [LivenessChange(False, "keepalive-timeout", "3 keepalives missed (interval 1s)")]
    assert not liveness.up
    assert liveness.status()["missed_in_a_row"] == 4
    assert liveness.status()["sent"] == 5


def test_down_is_reported_once_however_long_the_peer_stays_dead() -> None:
    liveness = Liveness(interval=0.2, retries=2, up_after=1)
    changes = [change for t in range(50) for change in probe_and_wait(liveness, t * 0.2)]
    assert [c.up for c in changes] == [False]
    assert changes[0].message == "2 keepalives missed (interval 200ms)"


def test_a_reply_resets_the_misses() -> None:
    liveness = Liveness(interval=1.0, retries=3, up_after=1)
    probe_and_wait(liveness, 0.0)
    probe_and_wait(liveness, 1.0)
    probe_and_wait(liveness, 2.0)
    assert liveness.missed_in_a_row == 2
    assert liveness.on_reply(2.0003, 0.0003) is None  # still up: no transition
    assert liveness.missed_in_a_row == 0
    assert liveness.status()["last_rtt_ms"] == 0.3
    assert [c for t in (3.0, 4.0) for c in probe_and_wait(liveness, t)] == []
    assert liveness.up


def test_restored_after_up_after_replies_in_a_row_and_a_miss_between_starts_over() -> None:
    liveness = Liveness(interval=1.0, retries=1, up_after=2)
    probe_and_wait(liveness, 0.0)
    assert probe_and_wait(liveness, 1.0)[0].reason == "keepalive-timeout"
    assert liveness.on_reply(1.1, 0.1) is None  # one reply of two
    probe_and_wait(liveness, 2.0)
    probe_and_wait(liveness, 3.0)  # the probe of t=2 was missed: start counting again
    assert liveness.on_reply(3.1, 0.1) is None
    probe_and_wait(liveness, 4.0)
    change = liveness.on_reply(4.1, 0.00024)
    assert change == LivenessChange(True, "keepalive-restored",
                                    "keepalives answered again (2 replies in a row, rtt 0.24 ms)")
    assert liveness.up


def test_up_after_one_reply_by_default() -> None:
    liveness = Liveness(interval=1.0, retries=1, up_after=1)
    probe_and_wait(liveness, 0.0)
    probe_and_wait(liveness, 1.0)
    change = liveness.on_reply(1.5, 0.5)
    assert change is not None and change.up and "a reply" in change.message


def test_a_loop_that_wakes_up_five_intervals_late_counts_one_miss() -> None:
    liveness = Liveness(interval=1.0, retries=3, up_after=1)
    liveness.on_probe_sent(0.0)
    assert liveness.on_timer(5.0) is None  # the one outstanding probe: one miss, not five
    assert liveness.missed_in_a_row == 1
    assert liveness.on_timer(5.5) is None  # nothing outstanding: nothing to miss
    assert liveness.missed_in_a_row == 1
    assert liveness.up


def test_a_probe_is_not_missed_before_its_interval_is_over() -> None:
    liveness = Liveness(interval=1.0, retries=1, up_after=1)
    liveness.on_probe_sent(10.0)
    assert liveness.on_timer(10.999) is None and liveness.missed_in_a_row == 0
    assert liveness.on_timer(11.0) is not None


def test_sending_again_while_a_probe_is_outstanding_counts_it_missed() -> None:
    # The engine may tick a hair before the deadline; the unanswered probe is missed all the same, once.
    liveness = Liveness(interval=1.0, retries=2, up_after=1)
    liveness.on_probe_sent(0.0)
    assert liveness.on_timer(0.9999999) is None
    assert liveness.on_probe_sent(0.9999999) is None
    assert liveness.missed_in_a_row == 1
    assert liveness.on_timer(2.0) is not None
    assert liveness.missed_in_a_row == 2


def test_a_late_reply_to_a_probe_already_missed_still_shows_the_peer_alive() -> None:
    liveness = Liveness(interval=1.0, retries=2, up_after=1)
    for t in (0.0, 1.0, 2.0):
        probe_and_wait(liveness, t)
    assert not liveness.up
    assert liveness.on_reply(2.5, 1.5) is not None  # the probe of t=1 answered late: the peer lives
    assert liveness.up


def test_reconfigure_keeps_the_verdict_and_counters() -> None:
    liveness = Liveness(interval=1.0, retries=1, up_after=1)
    probe_and_wait(liveness, 0.0)
    probe_and_wait(liveness, 1.0)
    liveness.reconfigure(interval=0.5, retries=5, up_after=3)
    assert not liveness.up and liveness.sent == 2
    assert liveness.status()["interval"] == 0.5 and liveness.status()["retries"] == 5


@given(st.lists(st.sampled_from(["tick", "reply"]), max_size=60), st.integers(1, 5), st.integers(1, 5))
def test_transitions_alternate_and_follow_the_counters(events: list[str], retries: int, up_after: int) -> None:
    liveness = Liveness(interval=1.0, retries=retries, up_after=up_after)
    verdicts = [True]
    now = 0.0
    for event in events:
        now += 0.5
        changes = probe_and_wait(liveness, now) if event == "tick" else [liveness.on_reply(now, 0.1)]
        for change in changes:
            if change is not None:
                assert change.up != verdicts[-1]
                verdicts.append(change.up)
                assert change.reason == ("keepalive-restored" if change.up else "keepalive-timeout")
        assert liveness.up == verdicts[-1]
        if not liveness.up:
            assert liveness.replies_in_a_row < up_after
    assert liveness.received == events.count("reply")


# --- tokens: a reply counts once ----------------------------------------------------------------------


def test_a_token_counts_once_so_a_replayed_reply_is_nothing() -> None:
    window = ProbeWindow(size=4)
    window.issue(0xABCD_0000_0001, now=10.0)
    assert window.claim(0xABCD_0000_0001) == 10.0
    assert window.claim(0xABCD_0000_0001) is None


def test_a_forged_token_is_unknown() -> None:
    window = ProbeWindow(size=4)
    window.issue(0x1111_2222_3333, now=1.0)
    assert window.claim(0x1111_2222_3334) is None
    assert len(window) == 1


def test_only_the_last_retries_plus_one_probes_can_be_answered() -> None:
    window = ProbeWindow(size=4)
    for n in range(1, 11):
        window.issue(n << 32, now=float(n))
    assert len(window) == 4
    assert [window.claim(n << 32) for n in range(1, 11)] == [None] * 6 + [7.0, 8.0, 9.0, 10.0]


def test_a_shrunk_window_forgets_the_oldest() -> None:
    window = ProbeWindow(size=4)
    for n in range(1, 5):
        window.issue(n << 32, now=float(n))
    window.resize(2)
    assert window.claim(2 << 32) is None and window.claim(3 << 32) == 3.0


def test_a_replayed_reply_does_not_keep_a_dead_tunnel_up() -> None:
    """The story end to end: one real reply recorded by an attacker, replayed after the peer died."""
    liveness = Liveness(interval=1.0, retries=3, up_after=1)
    window = ProbeWindow(size=4)
    recorded: list[int] = []
    for t in range(30):
        now = float(t)
        liveness.on_timer(now)
        token = (t + 1) << 32 | 0xBEEF
        window.issue(token, now)
        liveness.on_probe_sent(now)
        if t == 0:  # the peer's only reply, which the attacker records
            sent_at = window.claim(token)
            assert sent_at is not None
            liveness.on_reply(now + 0.001, now + 0.001 - sent_at)
            recorded.append(token)
        for replayed in recorded:  # replayed every interval afterwards
            if window.claim(replayed) is not None:
                liveness.on_reply(now, 0.0)
    assert not liveness.up
    assert liveness.received == 1


# --- answering budget ---------------------------------------------------------------------------------


def test_answers_are_rate_limited_with_a_burst() -> None:
    budget = AnswerBudget(rate=20.0, burst=20.0)
    assert sum(budget.take(100.0) for _ in range(100)) == 20
    assert not budget.take(100.01)
    assert budget.take(100.06)  # 1/20 s later one more
    assert sum(budget.take(200.0) for _ in range(100)) == 20  # refilled, never beyond the burst


def test_interval_descriptions() -> None:
    assert [format_duration(s) for s in (1.0, 10.0, 0.2, 0.05, 2.5)] == ["1s", "10s", "200ms", "50ms", "2.5s"]


# --- targets from the config --------------------------------------------------------------------------

SEED_CONFIG = """
[[tunnel]]
name = "to_b"
local = "172.19.1.1"
remote = "172.19.1.2"
ikey = 1
okey = 2
keepalive = {interval = "200ms", answer = "kernel"}

[[tunnel]]
name = "to_c"
local = "172.19.1.1"
remote = "172.19.1.3"
key = 42
keepalive = {interval = 0.2, up_after = 2}

[[tunnel]]
name = "disabled"
local = "172.19.1.1"
remote = "172.19.1.4"
keepalive = {}
enabled = false

[[tunnel]]
name = "plain"
local = "172.19.1.1"
remote = "172.19.1.5"
"""


def test_targets_are_the_enabled_tunnels_with_keepalives_and_their_keys_by_direction() -> None:
    config = load_config_text(SEED_CONFIG)
    assert targets_from_config(config) == [
        KeepaliveTarget("to_b", IPv4Address("172.19.1.1"), IPv4Address("172.19.1.2"), ikey=1, okey=2,
                        interval=0.2, retries=3, up_after=1, answer="kernel"),
        KeepaliveTarget("to_c", IPv4Address("172.19.1.1"), IPv4Address("172.19.1.3"), ikey=42, okey=42,
                        interval=0.2, retries=3, up_after=2, answer="daemon"),
    ]
