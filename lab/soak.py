"""python -m lab.soak --duration 1800 --seed N: greupd under a seeded random sequence of faults (issues #11, #21).

The seed's routers A and B with their LANs, plus a third router C on the same underlay. greupd runs on A with a
primary tunnel `to_b` (metric 0, in tunnels.toml) and a backup `to_c` (metric 100, in the drop-in
tunnels.d/50-backup.toml), both carrying B's LAN 20.10.1.0/24, with keepalives. B and C are plain Linux routers
whose kernels reflect A's keepalives (no greupd there); C forwards what it receives to B over the underlay, and B
returns traffic through C while its own tunnel is dead. lan_a pings lan_b (20.10.1.2) all along, from this
process, every PING_INTERVAL seconds. greupd runs as root without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, so
file modes bind it as they bind the packaged unit's user. Where nftables has the inet family and charon is
installed (the qemu guest), to_b runs over IPsec (`require = true`; charon on A for greupd, a hand-written
connection in B's), and from greupd's start on not one GRE packet between A and B may cross the underlay in
the clear (--ipsec on/off overrides).

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
  issue #21 (`--faults round3` alone; `classic` for the ones above):
    dropin-unreadable  tunnels.d chmod 000, then a reload or SIGHUP: rejected naming tunnels.d, no tunnel
                       deleted or made anew; sometimes left so, for a later restart to run the last good config
    config-fifo        tunnels.toml replaced by a FIFO, then a reload or SIGHUP: rejected naming the file, and for
                       FIFO_SECONDS status answers (each within FIFO_ANSWER) and keepalive replies keep counting
    config-nested      an array nested NESTED_DEPTH deep in tunnels.toml, a reload or SIGHUP (rejected, nothing
                       changed), then a restart: the last good config runs (status says so)
    xfrm-flush         `ip xfrm state flush; ip xfrm policy flush` on A under IPsec: to_b's policies and SAs back
                       within XFRM_BOUND, and no cleartext GRE between A and B ever (only with IPsec)
    lock-squat         greupd stopped; a process of uid SQUATTER_UID binds its netns lock; greupd must start
    gre-flood          a fifth box X floods A with junk GRE from its own address and spoofed from B's, at the
                       highest rate it reaches, for --flood-seconds: no tunnel whose peer lives goes down

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
worst convergence, pings lost per kind) are printed, with the command that replays the run, and once more as one
JSON line starting `soak-json: ` (`make soak` keeps it as a file; --json writes one too); the exit status is 1
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
from lab.charon import Charon, gre_transport_conf
from lab.charon import available as charon_available
from lab.greupd_process import REPO, GreupdProcess, _scratch
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
# The faults of sessions 2-4 (the short test in `make test` runs these), then those of issue #21 (round 3).
CLASSIC_KINDS = ("link-delete", "link-down", "route-delete", "address-delete", "nft-flush", "foreign-link",
                 "sigkill", "watchdog", "peer-death", "peer-return", "reload-valid", "reload-invalid",
                 "netlink-overrun")
ROUND3_KINDS = ("dropin-unreadable", "config-fifo", "config-nested", "xfrm-flush", "lock-squat", "gre-flood")
KINDS = CLASSIC_KINDS + ROUND3_KINDS
# greupd runs as root without these two capabilities, so file modes bind it as they bind the unit's user greupd
# (User=greupd, with CAP_NET_ADMIN and CAP_NET_RAW only): a tunnels.d at mode 000 is as unreadable to it.
DROPPED_CAPS = ("dac_override", "dac_read_search")
# The uid that squats greupd's netns lock: any local user, neither root nor greupd's own.
SQUATTER_UID = 4242
# While tunnels.toml is a FIFO: this long of status answers and keepalives counted, each answer within this.
FIFO_SECONDS = 3.0
FIFO_ANSWER = 2.0
# How deep the nested array in the config is (newcomer-3: ~500 overflows tomllib's recursion).
NESTED_DEPTH = 500
# After `ip xfrm state flush; ip xfrm policy flush` on A: the SAs and policies of to_b back within this.
XFRM_BOUND = 5.0
# GRE flood: the attacker's own (unconfigured) source and the one it spoofs (B's), for this long by default.
FLOOD_SOURCE = "172.19.1.7"
FLOOD_SPOOFED = "172.19.1.2"
FLOOD_SECONDS = 10.0


class Broken(Exception):
    """An invariant does not hold: the soak stops and says which, after which fault."""


# --- the config on A ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AConfig:
    """A's config as files: tunnels.toml ([daemon] and to_b) and the drop-in tunnels.d/50-backup.toml (to_c, and
    `spare` in variant 1), so that a fault on the drop-in directory has tunnels to lose."""

    main: str
    dropin: str

    @property
    def text(self) -> str:
        """The two as one text, for the soak's own planning (the loader merges them the same way)."""
        return self.main + self.dropin


