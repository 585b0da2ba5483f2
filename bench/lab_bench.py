"""The benchmark driver: runs inside a lab guest (it needs ip_gre), builds netns hosts, measures, writes JSON.

    python -m bench.lab_bench --suite systemd|uml [--quick] [--out FILE]

Suite "systemd" (the uml-systemd guest, systemd as PID 1): cold convergence of greupd, `ip -batch` and
systemd-networkd, interleaved trial by trial in one boot so that their ratios share the machine's mood; and
what networkd does about drift. Suite "uml" (plain UML guest): start-up, reload, drift repair, dead-peer
detection, keepalive cost, idle wake-ups, and cProfile summaries of the slow paths.

Times are CLOCK_MONOTONIC in this process: a daemon's READY=1 is stamped when its datagram is read; kernel
changes when their rtnetlink notification is read (bench/nl.py). Raw samples go to the JSON; bench/render.py
turns them into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import nl, scenario
from bench.greupd_timed import PROFILE_SAVE, PROFILE_START
from bench.record import results_file
from greupd.control import request
from lab.greupd_process import GreupdProcess
from lab.hosts import Host, Lab

REPO = Path(__file__).resolve().parent.parent
PROTO_GREUPD = 222
PROTO_STATIC = 4  # systemd-networkd's [Route]s
CLK_TCK = os.sysconf("SC_CLK_TCK")
NETWORKD_DIR = Path("/etc/systemd/network")

Json = dict[str, Any]


def log(*parts: object) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *parts, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class Sizes:
    convergence: tuple[int, ...]
    convergence_trials: dict[int, int]
    uml_convergence: int  # N of the plain UML guest's convergence (no systemd, no udev beside it)
    uml_convergence_trials: int
    networkd_trials: dict[int, int]  # networkd is much slower at large N: fewer trials, and a time limit
    networkd_timeout: float
    drift_small: int  # tunnels in the small config of the drift benchmark
    drift_trials: int
    drift_large_trials: int
    large: int  # the "1000 tunnels" of reload, drift and keepalive cost
    reload_trials: int
    dead_peer_tunnels: int
    dead_peer_trials: int
    window: float  # seconds over which CPU is measured
    startup_trials: int
    networkd_drift_wait: float


FULL = Sizes(convergence=(10, 100, 1000), convergence_trials={10: 5, 100: 5, 1000: 3}, uml_convergence=1000,
             uml_convergence_trials=3,
             networkd_trials={10: 5, 100: 3, 1000: 1}, networkd_timeout=600.0, drift_small=50, drift_trials=200,
             drift_large_trials=50, large=1000, reload_trials=10, dead_peer_tunnels=10, dead_peer_trials=50,
             window=30.0, startup_trials=3, networkd_drift_wait=10.0)
QUICK = Sizes(convergence=(10, 100), convergence_trials={10: 2, 100: 2}, uml_convergence=100,
              uml_convergence_trials=2, networkd_trials={10: 2, 100: 1},
              networkd_timeout=120.0, drift_small=20, drift_trials=20, drift_large_trials=10, large=100,
              reload_trials=3, dead_peer_tunnels=5, dead_peer_trials=10, window=5.0, startup_trials=1,
              networkd_drift_wait=3.0)


# --------------------------------------------------------------------------- helpers


class Notify:
    """An sd_notify socket of our own, read by a thread: each datagram is stamped with the time it was read.

    Read all the time, not only while waiting: greupd sends STATUS= after every reconcile pass with a blocking
    send, and a datagram queue left full (net.unix.max_dgram_qlen, 10 by default) would freeze its loop.
    """

    def __init__(self, path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[tuple[float, str]] = []
        self.watchdog: list[float] = []
        self.count = 0
        self._arrived = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="notify", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            at = time.monotonic()
            with self._arrived:
                self.count += 1
                if data.startswith(b"WATCHDOG=1"):
                    self.watchdog.append(at)  # their gaps show how long the loop was stuck (a ping every W/2)
                elif not data.startswith(b"STATUS="):  # keep what is waited for, not the chatter
                    self.messages.append((at, data.decode(errors="replace")))
                self._arrived.notify_all()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def wait(self, prefix: str, timeout: float, alive: Callable[[], bool] = lambda: True) -> tuple[float, str]:
        """The first message (old or new) with a line starting with `prefix`; consumed."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            while True:
                for i, (at, text) in enumerate(self.messages):
                    for line in text.splitlines():
                        if line.startswith(prefix):
                            del self.messages[i]
                            return at, line[len(prefix):]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {prefix!r} on the notify socket within {timeout} s")
                if not alive():
                    raise RuntimeError(f"the process died before {prefix!r}")
                self._arrived.wait(min(left, 0.5))


