"""BFD through a real GRE tunnel between the seed's routers A (172.19.1.1) and B (172.19.1.2), with the whole
daemon on A: against greupd on B, then against FRR's bfdd and BIRD from Debian on B (issue #22, build 5).

A carries B's LAN (20.10.1.0/24) through the tunnel; when BFD says down, A withdraws it within the detect
time (300 ms x 3) and a tick.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator

import pytest

from greupd.control import request
from lab.bfd_peers import BirdBfd, FrrBfd, bird_available, frr_available
from lab.greupd_process import GreupdProcess
from lab.hosts import Host, Lab, SeedTopology, seed_topology
from lab.waiting import eventually

pytestmark = pytest.mark.needs_gre

A_INNER, B_INNER = "192.168.8.1", "192.168.8.11"
DETECT = 0.9  # 300 ms x 3
SLACK = 0.6  # a tick of A's loop, and a busy UML guest between our clock reads and the daemons'


def greupd_config(local: str, remote: str, address: str, peer: str, route: str, name: str,
                  bfd: str = "interval = \"300ms\"\nmultiplier = 3\n") -> str:
    return (f'[[tunnel]]\nname = "{name}"\nlocal = "{local}"\nremote = "{remote}"\naddress = "{address}"\n'
            f'peer = "{peer}"\nroutes = ["{route}"]\n[tunnel.bfd]\n{bfd}')


A_CONFIG = greupd_config("172.19.1.1", "172.19.1.2", A_INNER, B_INNER, "20.10.1.0/24", "to_b")
B_CONFIG = greupd_config("172.19.1.2", "172.19.1.1", B_INNER, A_INNER, "10.10.1.0/24", "to_a")


@pytest.fixture
def seed() -> Iterator[SeedTopology]:
    with Lab() as lab:
        yield seed_topology(lab)


def hand_made_tunnel(b: Host) -> None:
    """B without greupd: a GRE tunnel back to A, made by hand, and a route to A's LAN through it."""
    b.ip("tunnel", "add", "to_a", "mode", "gre", "local", "172.19.1.2", "remote", "172.19.1.1", "ttl", "64")
    b.ip("addr", "add", B_INNER, "peer", A_INNER, "dev", "to_a")
    b.ip("link", "set", "to_a", "up")
    b.ip("route", "add", "10.10.1.0/24", "dev", "to_a")


def bfd_of(a: GreupdProcess) -> dict[str, object]:
    tunnel = a.tunnel("to_b")
    bfd: dict[str, object] = tunnel["bfd"]
    return bfd


def routed_through_tunnel(a: Host) -> bool:
    return "dev to_b" in a.ip("route", "show", "20.10.1.0/24").stdout


def assert_withdrawn_in_time(a: GreupdProcess, seed: SeedTopology, stopped: float, command: float) -> None:
    a.wait_for("to_b", "down", timeout=10)
    went_down = a.logged_at(r"tunnel to_b down: BFD session", stopped - 1)
    assert went_down is not None, a.output()
    assert went_down - stopped <= DETECT + SLACK + command, \
        f"withdrawn {went_down - stopped:.2f}s after the peer stopped (stopping took {command:.2f}s)\n{a.output()}"
    print(f"withdrawn {went_down - stopped:.3f}s after the peer stopped (stopping took {command:.3f}s)")
    tunnel = a.tunnel("to_b")
    assert tunnel["reason"] == "bfd-down" and tunnel["liveness"] == {"down_by": ["bfd"]}
    assert not routed_through_tunnel(seed.a)


def metrics(daemon: GreupdProcess) -> str:
    """What `greupd metrics` prints, from the control socket: a CLI process would hog the UML guest's one CPU
    for a second or two, longer than the detect time, and the sessions would time out for want of CPU."""
    return str(request(daemon.socket, "metrics", timeout=30)["text"])


def test_greupd_to_greupd_up_then_a_killed_peer_is_withdrawn_in_time(seed: SeedTopology) -> None:
    a = GreupdProcess(seed.a, A_CONFIG).start()
    b = GreupdProcess(seed.b, B_CONFIG).start()
    eventually(lambda: bfd_of(a)["state"] == "up" and bfd_of(a)["detect_time_ms"] == 900, 20,
               "A's session up at 300 ms x 3", a.output)
    a.wait_for("to_b", "up", timeout=10)
    eventually(lambda: routed_through_tunnel(seed.a), 5, "B's LAN routed through the tunnel",
               lambda: f"{a.output()}\n{seed.a.ip('route').stdout}")
    assert seed.lan_a.wait_ping("20.10.1.2")
    assert a.tunnel("to_b")["liveness"] == {"down_by": []}
    assert re.search(r"greupd_bfd_session_up\{tunnel=\"to_b\"\} 1", metrics(a))

    stopped = time.time()
    b.kill()
    assert_withdrawn_in_time(a, seed, stopped, 0.0)
    assert "control detection time expired" in a.output()
    eventually(lambda: re.search(r"greupd_bfd_session_up\{tunnel=\"to_b\"\} 0", metrics(a)) is not None, 5,
               "greupd_bfd_session_up 0", lambda: f"{metrics(a)}\n{a.tunnel('to_b')}")

    b.start()  # on_exit = "keep": its link is still there; a new session comes up
    a.wait_for("to_b", "up", timeout=20)
    assert a.tunnel("to_b")["reason"] == "bfd-restored" and routed_through_tunnel(seed.a)

    # A disables its tunnel: B hears AdminDown at once, not after its detect time.
    eventually(lambda: b.tunnel("to_a")["bfd"]["state"] == "up", 10, "B's session up", b.output)
    disabled = time.time()
    a.reload(A_CONFIG.replace('routes = ["20.10.1.0/24"]\n', 'routes = ["20.10.1.0/24"]\nenabled = false\n'))
    b.wait_for("to_a", "down", timeout=10)
    heard = b.logged_at(r"neighbor signaled session down", disabled - 1)
    assert heard is not None, b.output()
    print(f"B heard AdminDown {heard - disabled:.3f}s after A's reload began")
    a.stop()
    b.stop()