def a_config(variant: int, nft: bool, ipsec: IpsecSetup | None = None) -> AConfig:
    """Variant 0: to_b and to_c. Variant 1: to_c's ttl changed, and a third tunnel `spare` without keepalive.
    With `ipsec`, to_b runs over IPsec (B's charon has the matching connection) with require = true."""
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
        text += nft_part if nft else ""
        if ipsec is not None and name == "to_b":
            text += f'[tunnel.ipsec]\npsk_file = "{ipsec.psk_file}"\nrequire = true\n'
        return text + "\n"

    main = '[daemon]\nip_forward = true\non_exit = "keep"\n'
    main += f'vici_socket = "{ipsec.vici_socket}"\n\n' if ipsec is not None else "\n"
    main += tunnel("to_b", "172.19.1.2", "192.168.8.1", "192.168.8.11", 0, 64)
    dropin = tunnel("to_c", "172.19.1.3", "192.168.9.1", "192.168.9.11", 100, 64 if variant == 0 else 60)
    if variant == 1:
        dropin += ('[[tunnel]]\nname = "spare"\nlocal = "172.19.1.1"\nremote = "172.19.1.9"\n'
                   'address = "192.168.10.1"\npeer = "192.168.10.11"\nroutes = ["40.0.0.0/24"]\n\n')
    return AConfig(main, dropin)


BROKEN_TUNNEL = '[[tunnel]]\nname = "half_done"\nlocal = "172.19.1.1"\nremtoe = "172.19.1.4"\n'
# A tunnel whose routes are an array nested NESTED_DEPTH deep: a 1 KB file that overflowed tomllib's recursion.
NESTED_TUNNEL = ('[[tunnel]]\nname = "deep"\nlocal = "172.19.1.1"\nremote = "172.19.1.4"\nroutes = '
                 + "[" * NESTED_DEPTH + "]" * NESTED_DEPTH + "\n")


def unit_seconds(key: str, default: float) -> float:
    """WatchdogSec= / RestartSec= of the shipped unit, so the emulated watchdog is the packaged one."""
    match = re.search(rf"^{key}=(\d+)s?$", UNIT.read_text(), re.M) if UNIT.exists() else None
    return float(match.group(1)) if match else default


class SoakDaemon(GreupdProcess):
    """`greupd run` as GreupdProcess starts it, but without DROPPED_CAPS, and with the drop-in directory beside its
    config file."""

    def __init__(self, host: Host, config: AConfig, name: str) -> None:
        super().__init__(host, config.main, name=name)
        self.dropins = self.config_path.parent / "tunnels.d"
        self.dropins.mkdir(mode=0o755)
        self.dropin_path = self.dropins / "50-backup.toml"
        self.dropin_path.write_text(config.dropin)

    def write(self, config: AConfig) -> None:
        self.config_path.write_text(config.main)
        self.dropin_path.write_text(config.dropin)

    def start(self, wait: bool = True, timeout: float = 60) -> SoakDaemon:
        out = self.log.open("ab")
        bounding = ",".join(f"-{cap}" for cap in DROPPED_CAPS)
        self.proc = self.host.popen("setpriv", f"--bounding-set={bounding}", sys.executable, "-m", "greupd", "run",
                                    stdout=out, stderr=subprocess.STDOUT, env=self.env)
        if wait:
            self.wait_ready(timeout)
        return self


# --- IPsec on to_b (only where nftables has the inet family: greupd's require table) ------------------------------

# B is a plain strongSwan router: its own hand-written connection for GRE in ESP transport mode with A
# (as tests/test_ipsec_kernel.py's interop test), the proposals greupd offers by default.
PSK = "soak-psk-0123456789abcdef0123456789"


@dataclass
class IpsecSetup:
    """charon on A (greupd's) and on B (hand-configured), and the PSK file greupd reads."""

    charon_a: Charon
    charon_b: Charon
    psk_file: Path

    @property
    def vici_socket(self) -> Path:
        return self.charon_a.socket

    @classmethod
    def start(cls, a: Host, b: Host, directory: Path, timeout: float) -> IpsecSetup:
        psk = directory / "psk-to_b"
        psk.write_text(PSK + "\n")
        psk.chmod(0o600)  # root's own: greupd runs as root here (without DROPPED_CAPS, which it does not need)
        charon_a, charon_b = Charon(a).start(timeout), Charon(b).start(timeout)
        charon_b.load(gre_transport_conf("to-a", "172.19.1.2", "172.19.1.1", PSK))
        return cls(charon_a, charon_b, psk)

    def stop(self) -> None:
        for charon in (self.charon_a, self.charon_b):
            charon.stop()


def protected(a: Host) -> str | None:
    """None when A's kernel protects GRE with B: the out and in policies for protocol gre, and an ESP SA each way;
    else what is missing."""
    policies, states = a.ip("xfrm", "policy", "list").stdout, a.ip("xfrm", "state", "list").stdout
    for direction, src, dst in (("out", "172.19.1.1", "172.19.1.2"), ("in", "172.19.1.2", "172.19.1.1")):
        if not re.search(rf"src {src}/32 dst {dst}/32 proto gre\s*\n\s*dir {direction} ", policies):
            return f"no {direction} policy for gre {src} -> {dst}"
        if not re.search(rf"^src {src} dst {dst}\s*\n\s*proto esp ", states, re.M):
            return f"no ESP SA {src} -> {dst}"
    return None


ETH_P_ALL = 0x0003


