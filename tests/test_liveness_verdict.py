"""Dampening (RFC 2439 style) and the one verdict of several detectors, with plain numbers for the time."""

from __future__ import annotations

import pytest

from greupd.liveness.dampening import Dampening, DampeningSettings
from greupd.liveness.verdict import Verdicts

SETTINGS = DampeningSettings(half_life=60.0, suppress=2000.0, reuse=750.0, max_hold=600.0)


def test_the_penalty_halves_every_half_life() -> None:
    damp = Dampening(SETTINGS)
    damp.on_flap(0.0)
    assert damp.penalty(60.0) == pytest.approx(500.0)
    assert damp.penalty(120.0) == pytest.approx(250.0)


def test_the_third_quick_flap_suppresses_and_reuse_comes_when_the_penalty_falls() -> None:
    damp = Dampening(SETTINGS)
    assert not damp.on_flap(0.0) and not damp.on_flap(1.0)
    assert damp.on_flap(2.0) and damp.suppressed
    reuse_at = damp.reuse_at(2.0)
    assert reuse_at is not None
    assert not damp.tick(reuse_at - 0.5)
    assert damp.tick(reuse_at + 1e-6) and not damp.suppressed
    assert damp.penalty(reuse_at) == pytest.approx(750.0)


def test_max_hold_caps_the_suppression() -> None:
    damp = Dampening(DampeningSettings(half_life=60.0, suppress=2000.0, reuse=750.0, max_hold=120.0))
    for second in range(50):
        damp.on_flap(float(second))
    reuse_at = damp.reuse_at(49.0)
    assert reuse_at is not None and reuse_at - 49.0 == pytest.approx(120.0)


def test_down_while_any_detector_says_down_and_down_by_names_them() -> None:
    verdicts = Verdicts()
    assert verdicts.set("t", "keepalive", True, 0.0, "") == []
    assert verdicts.set("t", "bfd", True, 0.0, "") == []
    [change] = verdicts.set("t", "bfd", False, 1.0, "BFD session up -> down")
    assert not change.up and change.down_by == ("bfd",)
    assert verdicts.set("t", "keepalive", False, 2.0, "") == []  # already down
    assert verdicts.down_by("t") == ("bfd", "keepalive")
    assert verdicts.set("t", "bfd", True, 3.0, "") == []  # keepalive still says down
    [change] = verdicts.set("t", "keepalive", True, 4.0, "answered")
    assert change.up and change.down_by == () and verdicts.is_up("t")


def test_dampening_holds_a_flapping_tunnel_down_then_releases_it() -> None:
    verdicts = Verdicts()
    verdicts.configure_dampening({"t": SETTINGS})
    for second in (0.0, 2.0, 4.0):
        verdicts.set("t", "bfd", False, second, "down")
        verdicts.set("t", "bfd", True, second + 1, "up")
    assert verdicts.down_by("t") == ("dampening",)
    wake = verdicts.wake_at(5.0)
    assert wake is not None
    assert verdicts.tick(wake - 1) == []
    [change] = verdicts.tick(wake + 1e-6)
    assert change.up and "released" in change.message


def test_a_tunnel_that_loses_its_dampening_is_released() -> None:
    verdicts = Verdicts()
    verdicts.configure_dampening({"t": SETTINGS})
    for second in (0.0, 2.0, 4.0):
        verdicts.set("t", "bfd", False, second, "down")
        verdicts.set("t", "bfd", True, second + 1, "up")
    [change] = verdicts.configure_dampening({})
    assert change.up


def test_forgetting_a_detector_that_said_down_brings_the_tunnel_up() -> None:
    verdicts = Verdicts()
    verdicts.set("t", "bfd", False, 0.0, "")
    [change] = verdicts.forget("t", ["bfd"])
    assert change.up and "t" not in verdicts.names()
