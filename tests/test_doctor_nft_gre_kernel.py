"""`greupd doctor` on a kernel with both GRE and nftables `inet` (the demo's kind, `vng`): the seed's two routers
with greupd running the seed's whole config (NAT, MSS clamp: greupd's own table), a tunnel up through a real
ip_gre link, and doctor's trace crossing greupd's table. Nothing is found there; then another table's input
drop of GRE is found by its trace, and its fix makes it go (#24's "no false positives" and item 2); then, on the
same routers, a forward chain with policy drop (forward-drop) and a `from_tunnel` naming no interface
(interface-missing) each stop LAN-to-LAN traffic through the tunnel until the fix doctor prints is applied.
And a kernel whose ip_gre is not installed (gre-module-missing): greupd's tunnel comes up once the fix is run.

Both daemons and every doctor run are children forked from this process (lab/forked.py), with what they import
imported here once: the guest emulates its CPU, and each new interpreter paid greupd's, pyroute2's and
nftables' imports again (212 s for this test in the guest, most of it imports)."""

from __future__ import annotations

import ctypes
import importlib
import json
import os
import platform
import re
import signal
import socket
import struct
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from lab.forked import ForkedGreupd, spawn
from lab.hosts import Lab, seed_topology

pytestmark = pytest.mark.needs_nft_gre


# What the forked daemons and doctor runs import, imported once, here (the demo's way: demo/seed_story.py).
PRELOAD = ("nftables", "pyroute2", "pyroute2.netlink.nfnetlink.nfctsocket", "scapy.layers.inet", "scapy.layers.l2",
           "greupd.cli", "greupd.control", "greupd.daemon", "greupd.doctor.hear", "greupd.doctor.pmtu",
           "greupd.doctor.read", "greupd.doctor.trace", "greupd.keepalive.codec", "greupd.nft.table")


def preload() -> None:
    for name in PRELOAD:
        importlib.import_module(name)


SEED = Path(__file__).resolve().parent.parent / "etc" / "greupd" / "tunnels.toml"


def b_config(text: str) -> str:
    """The seed's config as machine B has it: the addresses the other way round, B's LAN and interfaces."""
    swaps = {'local = "172.19.1.1"': 'local = "172.19.1.2"', 'remote = "172.19.1.2"': 'remote = "172.19.1.1"',
             'address = "192.168.8.1"': 'address = "192.168.8.11"', 'peer = "192.168.8.11"': 'peer = "192.168.8.1"',
             'routes = ["20.10.1.0/24"]': 'routes = ["10.10.1.0/24"]',
             'into_tunnel = ["10.10.1.0/24"]': 'into_tunnel = ["20.10.1.0/24"]'}
    for old, new in swaps.items():
        assert old in text
        text = text.replace(old, new)
    return text


def doctor(daemon: ForkedGreupd) -> tuple[int, list[dict[str, str]]]:
    done = daemon.cli("doctor", "--json", "-c", str(daemon.config_path), "--socket", str(daemon.socket), timeout=900)
    assert done.returncode in (0, 1), done.stderr
    findings: list[dict[str, str]] = json.loads(done.stdout)["findings"]
    return done.returncode, findings