class CleartextWatch:
    """Counts GRE in the clear between A and B on A's underlay port, all along: what A sends to B, and what comes
    from B's own port (not the flood's spoofed copies, which have the attacker's MAC)."""

    def __init__(self, a: Host, b: Host) -> None:
        b_mac = re.search(r"link/ether (\S+)", b.ip("link", "show", "wan0").stdout)
        assert b_mac is not None
        self.b_mac = bytes.fromhex(b_mac.group(1).replace(":", ""))
        with in_netns(a):
            # ETH_P_ALL: a socket bound to one protocol sees only what comes in, not what A sends.
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            self.sock.bind(("wan0", ETH_P_ALL))
        self.sock.settimeout(0.2)
        self.seen: list[tuple[float, str]] = []
        self.esp = 0  # ESP between A and B, either way: that the watch sees the underlay at all
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="cleartext-watch")
        self._thread.start()

    def _loop(self) -> None:
        a_addr, b_addr = socket.inet_aton("172.19.1.1"), socket.inet_aton("172.19.1.2")
        while not self._stop.is_set():
            try:
                frame, where = self.sock.recvfrom(256)
            except (TimeoutError, OSError):
                continue
            ip = frame[14:]
            if frame[12:14] != b"\x08\x00" or len(ip) < 20 or ip[9] not in (47, 50):
                continue
            if ip[9] == 50:
                self.esp += {ip[12:16], ip[16:20]} == {a_addr, b_addr}
                continue
            outgoing = where[2] == socket.PACKET_OUTGOING
            if (outgoing and ip[12:16] == a_addr and ip[16:20] == b_addr) or (
                    not outgoing and ip[12:16] == b_addr and ip[16:20] == a_addr and frame[6:12] == self.b_mac):
                self.seen.append((time.monotonic(), "A -> B" if outgoing else "B -> A"))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


# --- programs the faults start in lab hosts ------------------------------------------------------------------------

# Binds greupd's netns lock (the abstract name control.NETNS_LOCK) and holds it until killed.
SQUAT = """
import socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.bind(b"\\0greupd")
    s.listen(1)
except OSError as exc:
    print(f"not bound: {exc}", flush=True)
    sys.exit(1)
print("bound", flush=True)
while True:
    time.sleep(60)
"""