class Daemon(GreupdProcess):
    """greupd run (via bench.greupd_timed) in a lab host, with our notify socket and optional watchdog."""

    def __init__(self, host: Host, config: str, *, watchdog_usec: int | None = None,
                 profile_dir: Path | None = None, profile_from_start: bool = False) -> None:
        super().__init__(host, config)
        self.notify = Notify(Path(tempfile.mkdtemp(prefix="bench-", dir="/run")) / "notify.sock")
        self.watchdog_usec = watchdog_usec
        self.profile_dir = profile_dir
        self.profile_from_start = profile_from_start
        self.spawned_at = 0.0
        self.stop_refused = False

    @property
    def env(self) -> dict[str, str]:
        env = super().env
        env["NOTIFY_SOCKET"] = str(self.notify.path)
        env["GREUPD_LOG_LEVEL"] = "WARNING"  # 1000 "tunnel up" lines would be part of what we time
        if self.watchdog_usec:
            env["WATCHDOG_USEC"] = str(self.watchdog_usec)
        if self.profile_dir is not None:
            env["BENCH_PROFILE_DIR"] = str(self.profile_dir)
            if self.profile_from_start:
                env["BENCH_PROFILE_FROM_START"] = "1"
        return env

    def start(self, wait: bool = True, timeout: float = 900) -> Daemon:
        out = self.log.open("ab")
        self.spawned_at = time.monotonic()
        self.proc = self.host.popen(sys.executable, "-m", "bench.greupd_timed", stdout=out,
                                    stderr=subprocess.STDOUT, env=self.env, cwd=str(REPO))
        if wait:
            imported, ready = self.wait_for_ready(timeout)
            log(f"greupd in {self.host.name}: imports done after {imported:.2f} s, READY after {ready:.2f} s")
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_for_ready(self, timeout: float = 900) -> tuple[float, float]:
        """(seconds from spawn to imports done, seconds from spawn to READY=1)."""
        try:
            _, imported = self.notify.wait("BENCH_IMPORTED=", timeout, self.alive)
            ready_at, _ = self.notify.wait("READY=1", timeout, self.alive)
        except (TimeoutError, RuntimeError) as exc:
            raise RuntimeError(f"{exc}\n{self.output()[-3000:]}") from None
        return float(imported) - self.spawned_at, ready_at - self.spawned_at

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def usage(self) -> Usage:
        return Usage.of(self.pid)

    def save_profile(self) -> str:
        """Stop the sampling profiler (bench.greupd_timed) and return its summary."""
        self.signal(PROFILE_SAVE)
        start = time.monotonic()
        _, number = self.notify.wait("BENCH_PROFILE_SAVED=", 300, self.alive)
        log(f"profile saved in {time.monotonic() - start:.1f} s")
        assert self.profile_dir is not None
        return (self.profile_dir / f"profile-{number}.txt").read_text()

    def close(self) -> None:
        """SIGTERM, as systemd stops it; a daemon that has not exited 120 s later is killed, and noted."""
        if self.alive():
            try:
                self.stop(timeout=120)
            except subprocess.TimeoutExpired:
                log(f"greupd in {self.host.name} ignored SIGTERM for 120 s: killed")
                self.stop_refused = True
                self.kill()
        self.notify.close()


@dataclass(frozen=True)
class Usage:
    """What /proc says about a process (and its threads) at one moment."""

    at: float
    cpu: float  # user + system seconds
    rss_kb: int
    hwm_kb: int
    voluntary: int  # context switches: a process blocked in epoll that wakes up adds one
    involuntary: int
    threads: int

    @staticmethod
    def of(pid: int) -> Usage:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
        status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                      if ":" in line)
        voluntary = involuntary = threads = 0
        for task in Path(f"/proc/{pid}/task").iterdir():
            task_status = (task / "status").read_text()
            voluntary += int(re.search(r"^voluntary_ctxt_switches:\s*(\d+)", task_status, re.M)[1])  # type: ignore[index]
            involuntary += int(re.search(r"^nonvoluntary_ctxt_switches:\s*(\d+)", task_status, re.M)[1])  # type: ignore[index]
            threads += 1
        return Usage(time.monotonic(), cpu, int(status["VmRSS"].split()[0]), int(status["VmHWM"].split()[0]),
                     voluntary, involuntary, threads)


def window_usage(daemon: Daemon, seconds: float) -> Json:
    """CPU share of one core, wake-ups and memory of the daemon over `seconds` of doing nothing but its job."""
    before = daemon.usage()
    time.sleep(seconds)
    after = daemon.usage()
    elapsed = after.at - before.at
    return {"seconds": elapsed, "cpu_percent": 100 * (after.cpu - before.cpu) / elapsed,
            "cpu_seconds": after.cpu - before.cpu,
            "wakeups_per_s": (after.voluntary - before.voluntary) / elapsed,
            "involuntary_per_s": (after.involuntary - before.involuntary) / elapsed,
            "rss_mb": after.rss_kb / 1024, "hwm_mb": after.hwm_kb / 1024, "threads": after.threads}


def underlay_host(lab: Lab, name: str) -> Host:
    """A host with LOCAL on a dummy underlay: enough for tunnels whose far end is not needed."""
    host = lab.host(name)
    host.ip_batch("link add wan0 type dummy", f"addr add {scenario.LOCAL}/{scenario.UNDERLAY_PREFIX} dev wan0",
                  "link set wan0 up")
    return host


def peered_hosts(lab: Lab, count: int) -> tuple[Host, Host]:
    """A (LOCAL) and B (REMOTE) on a veth; B has the mirror of the first `count` tunnels and reflects
    keepalives with its kernel."""
    a, b = lab.host("a"), lab.host("b")
    lab.link(a, b, f"{scenario.LOCAL}/{scenario.UNDERLAY_PREFIX}", f"{scenario.REMOTE}/{scenario.UNDERLAY_PREFIX}")
    for key, value in (("net.ipv4.ip_forward", "1"), ("net.ipv4.conf.all.rp_filter", "0"),
                       ("net.ipv4.conf.default.rp_filter", "0"), ("net.ipv4.conf.all.accept_local", "1"),
                       ("net.ipv4.conf.default.accept_local", "1")):
        nl.write_sysctl(b.netns, key, value)
    ip_batch_file(b, scenario.peer_batch(count))
    return a, b


