"""The work queue without a loop: what a pass is handed after kernel events, keepalive verdicts and a fight.

Time is handed in, as the daemon hands in time.monotonic(); `wake` counts how often the loop would wake.
"""

from __future__ import annotations

import asyncio

import pytest

from greupd.queue import (
    FIGHT_BACKOFF,
    FIGHT_REPAIRS,
    FIGHT_WINDOW,
    RETRY_BACKOFF,
    VERDICTS_PER_PASS,
    Batch,
    Pause,
    Retry,
    WorkQueue,
    settle,
)


class Wakes:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def test_nothing_marked_is_an_empty_batch() -> None:
    assert not WorkQueue[None]().take_ready(0.0)


def test_kernel_events_mark_names_and_are_repairs() -> None:
    wakes = Wakes()
    queue = WorkQueue[None](wakes)
    queue.mark({"to_b"})
    queue.mark({"to_c"})
    assert wakes.count == 2
    assert queue.take_ready(0.0) == Batch(frozenset({"to_b", "to_c"}), frozenset({"to_b", "to_c"}))
    assert not queue.take_ready(0.0)  # taken once


def test_a_keepalive_verdict_is_no_repair() -> None:
    queue = WorkQueue[None]()
    queue.mark_liveness("to_b")
    queue.mark({"to_c"})
    assert queue.take_ready(0.0) == Batch(frozenset({"to_b", "to_c"}), frozenset({"to_c"}),
                                          liveness_only=frozenset({"to_b"}))


def test_everything_swallows_the_names() -> None:
    queue = WorkQueue[None]()
    queue.mark({"to_b"})
    queue.mark(None)  # a dump overran: the watch cannot tell what changed
    queue.mark_nft()
    assert queue.take_ready(0.0) == Batch(None, nft=True)
    assert not queue.take_ready(0.0)


def test_nftables_alone() -> None:
    queue = WorkQueue[None]()
    queue.mark_nft()
    batch = queue.take_ready(0.0)
    assert batch == Batch(frozenset(), nft=True) and batch


def fight(queue: WorkQueue[None], name: str, start: float, every: float) -> list[Pause]:
    """Another program changes `name` back FIGHT_REPAIRS times, once every `every` seconds; we repair each."""
    pauses: list[Pause] = []
    for i in range(FIGHT_REPAIRS):
        pauses += queue.note_repairs([name], start + i * every)
    return pauses


def test_a_tunnel_fought_over_is_paused_then_retried() -> None:
    queue = WorkQueue[None]()
    [pause] = fight(queue, "to_b", 0.0, 0.1)
    assert pause == Pause("to_b", FIGHT_BACKOFF[0])
    assert str(pause) == (f"tunnel to_b: repaired {FIGHT_REPAIRS} times in {FIGHT_WINDOW:.0f} s, another program"
                          f" keeps changing it; next repair in {FIGHT_BACKOFF[0]:.0f} s")
    now = 0.9
    queue.mark({"to_b", "to_c"})
    assert queue.take_ready(now) == Batch(frozenset({"to_c"}), frozenset({"to_c"}))  # to_b waits, still marked
    assert queue.take_ready(now + FIGHT_BACKOFF[0]) == Batch(frozenset({"to_b"}), frozenset({"to_b"}))


def test_the_backoff_doubles_up_to_its_cap_and_resets_after_peace() -> None:
    queue = WorkQueue[None]()
    backoffs = [fight(queue, "to_b", round_ * 100.0, 0.1)[0].seconds for round_ in range(8)]
    assert backoffs == [min(FIGHT_BACKOFF[0] * 2 ** i, FIGHT_BACKOFF[1]) for i in range(8)]
    # Two repairs far apart (peace for longer than 4 windows): the next fight starts at the first backoff again.
    queue.note_repairs(["to_b"], 10_000.0)
    queue.note_repairs(["to_b"], 10_000.0 + 4 * FIGHT_WINDOW + 1)
    assert fight(queue, "to_b", 10_100.0, 0.1)[0].seconds == FIGHT_BACKOFF[0]


def test_a_keepalive_verdict_is_not_held_back_by_a_fight() -> None:
    """Review L3: a dead peer's routes go within the detection time, whatever pause a fight put on the tunnel."""
    queue = WorkQueue[None]()
    [pause] = fight(queue, "to_b", 0.0, 0.1)
    queue.mark_liveness("to_b")
    assert queue.take_ready(1.0) == Batch(frozenset({"to_b"}), liveness_only=frozenset({"to_b"}))
    queue.mark({"to_b"})  # the kernel's events still wait for the pause (from the last repair, at 0.9 s)
    assert queue.take_ready(1.1) == Batch(frozenset())
    assert queue.take_ready(0.9 + pause.seconds).names == frozenset({"to_b"})


