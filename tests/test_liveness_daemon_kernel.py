"""The whole daemon's liveness against a plain-kernel peer (issue #22, build 3 and 7): greupd on the seed's
router A with Cisco keepalives through a GRE tunnel to B, whose kernel reflects them (a tunnel made by hand).
B stops answering with a blackhole route to A's address, and starts again by removing it.

- `[tunnel.dampening]`: a tunnel that flaps every second or two stops moving routes once its penalty passes
  `suppress` (status, journal and metrics say dampened), and comes back once it decays below `reuse`.
- keepalive `hold` (Junos's hold-time): the tunnel is down between `hold` and `hold + interval` after the last
  reply reached A (the replies' times taken by the kernel, on A's underlay link), as config/models.py counts it.
"""

from __future__ import annotations

import re
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from greupd.control import request
from lab.greupd_process import GreupdProcess
from lab.hosts import Host, Lab, SeedTopology, in_netns, seed_topology
from lab.waiting import eventually

pytestmark = pytest.mark.needs_gre

A, B = "172.19.1.1", "172.19.1.2"
LAN_B = "20.10.1.0/24"


@pytest.fixture
def seed() -> Iterator[SeedTopology]:
    with Lab() as lab:
        seed = seed_topology(lab)
        reflecting_tunnel(seed.b)
        yield seed


def reflecting_tunnel(b: Host) -> None:
    """B without greupd: a GRE tunnel back to A whose kernel reflects Cisco keepalives (the decapsulated inner
    packet, from B to A, is routed back although it came in by the tunnel)."""
    b.ip_batch("tunnel add to_a mode gre local 172.19.1.2 remote 172.19.1.1 ttl 64",
               "addr add 192.168.8.11 peer 192.168.8.1 dev to_a", "link set to_a up")
    for key, value in (("net.ipv4.conf.to_a.accept_local", 1), ("net.ipv4.conf.to_a.rp_filter", 0),
                       ("net.ipv4.conf.all.rp_filter", 0)):
        b.sysctl(key, value)


def config(keepalive: str, more: str = "") -> str:
    return (f'[[tunnel]]\nname = "to_b"\nlocal = "{A}"\nremote = "{B}"\naddress = "192.168.8.1"\n'
            f'peer = "192.168.8.11"\nroutes = ["{LAN_B}"]\n[tunnel.keepalive]\n{keepalive}{more}')


def b_answers(seed: SeedTopology, answering: bool) -> None:
    seed.b.ip("route", "del" if answering else "add", "blackhole", f"{A}/32")


def routed(seed: SeedTopology) -> bool:
    return "dev to_b" in seed.a.ip("route", "show", LAN_B).stdout


def dampened_metric(a: GreupdProcess) -> int:
    # What `greupd metrics` prints, straight from the control socket (a CLI process costs seconds in UML).
    text = str(request(a.socket, "metrics", timeout=30)["text"])
    found = re.search(r'greupd_tunnel_dampened\{tunnel="to_b"\} (\d)', text)
    assert found is not None, text
    return int(found.group(1))


# --- dampening ----------------------------------------------------------------------------------------


def test_a_flapping_tunnel_is_held_down_by_dampening_then_released(seed: SeedTopology) -> None:
    # 1000 per flap, halved every 4 s: the second flap within ~9 s passes 1200; from there the penalty needs
    # 3-5 s to fall below 750 (more after the flap while held).
    a = GreupdProcess(seed.a, config('interval = "100ms"\nretries = 2\n',
                                     '[tunnel.dampening]\nhalf_life = "4s"\nsuppress = 1200\nreuse = 750\n'
                                     'max_hold = "10s"\n')).start()
    eventually(lambda: a.tunnel("to_b")["keepalive"]["received"] >= 3, 20, "B reflects A's keepalives", a.output)
    assert routed(seed) and a.tunnel("to_b")["liveness"] == {"down_by": []}

    # Flap 1: down and up again, routes follow.
    b_answers(seed, False)
    a.wait_for("to_b", "down", timeout=10)
    assert a.tunnel("to_b")["reason"] == "keepalive-timeout" and not routed(seed)
    b_answers(seed, True)
    a.wait_for("to_b", "up", timeout=10)
    assert routed(seed)

    # Flap 2: the penalty passes suppress. The keepalives come back, the tunnel stays down.
    flapped = time.time()
    b_answers(seed, False)
    a.wait_for("to_b", "down", timeout=10)
    held = a.logged_at(r"tunnel to_b down: .*flapping, held down \(penalty \d+ > 1200\)", flapped - 1)
    assert held is not None, a.output()
    b_answers(seed, True)
    eventually(lambda: a.tunnel("to_b")["keepalive"]["missed_in_a_row"] == 0, 10, "keepalives answered again")
    tunnel = a.tunnel("to_b")
    assert (tunnel["state"], tunnel["reason"], tunnel["liveness"]) == ("down", "dampened",
                                                                       {"down_by": ["dampening"]}), tunnel
    assert not routed(seed)
    assert dampened_metric(a) == 1

    # A flap while held down moves nothing (and adds to the penalty: the release comes later).
    b_answers(seed, False)
    eventually(lambda: a.tunnel("to_b")["liveness"]["down_by"] == ["dampening", "keepalive"], 10,
               "keepalive down too", a.output)
    b_answers(seed, True)
    eventually(lambda: a.tunnel("to_b")["liveness"]["down_by"] == ["dampening"], 10, "keepalive up again",
               a.output)
    assert not routed(seed) and a.tunnel("to_b")["state"] == "down"

    # Released once the penalty decays below reuse: routes back, the journal says why.
    a.wait_for("to_b", "up", timeout=20)
    released = a.logged_at(r"tunnel to_b up: dampening released \(penalty \d+ < 750\)", held)
    assert released is not None, a.output()
    print(f"held down {released - held:.2f}s")
    assert 2.0 < released - held < 12, a.output()  # max_hold caps it at 10 s after the last flap
    tunnel = a.tunnel("to_b")
    assert (tunnel["reason"], tunnel["liveness"]) == ("dampening-released", {"down_by": []}), tunnel
    eventually(lambda: routed(seed), 5, "B's LAN routed again")
    assert dampened_metric(a) == 0
    a.stop()


