"""python -m lab.soak --duration 1800 --seed N: greupd under a seeded random sequence of faults (issue #11).

The seed's routers A and B with their LANs, plus a third router C on the same underlay. greupd runs on A with a
primary tunnel `to_b` (metric 0) and a backup `to_c` (metric 100), both carrying B's LAN 20.10.1.0/24, with
keepalives. B and C are plain Linux routers whose kernels reflect A's keepalives (no greupd there); C forwards
what it receives to B over the underlay, and B returns traffic through C while its own tunnel is dead. lan_a
pings lan_b (20.10.1.2) all along, from this process, every PING_INTERVAL seconds.

Faults, one at a time, chosen by a seeded random generator (`--seed` replays a run; `--each-once` injects every
kind once, in seeded order, as the short test in `make test` does):

    link-delete, link-down, route-delete, address-delete   drift on one of A's tunnels
    nft-flush          `nft flush ruleset` (only where the kernel has nftables' inet family: not in UML)
    foreign-link       another program replaces a tunnel's link by its own of the same name (greupd stopped for
                       the moment of the swap, so it cannot win the race), keeps it a while, then removes it
    sigkill            SIGKILL, and greupd started again (as Restart=on-failure does)
    watchdog           SIGSTOP for the unit's WatchdogSec, a route deleted meanwhile, then SIGKILL and a start
                       after RestartSec: what systemd does to a stuck daemon (the plain UML guest has no systemd)
    peer-death         B's or C's tunnel stops (never both); peer-return brings it back
    reload-valid       the config changes (a third tunnel comes or goes, to_c's ttl), by `reload` or SIGHUP
    reload-invalid     a broken config and a reload; sometimes left on disk, so that a later restart must run the
                       last good config instead
    netlink-overrun    greupd stopped, a route deleted, link events flooded until its socket overflows, resumed;
                       the flood's links deleted again while it runs

After each fault, until it holds (within --bound seconds, restarts within --restart-bound):
  - the kernel is as the plan wants it: greupd's own planner, run here against A's kernel with the liveness the
    soak knows to be true (a dead peer's tunnel has no routes), plans no action (`greupd plan`'s "nothing to
    change"), and the nftables table matches its rendering; `greupd status` says up/down/error accordingly;
  - and then: nothing foreign changed (a dummy link with an address and routes, an `ip rule`, nftables tables),
    byte for byte;
  - all along: a dead peer's route never comes back (not after a restart either), and a ping is lost only while
    a dead peer is being detected ((retries + 1) x interval + --slack after it died), while the only
    working path is itself being repaired (a fault on to_c while B is dead), or when its reply was on its way
    back through A's end of the tunnel it came through, until greupd has that link back (B and C are plain
    routers: they keep sending into their tunnels).
At the end, `greupd plan` itself (the CLI) must say "nothing to change". The figures (faults per kind, converged,
worst convergence, pings lost per kind) are printed, with the command that replays the run; the exit status is 1
when an invariant broke (the first broken one ends the run), 0 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from greupd.config import Config, load_config_text
from greupd.control import ControlError, ControlUnavailable, request
from greupd.model import desired_state
from greupd.netlink.kernel import Kernel, KernelWatch
from greupd.plan import describe, plan_changes
from lab.greupd_process import REPO, GreupdProcess
from lab.hosts import Host, Lab, LabCommandError, SeedTopology, in_netns, seed_topology

KEEPALIVE_INTERVAL = 0.2
KEEPALIVE_RETRIES = 3
LAN_A = "10.10.1.0/24"
LAN_B = "20.10.1.0/24"
LAN_B_HOST = "20.10.1.2"
PING_INTERVAL = 0.05
# A reply later than this is a lost ping (and the window a loss is looked for in ends this long before now).
PING_WAIT = 2.0
# How long a ping or its reply may still be on its way when a fault cuts its path (the machine is loaded).
IN_FLIGHT = 0.3
# Links added (while greupd is stopped) in steps until its event socket overflows, at most this many.
FLOOD_STEP = 100
FLOOD_LINKS_MAX = 4000
UNIT = REPO / "systemd" / "greupd.service"

TUNNEL_NAMES = frozenset({"to_b", "to_c", "spare"})
KINDS = ("link-delete", "link-down", "route-delete", "address-delete", "nft-flush", "foreign-link", "sigkill",
         "watchdog", "peer-death", "peer-return", "reload-valid", "reload-invalid", "netlink-overrun")


class Broken(Exception):
    """An invariant does not hold: the soak stops and says which, after which fault."""


# --- the config on A ------------------------------------------------------------------------------------------

def a_config(variant: int, nft: bool) -> str:
    """Variant 0: to_b and to_c. Variant 1: to_c's ttl changed, and a third tunnel `spare` without keepalive."""
    def tunnel(name: str, remote: str, address: str, peer: str, metric: int, ttl: int) -> str:
        text = (f'[[tunnel]]\nname = "{name}"\nlocal = "172.19.1.1"\nremote = "{remote}"\naddress = "{address}"\n'
                f'peer = "{peer}"\nroutes = ["{LAN_B}"]\nmetric = {metric}\nttl = {ttl}\n'
                f'[tunnel.keepalive]\ninterval = {KEEPALIVE_INTERVAL}\nretries = {KEEPALIVE_RETRIES}\n'
                'up_after = 1\nanswer = "off"\n')
        # With inet nftables the table gets every kind of chain an `nft flush ruleset` must bring back: the
        # clamp (mangle), and NAT (srcnat plus the forward accepts) for the foreign dummy's 10.99.0.0/24,
        # a source the continuous ping never uses (NAT of the pinged LAN would pin its conntrack entry to one
        # tunnel's address and lose the replies after a failover, which is NAT's nature, not greupd's).
        nft_part = '[tunnel.mss]\nclamp = 1436\n[tunnel.nat]\ninto_tunnel = ["10.99.0.0/24"]\n'
        return text + (nft_part if nft else "") + "\n"

    text = '[daemon]\nip_forward = true\non_exit = "keep"\n\n'
    text += tunnel("to_b", "172.19.1.2", "192.168.8.1", "192.168.8.11", 0, 64)
    text += tunnel("to_c", "172.19.1.3", "192.168.9.1", "192.168.9.11", 100, 64 if variant == 0 else 60)
    if variant == 1:
        text += ('[[tunnel]]\nname = "spare"\nlocal = "172.19.1.1"\nremote = "172.19.1.9"\n'
                 'address = "192.168.10.1"\npeer = "192.168.10.11"\nroutes = ["40.0.0.0/24"]\n\n')
    return text


