"""Keepalives on a real kernel with ip_gre: the seed's routers A (172.19.1.1) and B (172.19.1.2), a GRE
tunnel made by hand on each (ikey/okey crossed: A sends key 2, B sends key 1), and the keepalive engine
alone (`python -m greupd.keepalive`) running in one of them.

- A's engine against a plain-kernel B that reflects probes the Cisco way: up; B's tunnel stops -> down
  after `retries` misses; B back -> up.
- B's engine answering (answer = "daemon") a Cisco-style sender on A, with B's kernel not reflecting
  (no ip_forward, no accept_local); nobody else gets answers: not an unconfigured source, not a third
  address, not a wrong key, not a flood beyond the rate limit.
- A third router C forging and replaying replies cannot keep a dead tunnel up.
- Malformed GRE thrown at A's engine: counted, and the engine keeps working.

The Cisco-style sender, the eavesdropper and the forger are this test process itself, with sockets opened
inside the lab hosts' namespaces (see in_netns).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import random
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import IP
from scapy.layers.l2 import GRE, Ether
from scapy.packet import Raw, fuzz

from greupd.keepalive.codec import KeepaliveRequest, parse_gre
from greupd.keepalive.engine import KeepaliveEngine, KeepaliveTarget, LivenessChange
from lab.hosts import Host, SeedTopology, in_netns
from lab.waiting import eventually

REPO = Path(__file__).resolve().parent.parent
A, B, C = "172.19.1.1", "172.19.1.2", "172.19.1.3"
A_IKEY, A_OKEY = 1, 2  # B's are the other way round
INTERVAL = 0.1
RETRIES = 3


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}



def add_tunnel(host: Host, local: str, remote: str, ikey: int, okey: int, address: str, peer: str) -> None:
    host.ip("tunnel", "add", "My_Tunnel", "mode", "gre", "local", local, "remote", remote,
            "ikey", str(ikey), "okey", str(okey), "ttl", "64")
    host.ip("addr", "add", address, "peer", peer, "dev", "My_Tunnel")
    host.ip("link", "set", "My_Tunnel", "up")


def seed_tunnels(seed: SeedTopology) -> None:
    add_tunnel(seed.a, A, B, A_IKEY, A_OKEY, "192.168.8.1", "192.168.8.11")
    add_tunnel(seed.b, B, A, A_OKEY, A_IKEY, "192.168.8.11", "192.168.8.1")


def reflect_with_the_kernel(host: Host) -> None:
    """How a plain Linux peer answers Cisco keepalives: route the decapsulated inner packet back, although
    its source is one of our own addresses (accept_local) and arrived by the tunnel (rp_filter)."""
    host.sysctl("net.ipv4.ip_forward", 1)
    host.sysctl("net.ipv4.conf.My_Tunnel.accept_local", 1)
    host.sysctl("net.ipv4.conf.My_Tunnel.rp_filter", 0)
    host.sysctl("net.ipv4.conf.all.rp_filter", 0)


def engine_config(local: str, remote: str, ikey: int, okey: int, answer: str = "off",
                  interval: float = INTERVAL, retries: int = RETRIES) -> str:
    return (f'[[tunnel]]\nname = "My_Tunnel"\nlocal = "{local}"\nremote = "{remote}"\n'
            f"ikey = {ikey}\nokey = {okey}\n"
            f'keepalive = {{interval = {interval}, retries = {retries}, answer = "{answer}"}}\n')


class EngineProcess:
    """`python -m greupd.keepalive` in a lab host: its verdicts (stdout lines) and its status file."""

    def __init__(self, host: Host, config: str, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "tunnels.toml").write_text(config)
        self.output = directory / "output"
        self.status_file = directory / "status.json"
        with self.output.open("wb") as out:
            self.proc = host.popen(sys.executable, "-m", "greupd.keepalive", "-c", str(directory / "tunnels.toml"),
                                   "--status-file", str(self.status_file), "--status-every", "0.05",
                                   stdout=out, stderr=subprocess.STDOUT, env=_env(), cwd=REPO)
        eventually(lambda: self.running() and "started" in self.output.read_text(), timeout=60,
                   what=f"engine started; output:\n{self.output.read_text()}")

    def running(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"engine exited with {self.proc.returncode}:\n{self.output.read_text()}")
        return True

    def changes(self) -> list[dict[str, Any]]:
        lines = [json.loads(line) for line in self.output.read_text().splitlines() if line.startswith("{")]
        return [line for line in lines if "tunnel" in line]

    def report(self) -> dict[str, Any]:
        self.running()
        report: dict[str, Any] = json.loads(self.status_file.read_text())
        return report

    def tunnel(self) -> dict[str, Any]:
        status: dict[str, Any] = self.report()["tunnels"]["My_Tunnel"]
        return status

    def counters(self) -> dict[str, int]:
        counters: dict[str, int] = self.report()["counters"]
        return counters


# --- (1) interop with a plain-kernel peer -------------------------------------------------------------


@pytest.mark.needs_gre
def test_engine_on_a_keeps_the_tunnel_up_against_a_plain_kernel_peer_and_sees_it_die(
        seed: SeedTopology, tmp_path: Path) -> None:
    seed_tunnels(seed)
    reflect_with_the_kernel(seed.b)
    engine = EngineProcess(seed.a, engine_config(A, B, A_IKEY, A_OKEY), tmp_path / "a")

    eventually(lambda: engine.tunnel()["received"] >= 10, what="replies from B's kernel")
    assert engine.changes() == [] and engine.tunnel()["up"]
    assert engine.tunnel()["last_rtt_ms"] is not None
    assert seed.a.ping("192.168.8.11")  # the tunnel carries traffic as before

    verdicts: list[bool] = []
    for stop, restore in (("ip link set My_Tunnel down", "ip link set My_Tunnel up"),
                          (f"ip route add blackhole {A}/32", f"ip route del blackhole {A}/32")):
        seed.b.sh(stop)
        verdicts.append(False)
        eventually(lambda: [c["up"] for c in engine.changes()] == verdicts, what=f"down after B: {stop}")
        down = engine.changes()[-1]
        assert down["reason"] == "keepalive-timeout"
        assert down["message"] == "3 keepalives missed (interval 100ms)"
        eventually(lambda: not engine.tunnel()["up"] and engine.tunnel()["missed_in_a_row"] >= RETRIES,
                   what="status down")

        seed.b.sh(restore)
        verdicts.append(True)
        eventually(lambda: [c["up"] for c in engine.changes()] == verdicts, what=f"up after B: {restore}")
        assert engine.changes()[-1]["reason"] == "keepalive-restored"
        eventually(lambda: engine.tunnel()["up"] and engine.tunnel()["missed_in_a_row"] == 0, what="status up")
    assert engine.counters()["unmatched_replies"] == 0


# --- (2) answering for a peer whose kernel does not reflect -------------------------------------------


@pytest.mark.needs_gre
def test_engine_on_b_answers_cisco_keepalives_from_a_and_nobody_else(seed: SeedTopology, tmp_path: Path) -> None:
    seed_tunnels(seed)
    c = seed.add_router("c", C)
    # B's kernel would not reflect: no forwarding, no accept_local, rp_filter as the distribution left it.
    seed.b.sysctl("net.ipv4.ip_forward", 0)
    engine = EngineProcess(seed.b, engine_config(B, A, A_OKEY, A_IKEY, answer="daemon", interval=10),
                           tmp_path / "b")

    def from_a(count: int, okey: int = A_OKEY, **options: Any) -> int:
        """A behaving like a Cisco with `tunnel key` 2 out, 1 in, and `keepalive`."""
        return send_keepalives(seed.a, A, B, okey, A_IKEY, count, **options)

    assert from_a(10) == 10
    # exactly as a Cisco sends them, without a sequence number: answered all the same (matched by IP ID)
    assert from_a(5, sequence=False) == 5
    eventually(lambda: engine.counters()["requests_answered"] == 15, what="15 answers counted")

    # C is no configured remote of B: its probe, though addressed like a keepalive, is not reflected (B's kernel
    # drops it before the engine sees it: #21 M6)
    packets = engine.counters()["packets"]
    assert send_keepalives(c, C, B, A_OKEY, A_IKEY, 5) == 0
    # A asking B to "reflect" to C: B is no reflector towards anyone. It answers A itself, as it answers a
    # MikroTik behind NAT that names its private address (answering.py), and sends C nothing.
    with contextlib.closing(gre_socket(c)) as at_c:
        assert from_a(5, inner_dst=C) == 5
        assert [IP(data).src for data in receive_for(at_c, 0.2) if IP(data).src == B] == []
    # with a key B's tunnel does not take
    assert from_a(5, okey=99) == 0
    eventually(lambda: engine.counters()["requests_ignored"] >= 5, what="5 requests ignored")
    assert engine.counters()["packets"] - packets == 10  # C's never reached the engine
    assert engine.counters()["requests_answered"] == 20
    assert engine.counters()["answered_behind_nat"] == 5

    # a flood from A's address: answered up to the burst, then at the rate limit
    assert 1 <= from_a(200, gap=0) < 100
    eventually(lambda: engine.counters()["requests_rate_limited"] > 0, what="rate limit counted")


# --- (3) forged and replayed replies ------------------------------------------------------------------


@pytest.mark.needs_gre
def test_forged_and_replayed_replies_do_not_keep_a_dead_tunnel_up(seed: SeedTopology, tmp_path: Path) -> None:
    seed_tunnels(seed)
    reflect_with_the_kernel(seed.b)
    c = seed.add_router("c", C)
    engine = EngineProcess(seed.a, engine_config(A, B, A_IKEY, A_OKEY), tmp_path / "a")
    eventually(lambda: engine.tunnel()["received"] >= 3, what="replies from B's kernel")

    # An eavesdropper on the switch port to A (p1) records B's genuine replies while B is alive.
    recorded = capture_replies(seed.wan.host, "p1", src=B, dst=A, seconds=1.0)
    assert len(recorded) >= 5

    seed.b.ip("link", "set", "My_Tunnel", "down")
    eventually(lambda: [c["up"] for c in engine.changes()] == [False], what="down after B died")
    eventually(lambda: not engine.tunnel()["up"], what="status down")
    received = engine.tunnel()["received"]
    packets = engine.counters()["packets"]

    # C forges replies with B's address and A's key but guessed tokens, and replays the recorded ones,
    # for 15 intervals: A stays down and counts none of them. The forged ones do not even reach the engine
    # (their tokens are none it issued: #21 M6); replays of tokens the filter still holds do, and count nothing.
    forged, replayed = forge_replies(c, src=B, dst=A, key=A_IKEY, seconds=1.5, recorded=recorded)
    assert forged > 50 and replayed > 250
    time.sleep(2 * INTERVAL)
    assert [c["up"] for c in engine.changes()] == [False]
    assert engine.tunnel()["received"] == received
    assert engine.counters()["packets"] - packets <= replayed

    seed.b.ip("link", "set", "My_Tunnel", "up")  # the real peer is back: the real replies count
    eventually(lambda: [c["up"] for c in engine.changes()] == [False, True], what="up after B is back")


# --- (4) malformed GRE --------------------------------------------------------------------------------


@pytest.mark.needs_gre
def test_malformed_gre_is_counted_and_the_engine_carries_on(seed: SeedTopology, tmp_path: Path) -> None:
    seed_tunnels(seed)
    reflect_with_the_kernel(seed.b)
    c = seed.add_router("c", C)
    # answer = "daemon": B's request-shaped packets reach the engine (replies need a token it issued: the
    # broken reply-shaped ones stay in the kernel, #21 M6)
    engine = EngineProcess(seed.a, engine_config(A, B, A_IKEY, A_OKEY, answer="daemon"), tmp_path / "a")
    eventually(lambda: engine.tunnel()["received"] >= 3, what="replies from B's kernel")

    random.seed(1)
    broken = malformed_gre(src=B, dst=A)
    request_shaped = sum(1 for packet in broken if GRE in IP(packet) and IP(packet)[GRE].proto == 0x0800)
    assert request_shaped == 5
    with contextlib.closing(raw_sender(c)) as sender:
        for _ in range(50):
            for packet in [*broken, fuzzed_gre(src=B, dst=A)]:
                sender.sendto(packet, (A, 0))
            time.sleep(0.002)
    eventually(lambda: engine.counters()["malformed"] >= 50 * request_shaped, what="malformed packets counted")

    received = engine.tunnel()["received"]
    eventually(lambda: engine.tunnel()["received"] >= received + 5, what="the engine still reads replies")
    assert engine.changes() == [] and engine.tunnel()["up"]


# --- (5) two engines, many tunnels, no GRE in the kernel at all ---------------------------------------


def engine_targets(local: str, remote: str, count: int, key_base: int, peer_key_base: int,
                   interval: float) -> list[KeepaliveTarget]:
    """`count` tunnels between the same two routers, told apart by their keys."""
    return [KeepaliveTarget(f"t{n}", IPv4Address(local), IPv4Address(remote), ikey=key_base + n,
                            okey=peer_key_base + n, interval=interval, retries=RETRIES, up_after=1, answer="daemon")
            for n in range(count)]


@pytest.mark.needs_root
def test_two_engines_answer_each_other_for_hundreds_of_tunnels(seed: SeedTopology) -> None:
    """Engines on A and B, each probing and each answering the other: no kernel tunnel, no sysctl needed
    (the raw GRE socket sees GRE whether or not the kernel has ip_gre). B's engine stops: all of A's tunnels
    go down; it starts again: all come back. Reconfiguring keeps what did not change."""
    count, interval = 300, 0.5
    targets_a = engine_targets(A, B, count, 1000, 5000, interval)
    targets_b = engine_targets(B, A, count, 5000, 1000, interval)
    changes: list[tuple[str, LivenessChange]] = []

    async def until(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            assert time.monotonic() < deadline, f"{what}: not true after {timeout} s"
            await asyncio.sleep(0.05)

    def started(host: Host, targets: list[KeepaliveTarget], on_change: Callable[[str, LivenessChange], None]
                ) -> KeepaliveEngine:
        engine = KeepaliveEngine(on_change)
        with in_netns(host):  # the engine's raw sockets live in the host's namespace
            engine.start(asyncio.get_running_loop())
        engine.configure(targets)
        return engine

    def received_by_all(engine: KeepaliveEngine, replies: int) -> bool:
        return all((engine.status(t.name) or {"received": 0})["received"] >= replies for t in targets_a)

    async def story() -> None:
        engine_a = started(seed.a, targets_a, lambda name, change: changes.append((name, change)))
        engine_b = started(seed.b, targets_b, lambda name, change: None)
        await until(lambda: received_by_all(engine_a, 3), "every tunnel answered")
        assert changes == [] and all(engine_a.is_up(t.name) for t in targets_a)
        assert engine_a.counters.unmatched_replies == 0 and engine_a.counters.malformed == 0

        engine_b.close()
        await until(lambda: len(changes) == count, "every tunnel down")
        assert {change.reason for _, change in changes} == {"keepalive-timeout"}
        assert not any(engine_a.is_up(t.name) for t in targets_a)

        # A reload: t0 removed, t1 retimed (keeps its verdict), t2's key changed (a new tunnel, same
        # verdict), the rest untouched (keep their counters).
        sent_before = (engine_a.status("t3") or {"sent": 0})["sent"]
        retimed = dataclasses.replace(targets_a[1], interval=0.2)
        rekeyed = dataclasses.replace(targets_a[2], ikey=9002, okey=9003)
        engine_a.configure([retimed, rekeyed, *targets_a[3:]])
        assert engine_a.status("t0") is None and engine_a.is_up("t0")  # no keepalives: no verdict
        assert not engine_a.is_up("t1") and not engine_a.is_up("t2")
        assert (engine_a.status("t1") or {"interval": 0})["interval"] == 0.2
        assert (engine_a.status("t3") or {"sent": 0})["sent"] >= sent_before

        changes.clear()
        engine_b = started(seed.b, targets_b, lambda name, change: None)
        await until(lambda: len(changes) == count - 2, "every tunnel B answers for up again")
        assert {change.reason for _, change in changes} == {"keepalive-restored"}
        assert not engine_a.is_up("t2")  # B knows no tunnel with the new keys
        engine_a.close()
        engine_b.close()

    asyncio.run(story())


@pytest.mark.needs_root
def test_replies_queued_while_the_loop_was_busy_are_not_counted_as_misses(seed: SeedTopology) -> None:
    """Review M8: 700 tunnels probe B at once; B's replies all arrive while A's loop is busy (a long pass),
    and by the time it runs again every probe's interval is over. One wake-up reads 512 packets; the other
    188 replies must still count before any tick calls its probe missed (retries = 1: one miss is down)."""
    count, interval = 700, 2.0
    targets = [dataclasses.replace(target, retries=1, answer="off")
               for target in engine_targets(A, B, count, 1000, 5000, interval)]
    changes: list[tuple[str, LivenessChange]] = []
    for here, there, address in ((seed.a, seed.b, B), (seed.b, seed.a, A)):  # no ARP queue for 700 packets
        mac = json.loads(there.ip("-j", "link", "show", "wan0").stdout)[0]["address"]
        here.ip("neigh", "replace", address, "lladdr", mac, "dev", "wan0", "nud", "permanent")

    async def story() -> None:
        loop = asyncio.get_running_loop()
        engine = KeepaliveEngine(lambda name, change: changes.append((name, change)), spread=False)
        with in_netns(seed.a):
            engine.start(loop)
        with contextlib.closing(gre_socket(seed.b)) as b_receives, contextlib.closing(raw_sender(seed.b)) as b_sends:
            b_receives.setsockopt(socket.SOL_SOCKET, 33, 4 << 20)  # SO_RCVBUFFORCE: 700 probes at once
            configured = loop.time()  # no probe can be due again before configured + interval
            engine.configure(targets)  # every first probe goes out at the next loop step, together
            probes: list[bytes] = []
            while len(probes) < count and loop.time() - configured < interval / 2:
                await asyncio.sleep(0)  # the engine sends; B reads
                probes += [p for p in receive_for(b_receives, 0.01) if isinstance(parse_gre(p), KeepaliveRequest)]
            all_sent = loop.time()  # every probe is due again by all_sent + interval
            assert len(probes) == count, f"B got {len(probes)} of {count} probes"
            # A's loop is busy: B reflects every probe meanwhile, and every probe's interval runs out.
            for probe in probes:
                request = parse_gre(probe)
                assert isinstance(request, KeepaliveRequest)
                b_sends.sendto(request.reflection, (A, 0))
            assert loop.time() < configured + interval, "too slow to tell: B answered after the interval"
            time.sleep(max(0.0, all_sent + interval + 0.2 - loop.time()))
        await asyncio.sleep(interval / 2)
        try:
            assert engine.counters.replies == count, engine.counters
            assert changes == [], f"{len(changes)} tunnels called down, e.g. {changes[0]}"
            assert all(engine.is_up(target.name) for target in targets)
        finally:
            engine.close()

    asyncio.run(story())


# --- sockets in a lab host, used from this process (lab.hosts.in_netns) ----------------------------------


def gre_socket(host: Host) -> socket.socket:
    with in_netns(host):
        return socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_GRE)


def raw_sender(host: Host) -> socket.socket:
    with in_netns(host):
        return socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)


def receive_for(sock: socket.socket, seconds: float, size: int = 65535) -> list[bytes]:
    sock.setblocking(False)
    packets: list[bytes] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if select.select([sock], [], [], left)[0]:
            packets.append(sock.recv(size))
    return packets


def send_keepalives(host: Host, src: str, dst: str, okey: int | None, ikey: int | None, count: int,
                    gap: float = 0.01, inner_dst: str | None = None, sequence: bool = True) -> int:
    """Send `count` keepalives from host the way a Cisco does, built with scapy alone:
    IP(src->dst)/GRE(okey)/IP(dst->src)/GRE(ikey, proto 0). Return how many came back reflected to host
    (matched by inner IP ID and sequence number)."""
    with contextlib.closing(gre_socket(host)) as receiver, contextlib.closing(raw_sender(host)) as sender:
        sent: set[tuple[int, int | None]] = set()
        probes = []
        for _ in range(count):
            ip_id, seq = random.randint(1, 0xFFFF), random.getrandbits(32) if sequence else None
            inner = GRE(proto=0, key_present=int(ikey is not None), key=ikey)
            if seq is not None:
                inner.seqnum_present, inner.sequence_number = 1, seq
            probe = (IP(src=src, dst=dst, ttl=255) / GRE(key_present=int(okey is not None), key=okey)
                     / IP(src=dst, dst=inner_dst or src, id=ip_id, ttl=255) / inner)
            probes.append(bytes(probe))
            sent.add((ip_id, seq))
        # Built first, sent after: a flood (gap 0) must arrive faster than the rate limit refills, which
        # scapy building each probe in a slow guest (milliseconds each) would not give.
        for probe_bytes in probes:
            sender.sendto(probe_bytes, (dst, 0))
            if gap:
                time.sleep(gap)
        answered = set()
        for data in receive_for(receiver, 0.5):
            packet = IP(data)
            if packet.src == dst and GRE in packet and packet[GRE].proto == 0:
                token = (packet.id, packet[GRE].sequence_number if packet[GRE].seqnum_present else None)
                if token in sent:
                    answered.add(token)
        return len(answered)


def capture_replies(host: Host, ifname: str, src: str, dst: str, seconds: float) -> list[bytes]:
    """Record, from the wire at host's ifname, the replies src sends dst (GRE protocol 0) as IP packets."""
    with in_netns(host):
        sniffer = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        sniffer.bind((ifname, 0))
    with contextlib.closing(sniffer):
        frames = receive_for(sniffer, seconds)
    replies = []
    for frame in frames:
        packet = Ether(frame)
        if IP in packet and packet[IP].src == src and packet[IP].dst == dst and GRE in packet \
                and packet[GRE].proto == 0:
            replies.append(bytes(packet[IP]))
    return replies