def test_frr_bfdd_as_the_peer(seed: SeedTopology) -> None:
    if not frr_available():
        pytest.skip("frr is not installed (make deps installs it)")
    hand_made_tunnel(seed.b)
    frr = FrrBfd(seed.b, peer=A_INNER, local=B_INNER, interface="to_a").start()
    try:
        a = GreupdProcess(seed.a, A_CONFIG).start()
        eventually(lambda: bfd_of(a)["state"] == "up", 20, "A's session with FRR up",
                   lambda: f"{a.output()}\n{frr.vtysh('show bfd peers')}")
        eventually(lambda: (frr.session() or {}).get("status") == "up", 10, "FRR's session up",
                   lambda: frr.vtysh("show bfd peers"))
        eventually(lambda: bfd_of(a)["detect_time_ms"] == 900, 10, "timers negotiated", a.output)
        assert seed.lan_a.wait_ping("20.10.1.2")

        # A timer change on either side is renegotiated (Poll/Final) without a flap.
        changes = a.tunnel("to_b")["state_changes"]
        frr.vtysh("configure terminal", "bfd", f"peer {A_INNER} local-address {B_INNER} interface to_a",
                  "transmit-interval 600")
        eventually(lambda: bfd_of(a)["detect_time_ms"] == 1800, 10, "FRR's slower TX taken", a.output)
        a.reload(A_CONFIG.replace("interval = \"300ms\"", "interval = \"500ms\""))
        eventually(lambda: (frr.session() or {}).get("remote-transmit-interval") == 500, 10,
                   "A's new timers at FRR", lambda: frr.vtysh("show bfd peers"))
        assert a.tunnel("to_b")["state_changes"] == changes and (frr.session() or {}).get("status") == "up"
        a.reload(A_CONFIG)
        frr.vtysh("configure terminal", "bfd", f"peer {A_INNER} local-address {B_INNER} interface to_a",
                  "transmit-interval 300")
        eventually(lambda: bfd_of(a)["detect_time_ms"] == 900, 10, "back at 300 ms x 3", a.output)

        # B's link down: both sides agree the session is down; up again: both up.
        seed.b.ip("link", "set", "to_a", "down")
        a.wait_for("to_b", "down", timeout=10)
        eventually(lambda: (frr.session() or {}).get("status") == "down", 10, "FRR's session down",
                   lambda: frr.vtysh("show bfd peers"))
        seed.b.ip("link", "set", "to_a", "up")
        seed.b.ip("route", "replace", "10.10.1.0/24", "dev", "to_a")
        a.wait_for("to_b", "up", timeout=20)
        eventually(lambda: (frr.session() or {}).get("status") == "up", 10, "FRR's session up again",
                   lambda: frr.vtysh("show bfd peers"))

        stopped = time.time()
        frr.stop_bfdd()  # SIGKILL: no AdminDown, only silence
        command = time.time() - stopped
        assert_withdrawn_in_time(a, seed, stopped, command)

        frr.start_bfdd()
        a.wait_for("to_b", "up", timeout=20)
        assert routed_through_tunnel(seed.a)
        a.stop()
    finally:
        frr.close()