BROKEN_TUNNEL = '[[tunnel]]\nname = "half_done"\nlocal = "172.19.1.1"\nremtoe = "172.19.1.4"\n'


def unit_seconds(key: str, default: float) -> float:
    """WatchdogSec= / RestartSec= of the shipped unit, so the emulated watchdog is the packaged one."""
    match = re.search(rf"^{key}=(\d+)s?$", UNIT.read_text(), re.M) if UNIT.exists() else None
    return float(match.group(1)) if match else default


# --- the peers ---------------------------------------------------------------------------------------------------

@dataclass
class Peer:
    """B or C: a plain Linux router with a GRE tunnel `to_a` back to A that reflects A's keepalives."""

    host: Host
    tunnel: str  # A's tunnel to this peer
    wan: str
    address: str
    peer: str
    alive: bool = True
    detected: bool = False  # A has seen it dead: from then on its route must never be back while it is

    def build(self, extra_routes: list[str]) -> None:
        self.host.ip("tunnel", "add", "to_a", "mode", "gre", "local", self.wan, "remote", "172.19.1.1", "ttl", "64")
        self.host.ip_batch(f"addr add {self.address} peer {self.peer} dev to_a", "link set to_a up",
                           f"route add {LAN_A} dev to_a", *extra_routes)
        # A reflected keepalive leaves with the peer's own address as source: a martian unless accept_local is
        # on and rp_filter off (kernel-lab.md). rp_filter off everywhere also lets B take A's LAN from C.
        for key in ("net.ipv4.ip_forward=1", "net.ipv4.conf.to_a.accept_local=1", "net.ipv4.conf.all.rp_filter=0",
                    "net.ipv4.conf.default.rp_filter=0", "net.ipv4.conf.to_a.rp_filter=0",
                    "net.ipv4.conf.wan0.rp_filter=0"):
            self.host.run("sysctl", "-q", "-w", key)

    def die(self) -> None:
        self.host.ip("link", "set", "to_a", "down")
        self.alive = False

    def come_back(self) -> None:
        # Setting the link down flushed the route through it.
        self.host.ip_batch("link set to_a up", f"route replace {LAN_A} dev to_a")
        self.alive = True


# --- the continuous ping -----------------------------------------------------------------------------------------

def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