def ip_batch_file(host: Host, text: str) -> float:
    """Run `ip -n NS -batch FILE`; seconds from spawn to exit."""
    with tempfile.NamedTemporaryFile("w", suffix=".ip", dir="/run", delete=False) as f:
        f.write(text)
    try:
        start = time.monotonic()
        proc = subprocess.run(["ip", "-n", host.netns, "-batch", f.name], capture_output=True, text=True)
        took = time.monotonic() - start
    finally:
        os.unlink(f.name)
    if proc.returncode != 0:
        raise RuntimeError(f"ip -batch in {host.name}: {proc.stderr[-2000:]}")
    return took


def delete_tunnels(netns: str | None, count: int) -> None:
    """Remove the benchmark's tunnels synchronously (a netns delete would leave the kernel busy afterwards)."""
    argv = ["ip", *(["-n", netns] if netns else []), "-force", "-batch", "-"]
    subprocess.run(argv, input="".join(f"link del t{i}\n" for i in range(count)), capture_output=True, text=True)


def kernel_counts(netns: str, proto: int) -> Json:
    rtnl = nl.Rtnl(netns)
    try:
        links = [e for e in rtnl.dump(nl.RTM_GETLINK, socket.AF_UNSPEC) if (e.name or "").startswith("t")]
        addrs = [e for e in rtnl.dump(nl.RTM_GETADDR) if (e.address or "").startswith("100.")]
        routes = [e for e in rtnl.dump(nl.RTM_GETROUTE) if e.proto == proto]
    finally:
        rtnl.close()
    return {"links": len(links), "links_up": sum(e.up for e in links), "addresses": len(addrs), "routes": len(routes)}


# --------------------------------------------------------------------------- suite "systemd"


def _last_route(counter: nl.RouteCounter, spawned: float, timeout: float) -> float | None:
    """Seconds from spawn to the last route's notification (None if notifications were lost)."""
    last = counter.wait(timeout)
    counter.close()
    return None if last is None or counter.overruns else last - spawned


def converge_greupd(count: int) -> Json:
    with Lab("cv") as lab:
        host = underlay_host(lab, "a")
        daemon = Daemon(host, scenario.greupd_toml(count))
        counter = nl.RouteCounter(host.netns, PROTO_GREUPD, 2 * count)
        try:
            daemon.start(wait=False)
            imported, ready = daemon.wait_for_ready()
            last_route = _last_route(counter, daemon.spawned_at, 60)
            status = daemon.status()
            assert status is not None
            counts = kernel_counts(host.netns, PROTO_GREUPD)
            up = sum(t["state"] == "up" for t in status["tunnels"])
            rss = daemon.usage().rss_kb / 1024
        finally:
            counter.close()
            daemon.close()
        delete_tunnels(host.netns, count)
    if counts["routes"] != 2 * count or up != count:
        raise RuntimeError(f"greupd READY with {counts} and {up} tunnels up of {count}")
    return {"seconds": ready, "imported": imported, "requests": status["netlink_requests"], "last_route": last_route,
            "rss_mb": rss}


def converge_ip_batch(count: int) -> Json:
    with Lab("cv") as lab:
        host = underlay_host(lab, "a")
        counter = nl.RouteCounter(host.netns, 3, 2 * count)  # RTPROT_BOOT, what `ip route add` gives
        start = time.monotonic()
        try:
            took = ip_batch_file(host, scenario.ip_batch(count))
            last_route = _last_route(counter, start, 60)
        finally:
            counter.close()
        counts = kernel_counts(host.netns, 3)
        delete_tunnels(host.netns, count)
    if counts["routes"] != 2 * count:
        raise RuntimeError(f"ip -batch left {counts}")
    return {"seconds": took, "last_route": last_route}