def test_bird_as_the_peer_gates_its_static_route_on_the_session(seed: SeedTopology) -> None:
    """BIRD's `route ... via ... bfd` follows greupd: kept across a greupd restart with on_exit = "keep" (the
    session is carried on; A's multiplier gives BIRD 30 s of detect time, longer than a restart of greupd in a
    busy UML guest, 10-20 s), withdrawn when greupd is killed."""
    if not bird_available():
        pytest.skip("bird2 is not installed (make deps installs it)")
    hand_made_tunnel(seed.b)
    seed.b.ip("route", "del", "10.10.1.0/24", "dev", "to_a")  # BIRD's static route replaces it, gated on BFD
    bird = BirdBfd(seed.b, peer=A_INNER, local=B_INNER, interface="to_a", route="10.10.1.0/24").start()

    def birds_route() -> bool:
        return "10.10.1.0/24" in seed.b.ip("route", "show", "proto", "bird").stdout

    try:
        a = GreupdProcess(seed.a, A_CONFIG.replace("multiplier = 3", "multiplier = 100")).start()
        eventually(lambda: bfd_of(a)["state"] == "up", 20, "A's session with BIRD up",
                   lambda: f"{a.output()}\n{bird.birdc('show', 'bfd', 'sessions')}")
        eventually(birds_route, 10, "BIRD's BFD-gated static route installed", lambda: bird.birdc("show", "route"))
        assert seed.lan_b.wait_ping("10.10.1.2")

        gaps: list[float] = []
        watching = threading.Event()

        def watch() -> None:
            while not watching.is_set():
                if not birds_route():
                    gaps.append(time.time())
                time.sleep(0.1)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            restarted = time.time()
            a.stop()
            a.start()
            a.wait_for("to_b", "up", timeout=20)
            print(f"greupd restarted in {time.time() - restarted:.2f}s")
            time.sleep(2)
        finally:
            watching.set()
            watcher.join()
        assert not gaps, f"BIRD's route was gone during greupd's restart\n{a.output()}"
        assert "carried on from the previous greupd" in a.output()
        assert bfd_of(a)["state"] == "up"

        a.kill()  # greupd gone without a word: BIRD's session times out (30 s) and its route goes
        eventually(lambda: not birds_route(), 45, "BIRD withdraws its route when greupd is gone",
                   lambda: bird.birdc("show", "bfd", "sessions"))
        a.start()
        eventually(birds_route, 20, "BIRD's route back with greupd", lambda: bird.birdc("show", "bfd", "sessions"))

        stopped = time.time()
        bird.stop()
        assert_withdrawn_in_time(a, seed, stopped, time.time() - stopped)
        a.stop()
    finally:
        bird.close()


def test_one_verdict_from_keepalives_and_bfd_names_the_detector_that_said_down(seed: SeedTopology) -> None:
    """Build 6: a tunnel with both detectors is down while either says down, and status, journal and metrics
    say which. B's greupd drops its [tunnel.bfd] (AdminDown to A) while its keepalives go on: down by bfd
    alone; then B stops answering anything: down by both."""
    keepalive = '[tunnel.keepalive]\ninterval = "200ms"\nretries = 3\n'
    both = 'interval = "300ms"\nmultiplier = 3\n' + keepalive
    a = GreupdProcess(seed.a, greupd_config("172.19.1.1", "172.19.1.2", A_INNER, B_INNER, "20.10.1.0/24", "to_b",
                                            both)).start()
    b_both = greupd_config("172.19.1.2", "172.19.1.1", B_INNER, A_INNER, "10.10.1.0/24", "to_a", both)
    b = GreupdProcess(seed.b, b_both).start()
    eventually(lambda: bfd_of(a)["state"] == "up" and a.tunnel("to_b")["keepalive"]["received"] >= 3, 20,
               "A's session up and B answering keepalives", a.output)
    a.wait_for("to_b", "up")
    assert a.tunnel("to_b")["liveness"] == {"down_by": []}

    def reload_b(config: str) -> None:  # by the control socket: a CLI process costs seconds in UML
        b.config_path.write_text(config)
        assert request(b.socket, "reload", timeout=120)["ok"], b.output()

    reload_b(b_both.replace('[tunnel.bfd]\ninterval = "300ms"\nmultiplier = 3\n', ""))
    a.wait_for("to_b", "down", timeout=10)
    tunnel = a.tunnel("to_b")
    assert (tunnel["reason"], tunnel["liveness"]) == ("bfd-down", {"down_by": ["bfd"]}), tunnel
    assert tunnel["keepalive"]["missed_in_a_row"] == 0  # the keepalives still say up
    assert a.logged_at(r"tunnel to_b down: BFD session up -> down \(neighbor signaled session down\) "
                       r"\(down by bfd\)", 0) is not None, a.output()
    assert re.search(r'greupd_bfd_session_up\{tunnel="to_b"\} 0', metrics(a))
    assert not routed_through_tunnel(seed.a)

    reload_b(b_both)
    a.wait_for("to_b", "up", timeout=20)
    assert a.tunnel("to_b")["reason"] == "bfd-restored"

    seed.b.ip("route", "add", "blackhole", "172.19.1.1/32")  # B answers nothing now
    eventually(lambda: a.tunnel("to_b")["liveness"] == {"down_by": ["bfd", "keepalive"]}, 10,
               "down by both", a.output)
    assert a.tunnel("to_b")["state"] == "down"
    seed.b.ip("route", "del", "blackhole", "172.19.1.1/32")
    a.wait_for("to_b", "up", timeout=20)
    assert a.tunnel("to_b")["liveness"] == {"down_by": []}
    a.stop()
    b.stop()