# Junk GRE to A, as fast as one process sends it, for argv[3] seconds from argv[1] (IP_HDRINCL: any source). Half
# is keepalive-shaped (GRE protocol 0, an inner IPv4 header A -> source, GRE protocol 0 inside, then a random
# token), half random bytes after a GRE header of protocol 0; either gets past a filter on protocol 0. Sent 256
# at a time with sendmmsg(2) (through ctypes: Python has no binding), since a syscall per packet is what limits
# the rate in a guest.
FLOOD = """
import ctypes, random, socket, struct, sys, time
src, dst, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
rng = random.Random(src)
def ip(payload, s_, d):
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 64, 47, 0,
                       socket.inet_aton(s_), socket.inet_aton(d)) + payload
packets = []
for n in range(64):
    if n % 2:
        inner = ip(struct.pack("!HH", 0, 0) + rng.randbytes(8), dst, src)
        packets.append(ip(struct.pack("!HH", 0, 0) + inner, src, dst))
    else:
        packets.append(ip(struct.pack("!HH", 0, 0) + rng.randbytes(rng.randrange(4, 64)), src, dst))
class iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
class msghdr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32), ("iov", ctypes.POINTER(iovec)),
                ("iovlen", ctypes.c_size_t), ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                ("flags", ctypes.c_int)]
class mmsghdr(ctypes.Structure):
    _fields_ = [("hdr", msghdr), ("len", ctypes.c_uint)]
BATCH = 256
address = ctypes.create_string_buffer(struct.pack("=H", socket.AF_INET) + bytes(2) + socket.inet_aton(dst) + bytes(8))
buffers = [ctypes.create_string_buffer(p, len(p)) for p in packets]
iovs = (iovec * BATCH)()
msgs = (mmsghdr * BATCH)()
for i in range(BATCH):
    b = buffers[i % len(buffers)]
    iovs[i].base, iovs[i].len = ctypes.addressof(b), len(b)
    msgs[i].hdr.name, msgs[i].hdr.namelen = ctypes.addressof(address), 16
    msgs[i].hdr.iov, msgs[i].hdr.iovlen = ctypes.pointer(iovs[i]), 1
libc = ctypes.CDLL(None, use_errno=True)
print("go", flush=True)
sent = errors = 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    n = libc.sendmmsg(s.fileno(), msgs, BATCH, 0)
    if n > 0:
        sent += n
    else:
        errors += 1
print(f"sent {sent} errors {errors}", flush=True)
"""


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
    # Run once it converged, before anything else is looked at: checks of what must not have happened meanwhile
    # (a tunnel recreated), and the fault's own end (a squatter killed). Each may raise Broken.
    after: list[Callable[[], None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.injected = self.started  # `started` may move on to the part whose convergence is measured


# --- the soak ----------------------------------------------------------------------------------------------------

class Soak:
    def __init__(self, lab: Lab, seed: int, *, nft: bool, bound: float, restart_bound: float, slack: float,
                 ipsec: bool = False, flood_seconds: float = FLOOD_SECONDS, out: Callable[[str], None] = print) -> None:
        self.rng = random.Random(seed)
        self.seed = seed
        self.nft = nft
        self.flood_seconds = flood_seconds
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
        # X: another box on the underlay, whose only part is the GRE flood (from its own and from B's address).
        self.x = self.topo.add_router("x", f"{FLOOD_SOURCE}")
        for host in (self.a, self.topo.b, self.c, self.x):
            host.run("sysctl", "-q", "-w", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0")
        self._foreign_objects()
        self.foreign = ""  # taken once greupd runs and IPv6 link-local addresses have settled
        # charon's start, like greupd's, takes minutes in the qemu guest under load.
        self.ipsec = (IpsecSetup.start(self.a, self.topo.b, Path(_scratch()), timeout=max(30.0, restart_bound))
                      if ipsec else None)
        self.cleartext: CleartextWatch | None = None
        self.variant = 0
        self.config = a_config(0, nft, self.ipsec)
        self.running_config: Config = load_config_text(self.config.text)
        # How to put right what a fault left broken on disk (None: nothing is), for the next fault or the end.
        self.disk_repair: Callable[[], None] | None = None
        self.expect_fallback = False  # restarted while the file on disk was broken
        self.foreign_links: set[str] = set()
        self.daemon = SoakDaemon(self.a, self.config, name="greupd-soak")
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
        if kind == "xfrm-flush":
            return self.ipsec is not None
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
        flushed = self.a.ip("addr", "flush", "dev", name, "scope", "global", check=False)
        # ip gives up ("Flush remains incomplete after 10 rounds", status 255) when greupd puts the address back
        # between its rounds: the repair won the race, which is what the fault checks next anyway.
        if flushed.returncode != 0 and "Flush remains incomplete" not in flushed.stderr:
            raise Broken(f"ip addr flush dev {name}: {flushed.stderr.strip()}")
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
        self.expect_fallback = self.disk_repair is not None
        self.daemon.start(wait=False)

    def broken_on_disk(self, repair: Callable[[], None]) -> None:
        """A fault left the config broken on disk; `repair` is how the admin puts it right."""
        self.disk_repair = repair
        self.expect_fallback = False  # status now names this rejection, not the start's

    def repair_disk(self) -> None:
        if self.disk_repair is not None:
            self.disk_repair()
            self.disk_repair = None

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
        config = a_config(self.variant, self.nft, self.ipsec)
        by_signal = self.rng.random() < 0.5
        fault = Fault("reload-valid", f"config variant {self.variant} by {'SIGHUP' if by_signal else 'reload'}",
                      time.monotonic())
        generation = self._generation()
        self.repair_disk()
        self.daemon.write(config)
        self.config, self.running_config = config, load_config_text(config.text)
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
        self.repair_disk()
        self.daemon.config_path.write_text(self.config.main + "\n" + BROKEN_TUNNEL)
        self.broken_on_disk(lambda: self.daemon.write(self.config))
        result = request(self.daemon.socket, "reload")
        if result["ok"] or "remtoe" not in (result["error"] or "") or "tunnels.toml:" not in (result["error"] or ""):
            raise Broken(f"the broken config's reload answered {result}")
        if self._generation() != generation:
            raise Broken("a rejected reload changed the generation")
        if self.rng.random() < 0.5:
            fault.detail += "; the file fixed again"
            self.repair_disk()
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

    # --- the faults of issue #21 (round 3) ---

    def _status(self, timeout: float = 5.0) -> dict[str, Any]:
        try:
            return dict(request(self.daemon.socket, "status", timeout=timeout))
        except ControlUnavailable as exc:
            proc = self.daemon.proc
            with contextlib.suppress(subprocess.TimeoutExpired):
                if proc is not None and proc.wait(1) is not None:
                    raise Broken(f"greupd exited with status {proc.returncode}") from None
            raise Broken(f"greupd's status unanswered within {timeout:g}s: {exc}") from None

    def _link_indexes(self) -> dict[str, int]:
        """A's tunnel links that are greupd's now (not a foreign link holding a name), with their ifindex."""
        indexes = {}
        for name in self.tunnels():
            shown = self.a.ip("-o", "link", "show", name, check=False)
            if name not in self.foreign_links and shown.returncode == 0:
                indexes[name] = int(shown.stdout.split(":", 1)[0])
        return indexes

    def _kept(self, before: dict[str, int]) -> Callable[[], None]:
        """A check that none of the links in `before` was deleted (or deleted and made anew) meanwhile."""
        def check() -> None:
            now = self._link_indexes()
            lost = sorted(name for name, index in before.items() if now.get(name) != index)
            if lost:
                raise Broken(f"tunnel links deleted (or deleted and made anew) by a config that was not read: "
                             f"{', '.join(lost)}")
        return check

    def _reload_rejected(self, by_signal: bool, generation: int, names: str) -> str:
        """Ask for a reload of the broken config on disk (SIGHUP or the control socket's `reload`); it must be
        rejected with an error that names `names`, leave the generation as it was and the daemon running."""
        self.expect_fallback = False  # status now names this rejection, not the start's (seed 20261206, fault 30)
        if by_signal:
            seen = len(self.daemon.output())
            self.daemon.signal(signal.SIGHUP)
            deadline = time.monotonic() + self.bound
            while names not in self.daemon.output()[seen:]:
                if self.daemon.proc is not None and self.daemon.proc.poll() is not None:
                    raise Broken(f"greupd exited with status {self.daemon.proc.returncode} after the SIGHUP")
                if (now := self._status()["generation"]) != generation:
                    raise Broken(f"the SIGHUP applied what was on disk (generation {generation} -> {now}) instead "
                                 f"of rejecting it naming {names}")
                if time.monotonic() > deadline:
                    raise Broken(f"no rejection naming {names} logged {self.bound:g}s after the SIGHUP")
                time.sleep(0.1)
            error = self._status()["last_error"] or ""
            if names not in error:
                raise Broken(f"status' last_error does not name {names} after the SIGHUP: {error!r}")
        else:
            try:
                result = request(self.daemon.socket, "reload", timeout=self.bound)
            except ControlUnavailable as exc:
                raise Broken(f"the reload went unanswered for {self.bound:g}s: {exc}") from None
            error = result["error"] or ""
            if result["ok"] or names not in error:
                raise Broken(f"the reload answered {result}, not a rejection naming {names}")
        if self._generation() != generation:
            raise Broken("a rejected reload changed the generation")
        return error

    def fault_dropin_unreadable(self) -> Fault:
        """tunnels.d unreadable to greupd (mode 000; it runs without CAP_DAC_*, as the unit's user would be
        refused a 0700 root directory), then a reload: rejected, naming tunnels.d; to_c (a drop-in's) kept."""
        self.repair_disk()
        by_signal = self.rng.random() < 0.5
        dropins = self.daemon.dropins
        fault = Fault("dropin-unreadable", f"tunnels.d chmod 000, then {'SIGHUP' if by_signal else 'reload'}",
                      time.monotonic())
        before = self._link_indexes()
        generation = self._generation()
        dropins.chmod(0)
        self.broken_on_disk(lambda: dropins.chmod(0o755))
        self._reload_rejected(by_signal, generation, "tunnels.d")
        fault.after.append(self._kept(before))
        if self.rng.random() < 0.5:
            fault.detail += "; made readable again"
            self.repair_disk()
        else:
            fault.detail += "; left unreadable"
        return fault

    def _keepalives_received(self) -> dict[str, int]:
        """Replies counted so far by each tunnel with keepalives whose peer lives."""
        return {t["name"]: t["keepalive"]["received"] for t in self._status()["tunnels"]
                if t["keepalive"] is not None and self.alive().get(t["name"], False)
                and t["name"] not in self.foreign_links}

    def fault_config_fifo(self) -> Fault:
        """tunnels.toml replaced by a FIFO that nobody writes, then a reload: the loop must not block on it (status
        answers, keepalives go on), and the reload is rejected naming the file."""
        self.repair_disk()
        by_signal = self.rng.random() < 0.5
        path = self.daemon.config_path
        fault = Fault("config-fifo", f"tunnels.toml replaced by a FIFO, then {'SIGHUP' if by_signal else 'reload'}",
                      time.monotonic())
        generation = self._generation()
        received = self._keepalives_received()
        path.unlink()
        os.mkfifo(path)
        try:
            self._reload_rejected(by_signal, generation, "tunnels.toml")
            deadline = time.monotonic() + FIFO_SECONDS
            while time.monotonic() < deadline:
                self._status(timeout=FIFO_ANSWER)
                time.sleep(0.2)
            now = self._keepalives_received()
            stalled = sorted(name for name, count in received.items() if now.get(name, count) <= count)
            if stalled:
                raise Broken(f"no keepalive reply counted in {FIFO_SECONDS:g}s with tunnels.toml a FIFO: "
                             f"{', '.join(stalled)}")
        finally:
            self._unblock(path)
            path.unlink()
            path.write_text(self.config.main)
        return fault

    def _unblock(self, fifo: Path) -> None:
        """A reader stuck in open() on the FIFO (the loop, if it blocks) gets the config it expected, so that a
        broken soak still ends cleanly."""
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: nobody has it open for reading
            return
        with contextlib.suppress(OSError):
            os.write(fd, self.config.main.encode())
        os.close(fd)

    def fault_config_nested(self) -> Fault:
        """An array nested NESTED_DEPTH deep in tunnels.toml (tomllib's recursion), a reload: rejected naming the
        file, everything kept; then a restart (`systemctl restart`): the last good config runs."""
        self.repair_disk()
        by_signal = self.rng.random() < 0.5
        fault = Fault("config-nested", f"an array nested {NESTED_DEPTH} deep in tunnels.toml, "
                                       f"{'SIGHUP' if by_signal else 'reload'}, then a restart", time.monotonic(),
                      restart=True)
        before = self._link_indexes()
        generation = self._generation()
        self.daemon.config_path.write_text(self.config.main + "\n" + NESTED_TUNNEL)
        self.broken_on_disk(lambda: self.daemon.write(self.config))
        self._reload_rejected(by_signal, generation, "tunnels.toml")
        took = self.converge(fault, bound=self.bound)  # still running and managing, with the old config
        self._kept(before)()
        self.figures["config-nested"].note_max("worst seconds to hold after the reload", took)
        self.daemon.stop()  # SIGTERM: on_exit = "keep" leaves everything in place
        self._restart()  # and status must say it runs the last good config
        fault.started = time.monotonic()
        fault.detail += "; left on disk"
        return fault

    def fault_lock_squat(self) -> Fault:
        """greupd stopped (a restart, an upgrade), and before it starts again a process of another user binds its
        netns lock (the abstract name control.NETNS_LOCK): greupd must start all the same."""
        fault = Fault("lock-squat", f"greupd stopped, uid {SQUATTER_UID} binds its netns lock, greupd started",
                      time.monotonic(), restart=True)
        self.daemon.stop()
        squatter = self.a.popen("setpriv", f"--reuid={SQUATTER_UID}", f"--regid={SQUATTER_UID}", "--clear-groups",
                                sys.executable, "-c", SQUAT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)

        def end() -> None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(squatter.pid, signal.SIGKILL)
            squatter.wait(10)

        fault.after.append(end)
        assert squatter.stdout is not None
        said = squatter.stdout.readline().strip()
        if said != "bound":
            end()
            raise Broken(f"the squatter could not take the lock (a soak problem, not greupd's): {said!r}")
        self._restart()
        return fault

    def fault_gre_flood(self) -> Fault:
        """Junk GRE to A at the highest rate X reaches, from X's own address (no tunnel has it) and spoofed from
        B's, for --flood-seconds: no tunnel whose peer lives may go down meanwhile."""
        fault = Fault("gre-flood", f"junk GRE to A from {FLOOD_SOURCE} and spoofed from {FLOOD_SPOOFED} for "
                                   f"{self.flood_seconds:g}s", time.monotonic())
        before = {t["name"]: t for t in self._status()["tunnels"]}
        watched = sorted(name for name, t in before.items()
                         if t["keepalive"] is not None and self.alive().get(name, False)
                         and name not in self.foreign_links)
        received, dropped = self.wan_rx_packets(), self.gre_socket_drops()
        # Niced: in the guest the flood shares A's CPU, which a real attacker's host would not; greupd gets the
        # CPU first and the flood what is left.
        flooders = [self.x.popen("nice", "-n", "10", sys.executable, "-c", FLOOD, source, "172.19.1.1",
                                 str(self.flood_seconds), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                    for source in (FLOOD_SOURCE, FLOOD_SPOOFED)]
        try:
            for flooder in flooders:
                assert flooder.stdout is not None
                said = flooder.stdout.readline().strip()
                if said != "go":
                    raise Broken(f"a flooder did not start (a soak problem, not greupd's): {said!r}")
            began, began_wall = time.monotonic(), time.time()
            fault.started = began
            # What a flood does to the links themselves (queues full) is the flood's, not greupd's.
            fault.loss_allowed.append((began, began + self.flood_seconds + 2 * IN_FLIGHT))
            while any(f.poll() is None for f in flooders):
                for t in self._status()["tunnels"]:
                    if t["name"] in watched and t["state"] != "up":
                        raise Broken(f"{t['name']} {t['state']} ({t['reason']}) during the flood, its peer alive")
                time.sleep(0.1)
            said = " ".join((f.stdout.read() if f.stdout else "") for f in flooders)
            fault.started = time.monotonic()  # convergence counts from the flood's end
        finally:
            for flooder in flooders:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(flooder.pid, signal.SIGKILL)
                flooder.wait(10)
        sent = sum(int(n) for n in re.findall(r"sent (\d+)", said))
        received, dropped = self.wan_rx_packets() - received, self.gre_socket_drops() - dropped
        figures = self.figures["gre-flood"]
        figures.note_max("most packets per second sent", sent / self.flood_seconds)
        figures.note_max("most packets per second reaching A", received / self.flood_seconds)
        figures.note_max("most dropped at greupd's GRE socket", dropped)
        for name in watched:
            if self.daemon.logged_at(rf"tunnel {name} down: ", after=began_wall) is not None:
                raise Broken(f"{name} went down during the flood, its peer alive (greupd's log)")
        after = {t["name"]: t for t in self._status()["tunnels"]}
        flapped = [name for name in watched if after[name]["state_changes"] != before[name]["state_changes"]]
        if flapped:
            raise Broken(f"state changes during the flood, their peers alive: {', '.join(flapped)}")
        fault.detail += (f" ({sent / self.flood_seconds:.0f} packets/s sent, {received / self.flood_seconds:.0f}/s "
                         f"reached A, {dropped} dropped at greupd's GRE socket)")
        return fault

    def wan_rx_packets(self) -> int:
        shown = self.a.ip("-s", "link", "show", "wan0").stdout
        match = re.search(r"RX:.*\n\s+\d+\s+(\d+)", shown)
        assert match, shown
        return int(match.group(1))

    def gre_socket_drops(self) -> int:
        """What the kernel dropped at greupd's raw GRE sockets (/proc/PID/net/raw, protocol 47, column drops):
        a full receive buffer, where a flood would make real keepalive replies go missing (review M6)."""
        assert self.daemon.proc is not None
        rows = Path(f"/proc/{self.daemon.proc.pid}/net/raw").read_text().splitlines()[1:]
        return sum(int(row.split()[-1]) for row in rows if row.split()[1].upper().endswith(":002F"))

    def fault_xfrm_flush(self) -> Fault:
        """`ip xfrm state flush` and `ip xfrm policy flush` on A behind charon's back (to_b runs over IPsec):
        protection back within XFRM_BOUND, and not one GRE packet between A and B in the clear (CleartextWatch)."""
        deadline = time.monotonic() + self.bound
        while (missing := protected(self.a)) is not None:  # as it should be before the flush
            if time.monotonic() > deadline:
                raise Broken(f"to_b not protected before the flush: {missing}")
            time.sleep(0.1)
        fault = Fault("xfrm-flush", "ip xfrm state flush; ip xfrm policy flush (behind charon's back)",
                      time.monotonic())
        if self.carrier() == "to_b":  # require = true drops to_b's traffic until its SAs are back
            fault.loss_allowed.append((fault.started, None))
        self.a.ip("xfrm", "state", "flush")
        self.a.ip("xfrm", "policy", "flush")
        flushed = looked = time.monotonic()
        while (missing := protected(self.a)) is not None:
            # The look itself takes time (two `ip` runs, tenths of a second in a guest): a look that began
            # within the bound and found it back counts as back within the bound.
            if time.monotonic() - flushed > XFRM_BOUND:
                raise Broken(f"protection not back {XFRM_BOUND:g}s after the flush: {missing}")
            time.sleep(0.05)
            looked = time.monotonic()
        self.figures["xfrm-flush"].note_max("worst seconds to protection (at most)", time.monotonic() - flushed)
        if looked - flushed > XFRM_BOUND:
            raise Broken(f"protection back only {looked - flushed:.2f}s after the flush, bound {XFRM_BOUND:g}s")
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
        if self.ipsec is not None:
            # From greupd's start on, not one GRE packet between A and B may cross the underlay unprotected.
            self.cleartext = CleartextWatch(self.a, self.topo.b)
        self.daemon.start(wait=False)
        start = Fault("start", "greupd run", time.monotonic(), restart=True)
        seconds = self.converge(start)
        if self.ipsec is not None:  # and to_b's SAs negotiated (on its first keepalive), to_b up through them
            while (missing := protected(self.a)) is not None:
                if time.monotonic() - start.started > self.restart_bound:
                    raise Broken(f"to_b not protected {self.restart_bound:g}s after greupd's start: {missing}")
                time.sleep(0.1)
            seconds = self.converge(start)
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
        self.check_cleartext("at the end")

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
        try:
            for check in fault.after:
                check()
        except (Broken, ControlUnavailable, ControlError, LabCommandError) as exc:
            raise Broken(f"fault #{self.faults} {kind} ({fault.detail}): {exc}") from None
        self.check_cleartext(f"fault #{self.faults} {kind} ({fault.detail})")
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

    def check_cleartext(self, where: str) -> None:
        if self.cleartext is not None and self.cleartext.seen:
            when, way = self.cleartext.seen[0]
            after = [f for f in self.history if f.injected <= when]
            at = (f"{when - after[-1].injected:.2f}s after fault #{after[-1].number} {after[-1].kind}" if after
                  else "before the first fault (greupd's start)")
            raise Broken(f"{where}: {len(self.cleartext.seen)} GRE packets in the clear between A and B on the "
                         f"underlay, the first {way} {at}")

    def final_plan(self) -> None:
        self.repair_disk()  # the admin fixes the file first: `greupd plan` rightly refuses a broken one
        # The CLI starts as slowly as the daemon (imports): in the qemu guest under load that took 250-490 s.
        limit = max(300.0, self.restart_bound)
        try:
            result = self.daemon.cli("plan", timeout=limit)
        except subprocess.TimeoutExpired:
            raise Broken(f"`greupd plan` at the end did not finish within {limit:g}s") from None
        if result.returncode != 0 or "# kernel\nnothing to change\n" not in result.stdout:
            raise Broken(f"`greupd plan` at the end: exit {result.returncode}\n{result.stdout}{result.stderr}")

    def ipsec_evidence(self) -> None:
        """After a break with IPsec: both charons' last lines and A's and B's xfrm state, for whoever reads it."""
        if self.ipsec is None:
            return
        for name, charon in (("A", self.ipsec.charon_a), ("B", self.ipsec.charon_b)):
            self.out(f"--- charon in {name} (last 30 lines):")
            self.out("\n".join(charon.output().splitlines()[-30:]))
        for name, host in (("A", self.a), ("B", self.topo.b)):
            with contextlib.suppress(LabCommandError, subprocess.TimeoutExpired):
                self.out(f"--- ip xfrm state / policy in {name}:")
                self.out(host.ip("xfrm", "state").stdout + host.ip("xfrm", "policy").stdout)

    def close(self) -> None:
        if self.pinger is not None:
            self.pinger.stop()
        if self.cleartext is not None:
            self.cleartext.stop()
        if self.daemon.proc is not None and self.daemon.proc.poll() is None:
            self.daemon.signal(signal.SIGCONT)
            self.daemon.stop()
        self.kernel.close()
        if self.ipsec is not None:
            self.ipsec.stop()

    def report(self, duration: float, broken: str | None) -> dict[str, Any]:
        sent, replied = self.pinger.count() if self.pinger else (0, 0)
        kinds = {kind: {"injected": f.injected, "converged": f.converged, "worst_seconds": round(f.worst_seconds, 2),
                        "mean_seconds": round(f.total_seconds / f.converged, 2) if f.converged else None,
                        "pings_lost": f.pings_lost, **f.notes}
                 for kind, f in self.figures.items() if f.injected or kind in ("nft-flush", "xfrm-flush")}
        converged = [f for f in self.figures.values() if f.converged]
        return {"seed": self.seed, "duration_asked": duration, "ran_seconds": round(time.monotonic() - self.started, 1),
                "kernel": os.uname().release, "guest": os.environ.get("GREUPD_LAB_GUEST", "none"),
                "nft_inet": self.nft, "ipsec": self.ipsec is not None, "code": code_version(),
                "daemon": f"root without {', '.join('CAP_' + c.upper() for c in DROPPED_CAPS)}",
                "cleartext_gre_packets": len(self.cleartext.seen) if self.cleartext else None,
                "esp_packets": self.cleartext.esp if self.cleartext else None,
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
             f"{'kind':<18}{'injected':>9}{'converged':>10}{'worst s':>9}{'mean s':>8}{'pings lost':>11}  notes"]
    for kind, f in report["kinds"].items():
        notes = ", ".join(f"{k} {v}" for k, v in f.items()
                          if k not in ("injected", "converged", "worst_seconds", "mean_seconds", "pings_lost"))
        if kind == "nft-flush" and not report["nft_inet"]:
            notes = "skipped: this kernel's nftables lacks the inet family"
        if kind == "xfrm-flush" and not report["ipsec"]:
            notes = "skipped: no IPsec in this run (needs nftables inet and charon: the qemu guest)"
        lines.append(f"{kind:<18}{f['injected']:>9}{f['converged']:>10}{f['worst_seconds']:>9}"
                     f"{f['mean_seconds'] if f['mean_seconds'] is not None else '-':>8}{f['pings_lost']:>11}  {notes}")
    lines.append(f"invariants: {'BROKEN: ' + report['broken'] if report['broken'] else 'all held'}")
    lines.append(f"replay: {replay}")
    return "\n".join(lines)


def code_version() -> str:
    """The commit the soak ran (and whether the checkout had changes), for the record."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True,
                              text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        head = ""
    return head or "unknown"


def nft_inet_available() -> bool:
    from lab.kernel import capabilities

    return "nft_gre" in capabilities()


def ipsec_wanted(mode: str, nft: bool) -> bool:
    """IPsec on to_b: "auto" where it can be what greupd promises (nftables inet for the require table, charon
    installed: the qemu guest), "on" anyway (in UML: to try the setup; no table drops cleartext there)."""
    if mode == "off":
        return False
    if mode == "on":
        return True
    return nft and charon_available() is None


def run_soak(duration: float, seed: int, *, kinds: list[str] | None = None, each_once: bool = False,
             bound: float = 15.0, restart_bound: float = 120.0, slack: float = 1.5, ipsec: str = "auto",
             flood_seconds: float = FLOOD_SECONDS, out: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the soak in lab namespaces of the running kernel (which must have ip_gre); the figures as a dict."""
    nft = nft_inet_available()
    with_ipsec = ipsec_wanted(ipsec, nft)
    chosen = [k for k in (kinds or list(KINDS))
              if (k != "nft-flush" or nft) and (k != "xfrm-flush" or with_ipsec)]
    skipped = sorted(set(kinds or KINDS) - set(chosen))
    if skipped:
        out(f"soak: skipped here: {', '.join(skipped)} (nftables inet: {'yes' if nft else 'no'}, "
            f"IPsec: {'yes' if with_ipsec else 'no'})")
    if not chosen:
        raise SystemExit("soak: none of the faults asked for can run on this kernel")
    with Lab("-soak") as lab:
        soak = Soak(lab, seed, nft=nft, bound=bound, restart_bound=restart_bound, slack=slack, ipsec=with_ipsec,
                    flood_seconds=flood_seconds, out=out)
        broken: str | None = None
        try:
            soak.run(duration, chosen, each_once)
        except Broken as exc:
            broken = str(exc)
            out(f"BROKEN: {broken}\n--- greupd's output (last 60 lines):")
            out("\n".join(soak.daemon.output().splitlines()[-60:]))
            soak.ipsec_evidence()
        finally:
            report = soak.report(duration, broken)
            soak.close()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=300, help="seconds of faults (default 300)")
    parser.add_argument("--minutes", type=float, default=None, help="minutes of faults (instead of --duration)")
    parser.add_argument("--seed", type=int, default=None, help="replay a run (default: a random seed, printed)")
    parser.add_argument("--each-once", action="store_true", help="every fault kind once, in seeded order")
    parser.add_argument("--faults", default=None,
                        help=f"comma-separated kinds (default all: {','.join(KINDS)}); `classic` stands for "
                             f"{','.join(CLASSIC_KINDS)}, `round3` for {','.join(ROUND3_KINDS)}")
    parser.add_argument("--bound", type=float, default=15.0, help="seconds to converge after a fault (15)")
    parser.add_argument("--restart-bound", type=float, default=120.0,
                        help="seconds to converge after a restart, import time included (120)")
    parser.add_argument("--slack", type=float, default=1.5,
                        help="seconds beyond (retries+1) x interval for detecting a dead peer (1.5)")
    parser.add_argument("--ipsec", choices=("auto", "on", "off"), default="auto",
                        help="to_b over IPsec, which the xfrm-flush fault needs (auto: where nftables has the inet "
                             "family and charon is installed, i.e. the qemu guest)")
    parser.add_argument("--flood-seconds", type=float, default=FLOOD_SECONDS,
                        help=f"how long each GRE flood lasts ({FLOOD_SECONDS:g})")
    parser.add_argument("--json", type=Path, default=None,
                        help="also write the figures to this file (they are printed as one `soak-json:` line too)")
    args = parser.parse_args(argv)
    duration = args.minutes * 60 if args.minutes is not None else args.duration
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    groups = {"classic": list(CLASSIC_KINDS), "round3": list(ROUND3_KINDS)}
    kinds = [k for name in args.faults.split(",") for k in groups.get(name, [name])] if args.faults else None
    unknown = set(kinds or ()) - set(KINDS)
    if unknown:
        parser.error(f"unknown fault kinds: {', '.join(sorted(unknown))}")
    print(f"soak: seed {seed}, {duration:g}s", flush=True)
    report = run_soak(duration, seed, kinds=kinds, each_once=args.each_once, bound=args.bound,
                      restart_bound=args.restart_bound, slack=args.slack, ipsec=args.ipsec,
                      flood_seconds=args.flood_seconds, out=lambda s: print(s, flush=True))
    replay = (f"python -m lab.soak --duration {duration:g} --seed {seed}"
              + (" --each-once" if args.each_once else "") + (f" --faults {args.faults}" if args.faults else "")
              + f" --bound {args.bound:g} --restart-bound {args.restart_bound:g} --slack {args.slack:g}"
              + f" --ipsec {args.ipsec} --flood-seconds {args.flood_seconds:g}")
    print(format_report(report, replay), flush=True)
    record = {**report, "replay": replay}
    # One line, so that whoever captured the output (make soak, from any guest) has the figures as JSON.
    print("soak-json: " + json.dumps(record), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 1 if report["broken"] else 0


if __name__ == "__main__":
    sys.exit(main())