class Pinger:
    """ICMP echo from a lab host every `interval` seconds, in two threads of this process (a `ping` process
    buffers its output; this knows when each request left and whether its reply came)."""

    def __init__(self, host: Host, target: str, interval: float = PING_INTERVAL) -> None:
        self.target = target
        self.interval = interval
        self.ident = os.getpid() & 0xFFFF
        with in_netns(host):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        self.sock.settimeout(0.2)
        self.sent: list[float] = []  # send time by counter
        self.replied: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._send_loop, daemon=True, name="pinger-send"),
                         threading.Thread(target=self._receive_loop, daemon=True, name="pinger-receive")]

    def start(self) -> Pinger:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(5)
        self.sock.close()

    def _send_loop(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            with self._lock:
                counter = len(self.sent)
                self.sent.append(time.monotonic())
            payload = struct.pack("!Q", counter) + bytes(40)
            header = struct.pack("!BBHHH", 8, 0, 0, self.ident, counter & 0xFFFF)
            packet = struct.pack("!BBHHH", 8, 0, _checksum(header + payload), self.ident, counter & 0xFFFF) + payload
            with contextlib.suppress(OSError):  # no route for a moment: that is a lost ping, counted as such
                self.sock.sendto(packet, (self.target, 0))
            next_at += self.interval
            now = time.monotonic()
            if next_at < now - 1:  # starved of CPU for a while: no burst to catch up
                next_at = now
            time.sleep(max(0.0, next_at - now))

    def _receive_loop(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(2048)
            except (TimeoutError, OSError):
                continue
            header_length = (data[0] & 0x0F) * 4
            icmp = data[header_length:]
            if len(icmp) < 16 or icmp[0] != 0 or struct.unpack("!H", icmp[4:6])[0] != self.ident:
                continue
            (counter,) = struct.unpack("!Q", icmp[8:16])
            with self._lock:
                self.replied.add(counter)

    def lost_between(self, start: float, end: float) -> list[float]:
        """Send times, within [start, end), of the echo requests that got no reply (end: at most now - PING_WAIT)."""
        with self._lock:
            return [t for n, t in enumerate(self.sent) if start <= t < end and n not in self.replied]

    def count(self) -> tuple[int, int]:
        with self._lock:
            return len(self.sent), len(self.replied)


# --- figures -----------------------------------------------------------------------------------------------------

@dataclass
class KindFigures:
    injected: int = 0
    converged: int = 0
    worst_seconds: float = 0.0
    total_seconds: float = 0.0
    pings_lost: int = 0
    notes: dict[str, float] = field(default_factory=dict)  # e.g. worst detection time of a dead peer

    def note_max(self, key: str, value: float) -> None:
        self.notes[key] = round(max(self.notes.get(key, 0.0), value), 3)


@dataclass
class Fault:
    kind: str
    detail: str
    started: float
    # Windows (start, end) in which a lost ping is no broken invariant: a dead peer being detected, or the only
    # working path being repaired (end None: until the fault converged).
    loss_allowed: list[tuple[float, float | None]] = field(default_factory=list)
    restart: bool = False
    number: int = 0
    converged: float | None = None  # when everything held again

    def __post_init__(self) -> None:
        self.injected = self.started  # `started` may move on to the part whose convergence is measured


# --- the soak ----------------------------------------------------------------------------------------------------

class Soak:
    def __init__(self, lab: Lab, seed: int, *, nft: bool, bound: float, restart_bound: float, slack: float,
                 out: Callable[[str], None] = print) -> None:
        self.rng = random.Random(seed)
        self.seed = seed
        self.nft = nft
        self.bound = bound
        self.restart_bound = restart_bound
        self.detect_bound = (KEEPALIVE_RETRIES + 1) * KEEPALIVE_INTERVAL + slack
        self.out = out
        self.watchdog = unit_seconds("WatchdogSec", 10)
        self.restart_after = unit_seconds("RestartSec", 2)
        self.topo: SeedTopology = seed_topology(lab)
        self.a = self.topo.a
        self.c = self.topo.add_router("c", "172.19.1.3")
        self.peers = {"to_b": Peer(self.topo.b, "to_b", "172.19.1.2", "192.168.8.11", "192.168.8.1"),
                      "to_c": Peer(self.c, "to_c", "172.19.1.3", "192.168.9.11", "192.168.9.1")}
        # B takes A's LAN from C while its own tunnel is dead; C passes B's LAN on to B over the underlay.
        self.peers["to_b"].build([f"route add {LAN_A} via 172.19.1.3 metric 100"])
        self.peers["to_c"].build([f"route add {LAN_B} via 172.19.1.2"])
        for host in (self.a, self.topo.b, self.c):
            host.run("sysctl", "-q", "-w", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0")
        self._foreign_objects()
        self.foreign = ""  # taken once greupd runs and IPv6 link-local addresses have settled
        self.variant = 0
        self.running_text = a_config(0, nft)
        self.running_config: Config = load_config_text(self.running_text)
        self.disk_valid = True
        self.expect_fallback = False  # restarted while the file on disk was broken
        self.foreign_links: set[str] = set()
        self.daemon = GreupdProcess(self.a, self.running_text, name="greupd-soak")
        self.figures: dict[str, KindFigures] = {kind: KindFigures() for kind in KINDS}
        self.overruns_seen = 0
        self.started = time.monotonic()
        self.faults = 0
        self.window_start = 0.0
        self.pinger: Pinger | None = None
        self.history: list[Fault] = []
        with in_netns(self.a):
            self.kernel = Kernel()

    # --- setup ---

    def _foreign_objects(self) -> None:
        """What another admin or program set up on A: greupd must leave every byte of it alone."""
        self.a.ip_batch("link add foreign0 type dummy", "addr add 10.99.0.1/24 dev foreign0", "link set foreign0 up",
                        "route add 30.0.0.0/24 dev foreign0 proto static", "route add 31.0.0.0/24 via 10.99.0.2",
                        "route add 32.0.0.0/24 dev foreign0 table 100",
                        "rule add from 10.99.0.0/24 lookup 100 pref 1000")
        self._foreign_nft_tables()

    def _foreign_nft_tables(self) -> None:
        """Another firewall's tables (bridge: UML's nftables has no other family). Put back after `nft flush
        ruleset` as that firewall's admin would: greupd puts back only its own."""
        table = ("table {} foreign {{\n chain keep {{\n  type filter hook forward priority 0; policy accept;\n"
                 "  {}\n }}\n}}\n")
        self.a.run("nft", "-f", "-", input=table.format("bridge", "ether type arp accept"))
        if self.nft:
            self.a.run("nft", "-f", "-", input=table.format("inet", 'iifname "eth1" tcp dport 25 drop'))

    def foreign_state(self) -> str:
        # Not table local: the kernel fills it on its own (a link-local route appears once DAD is done).
        ours = re.compile(r"dev (to_b|to_c|spare)\b|proto 222|flood| table local ")
        routes = "\n".join(line for family in ("-4", "-6")
                           for line in self.a.ip(family, "route", "show", "table", "all").stdout.splitlines()
                           if not ours.search(line))
        parts = [self.a.ip("-d", "link", "show", "foreign0").stdout, self.a.ip("addr", "show", "foreign0").stdout,
                 routes, self.a.ip("rule", "show").stdout,
                 self.a.run("nft", "list", "table", "bridge", "foreign").stdout]
        if self.nft:
            parts.append(self.a.run("nft", "list", "table", "inet", "foreign").stdout)
        return "\n".join(parts)

    # --- what converged means ---

    def alive(self) -> dict[str, bool]:
        return {name: peer.alive for name, peer in self.peers.items()}

    def difference(self) -> str | None:
        """None when A's kernel and greupd's status are as the running config and the true liveness want."""
        proc = self.daemon.proc
        if proc is not None and proc.poll() is not None:
            raise Broken(f"greupd exited with status {proc.returncode}")
        desired = desired_state(self.running_config, self.alive())
        with in_netns(self.a):
            # Scoped to the names the tunnels ever have: a full dump parses every flood link too (seconds in UML).
            observed = self.kernel.observe(desired, TUNNEL_NAMES)
            table_difference = self._nft_difference()
        plan = plan_changes(desired, observed)
        for route in observed.routes:
            peer = self.peers.get(route.ifname)
            if peer is not None and not peer.alive and peer.detected:
                raise Broken(f"{route.ifname}'s peer is dead (greupd saw it die), yet its route is back: {route}")
        problems = {p.tunnel for p in plan.problems}
        if plan.actions or problems != self.foreign_links:
            return f"plan:\n{describe(plan)}"
        if table_difference is not None:
            return table_difference
        try:
            status = request(self.daemon.socket, "status", timeout=5)
        except ControlUnavailable as exc:
            return f"no status: {exc}"
        for tunnel in status["tunnels"]:
            name = tunnel["name"]
            want = "error" if name in self.foreign_links else "up" if self.alive().get(name, True) else "down"
            if tunnel["state"] != want:
                return f"greupd status: {name} {tunnel['state']} ({tunnel['reason']}), not {want}"
        if self.expect_fallback and "running the last good config" not in (status["last_error"] or ""):
            return f"greupd status: last_error {status['last_error']!r}, not a start with the last good config"
        return None

    def _nft_difference(self) -> str | None:
        if not self.nft:
            return None
        from greupd.nft.render import render_ruleset
        from greupd.nft.table import NftError, NftTable

        try:
            if NftTable(self.running_config.daemon.nft_table).matches(render_ruleset(self.running_config)):
                return None
        except NftError as exc:
            # A listing that races a transaction (greupd replacing its table as we read it) can fail with
            # ENOENT: a moment of change, looked at again on the next poll like any other difference.
            return f"the nftables table could not be listed: {exc}"
        return "the nftables table differs from its rendering"

    def converge(self, fault: Fault, bound: float | None = None) -> float:
        """Seconds from the fault until everything holds; Broken if not within the bound."""
        limit = bound or (self.restart_bound if fault.restart else self.bound)
        last = "not looked yet"
        while True:
            diff = self.difference()
            now = time.monotonic()
            if diff is None:
                return now - fault.started
            last = diff
            if now - fault.started > limit:
                raise Broken(f"not converged {limit:g}s after the fault: {last}")
            time.sleep(0.05)

    # --- one fault ---

    def installed_tunnels(self) -> list[str]:
        return [t.name for t in self.running_config.tunnels
                if t.routes and self.alive().get(t.name, True) and t.name not in self.foreign_links]

    def route_of(self, name: str) -> str:
        return next(str(r) for t in self.running_config.tunnels if t.name == name for r in t.routes)

    def tunnels(self) -> list[str]:
        return [t.name for t in self.running_config.tunnels]

    def sole_path(self, tunnel: str) -> bool:
        """Whether `tunnel` is the only working path to B's LAN now (the other peer dead)."""
        others = [p for name, p in self.peers.items() if name != tunnel]
        return tunnel in self.peers and self.peers[tunnel].alive and all(not p.alive for p in others)

    def possible(self, kind: str) -> bool:
        if kind == "nft-flush":
            return self.nft
        if kind == "peer-death":
            return all(p.alive for p in self.peers.values())
        if kind == "peer-return":
            return any(not p.alive for p in self.peers.values())
        if kind == "route-delete":
            return bool(self.installed_tunnels())
        return True

    def inject(self, kind: str) -> Fault:
        fault = getattr(self, "fault_" + kind.replace("-", "_"))()
        assert isinstance(fault, Fault)
        return fault

    def _drift(self, kind: str, name: str, detail: str) -> Fault:
        """A fault on tunnel `name`; if that is the only working path now, pings die until it is repaired."""
        fault = Fault(kind, detail, time.monotonic())
        if self.sole_path(name):
            fault.loss_allowed.append((fault.started, None))
        return fault

    def carrier(self) -> str | None:
        """The tunnel lan_a's pings take now: to_b while B lives, else to_c while C does."""
        return next((name for name in ("to_b", "to_c") if self.peers[name].alive), None)

    def _link_gone(self, fault: Fault, name: str) -> None:
        """A's end of the tunnel the replies come back through (B's, or C's while B is dead: a plain peer keeps
        sending into its tunnel) is down or gone: A's kernel drops what arrives for it until greupd has repaired
        it. The fault's doing; greupd's part is the repair, which is bounded like any other."""
        if name == self.carrier():
            fault.loss_allowed.append((fault.injected, None))

    def fault_link_delete(self) -> Fault:
        name = self.rng.choice(self.tunnels())
        fault = self._drift("link-delete", name, f"ip link del {name}")
        self.a.ip("link", "del", name)
        self._link_gone(fault, name)
        return fault

    def fault_link_down(self) -> Fault:
        name = self.rng.choice(self.tunnels())
        fault = self._drift("link-down", name, f"ip link set {name} down")
        self.a.ip("link", "set", name, "down")
        self._link_gone(fault, name)
        return fault

    def fault_route_delete(self) -> Fault:
        name = self.rng.choice(self.installed_tunnels())
        route = self.route_of(name)
        fault = self._drift("route-delete", name, f"ip route del {route} dev {name}")
        self.a.ip("route", "del", route, "dev", name, "proto", "222")
        return fault

    def fault_address_delete(self) -> Fault:
        name = self.rng.choice(self.tunnels())
        fault = self._drift("address-delete", name, f"ip addr flush dev {name}")
        self.a.ip("addr", "flush", "dev", name, "scope", "global")
        return fault

    def fault_nft_flush(self) -> Fault:
        fault = Fault("nft-flush", "nft flush ruleset", time.monotonic())
        self.a.run("nft", "flush", "ruleset")
        self._foreign_nft_tables()
        return fault

    @contextlib.contextmanager
    def daemon_stopped(self) -> Iterator[None]:
        self.daemon.signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self.daemon.signal(signal.SIGCONT)

    def fault_foreign_link(self) -> Fault:
        name = self.rng.choice(self.tunnels())
        fault = self._drift("foreign-link", name, f"{name} replaced by a dummy link of another program")
        with self.daemon_stopped():
            self.a.ip_batch(f"link del {name}", f"link add {name} type dummy", f"addr add 10.98.0.1/32 dev {name}")
            self._link_gone(fault, name)
            fault.started = time.monotonic()
        self.foreign_links.add(name)
        before = self.a.ip("-d", "addr", "show", name).stdout
        took = self.converge(fault)
        self.figures["foreign-link"].note_max("worst seconds to report the clash", took)
        time.sleep(self.rng.uniform(0.5, 2.0))
        after = self.a.ip("-d", "addr", "show", name).stdout
        if after != before:
            raise Broken(f"the foreign link {name} changed:\n{before}\n--- now:\n{after}")
        self.a.ip("link", "del", name)  # the other program goes away; greupd may have its name back
        self.foreign_links.discard(name)
        fault.started = time.monotonic()  # the convergence that counts: greupd takes its name back
        return fault

    def _restart(self) -> None:
        assert self.daemon.proc is not None
        self.daemon.proc.wait(10)
        self.expect_fallback = not self.disk_valid
        self.daemon.start(wait=False)

    def fault_sigkill(self) -> Fault:
        fault = Fault("sigkill", "SIGKILL, then greupd run again", time.monotonic(), restart=True)
        self.daemon.signal(signal.SIGKILL)
        self._restart()
        return fault

    def fault_watchdog(self) -> Fault:
        fault = Fault("watchdog", f"SIGSTOP {self.watchdog:g}s (WatchdogSec), a route deleted meanwhile, SIGKILL,"
                                  f" run again after {self.restart_after:g}s (RestartSec)", time.monotonic(),
                      restart=True)
        self.daemon.signal(signal.SIGSTOP)
        installed = self.installed_tunnels()
        if installed:
            name = self.rng.choice(installed)
            if self.sole_path(name):
                fault.loss_allowed.append((fault.started, None))
            self.a.ip("route", "del", self.route_of(name), "dev", name, "proto", "222")
        time.sleep(self.watchdog)
        self.daemon.signal(signal.SIGKILL)
        time.sleep(self.restart_after)
        self._restart()
        return fault

    def fault_peer_death(self) -> Fault:
        name = self.rng.choice(sorted(self.peers))
        peer = self.peers[name]
        fault = Fault("peer-death", f"{name}'s peer stops answering", time.monotonic())
        died = time.time()
        peer.die()
        while (state := self._status_of(name)) != "down":
            if time.monotonic() - fault.started > self.bound:
                raise Broken(f"{name} still {state} {self.bound:g}s after its peer died")
            time.sleep(0.02)
        # The daemon's own log line says when it decided (a status poll adds its own delay under load).
        logged = self.daemon.logged_at(rf"tunnel {name} down: ", after=died)
        detected = (logged if logged is not None else time.time()) - died
        self.figures["peer-death"].note_max("worst detection seconds", detected)
        if detected > self.detect_bound:
            raise Broken(f"{name}'s dead peer detected after {detected:.2f}s, bound {self.detect_bound:.2f}s")
        # Traffic takes to_b while B lives: its death loses pings until A notices and withdraws the route (the
        # same pass); C's death loses none.
        if name == "to_b":
            fault.loss_allowed.append((fault.started, fault.started + detected + 0.3))
        peer.detected = True
        return fault

    def _status_of(self, name: str) -> str:
        with contextlib.suppress(ControlUnavailable):
            for tunnel in request(self.daemon.socket, "status", timeout=5)["tunnels"]:
                if tunnel["name"] == name:
                    return tunnel["state"]
        return "unknown"

    def fault_peer_return(self) -> Fault:
        name = next(name for name, peer in self.peers.items() if not peer.alive)
        fault = Fault("peer-return", f"{name}'s peer answers again", time.monotonic())
        self.peers[name].come_back()
        self.peers[name].detected = False
        return fault

    def fault_reload_valid(self) -> Fault:
        self.variant = 1 - self.variant
        text = a_config(self.variant, self.nft)
        by_signal = self.rng.random() < 0.5
        fault = Fault("reload-valid", f"config variant {self.variant} by {'SIGHUP' if by_signal else 'reload'}",
                      time.monotonic())
        generation = self._generation()
        self.daemon.config_path.write_text(text)
        self.running_text, self.running_config, self.disk_valid = text, load_config_text(text), True
        self.expect_fallback = False
        if by_signal:
            self.daemon.signal(signal.SIGHUP)
        else:
            result = request(self.daemon.socket, "reload")
            if not result["ok"]:
                raise Broken(f"a valid config was rejected: {result['error']}")
        deadline = time.monotonic() + self.bound
        while self._generation() != generation + 1:
            if time.monotonic() > deadline:
                raise Broken(f"generation still {self._generation()} after the reload, not {generation + 1}")
            time.sleep(0.05)
        return fault

    def _generation(self) -> int:
        for _ in range(50):
            with contextlib.suppress(ControlUnavailable):
                status = request(self.daemon.socket, "status", timeout=5)
                return status["generation"]
            time.sleep(0.2)
        raise Broken("greupd does not answer on its control socket")

    def fault_reload_invalid(self) -> Fault:
        fault = Fault("reload-invalid", "a config with a misspelt key, then reload", time.monotonic())
        generation = self._generation()
        self.daemon.config_path.write_text(self.running_text + "\n" + BROKEN_TUNNEL)
        self.disk_valid = False
        self.expect_fallback = False  # status now names this rejection, not the start's
        result = request(self.daemon.socket, "reload")
        if result["ok"] or "remtoe" not in (result["error"] or "") or "tunnels.toml:" not in (result["error"] or ""):
            raise Broken(f"the broken config's reload answered {result}")
        if self._generation() != generation:
            raise Broken("a rejected reload changed the generation")
        if self.rng.random() < 0.5:
            fault.detail += "; the file fixed again"
            self.daemon.config_path.write_text(self.running_text)
            self.disk_valid = True
        else:
            fault.detail += "; left broken on disk"
        return fault

    def fault_netlink_overrun(self) -> Fault:
        fault = Fault("netlink-overrun", "greupd stopped, a drift, link events until its socket overflows, resumed",
                      time.monotonic())
        flooded = 0
        with self.daemon_stopped():
            installed = self.installed_tunnels()
            if installed:
                name = self.rng.choice(installed)
                if self.sole_path(name):
                    fault.loss_allowed.append((fault.started, None))
                self.a.ip("route", "del", self.route_of(name), "dev", name, "proto", "222")
            drops = self.watch_drops()
            while self.watch_drops() == drops and flooded < FLOOD_LINKS_MAX:
                self.a.run("ip", "-batch", "-", input="".join(f"link add flood{i} type dummy\n"
                                                              for i in range(flooded, flooded + FLOOD_STEP)))
                flooded += FLOOD_STEP
        overflowed = self.watch_drops() != drops
        fault.detail = (f"greupd stopped, a drift, {flooded} link events "
                        f"({'its event socket overflowed' if overflowed else 'NO overflow'}), resumed")
        figures = self.figures["netlink-overrun"]
        figures.note_max("most links to overflow", flooded)
        fault.started = time.monotonic()  # resumed: from here greupd has to find out what it missed
        took = self.converge(fault, bound=self.restart_bound)
        figures.note_max("worst seconds to repair after resuming", took)
        self.a.run("ip", "-batch", "-", input="".join(f"link del flood{i}\n" for i in range(flooded)), timeout=600)
        fault.started = time.monotonic()  # and the flood's own removal, seen while running
        overruns = self.daemon.output().count("rtnetlink event queue overflowed")
        if overruns > self.overruns_seen:
            figures.notes["resyncs logged"] = figures.notes.get("resyncs logged", 0) + 1
        self.overruns_seen = overruns
        return fault

    def watch_drops(self) -> int | None:
        """Notifications the kernel dropped for greupd's event socket (/proc/PID/net/netlink, column Drops)."""
        assert self.daemon.proc is not None
        table = Path(f"/proc/{self.daemon.proc.pid}/net/netlink").read_text().splitlines()[1:]
        for row in table:
            fields = row.split()  # sk Eth Pid Groups Rmem Wmem Dump Locks Drops Inode
            if fields[1] == "0" and int(fields[3], 16) == KernelWatch.GROUPS:
                return int(fields[8])
        return None

    # --- the run ---

    def settle_pings(self, upto: float) -> None:
        """Look at the pings sent from the last look until `upto` (at least PING_WAIT ago): each lost one must lie
        in a window some fault allows, and counts for the fault it followed. Looked at lazily, so that no fault
        waits for its pings' replies."""
        assert self.pinger is not None
        lost = self.pinger.lost_between(self.window_start, upto)
        self.window_start = max(self.window_start, upto)
        for sent in lost:
            after = [f for f in self.history if f.injected <= sent]
            fault = after[-1] if after else None
            # A window opens IN_FLIGHT early: a ping sent just before the fault may meet it on its way.
            allowed = any(start - IN_FLIGHT <= sent <= (stop if stop is not None else (f.converged or upto))
                          for f in self.history for start, stop in f.loss_allowed)
            if not allowed:
                where = (f"{sent - fault.injected:+.2f}s after fault #{fault.number} {fault.kind} ({fault.detail})"
                         if fault else "before the first fault")
                raise Broken(f"a ping was lost where none may be: sent {where}")
            assert fault is not None
            self.figures[fault.kind].pings_lost += 1

    def run(self, duration: float, kinds: list[str], each_once: bool) -> None:
        self.daemon.start(wait=False)
        seconds = self.converge(Fault("start", "greupd run", time.monotonic(), restart=True))
        self.out(f"soak: greupd started and converged in {seconds:.1f}s; faults begin")
        self.foreign = self.foreign_state()
        self.pinger = Pinger(self.topo.lan_a, LAN_B_HOST).start()
        time.sleep(1.0)
        self.window_start = time.monotonic()
        queue = [k for k in kinds if k != "peer-return"]
        if each_once:
            self.rng.shuffle(queue)
        self.started = time.monotonic()
        while True:
            if each_once:
                if not queue:
                    break
                candidates = [k for k in queue if self.possible(k)]
                kind = candidates[0] if candidates else "peer-return"
                if kind in queue:
                    queue.remove(kind)
            else:
                if time.monotonic() - self.started >= duration:
                    break
                kind = self.rng.choice([k for k in kinds if self.possible(k)])
            self.one(kind)
        # Every peer back, then the CLI's own plan must be empty too.
        while not all(p.alive for p in self.peers.values()):
            self.one("peer-return")
        self.final_plan()
        time.sleep(PING_WAIT)
        self.settle_pings(time.monotonic() - PING_WAIT)

    def one(self, kind: str) -> None:
        figures = self.figures[kind]
        self.faults += 1
        figures.injected += 1
        try:
            fault = self.inject(kind)
        except (Broken, ControlUnavailable, ControlError, LabCommandError) as exc:
            raise Broken(f"fault #{self.faults} {kind}: {exc}") from None
        fault.number = self.faults
        self.history.append(fault)
        try:
            took = self.converge(fault)
        except Broken as exc:
            raise Broken(f"fault #{self.faults} {kind} ({fault.detail}): {exc}") from None
        fault.converged = time.monotonic()
        figures.converged += 1
        figures.worst_seconds = max(figures.worst_seconds, took)
        figures.total_seconds += took
        foreign = self.foreign_state()
        if foreign != self.foreign:
            raise Broken(f"fault #{self.faults} {kind} ({fault.detail}): something foreign changed:\n"
                         f"{self.foreign}\n--- now:\n{foreign}")
        self.settle_pings(time.monotonic() - PING_WAIT)
        self.out(f"[{time.monotonic() - self.started:7.1f}s] #{self.faults} {kind}: {fault.detail}: "
                 f"converged in {took:.2f}s")
        time.sleep(self.rng.uniform(0.2, 1.0))

    def final_plan(self) -> None:
        if not self.disk_valid:  # the admin fixes the file first: `greupd plan` rightly refuses a broken one
            self.daemon.config_path.write_text(self.running_text)
            self.disk_valid = True
        # The CLI starts as slowly as the daemon (imports): in the qemu guest under load that took 250-490 s.
        limit = max(300.0, self.restart_bound)
        try:
            result = self.daemon.cli("plan", timeout=limit)
        except subprocess.TimeoutExpired:
            raise Broken(f"`greupd plan` at the end did not finish within {limit:g}s") from None
        if result.returncode != 0 or "# kernel\nnothing to change\n" not in result.stdout:
            raise Broken(f"`greupd plan` at the end: exit {result.returncode}\n{result.stdout}{result.stderr}")

    def close(self) -> None:
        if self.pinger is not None:
            self.pinger.stop()
        if self.daemon.proc is not None and self.daemon.proc.poll() is None:
            self.daemon.signal(signal.SIGCONT)
            self.daemon.stop()
        self.kernel.close()

    def report(self, duration: float, broken: str | None) -> dict[str, Any]:
        sent, replied = self.pinger.count() if self.pinger else (0, 0)
        kinds = {kind: {"injected": f.injected, "converged": f.converged, "worst_seconds": round(f.worst_seconds, 2),
                        "mean_seconds": round(f.total_seconds / f.converged, 2) if f.converged else None,
                        "pings_lost": f.pings_lost, **f.notes}
                 for kind, f in self.figures.items() if f.injected or kind == "nft-flush"}
        converged = [f for f in self.figures.values() if f.converged]
        return {"seed": self.seed, "duration_asked": duration, "ran_seconds": round(time.monotonic() - self.started, 1),
                "kernel": os.uname().release, "guest": os.environ.get("GREUPD_LAB_GUEST", "none"),
                "nft_inet": self.nft,
                "faults_injected": sum(f.injected for f in self.figures.values()),
                "faults_converged": sum(f.converged for f in self.figures.values()),
                "worst_convergence_seconds": round(max((f.worst_seconds for f in converged), default=0.0), 2),
                "pings_sent": sent, "pings_answered": replied, "kinds": kinds, "broken": broken}


def format_report(report: dict[str, Any], replay: str) -> str:
    lines = [f"soak: seed {report['seed']}, {report['ran_seconds']}s of faults, kernel {report['kernel']} "
             f"(guest {report['guest']}), nftables inet: {'yes' if report['nft_inet'] else 'no (nft-flush skipped)'}",
             f"faults injected {report['faults_injected']}, converged {report['faults_converged']}, "
             f"worst convergence {report['worst_convergence_seconds']}s; "
             f"pings sent {report['pings_sent']}, answered {report['pings_answered']}",
             f"{'kind':<16}{'injected':>9}{'converged':>10}{'worst s':>9}{'mean s':>8}{'pings lost':>11}  notes"]
    for kind, f in report["kinds"].items():
        notes = ", ".join(f"{k} {v}" for k, v in f.items()
                          if k not in ("injected", "converged", "worst_seconds", "mean_seconds", "pings_lost"))
        if kind == "nft-flush" and not report["nft_inet"]:
            notes = "skipped: this kernel's nftables lacks the inet family"
        lines.append(f"{kind:<16}{f['injected']:>9}{f['converged']:>10}{f['worst_seconds']:>9}"
                     f"{f['mean_seconds'] if f['mean_seconds'] is not None else '-':>8}{f['pings_lost']:>11}  {notes}")
    lines.append(f"invariants: {'BROKEN: ' + report['broken'] if report['broken'] else 'all held'}")
    lines.append(f"replay: {replay}")
    return "\n".join(lines)


def nft_inet_available() -> bool:
    from lab.kernel import capabilities

    return "nft_gre" in capabilities()


def run_soak(duration: float, seed: int, *, kinds: list[str] | None = None, each_once: bool = False,
             bound: float = 15.0, restart_bound: float = 120.0, slack: float = 1.5,
             out: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the soak in lab namespaces of the running kernel (which must have ip_gre); the figures as a dict."""
    nft = nft_inet_available()
    chosen = [k for k in (kinds or list(KINDS)) if k != "nft-flush" or nft]
    with Lab("-soak") as lab:
        soak = Soak(lab, seed, nft=nft, bound=bound, restart_bound=restart_bound, slack=slack, out=out)
        broken: str | None = None
        try:
            soak.run(duration, chosen, each_once)
        except Broken as exc:
            broken = str(exc)
            out(f"BROKEN: {broken}\n--- greupd's output (last 60 lines):")
            out("\n".join(soak.daemon.output().splitlines()[-60:]))
        finally:
            report = soak.report(duration, broken)
            soak.close()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=300, help="seconds of faults (default 300)")
    parser.add_argument("--seed", type=int, default=None, help="replay a run (default: a random seed, printed)")
    parser.add_argument("--each-once", action="store_true", help="every fault kind once, in seeded order")
    parser.add_argument("--faults", default=None, help=f"comma-separated kinds (default all: {','.join(KINDS)})")
    parser.add_argument("--bound", type=float, default=15.0, help="seconds to converge after a fault (15)")
    parser.add_argument("--restart-bound", type=float, default=120.0,
                        help="seconds to converge after a restart, import time included (120)")
    parser.add_argument("--slack", type=float, default=1.5,
                        help="seconds beyond (retries+1) x interval for detecting a dead peer (1.5)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    kinds = args.faults.split(",") if args.faults else None
    unknown = set(kinds or ()) - set(KINDS)
    if unknown:
        parser.error(f"unknown fault kinds: {', '.join(sorted(unknown))}")
    print(f"soak: seed {seed}, {args.duration:g}s", flush=True)
    report = run_soak(args.duration, seed, kinds=kinds, each_once=args.each_once, bound=args.bound,
                      restart_bound=args.restart_bound, slack=args.slack, out=lambda s: print(s, flush=True))
    replay = (f"python -m lab.soak --duration {args.duration:g} --seed {seed}"
              + (" --each-once" if args.each_once else "") + (f" --faults {args.faults}" if args.faults else ""))
    print(format_report(report, replay), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps({**report, "replay": replay}, indent=2) + "\n")
    return 1 if report["broken"] else 0


if __name__ == "__main__":
    sys.exit(main())
