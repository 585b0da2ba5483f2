"""liveness/room.py without sockets: detectors' flips become one verdict per tunnel, with the reason and the
detectors that decided, in status and in what the daemon hears. The engines are never started here; their
callbacks are fed as they would be."""

from __future__ import annotations

from greupd.config import load_config_text
from greupd.keepalive.engine import targets_from_config
from greupd.keepalive.liveness import LivenessChange
from greupd.liveness.bfd_codec import Diag, State
from greupd.liveness.bfd_session import BfdChange
from greupd.liveness.room import LivenessRoom
from greupd.liveness.verdict import LivenessVerdict
from greupd.status import TunnelStatus

CONFIG = """[[tunnel]]
name = "both"
local = "192.0.2.1"
remote = "192.0.2.2"
address = "10.0.0.1"
peer = "10.0.0.2"
[tunnel.keepalive]
interval = "1s"
[tunnel.bfd]
[tunnel.dampening]

[[tunnel]]
name = "cisco"
local = "192.0.2.1"
remote = "192.0.2.3"
[tunnel.keepalive]
interval = "1s"
"""

BFD_DOWN = BfdChange(State.DOWN, State.UP, Diag.DETECTION_TIME_EXPIRED, False,
                     "BFD session up -> down (control detection time expired)")
BFD_UP = BfdChange(State.UP, State.INIT, Diag.NONE, True, "BFD session init -> up (detect time 900 ms)")


def room() -> tuple[LivenessRoom, list[tuple[str, LivenessVerdict]]]:
    heard: list[tuple[str, LivenessVerdict]] = []
    liveness = LivenessRoom(lambda name, verdict: heard.append((name, verdict)))
    liveness.configure(load_config_text(CONFIG))
    return liveness, heard


def keepalive_down(liveness: LivenessRoom, name: str) -> None:
    """The keepalive engine's own verdict, as its Liveness would have it after `retries` misses."""
    liveness.keepalive.configure([])
    liveness.keepalive.configure(targets_from_config(load_config_text(CONFIG)), {name: False})


def status(name: str) -> TunnelStatus:
    return {"name": name, "mode": "gre", "local": "", "remote": "", "state": "up", "since": "2026-12-06T21:00:00Z",
            "reason": "config",
            "error": None, "ifindex": None, "routes": [], "routes_installed": False, "keepalive": None,
            "state_changes": 0, "drift_repairs": 0}


def test_bfd_down_takes_the_tunnel_down_and_says_so() -> None:
    liveness, heard = room()
    assert liveness.alive() == {"both": True, "cisco": True}
    liveness._bfd_changed("both", BFD_DOWN)
    [(name, verdict)] = heard
    assert name == "both" and not verdict.up and verdict.reason == "bfd-down" and verdict.down_by == ("bfd",)
    assert verdict.message == "BFD session up -> down (control detection time expired) (down by bfd)"
    assert liveness.alive() == {"both": False, "cisco": True}
    [annotated] = liveness.annotate([status("both")])
    assert annotated["liveness"] == {"down_by": ["bfd"]}

    keepalive_down(liveness, "both")
    liveness._keepalive_changed("both", LivenessChange(False, "keepalive-timeout", "3 keepalives missed"))
    assert len(heard) == 1  # already down
    liveness._bfd_changed("both", BFD_UP)
    assert len(heard) == 1 and not liveness.is_up("both")  # the keepalive still says down
    assert liveness.annotate([status("both")])[0]["liveness"] == {"down_by": ["keepalive"]}


def test_a_keepalive_only_tunnel_keeps_its_sentences() -> None:
    liveness, heard = room()
    change = LivenessChange(False, "keepalive-timeout", "3 keepalives missed (interval 1s)")
    keepalive_down(liveness, "cisco")
    liveness._keepalive_changed("cisco", change)
    assert heard == [("cisco", LivenessVerdict(False, "keepalive-timeout", "3 keepalives missed (interval 1s)",
                                               ("keepalive",)))]
    liveness.keepalive.configure([])
    liveness.keepalive.configure(targets_from_config(load_config_text(CONFIG)))
    liveness._keepalive_changed("cisco", LivenessChange(True, "keepalive-restored", "keepalives answered again"))
    assert heard[-1] == ("cisco", LivenessVerdict(True, "keepalive-restored", "keepalives answered again"))


def test_a_flapping_session_is_dampened() -> None:
    liveness, heard = room()
    for _ in range(3):
        liveness._bfd_changed("both", BFD_DOWN)
        liveness._bfd_changed("both", BFD_UP)
    assert heard[-1][1].reason == "dampened" and "dampening" in heard[-1][1].down_by
    assert not liveness.is_up("both")
    assert liveness.annotate([status("both")])[0]["liveness"] == {"down_by": ["dampening"]}


def test_metrics_say_whether_the_session_is_up_and_the_tunnel_dampened() -> None:
    from greupd.metrics import ReloadOutcome, render
    from tests.test_control import router_a
    from tests.test_metrics import STARTED, value

    daemon_status = router_a(generation=1)
    with_bfd, dampened = status("with_bfd"), status("dampened")
    with_bfd["bfd"] = {"state": "up", "remote_state": "up", "detect_time_ms": 900, "sent": 9, "received": 9,
                       "dropped": 0}
    with_bfd["liveness"] = {"down_by": []}
    dampened["bfd"] = {"state": "up", "remote_state": "up", "detect_time_ms": 900, "sent": 9, "received": 9,
                       "dropped": 0}
    dampened["liveness"] = {"down_by": ["dampening"]}
    daemon_status["tunnels"] += [with_bfd, dampened]
    text = render(daemon_status, ReloadOutcome(ok=True, last_success=STARTED))
    assert value(text, "greupd_bfd_session_up", tunnel="with_bfd") == 1
    assert value(text, "greupd_tunnel_dampened", tunnel="with_bfd") == 0
    assert value(text, "greupd_tunnel_dampened", tunnel="dampened") == 1
    assert "greupd_bfd_session_up{tunnel=\"My_Tunnel\"}" not in text  # no [tunnel.bfd]: no series