# --- hold ---------------------------------------------------------------------------------------------

_ETH_P_IP = 0x0800
_SO_TIMESTAMPNS = 35


class RepliesOnTheWire:
    """The times at which GRE packets from B reached A's wan0, as the kernel stamped them."""

    def __init__(self, host: Host) -> None:
        with in_netns(host):
            self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(_ETH_P_IP))
        self._sock.bind(("wan0", _ETH_P_IP))
        self._sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
        self.times: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        source = socket.inet_aton(B)
        while not self._stop.is_set():
            if not select.select([self._sock], [], [], 0.1)[0]:
                continue
            data, ancillary, _, _ = self._sock.recvmsg(64, socket.CMSG_SPACE(16))
            if len(data) >= 20 and data[9] == 47 and data[12:16] == source:
                stamp = next((struct.unpack("=qq", value[:16]) for level, kind, value in ancillary
                              if (level, kind) == (socket.SOL_SOCKET, _SO_TIMESTAMPNS)), None)
                self.times.append(stamp[0] + stamp[1] / 1e9 if stamp is not None else time.time())

    def wait_for_one_more(self, a: GreupdProcess) -> None:
        seen = len(self.times)
        eventually(lambda: len(self.times) > seen, 5, "a reply on A's wire", a.output)

    def last_before(self, when: float) -> float:
        return max(t for t in self.times if t <= when)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sock.close()


def test_hold_takes_the_tunnel_down_between_hold_and_hold_plus_interval_after_the_last_reply(
        seed: SeedTopology) -> None:
    # Not a multiple of the interval: down 0.9 s after the last reply (retries 2); counting one probe more
    # (retries = ceil(hold / interval), as before) would make it 1.2 s.
    interval, hold = 0.3, 0.7
    a = GreupdProcess(seed.a, config('interval = "300ms"\nhold = "700ms"\n')).start()
    eventually(lambda: a.tunnel("to_b")["keepalive"]["received"] >= 3, 20, "B reflects A's keepalives", a.output)
    wire = RepliesOnTheWire(seed.a)
    gaps = []
    try:
        for _ in range(3):
            wire.wait_for_one_more(a)  # the socket opened (or B answered again) before the last reply
            stopped = time.time()
            b_answers(seed, False)
            a.wait_for("to_b", "down", timeout=10)
            down = a.logged_at(r"tunnel to_b down: \d+ keepalives missed", stopped)
            assert down is not None, a.output()
            gaps.append(down - wire.last_before(down))
            b_answers(seed, True)
            a.wait_for("to_b", "up", timeout=10)
            assert routed(seed)
    finally:
        wire.close()
    missed = [int(n) for n in re.findall(r"tunnel to_b down: (\d+) keepalives missed", a.output())]
    print("down after the last reply: " + ", ".join(f"{gap:.3f}s" for gap in gaps) + f"; missed {missed}")
    # The rule itself, free of the guest's timing: hold 700 ms at 300 ms is 2 probes missed (0.9 s of silence at
    # most); counting one probe more (retries = ceil(hold / interval), as before) would say 3 (1.2 s).
    assert missed == [2, 2, 2], (missed, a.output())
    # The clock, with the noise of a loaded guest: each down is logged after the verdict's pass (a busy tick late;
    # one of three seen 1.12 s in a loaded CI guest), and misses are counted by probes (Cisco's way), so when the
    # last reply was late (it answered a probe up to an interval older; seen 0.62 s) the down comes less than
    # `hold` after it. The median of three tells the two rules apart (0.9 s against 1.2 s) without the outlier.
    assert all(hold - interval <= gap for gap in gaps), (gaps, a.output())
    assert sorted(gaps)[1] <= hold + interval + 0.1, (gaps, a.output())
    a.stop()