def test_nothing_on_the_seeds_setup_then_each_fault_named_and_its_fix_makes_lan_to_lan_work() -> None:
    """The seed's routers, both daemons up: doctor finds nothing. Then one fault after another on A, each named
    alone by doctor and fixed as it prints: another table's input drop of GRE (traced), Docker's FORWARD policy
    (forward-drop: B's LAN no longer reaches A's), a `from_tunnel` naming no interface (interface-missing: A's LAN
    hosts, without a route beyond their LAN, cannot answer B's). After each fix LAN B pings LAN A again."""
    text = SEED.read_text()
    preload()
    with Lab() as lab:
        seed = seed_topology(lab)
        a = ForkedGreupd(seed.a, text).start(timeout=600)
        b = ForkedGreupd(seed.b, b_config(text)).start(timeout=600)
        try:
            a.wait_for("My_Tunnel", "up", timeout=120)
            b.wait_for("My_Tunnel", "up", timeout=120)
            assert doctor(a) == (0, [])
            assert doctor(b) == (0, [])
            seed.a.run("nft", "-f", "-", input="table ip other {\n chain input {\n"
                       "  type filter hook input priority 0; policy accept;\n  ip protocol gre counter drop\n }\n}\n")
            code, findings = doctor(a)
            assert code == 1 and [f["check"] for f in findings] == ["firewall-drops-gre"], findings
            (finding,) = findings
            assert finding["evidence"].startswith("nftables trace ")
            assert "decided by table ip other chain input: ip protocol gre counter drop # handle 2" \
                in finding["evidence"]
            seed.a.run(*finding["fix"].split())
            assert doctor(a) == (0, [])
            a.wait_for("My_Tunnel", "up", timeout=120)
            assert seed.lan_b.wait_ping("10.10.1.2", timeout=60)  # B's LAN to A's, through the tunnel

            # forward-drop: `iptables -P FORWARD DROP` (Docker's), as iptables-nft leaves it in the kernel (no
            # iptables here: made with nft, as tests/test_doctor_kernel.py does).
            seed.a.run("nft", "-f", "-", input="table ip filter {\n chain FORWARD {\n"
                       "  type filter hook forward priority 0; policy drop;\n }\n}\n")
            assert not seed.lan_b.ping("10.10.1.2")
            code, findings = doctor(a)
            assert code == 1 and [f["check"] for f in findings] == ["forward-drop"], findings
            (finding,) = findings
            assert "table ip filter chain FORWARD (hook forward" in finding["evidence"]
            assert "none of its rules accepts iifname My_Tunnel or oifname My_Tunnel" in finding["evidence"]
            assert finding["fix"] == ("iptables -I FORWARD -i My_Tunnel -j ACCEPT\n"
                                      "iptables -I FORWARD -o My_Tunnel -j ACCEPT")
            for line in finding["fix"].splitlines():  # each line as iptables-nft writes it
                way = {"-i": "iifname", "-o": "oifname"}[line.split()[3]]
                seed.a.run("nft", "insert", "rule", "ip", "filter", "FORWARD", way, "My_Tunnel", "counter", "accept")
            assert seed.lan_b.wait_ping("10.10.1.2", timeout=30)
            assert doctor(a) == (0, [])

            # interface-missing: A's LAN hosts know no route beyond their LAN, so B's side reaches them only as
            # A's eth1 address (from_tunnel's masquerade). A typo there (lan0) and they cannot answer.
            seed.lan_a.ip("route", "del", "default")
            text = a.config_path.read_text()
            assert 'from_tunnel = ["eth1"]' in text
            a.reload(text.replace('from_tunnel = ["eth1"]', 'from_tunnel = ["lan0"]'))
            assert not seed.lan_b.ping("10.10.1.2")
            code, findings = doctor(a)
            assert code == 1 and [f["check"] for f in findings] == ["interface-missing"], findings
            (finding,) = findings
            assert "from_tunnel names lan0, which does not exist" in finding["message"]
            assert finding["evidence"].startswith("no link named lan0 (links: ")
            assert finding["fix"] == ('in [[tunnel]] name = "My_Tunnel", [tunnel.nat]: '
                                      'from_tunnel = ["<an existing interface>"]')
            line = finding["fix"].split(": ", 1)[1].replace("<an existing interface>", "eth1")
            done = a.reload(a.config_path.read_text().replace('from_tunnel = ["lan0"]', line))
            assert done.returncode == 0, done.stdout + done.stderr
            assert seed.lan_b.wait_ping("10.10.1.2", timeout=30)
            assert doctor(a) == (0, [])
        finally:
            a.stop()
            b.stop()


def reflect(ready: Callable[[], None]) -> dict[str, object]:
    """A peer's GRE tunnel, as it treats a Cisco keepalive: the inner packet routed back (tests/test_doctor_kernel.py's
    REFLECTOR, in a child forked from here instead of a new interpreter). Runs until killed."""
    rx = socket.socket(socket.AF_INET, socket.SOCK_RAW, 47)
    tx = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    ready()
    while True:
        data = rx.recv(65535)
        ihl = (data[0] & 0x0F) * 4
        flags, proto = struct.unpack_from("!HH", data, ihl)
        if proto == 0x0800:
            inner = data[ihl + 4 + 4 * bool(flags & 0x8000) + 4 * bool(flags & 0x2000) + 4 * bool(flags & 0x1000):]
            with suppress(OSError):
                tx.sendto(inner, (socket.inet_ntoa(inner[16:20]), 0))


MS_BIND = 4096


def _libc_call(name: str, *args: object) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if getattr(libc, name)(*args) != 0:
        raise OSError(ctypes.get_errno(), f"{name}{args}")


