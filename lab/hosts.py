"""Network-namespace "hosts" joined by veth pairs and bridges, for tests on a real kernel.

Every netns this module creates is named ``glab<pid>-<n>-<name>``: unique per process and per
Lab, so parallel runs and runs by other engineers never collide, and namespaces that a killed
run left behind can be recognised (their pid is dead) and removed by the next run.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import re
import shlex
import signal
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

PREFIX = "glab"
_lab_counter = itertools.count(1)
_LEFTOVER = re.compile(rf"^{PREFIX}(\d+)-")


def _ip(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *argv], check=check, capture_output=True, text=True, timeout=30)


NETNS_DIR = "/run/netns"  # where `ip netns add` names its namespaces


def netns_list() -> list[str]:
    # What `ip netns list` reads, without a process (each costs 0.1-0.4 s in the UML guest).
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _netns_batch(verb: str, names: Sequence[str]) -> None:
    """`ip netns add|del` for several names in one process; -force: a failing line does not stop the rest."""
    if names:
        subprocess.run(["ip", "-force", "-batch", "-"], input="".join(f"netns {verb} {n}\n" for n in names),
                       check=verb == "add", capture_output=True, text=True, timeout=60)


def remove_leftovers() -> list[str]:
    """Delete lab namespaces whose creating process is gone (a run that was killed)."""
    removed = []
    for ns in netns_list():
        m = _LEFTOVER.match(ns)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            removed.append(ns)
    _netns_batch("del", removed)
    return removed


class LabCommandError(subprocess.CalledProcessError):
    """A failed command in a lab host; unlike CalledProcessError its message shows stderr."""

    def __str__(self) -> str:
        err = (self.stderr or self.output or "").strip()
        return super().__str__() + (f"\n{err[-2000:]}" if err else "")


class Host:
    """One network namespace; commands run in it through ``ip netns exec``."""

    def __init__(self, lab: Lab, name: str, netns: str) -> None:
        self.lab = lab
        self.name = name
        self.netns = netns

    def __repr__(self) -> str:
        return f"Host({self.name!r}, netns={self.netns!r})"

    def _argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv]

    def run(
        self,
        *argv: str,
        check: bool = True,
        timeout: float = 60,
        input: str | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run argv in this host; on failure with check=True the error names the host and output."""
        proc = subprocess.run(self._argv(argv), capture_output=True, text=True, timeout=timeout, input=input, env=env)
        if check and proc.returncode != 0:
            raise LabCommandError(
                proc.returncode,
                f"[{self.name}] {shlex.join(argv)}",
                output=proc.stdout,
                stderr=proc.stderr,
            )
        return proc

    def sh(self, cmdline: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self.run("sh", "-c", cmdline, check=check, timeout=timeout)

    def popen(self, *argv: str, **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a background process in this host; the Lab kills it (and its group) on close."""
        kwargs.setdefault("start_new_session", True)
        proc: subprocess.Popen[Any] = subprocess.Popen(self._argv(argv), **kwargs)
        self.lab._procs.append(proc)
        return proc

    def _sysctl_path(self, key: str) -> str | None:
        # net.ipv4.conf.eth0.rp_filter -> /proc/sys/net/ipv4/conf/eth0/rp_filter; a key whose names hold a
        # dot (eth0.100) has no such path and goes to sysctl(8), which also words the errors.
        path = "/proc/sys/" + key.replace(".", "/")
        return path if "/" not in key and os.path.exists(path) else None

    def sysctl(self, key: str, value: str | int) -> None:
        # Written from this process, in the host's netns (in_netns): what `sysctl -w` does, without the
        # two execs (`ip netns exec`, sysctl) that cost up to a second in the UML guest.
        with in_netns(self):
            path = self._sysctl_path(key)
            if path is not None:
                with open(path, "w") as f:
                    f.write(f"{value}\n")
                return
        self.run("sysctl", "-q", "-w", f"{key}={value}")

    def sysctl_get(self, key: str) -> str:
        with in_netns(self):
            path = self._sysctl_path(key)
            if path is not None:
                with open(path) as f:
                    return f.read().strip()
        return self.run("sysctl", "-n", key).stdout.strip()

    def ping(self, addr: str, count: int = 1, timeout: float = 2.0, interval: float = 0.2) -> bool:
        # -W is the per-reply wait, -w the overall deadline; both so a lost packet fails fast.
        deadline = max(1, int(timeout + count * interval + 0.999))
        argv = ["ping", "-n", "-q", "-c", str(count), "-i", str(interval), "-W", str(timeout), "-w", str(deadline)]
        return self.run(*argv, addr, check=False, timeout=deadline + 10).returncode == 0

    def wait_ping(self, addr: str, timeout: float = 10.0) -> bool:
        """Ping until one reply arrives or timeout seconds pass (ARP, DAD and routes settle)."""
        return (
            self.run(
                "ping",
                "-n",
                "-q",
                "-c",
                "1",
                "-i",
                "0.2",
                "-w",
                str(max(1, int(timeout))),
                addr,
                check=False,
                timeout=timeout + 10,
            ).returncode
            == 0
        )

    def ip(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        # `ip -n` rather than `ip netns exec ... ip`: one exec instead of two (slow in UML).
        proc = _ip("-n", self.netns, *argv, check=False)
        if check and proc.returncode != 0:
            raise LabCommandError(
                proc.returncode, f"[{self.name}] ip {shlex.join(argv)}", output=proc.stdout, stderr=proc.stderr
            )
        return proc

    def ifindex(self, link: str) -> int:
        """The link's interface index: the same index before and after a change means it was not recreated."""
        return int(self.ip("-o", "link", "show", link).stdout.split(":", 1)[0])

    def link_details(self, link: str) -> str:
        """`ip -d link show`: the link's kind-specific parameters (ttl, key, encaplimit, ...) as iproute2 words."""
        return self.ip("-d", "link", "show", link).stdout

    def ip_batch(self, *commands: str) -> None:
        """Several ip commands ("addr add ... dev eth0") in one process; stops at the first error."""
        proc = subprocess.run(
            ["ip", "-n", self.netns, "-batch", "-"],
            input="\n".join(commands) + "\n",
            capture_output=True,
            text=True,
            timeout=30,
        )
        if proc.returncode != 0:
            raise LabCommandError(
                proc.returncode, f"[{self.name}] ip -batch: {'; '.join(commands)}", proc.stdout, proc.stderr
            )

    def addr_add(self, ifname: str, cidr: str) -> None:
        self.ip("addr", "add", cidr, "dev", ifname)

    def iproute(self) -> Any:
        """A pyroute2 IPRoute bound to this namespace (close it, or use it as a context manager)."""
        from pyroute2 import IPRoute

        return IPRoute(netns=self.netns, flags=0)


_CLONE_NEWNET = 0x40000000


@contextlib.contextmanager
def in_netns(host: Host) -> Iterator[None]:
    """Switch this thread into host's network namespace for a while: sockets created meanwhile stay there, and
    /proc/sys/net reads host's sysctls. (A Python process per look costs seconds in the UML guest; this, nothing.)"""
    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/thread-self/ns/net") as home, open(f"/run/netns/{host.netns}") as there:
        if libc.setns(there.fileno(), _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {host.netns}")
        try:
            yield
        finally:
            if libc.setns(home.fileno(), _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back home")


class Lab:
    """A set of netns hosts; ``close()`` (or leaving the ``with`` block) removes all of them."""

    def __init__(self, tag: str = "") -> None:
        remove_leftovers()
        self.prefix = f"{PREFIX}{os.getpid()}-{next(_lab_counter)}{tag}-"
        self.hosts: dict[str, Host] = {}
        self._procs: list[subprocess.Popen[Any]] = []
        self._closed = False

    def __enter__(self) -> Lab:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def host(self, name: str) -> Host:
        (h,) = self.bare_hosts(name)
        h.ip("link", "set", "lo", "up")
        return h

    def bare_hosts(self, *names: str) -> list[Host]:
        """Several hosts made in one process, their `lo` still down (put "link set lo up" in each one's
        first ip_batch: in the UML guest every process costs 0.1-0.4 s)."""
        for name in names:
            if name in self.hosts or names.count(name) > 1:
                raise ValueError(f"host {name!r} exists")
        made = [Host(self, name, self.prefix + name) for name in names]
        self.hosts.update((h.name, h) for h in made)  # before adding: close() removes what was made
        _netns_batch("add", [h.netns for h in made])
        return made

    def link(
        self,
        h1: Host,
        h2: Host,
        addr1: str | None = None,
        addr2: str | None = None,
        if1: str = "eth0",
        if2: str = "eth0",
        *,
        then1: Sequence[str] = (),
        then2: Sequence[str] = (),
    ) -> None:
        """Join h1 and h2 by a veth pair if1<->if2, address and bring up both ends.

        Created inside h1's namespace with the peer placed in h2's directly, so the pair never
        exists under these names in the root namespace (where other runs could collide).
        ``then1``/``then2``: more ip commands for each side, run in the same process (in the UML
        guest every process costs 0.1-0.4 s).
        """
        h1.ip("link", "add", if1, "type", "veth", "peer", "name", if2, "netns", h2.netns)
        for h, ifname, addr, then in ((h1, if1, addr1, then1), (h2, if2, addr2, then2)):
            h.ip_batch(*([f"addr add {addr} dev {ifname}"] if addr else []), f"link set {ifname} up", *then)

    def switch(self, name: str) -> Switch:
        """A host holding one bridge ``br0``: an L2 segment that any number of hosts can join."""
        h = self.host(name)
        h.ip_batch("link add br0 type bridge", "link set br0 up")
        return Switch(h)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for proc in self._procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        # Deleting a netns with no process left in it destroys its veths, tunnels and bridges too.
        _netns_batch("del", [h.netns for h in self.hosts.values()])


@dataclass
class Switch:
    host: Host
    ports: int = 0

    def attach(self, h: Host, ifname: str, addr: str | None = None) -> None:
        self.ports += 1
        port = f"p{self.ports}"
        self.host.lab.link(self.host, h, None, addr, if1=port, if2=ifname, then1=[f"link set {port} master br0"])


@dataclass
class SeedTopology:
    """The seed how-to's network: routers A and B on an underlay (a bridge, so C can join)."""

    lab: Lab
    wan: Switch
    a: Host
    b: Host
    lan_a: Host
    lan_b: Host
    routers: dict[str, Host] = field(default_factory=dict)

    def add_router(self, name: str, wan_addr: str, prefixlen: int = 24) -> Host:
        """Another router (e.g. C for failover) with ``wan0`` = wan_addr on the underlay."""
        r = _router(self.lab, self.wan, name, wan_addr, prefixlen)
        self.routers[name] = r
        return r


def _router(lab: Lab, wan: Switch, name: str, wan_addr: str, prefixlen: int = 24) -> Host:
    r = lab.host(name)
    r.sysctl("net.ipv4.ip_forward", 1)
    wan.attach(r, "wan0", f"{wan_addr}/{prefixlen}")
    return r


def seed_topology(lab: Lab) -> SeedTopology:
    """A=172.19.1.1, B=172.19.1.2 on wan0; LANs 10.10.1.0/24 behind A and 20.10.1.0/24 behind B.

    What lab.switch, _router and lab.link would build, in six processes instead of ~30 (every test of the
    UML guest builds it, and each process there costs 0.1-0.4 s): one makes the namespaces, then one
    `ip -batch` per host makes its links (a veth's peer straight into the next host) and addresses.
    """
    switch, a, b, lan_a, lan_b = lab.bare_hosts("wan", "a", "b", "lan_a", "lan_b")
    ports = [(f"p{n}", router) for n, router in enumerate((a, b), 1)]
    switch.ip_batch("link set lo up", "link add br0 type bridge", "link set br0 up",
                    *(line for port, router in ports for line in (
                        f"link add {port} type veth peer name wan0 netns {router.netns}",
                        f"link set {port} master br0", f"link set {port} up")))
    for router, wan_addr, lan, lan_prefix in ((a, "172.19.1.1", lan_a, "10.10.1"), (b, "172.19.1.2", lan_b, "20.10.1")):
        router.ip_batch("link set lo up", f"addr add {wan_addr}/24 dev wan0", "link set wan0 up",
                        f"link add eth1 type veth peer name eth0 netns {lan.netns}",
                        f"addr add {lan_prefix}.1/24 dev eth1", "link set eth1 up")
        lan.ip_batch("link set lo up", f"addr add {lan_prefix}.2/24 dev eth0", "link set eth0 up",
                     f"route add default via {lan_prefix}.1")
        router.sysctl("net.ipv4.ip_forward", 1)
    return SeedTopology(lab, Switch(switch, ports=len(ports)), a, b, lan_a, lan_b, routers={"a": a, "b": b})