class Networkd:
    """systemd-networkd of the guest (root netns), configured with the benchmark's .netdev/.network files."""

    def __init__(self) -> None:
        self.available = Path("/run/systemd/system").is_dir() and Path("/lib/systemd/systemd-networkd").exists()
        self.ns = "/proc/1/ns/net"  # the guest's root netns, where systemd runs networkd
        self.count = 0

    def setup(self) -> None:
        self._ip("link add wan0 type dummy", f"addr add {scenario.LOCAL}/{scenario.UNDERLAY_PREFIX} dev wan0",
                 "link set wan0 up")
        self._systemctl("stop", "systemd-networkd.socket", "systemd-networkd.service", check=False)

    def _ip(self, *commands: str) -> None:
        subprocess.run(["ip", "-force", "-batch", "-"], input="\n".join(commands) + "\n", text=True,
                       capture_output=True)

    def _systemctl(self, *argv: str, check: bool = True) -> None:
        proc = subprocess.run(["systemctl", *argv], capture_output=True, text=True)
        if check and proc.returncode != 0:
            raise RuntimeError(f"systemctl {' '.join(argv)}: {proc.stderr}")

    def configure(self, count: int) -> None:
        if NETWORKD_DIR.exists():
            shutil.rmtree(NETWORKD_DIR)
        NETWORKD_DIR.mkdir(parents=True)
        for name, text in scenario.networkd_files(count).items():
            (NETWORKD_DIR / name).write_text(text)
        self.count = count

    def converge(self, timeout: float) -> Json:
        """Start networkd; seconds until every address and route of the config is in the kernel (None if that
        takes longer than `timeout`: then how far it got)."""
        wanted_routes = {r for t in scenario.tunnels(self.count) for r in t.routes}
        wanted_addrs = {t.address for t in scenario.tunnels(self.count)}
        with nl.Watch(self.ns) as watch:
            start = time.monotonic()
            subprocess.Popen(["systemctl", "start", "--no-block", "systemd-networkd.service"])
            routes: set[str] = set()
            addrs: set[str] = set()
            last = start
            while routes != wanted_routes or addrs != wanted_addrs:
                if time.monotonic() - start > timeout:
                    return {"seconds": None, "timeout": timeout, "routes": len(routes), "addresses": len(addrs),
                            "of": self.count}
                for e in watch.read(1.0):
                    if e.kind == nl.RTM_NEWROUTE and e.proto == PROTO_STATIC and e.dst in wanted_routes:
                        routes.add(e.dst)
                        last = e.at
                    elif e.kind == nl.RTM_DELROUTE and e.dst in routes:
                        routes.discard(e.dst)
                    elif e.kind == nl.RTM_NEWADDR and e.address in wanted_addrs:
                        addrs.add(e.address)
                        last = e.at
            overruns = watch.overruns
        if overruns:  # events were lost: check the end state with a dump
            counts = kernel_counts(self.ns, PROTO_STATIC)
            if counts["routes"] < 2 * self.count:
                raise RuntimeError(f"networkd: event overrun and only {counts}")
        return {"seconds": last - start, "overruns": overruns}

    def stop(self) -> None:
        self._systemctl("stop", "systemd-networkd.socket", "systemd-networkd.service", check=False)
        delete_tunnels(None, self.count)

    def drift(self, wait: float) -> Json:
        """After convergence: delete a route and a tunnel, and see whether networkd puts them back."""
        result: Json = {}
        t = scenario.Tunnel(0)
        rtnl = nl.Rtnl(self.ns)
        try:
            with nl.Watch(self.ns) as watch:
                watch.drain()
                start = time.monotonic()
                rtnl.delete_route(t.routes[0])
                try:
                    seen = watch.until(lambda e: e.kind == nl.RTM_NEWROUTE and e.dst == t.routes[0], wait)
                    result["route_del"] = {"repaired": True, "seconds": seen[-1].at - start}
                except TimeoutError:
                    result["route_del"] = {"repaired": False, "waited": wait}
                other = scenario.Tunnel(1)
                watch.drain()
                start = time.monotonic()
                rtnl.delete_link(other.name)
                try:
                    seen = watch.until(lambda e: e.kind == nl.RTM_NEWROUTE and e.dst == other.routes[1], wait)
                    result["link_del"] = {"repaired": True, "seconds": seen[-1].at - start}
                except TimeoutError:
                    result["link_del"] = {"repaired": False, "waited": wait}
        finally:
            rtnl.close()
        version = subprocess.run(["systemctl", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
        result["version"] = version
        return result


def suite_systemd(sizes: Sizes) -> Json:
    networkd = Networkd()
    results: Json = {"convergence": {}}
    if networkd.available:
        networkd.setup()
    else:
        log("no systemd as PID 1: networkd is left out")
    for count in sizes.convergence:
        rows: dict[str, list[Json]] = {"greupd": [], "ip_batch": [], "networkd": []}
        if networkd.available:
            networkd.configure(count)
        for trial in range(sizes.convergence_trials[count]):
            # Interleaved, in a rotating order: a slow minute of the shared machine hits all three alike.
            tools = ["ip_batch", "greupd", "networkd"]
            for tool in tools[trial % 3:] + tools[:trial % 3]:
                if tool == "networkd" and (not networkd.available or trial >= sizes.networkd_trials[count]):
                    continue
                if tool == "greupd":
                    row = converge_greupd(count)
                elif tool == "ip_batch":
                    row = converge_ip_batch(count)
                else:
                    row = networkd.converge(sizes.networkd_timeout)
                    networkd.stop()
                rows[tool].append(row)
                log(f"convergence N={count} trial {trial} {tool}: {row}")
                time.sleep(1)
        results["convergence"][str(count)] = rows
    if networkd.available:
        count = sizes.convergence[0]
        networkd.configure(count)
        networkd.converge(sizes.networkd_timeout)
        results["networkd_drift"] = networkd.drift(sizes.networkd_drift_wait)
        log("networkd drift:", results["networkd_drift"])
        networkd.stop()
    return results


# --------------------------------------------------------------------------- suite "uml"


def timed_command(argv: list[str], trials: int) -> list[float]:
    samples = []
    for _ in range(trials):
        start = time.monotonic()
        subprocess.run(argv, check=True, cwd=REPO, capture_output=True)
        samples.append(time.monotonic() - start)
    return samples


def import_breakdown() -> Json:
    """python -X importtime of what `greupd run` imports, plus scapy's layers: own (self) milliseconds per
    top-level package, so that what pydantic imports for itself counts as pydantic, and so on."""
    code = "import greupd.daemon; import scapy.layers.inet, scapy.layers.l2"
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code], cwd=REPO, capture_output=True,
                          text=True, check=True)
    packages: dict[str, float] = {}
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+\d+ \|\s*(\S+)", line)
        if m:
            top = m[2].split(".")[0]
            packages[top] = packages.get(top, 0.0) + int(m[1]) / 1000
    ranked = sorted(packages.items(), key=lambda kv: -kv[1])
    return {**dict(ranked[:12]), "(other)": sum(ms for _, ms in ranked[12:])}