def forge_replies(host: Host, src: str, dst: str, key: int, seconds: float, recorded: list[bytes],
                  at_least: int = 51) -> tuple[int, int]:
    """From host: replies with src's address and the right key but guessed tokens, interleaved with replays
    of recorded ones, for `seconds` and at least `at_least` rounds (a busy guest sends fewer a second).
    Return (forged, replayed)."""
    forged = replayed = 0
    with contextlib.closing(raw_sender(host)) as sender:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline or forged < at_least:
            guess = IP(src=src, dst=dst, id=random.randint(1, 0xFFFF)) / GRE(
                key_present=1, key=key, seqnum_present=1, sequence_number=random.getrandbits(32), proto=0)
            sender.sendto(bytes(guess), (dst, 0))
            forged += 1
            for packet in recorded:
                sender.sendto(packet, (dst, 0))
                replayed += 1
            time.sleep(0.005)
    return forged, replayed


def malformed_gre(src: str, dst: str) -> list[bytes]:
    """GRE that passes the kernel's IP checks but is broken inside (the request-shaped ones pass the engine's
    socket filter too)."""
    outer = IP(src=src, dst=dst, proto=47)
    return [bytes(p) for p in (
        outer / GRE(version=1, proto=0),
        outer / GRE(routing_present=1, proto=0),
        outer / Raw(b"\x20\x00\x00\x00"),  # key flag, protocol 0, no key
        outer / Raw(b"\x10\x00\x00\x00\x00\x00"),  # sequence flag, no sequence
        outer / GRE(proto=0x0800) / IP(proto=47, len=200) / GRE(proto=0),  # inner longer than the packet
        outer / GRE(proto=0x0800) / IP(proto=47),  # inner GRE header missing
        outer / GRE(proto=0x0800) / IP(proto=47, flags="MF") / GRE(proto=0),  # inner fragment
        outer / GRE(proto=0x0800) / Raw(b"\x65" + b"\x00" * 8 + b"\x2f" + b"\x00" * 10),  # inner IP version 6
        IP(src=src, dst=dst, options=[b"\x01\x01\x01\x00"]) / GRE(proto=0x0800) / IP(ihl=15, proto=47),
    )]


def fuzzed_gre(src: str, dst: str) -> bytes:
    """A scapy-fuzzed GRE header (protocol 0 or IPv4, so the socket filter lets most through) and inner part."""
    gre = fuzz(GRE())
    gre.proto = random.choice([0, 0x0800])
    return bytes(IP(src=src, dst=dst) / gre / fuzz(IP(proto=47)) / fuzz(GRE()))