@contextmanager
def ip_gre_not_installed(scratch: Path) -> Iterator[None]:
    """ip_gre unloaded and, for this kernel, not installed: what a cloud kernel without its "extra" modules
    package has. Its .ko is an empty file where the kernel's modprobe looks (the lab's module tree, from
    /proc/sys/kernel/modprobe's wrapper) and it is missing from /lib/modules/$(uname -r)/modules.dep, which
    doctor reads. Bind mounts over the read-only trees, in the guest's own root: leaving undoes them."""
    if Path("/sys/module/ip_gre").exists():
        subprocess.run(["rmmod", "ip_gre"], check=True, capture_output=True, text=True, timeout=120)
    assert not Path("/sys/module/ip_gre").exists()
    release = platform.release()
    helper = Path(Path("/proc/sys/kernel/modprobe").read_text().strip()).read_bytes()
    found = re.search(rb"-d (\S+)", helper) if helper.startswith(b"#!") else None  # the lab's wrapper
    trees = {Path("/"), Path(os.fsdecode(found[1])) if found else Path("/")}
    empty = scratch / "empty.ko"
    empty.write_bytes(b"")
    dep = Path("/lib/modules") / release / "modules.dep"
    lines = dep.read_text().splitlines(keepends=True)
    (scratch / "modules.dep").write_text("".join(line for line in lines if "/ip_gre.ko" not in line))
    targets = [dep]
    for tree in trees:
        modules = tree / "lib" / "modules" / release
        relative = next(line.split(":", 1)[0] for line in (modules / "modules.dep").read_text().splitlines()
                        if "/ip_gre.ko" in line.split(":", 1)[0])
        targets.append(modules / relative)
    mounted: list[Path] = []
    try:
        for target in targets:
            source = scratch / "modules.dep" if target == dep else empty
            _libc_call("mount", os.fsencode(source), os.fsencode(target), None, MS_BIND, None)
            mounted.append(target)
        yield
    finally:
        for target in reversed(mounted):
            _libc_call("umount2", os.fsencode(target), 0)


PAIR = """[[tunnel]]
name = "T1"
mode = "gre"
local = "10.9.0.1"
remote = "10.9.0.2"
address = "192.168.9.1"
peer = "192.168.9.2"

[tunnel.keepalive]
interval = "1s"
"""


@pytest.mark.skipif(os.environ.get("GREUPD_LAB_GUEST") != "vng", reason="unloads ip_gre and hides it: a lab guest's "
                    "kernel only, never a real host's")
def test_gre_module_missing_until_the_printed_fix_and_then_greupds_tunnel_comes_up(tmp_path: Path) -> None:
    """The kernel cannot make a gre link (ip_gre neither loaded nor installed): greupd retries, doctor names
    gre-module-missing. The fix, as printed: the package's module back (here: the hiding undone), `modprobe
    ip_gre`, and the modules-load.d line; greupd's next retry makes the link, and a ping crosses the tunnel."""
    preload()
    with Lab() as lab:
        a, b = lab.host("a"), lab.host("b")
        lab.link(a, b, "10.9.0.1/24", "10.9.0.2/24")
        # b stands for the peer, another machine whose GRE works; on this kernel it cannot have a tunnel while
        # ip_gre is missing, so until then a raw socket does what its tunnel would do to a keepalive.
        reflector = spawn(b, reflect, timeout=60)
        try:
            reflector.wait_ready()
            with ip_gre_not_installed(tmp_path):
                refused = b.ip("link", "add", "T1", "type", "gre", "local", "10.9.0.2", "remote", "10.9.0.1",
                               check=False)
                assert refused.returncode != 0, "ip_gre is still loadable"
                daemon = ForkedGreupd(a, PAIR).start(wait=False)
                try:
                    code, findings = doctor(daemon)
                    assert code == 1 and [f["check"] for f in findings] == ["gre-module-missing"], findings
                    (finding,) = findings
                    assert finding["message"] == "the kernel has no ip_gre: it cannot make this tunnel's link"
                    assert finding["evidence"] == ("/sys/module/ip_gre does not exist and ip_gre is in neither "
                                                   "modules.dep nor modules.builtin of this kernel")
                    install, load, persist = finding["fix"].splitlines()
                    assert install.startswith("apt-get install linux-modules-extra-$(uname -r)")
                    assert (load, persist) == ("modprobe ip_gre", "echo ip_gre > /etc/modules-load.d/greupd.conf")
                except BaseException:
                    daemon.stop()
                    raise
        finally:
            os.kill(reflector.pid, signal.SIGKILL)
            os.waitpid(reflector.pid, 0)
        try:  # the module installed again (the binds gone); then the fix's other two lines, as printed
            subprocess.run(load.split(), check=True, timeout=300)
            subprocess.run(["sh", "-c", persist], check=True, timeout=60)  # the guest's /etc: an overlay on tmpfs
            b.ip_batch("link add T1 type gre local 10.9.0.2 remote 10.9.0.1",
                       "addr add 192.168.9.2 peer 192.168.9.1 dev T1", "link set T1 up")
            for key, value in (("net.ipv4.ip_forward", 1), ("net.ipv4.conf.T1.accept_local", 1),
                               ("net.ipv4.conf.T1.rp_filter", 0), ("net.ipv4.conf.all.rp_filter", 0)):
                b.sysctl(key, value)
            daemon.wait_for("T1", "up", timeout=120)  # its retry (backoff at most 10 s) made the link
            assert a.wait_ping("192.168.9.2", timeout=30)
            assert doctor(daemon) == (0, [])
        finally:
            daemon.stop()