def startup(sizes: Sizes) -> Json:
    py = sys.executable
    result: Json = {
        "python_bare": timed_command([py, "-c", "pass"], sizes.startup_trials),
        "import_daemon": timed_command([py, "-c", "import greupd.daemon"], sizes.startup_trials),
        "import_daemon_scapy": timed_command(
            [py, "-c", "import greupd.daemon; import scapy.layers.inet, scapy.layers.l2"], sizes.startup_trials),
        "import_scapy_all": timed_command([py, "-c", "import scapy.all"], 1),
        "import_breakdown_ms": import_breakdown(),
    }
    for label, keepalive in (("ready_one_tunnel", None), ("ready_one_tunnel_keepalive", (1.0, 3, 1))):
        rows = []
        for _ in range(sizes.startup_trials):
            with Lab("st") as lab:
                daemon = Daemon(underlay_host(lab, "a"), scenario.greupd_toml(1, keepalive=keepalive))
                try:
                    daemon.start(wait=False)
                    imported, ready = daemon.wait_for_ready()
                finally:
                    daemon.close()
            rows.append({"imported": imported, "seconds": ready})
        result[label] = rows
        log(f"startup {label}: {rows}")
    return result


def drift_trials(host: Host, count: int, trials: int, pause: float, links: bool = True) -> Json:
    """`ip route del` / `ip link del` of owned objects (sent as those commands send them), until repaired."""
    rtnl = nl.Rtnl(host.netns)
    route_samples: list[float] = []
    link_samples: list[Json] = []
    try:
        with nl.Watch(host.netns) as watch:
            # Many tunnels in turn: greupd backs off from a tunnel repaired 10 times in 10 s (a "fight").
            for trial in range(trials):
                t = scenario.Tunnel(trial % count)
                watch.drain()
                start = time.monotonic()
                rtnl.delete_route(t.routes[0])
                seen = watch.until(lambda e, t=t: e.kind == nl.RTM_NEWROUTE and e.dst == t.routes[0]
                                   and e.proto == PROTO_GREUPD, 10)
                route_samples.append(seen[-1].at - start)
                if trial % 25 == 24:
                    log(f"drift ({count} tunnels): route trial {trial + 1}: {route_samples[-1] * 1000:.0f} ms")
                time.sleep(pause)
            for trial in range(trials if links else 0):
                t = scenario.Tunnel((trial + count // 2) % count)
                watch.drain()
                start = time.monotonic()
                rtnl.delete_link(t.name)
                pending = {("link", t.name), ("addr", t.address), *(("route", r) for r in t.routes)}
                seen = watch.until(lambda e, t=t, pending=pending: _repaired_part(e, t, pending), 10)
                marks: dict[str, float] = {}
                for e in seen:
                    part = _part_of(e, t)
                    if part is not None:
                        marks.setdefault(part[0], e.at - start)
                link_samples.append({"seconds": seen[-1].at - start, **marks})
                if trial % 25 == 24:
                    log(f"drift ({count} tunnels): link trial {trial + 1}: {seen[-1].at - start:.3f} s")
                time.sleep(pause)
    finally:
        rtnl.close()
    return {"route": route_samples, "link": link_samples}


def _part_of(e: nl.Event, t: scenario.Tunnel) -> tuple[str, str] | None:
    """Which piece of tunnel t this event shows back in place, if any."""
    if e.kind == nl.RTM_NEWLINK and e.name == t.name and e.up:
        return ("link", t.name)
    if e.kind == nl.RTM_NEWADDR and e.address == t.address:
        return ("addr", t.address)
    if e.kind == nl.RTM_NEWROUTE and e.proto == PROTO_GREUPD and e.dst in t.routes:
        return ("route", e.dst or "")
    return None


def _repaired_part(e: nl.Event, t: scenario.Tunnel, pending: set[tuple[str, str]]) -> bool:
    pending.discard(_part_of(e, t) or ("", ""))
    return not pending


def reload_trials(daemon: Daemon, count: int, trials: int, first: int = 0) -> list[Json]:
    target = count // 2
    name = scenario.Tunnel(target).name
    rows = []
    with nl.Watch(daemon.host.netns) as watch:
        for trial in range(trials):
            ttl = 100 if (first + trial) % 2 == 0 else 64
            daemon.config_path.write_text(scenario.greupd_toml(count, ttl_of={target: ttl}))
            status = daemon.status()
            assert status is not None
            before = status["netlink_requests"]
            watch.drain()
            start = time.monotonic()
            result = request(daemon.socket, "reload", timeout=300)
            replied = time.monotonic() - start
            seen = watch.until(lambda e, ttl=ttl: e.kind == nl.RTM_NEWLINK and e.name == name and e.ttl == ttl, 10)
            applied = seen[-1].at - start
            time.sleep(0.5)
            seen += watch.read(0)
            status = daemon.status()
            assert status is not None and result["ok"], result
            changes = [e for e in seen if not (e.kind == nl.RTM_NEWLINK and e.name == name)]
            rows.append({"applied": applied, "replied": replied,
                         "requests": status["netlink_requests"] - before,
                         "kernel_events": len(seen), "other_kernel_events": len(changes)})
            log(f"reload trial {trial}: {rows[-1]}")
    return rows


def dead_peer_trials(a: Host, b: Host, tunnels: int, trials: int, interval: float, same_tunnel: bool) -> Json:
    """Silence the peer of one tunnel (its mirror on B set down), time until A withdraws the tunnel's routes;
    then answer again and time until they are back."""
    rtnl_b = nl.Rtnl(b.netns)
    down: list[float] = []
    up: list[float] = []
    try:
        with nl.Watch(a.netns) as watch:
            for trial in range(trials):
                t = scenario.Tunnel(0 if same_tunnel else trial % tunnels)
                routes = set(t.routes)
                watch.drain()
                rtnl_b.set_link(t.name, False)
                silent = time.monotonic()
                gone: set[str] = set()
                seen = watch.until(lambda e, routes=routes, gone=gone: e.kind == nl.RTM_DELROUTE
                                   and e.dst in routes and (gone.add(e.dst or "") or gone == routes), 30)
                down.append(seen[-1].at - silent)
                watch.drain()
                rtnl_b.set_link(t.name, True)
                answering = time.monotonic()
                back: set[str] = set()
                seen = watch.until(lambda e, routes=routes, back=back: e.kind == nl.RTM_NEWROUTE
                                   and e.dst in routes and (back.add(e.dst or "") or back == routes), 30)
                up.append(seen[-1].at - answering)
                time.sleep(random.uniform(0, interval))  # a fresh phase against the probe timer
    finally:
        rtnl_b.close()
    return {"down": down, "up": up}


def wait_all_up(daemon: Daemon, count: int, timeout: float) -> Json:
    deadline = time.monotonic() + timeout
    while True:
        status = daemon.status()
        assert status is not None
        up = sum(t["state"] == "up" for t in status["tunnels"])
        answered = sum(bool(t["keepalive"] and t["keepalive"]["received"]) for t in status["tunnels"])
        if (up == count and answered == count) or time.monotonic() > deadline:
            return {"up": up, "answered": answered, "of": count}
        time.sleep(1)


def keepalive_summary(status: Json) -> Json:
    ka = [t["keepalive"] for t in status["tunnels"] if t["keepalive"]]
    return {"up": sum(t["state"] == "up" for t in status["tunnels"]), "of": len(status["tunnels"]),
            "sent": sum(k["sent"] for k in ka), "received": sum(k["received"] for k in ka)}


def keepalive_cost(sizes: Sizes, interval: float, profile_dir: Path | None = None) -> tuple[Json, str | None]:
    """Measured over a window without the profiler; then, with `profile_dir`, a profiled window of its own."""
    count = sizes.large
    profile = None
    with Lab("ka") as lab:
        a, b = peered_hosts(lab, count)
        daemon = Daemon(a, scenario.greupd_toml(count, keepalive=(interval, 3, 1)), profile_dir=profile_dir)
        try:
            daemon.start(wait=False)
            try:
                imported, ready = daemon.wait_for_ready(timeout=240)
            except RuntimeError as exc:
                # 10 000 probes/s can saturate the guest's one CPU before the first reconcile ends.
                log(f"keepalive {count} x {interval} s: no READY: {str(exc).splitlines()[0]}")
                overloaded = {"interval": interval, "tunnels": count, "ready": None, "ready_timeout": 240,
                              **window_usage(daemon, sizes.window), "probes_per_s": None, "reply_ratio": None,
                              "up_at_end": None}
                daemon.close()
                overloaded["sigterm_refused"] = daemon.stop_refused
                return overloaded, None
            log(f"keepalive {count} x {interval} s: READY after {ready:.1f} s (imports {imported:.1f} s)")
            settle = wait_all_up(daemon, count, 60)
            time.sleep(3)
            status_before = daemon.status()
            assert status_before is not None
            usage = window_usage(daemon, sizes.window)
            status_after = daemon.status()
            assert status_after is not None
            before, after = keepalive_summary(status_before), keepalive_summary(status_after)
            if profile_dir is not None:
                daemon.signal(PROFILE_START)
                time.sleep(min(sizes.window, 10))
                profile = daemon.save_profile()
        finally:
            daemon.close()
            delete_tunnels(a.netns, count)
            delete_tunnels(b.netns, count)
    sent = after["sent"] - before["sent"]
    return {"interval": interval, "tunnels": count, "ready": ready, "settled": settle, **usage,
            "probes_per_s": sent / usage["seconds"],
            "reply_ratio": (after["received"] - before["received"]) / sent if sent else 0.0,
            "up_at_end": after["up"]}, profile


def suite_keepalive(sizes: Sizes, results: Json, profile_dir: Path | None = None) -> None:
    """The keepalive part of the uml suite (dead-peer detection, keepalive cost), also run alone:
    `bench/run --only keepalive` (bench/results/keepalive.json, not rendered; `make bench` measures it as
    part of the uml suite)."""
    large = sizes.large
    profiles: Json = results.setdefault("profiles", {})
    alone = profile_dir is None
    if profile_dir is None:
        profile_dir = Path(tempfile.mkdtemp(prefix="bench-profiles-", dir="/run"))
    log("dead peer")
    with Lab("dp") as lab:
        a, b = peered_hosts(lab, sizes.dead_peer_tunnels)
        interval = 0.1
        daemon = Daemon(a, scenario.greupd_toml(sizes.dead_peer_tunnels, keepalive=(interval, 3, 1)))
        try:
            daemon.start()
            wait_all_up(daemon, sizes.dead_peer_tunnels, 30)
            results["dead_peer"] = {"interval": interval, "retries": 3, "up_after": 1,
                                    "tunnels": sizes.dead_peer_tunnels,
                                    **dead_peer_trials(a, b, sizes.dead_peer_tunnels, sizes.dead_peer_trials,
                                                       interval, same_tunnel=False)}
            time.sleep(12)  # let the fight-detection window of the rotating trials pass
            results["dead_peer_same_tunnel"] = dead_peer_trials(a, b, 1, 12, interval, same_tunnel=True)
        finally:
            daemon.close()

    for interval in (1.0, 0.1):
        log(f"keepalive cost, {large} x {interval} s")
        results[f"keepalive_{interval}"], profile = keepalive_cost(
            sizes, interval, profile_dir if interval == 1.0 else None)
        if profile is not None:
            profiles[f"keepalive_{interval}s"] = profile
        log(results[f"keepalive_{interval}"])
    if alone:
        shutil.rmtree(profile_dir, ignore_errors=True)


def suite_uml(sizes: Sizes, results: Json) -> None:
    """Fills `results` as it goes: a later failure keeps what was measured before it."""
    profiles: Json = {}
    results["profiles"] = profiles
    profile_dir = Path(tempfile.mkdtemp(prefix="bench-profiles-", dir="/run"))

    log("start-up")
    results["startup"] = startup(sizes)

    count = sizes.uml_convergence
    log(f"convergence, {count} tunnels, greupd and ip -batch interleaved")
    rows: dict[str, list[Json]] = {"greupd": [], "ip_batch": [], "networkd": []}
    for trial in range(sizes.uml_convergence_trials):
        for tool in (("ip_batch", "greupd") if trial % 2 == 0 else ("greupd", "ip_batch")):
            rows[tool].append(converge_greupd(count) if tool == "greupd" else converge_ip_batch(count))
            log(f"convergence N={count} trial {trial} {tool}: {rows[tool][-1]}")
    results["convergence"] = {str(count): rows}

    log(f"drift, {sizes.drift_small} tunnels")
    with Lab("dr") as lab:
        daemon = Daemon(underlay_host(lab, "a"), scenario.greupd_toml(sizes.drift_small))
        try:
            daemon.start()
            results["drift_small"] = {"tunnels": sizes.drift_small,
                                      **drift_trials(daemon.host, sizes.drift_small, sizes.drift_trials, 0.05)}
        finally:
            daemon.close()

    large = sizes.large
    log(f"{large} tunnels: idle, reload, drift")
    with Lab("lg") as lab:
        host = underlay_host(lab, "a")
        daemon = Daemon(host, scenario.greupd_toml(large), watchdog_usec=10_000_000, profile_dir=profile_dir,
                        profile_from_start=True)
        try:
            daemon.start()
            profiles["cold_start"] = daemon.save_profile()
            time.sleep(2)
            results["idle"] = {"tunnels": large, "watchdog_s": 10.0, **window_usage(daemon, sizes.window)}
            log("idle:", results["idle"])
            results["reload"] = {"tunnels": large, "trials": reload_trials(daemon, large, sizes.reload_trials)}
            daemon.signal(PROFILE_START)
            reload_trials(daemon, large, 2, first=sizes.reload_trials)
            profiles["reload"] = daemon.save_profile()
            results["drift_large"] = {"tunnels": large,
                                      **drift_trials(host, large, sizes.drift_large_trials, 0.05)}
            daemon.signal(PROFILE_START)
            drift_trials(host, large, 5, 0.05)
            profiles["drift_repair"] = daemon.save_profile()
        finally:
            daemon.close()
            delete_tunnels(host.netns, large)

    suite_keepalive(sizes, results, profile_dir)
    shutil.rmtree(profile_dir, ignore_errors=True)


# --------------------------------------------------------------------------- suite "hub" (issue #26)


@dataclass(frozen=True)
class HubSizes:
    tunnels: int  # the hub's spokes
    convergence_trials: int  # per tool, interleaved
    reload_trials: int
    drift_trials: int
    interval: float  # keepalive interval of the mass death (retries 3)
    window: float


# 2000 by default: UML cannot carry 10,000 in a bench's time. The suite's time grows faster than N, `ip -batch` itself
# slowing with the number of links (1000: 14 s, 2000: 43-90 s, 10,000: not done after 17 min; session 6, loaded).
# The 10,000 rows that do not need UML are measured natively (bench/host_bench.py, bench/engine_bench.py).
# GREUPD_BENCH_HUB_TUNNELS=N for another size.
HUB = HubSizes(tunnels=int(os.environ.get("GREUPD_BENCH_HUB_TUNNELS", "2000")), convergence_trials=2,
               reload_trials=6, drift_trials=100, interval=1.0, window=20.0)
HUB_QUICK = HubSizes(tunnels=300, convergence_trials=1, reload_trials=2, drift_trials=10, interval=1.0, window=5.0)


def hub_convergence(sizes: HubSizes) -> Json:
    """Spawn to READY and to the last route, greupd and `ip -batch` interleaved: at the hub's N, and first at 1000
    (#26's row for the last route), three trials there since they are cheap."""
    sizes_trials = [(1000, 3)] if sizes.tunnels > 1000 else []
    result: Json = {}
    for count, trials in [*sizes_trials, (sizes.tunnels, sizes.convergence_trials)]:
        rows: dict[str, list[Json]] = {"greupd": [], "ip_batch": []}
        for trial in range(trials):
            for tool in (("ip_batch", "greupd") if trial % 2 == 0 else ("greupd", "ip_batch")):
                rows[tool].append(converge_greupd(count) if tool == "greupd" else converge_ip_batch(count))
                log(f"hub convergence N={count} trial {trial} {tool}: {rows[tool][-1]}")
        result[str(count)] = rows
    return result


def watchdog_gaps(times: list[float], start: float, end: float) -> Json:
    """The longest gaps between watchdog pings (sent from the loop at half WATCHDOG_USEC) within [start, end]."""
    before = [t for t in times if t < start]
    inside = [t for t in times if start <= t <= end]
    # From the last ping before `start` (a loop stuck from then on shows as one long gap), and until `end`.
    points = [*before[-1:], *inside, end]
    gaps = sorted((b - a for a, b in itertools.pairwise(points)), reverse=True)
    return {"pings": len(inside), "longest_gaps": gaps[:5]}


def mass_death(a: Host, b: Host, daemon: Daemon, count: int, interval: float) -> Json:
    """The hub's uplink fails: the far side's end of the underlay goes down, every peer falls silent at once.
    Times until the last of the 2 x count routes is withdrawn (rtnetlink notifications); the loop's stalls
    meanwhile (gaps of the watchdog pings); then the uplink back, until every route is back."""
    rtnl_b = nl.Rtnl(b.netns)
    try:
        gone = nl.RouteCounter(a.netns, PROTO_GREUPD, 2 * count, kind=nl.RTM_DELROUTE)
        failed = time.monotonic()
        rtnl_b.set_link("eth0", False)
        last = gone.wait(interval * 4 + 60)
        overruns = gone.overruns
        withdrawn = gone.count
        gone.close()
        end = (last or time.monotonic()) + 1.0
        time.sleep(max(0.0, end - time.monotonic()))
        stalls = watchdog_gaps(daemon.notify.watchdog, failed, end)
        back = nl.RouteCounter(a.netns, PROTO_GREUPD, 2 * count)
        restored = time.monotonic()
        rtnl_b.set_link("eth0", True)
        back_last = back.wait(interval * 4 + 120)
        back_count = back.count
        back.close()
    finally:
        rtnl_b.close()
    return {"tunnels": count, "interval": interval, "retries": 3,
            "withdrawn_s": None if last is None else last - failed, "routes_withdrawn": withdrawn,
            "overruns": overruns, "watchdog": stalls,
            "restored_s": None if back_last is None else back_last - restored, "routes_back": back_count}


def hub_running(sizes: HubSizes, results: Json, profile_dir: Path) -> None:
    """N tunnels running: one tunnel's reload, `ip route del` repaired; then N tunnels with keepalives: cost,
    memory, and the mass death."""
    count = sizes.tunnels
    profiles: Json = results.setdefault("profiles", {})
    with Lab("hb") as lab:
        host = underlay_host(lab, "a")
        daemon = Daemon(host, scenario.greupd_toml(count), profile_dir=profile_dir)
        try:
            daemon.start()
            time.sleep(2)
            results["idle"] = {"tunnels": count, **window_usage(daemon, 5.0)}
            results["reload"] = {"tunnels": count, "trials": reload_trials(daemon, count, sizes.reload_trials)}
            daemon.signal(PROFILE_START)
            reload_trials(daemon, count, 2, first=sizes.reload_trials)
            profiles["hub_reload"] = daemon.save_profile()
            results["drift"] = {"tunnels": count,
                                **drift_trials(host, count, sizes.drift_trials, 0.05, links=False)}
            daemon.signal(PROFILE_START)
            drift_trials(host, count, 10, 0.05, links=False)
            profiles["hub_drift_repair"] = daemon.save_profile()
        finally:
            daemon.close()
            delete_tunnels(host.netns, count)
    log("hub: keepalives and the mass death")
    with Lab("md") as lab:
        a, b = peered_hosts(lab, count)
        config = scenario.greupd_toml(count, keepalive=(sizes.interval, 3, 1))
        daemon = Daemon(a, config, watchdog_usec=100_000, profile_dir=profile_dir)
        try:
            daemon.start()
            results["keepalive_settled"] = wait_all_up(daemon, count, 120)
            time.sleep(2)
            results["keepalive"] = {"tunnels": count, "interval": sizes.interval,
                                    **window_usage(daemon, sizes.window)}
            log("hub keepalive:", results["keepalive"])
            results["mass_death"] = mass_death(a, b, daemon, count, sizes.interval)
            log("hub mass death:", results["mass_death"])
            wait_all_up(daemon, count, 60)
            daemon.signal(PROFILE_START)
            results["mass_death_profiled"] = mass_death(a, b, daemon, count, sizes.interval)
            profiles["hub_mass_death"] = daemon.save_profile()
        finally:
            daemon.close()
            delete_tunnels(a.netns, count)
            delete_tunnels(b.netns, count)


def suite_hub(sizes: HubSizes, results: Json, running: bool) -> None:
    """Convergence at the hub's N, greupd against `ip -batch`; with `running` (the plain UML guest) also the
    rest of issue #26's UML rows."""
    profile_dir = Path(tempfile.mkdtemp(prefix="bench-profiles-", dir="/run"))
    log(f"hub: convergence, {sizes.tunnels} tunnels")
    results["convergence"] = hub_convergence(sizes)
    if running:
        hub_running(sizes, results, profile_dir)
    shutil.rmtree(profile_dir, ignore_errors=True)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.lab_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=("systemd", "uml", "keepalive", "hub", "hub-systemd"), required=True)
    p.add_argument("--quick", action="store_true", help="small N and few trials: a smoke run")
    p.add_argument("--out", type=Path, default=None, help="JSON output (default: $GREUPD_LAB_RUNDIR/bench.json)")
    a = p.parse_args(argv)
    out = a.out or Path(os.environ.get("GREUPD_LAB_RUNDIR", ".")) / "bench.json"
    sizes = QUICK if a.quick else FULL
    started = time.monotonic()
    with results_file(out, a.suite, a.quick) as data:
        if a.suite == "systemd":
            data.update(suite_systemd(sizes))
        elif a.suite == "keepalive":
            suite_keepalive(sizes, data)
        elif a.suite in ("hub", "hub-systemd"):
            suite_hub(HUB_QUICK if a.quick else HUB, data, running=a.suite == "hub")
        else:
            suite_uml(sizes, data)
    log(f"done in {time.monotonic() - started:.0f} s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