def test_refused_tunnels_are_retried_after_1_s_doubling_to_60_s() -> None:
    """Review M1: a foreign route holds to_b's prefix (EEXIST); greupd tries again until it gets it."""
    queue = WorkQueue[None]()
    now, waits = 0.0, []
    for _ in range(9):
        [retry] = queue.note_refused(["to_b"], now)
        waits.append(retry.seconds)
        now += retry.seconds
        queue.mark_retry("to_b")
        assert queue.take_ready(now) == Batch(frozenset({"to_b"}))  # a retry is no repair: no fight
    assert waits == [1, 2, 4, 8, 16, 32, 60, 60, 60] and RETRY_BACKOFF == (1.0, 60.0)
    # The foreign route went; the retry's pass applied everything: the next refusal starts at 1 s again.
    queue.note_applied(["to_b"])
    assert queue.note_refused(["to_b"], now) == [Retry("to_b", 1.0)]


def test_a_refusal_while_a_retry_is_pending_schedules_no_second_one() -> None:
    queue = WorkQueue[None]()
    assert queue.note_refused(["to_b", "to_c"], 0.0) == [Retry("to_b", 1.0), Retry("to_c", 1.0)]
    assert queue.note_refused(["to_b"], 0.5) == []  # a kernel event's pass, before the retry is due
    assert queue.note_refused(["to_b"], 1.0) == [Retry("to_b", 2.0)]
    queue.forget(["to_b"])  # to_c is no longer configured
    assert queue.note_refused(["to_b"], 1.5) == []
    assert queue.note_refused(["to_c"], 1.5) == [Retry("to_c", 1.0)]  # added back: starts afresh


def test_slow_repairs_are_no_fight() -> None:
    queue = WorkQueue[None]()
    assert fight(queue, "to_b", 0.0, 2 * FIGHT_WINDOW / FIGHT_REPAIRS) == []


def test_a_removed_tunnel_forgets_its_fight() -> None:
    queue = WorkQueue[None]()
    fight(queue, "to_b", 0.0, 0.1)
    queue.forget(["to_c"])
    queue.mark({"to_b"})
    assert queue.take_ready(0.5).names == frozenset({"to_b"})


def test_reload_requests_are_answered_together() -> None:
    async def main() -> None:
        queue = WorkQueue[int]()
        assert queue.take_reload() is None
        queue.mark_reload()  # SIGHUP: nobody waits for the answer
        first, second = asyncio.Future[int](), asyncio.Future[int]()
        queue.mark_reload(first)
        queue.mark_reload(second)
        answers = queue.take_reload()
        assert answers == [first, second]
        settle(answers, lambda: 2)
        assert (await first, await second) == (2, 2)
        assert queue.take_reload() is None

    asyncio.run(main())


def test_a_failing_reload_reaches_whoever_waits() -> None:
    def broken() -> int:
        raise RuntimeError("netlink socket closed")

    async def main() -> None:
        waiting = asyncio.Future[int]()
        settle([waiting], broken)
        with pytest.raises(RuntimeError, match="netlink socket closed"):
            await waiting
        with pytest.raises(RuntimeError):  # nobody waits (SIGHUP): it is the daemon's bug to crash on
            settle([], broken)

    asyncio.run(main())


def test_stopping_cancels_waiting_reloads() -> None:
    async def main() -> None:
        queue = WorkQueue[int]()
        waiting = asyncio.Future[int]()
        queue.mark_reload(waiting)
        queue.cancel_reloads()
        assert waiting.cancelled()

    asyncio.run(main())


def test_only_a_tunnel_nothing_but_its_verdict_marked_may_be_planned_from_memory() -> None:
    """#26: a verdict's pass may trust what the last pass left; a kernel event or a retry beside it may not."""
    queue = WorkQueue[None]()
    for name in ("to_b", "to_c", "to_d"):
        queue.mark_liveness(name)
    queue.mark({"to_c"})
    queue.mark_retry("to_d")
    assert queue.take_ready(0.0).liveness_only == frozenset({"to_b"})
    queue.mark_liveness("to_c")  # the event's mark was taken with the last batch: this one is the verdict's alone
    assert queue.take_ready(0.0).liveness_only == frozenset({"to_c"})


def test_a_thousand_verdicts_go_to_passes_of_at_most_verdicts_per_pass() -> None:
    """#26: a hub's uplink fails; no single pass holds the loop for all of them."""
    woken: list[bool] = []
    queue = WorkQueue[None](lambda: woken.append(True))
    names = {f"t{i}" for i in range(2 * VERDICTS_PER_PASS + 1)}
    for name in names:
        queue.mark_liveness(name)
    queue.mark({"drifted"})
    woken.clear()
    batches = [queue.take_ready(0.0) for _ in range(3)]
    assert [len(b.liveness_only) for b in batches] == [VERDICTS_PER_PASS, VERDICTS_PER_PASS, 1]
    assert "drifted" in (batches[0].names or ()) and len(woken) == 2  # the loop is told there is more
    assert set().union(*(b.names or () for b in batches)) == names | {"drifted"}
    assert queue.take_ready(0.0) == Batch(frozenset())
