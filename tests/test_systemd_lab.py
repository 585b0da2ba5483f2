"""greupd as an administrator runs it: the Debian package installed with dpkg, started by systemd (PID 1).

These run in the uml-systemd lab guest (lab/pytest_plugin.py dispatches them): systemd as PID 1 on an overlay whose
writes vanish with the guest, so dpkg -i, /etc and unit files are the guest's alone. Router A of the seed is a
netns; the packaged greupd.service runs in it (a drop-in adds NetworkNamespacePath=, nothing else changes), as
the unprivileged user greupd with CAP_NET_ADMIN and CAP_NET_RAW. greupd@NETNS.service, the per-namespace
template, runs unchanged as greupd@ns1, in A's netns under the name ns1.
Router B is a plain Linux GRE peer that reflects A's keepalives in its kernel, so "the peer dies" is one
`ip link set down` away.

The .deb comes from tests/test_packaging.py when it ran earlier in the same pytest session (it hands the path
over in GREUPD_LAB_DEB); otherwise it is built here, which takes minutes in the guest.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from greupd.events import MESSAGE_IDS, EventKind
from lab import waiting
from lab.hosts import Host, Lab, SeedTopology, seed_topology

pytestmark = [pytest.mark.needs_systemd, pytest.mark.distro]  # the installed package: make install-test

REPO = Path(__file__).resolve().parent.parent
CONFIG = Path("/etc/greupd/tunnels.toml")
DROP_IN = Path("/etc/systemd/system/greupd.service.d/lab.conf")
INTERVAL = 0.2
RETRIES = 3


def a_config(on_exit: str = "keep", routes: tuple[str, ...] = ("20.10.1.0/24",)) -> str:
    quoted = ", ".join(f'"{r}"' for r in routes)
    return (f'[daemon]\nip_forward = true\non_exit = "{on_exit}"\n\n'
            '[[tunnel]]\nname = "My_Tunnel"\nmode = "gre"\nlocal = "172.19.1.1"\nremote = "172.19.1.2"\n'
            f'address = "192.168.8.1"\npeer = "192.168.8.11"\nroutes = [{quoted}]\n\n'
            f'[tunnel.keepalive]\ninterval = {INTERVAL}\nretries = {RETRIES}\n')


def plain_peer(b: Host) -> None:
    """Router B without greupd: a GRE tunnel back to A whose kernel reflects A's keepalives (kernel-lab.md)."""
    b.ip("tunnel", "add", "to_a", "mode", "gre", "local", "172.19.1.2", "remote", "172.19.1.1", "ttl", "64")
    b.ip("addr", "add", "192.168.8.11", "peer", "192.168.8.1", "dev", "to_a")
    b.ip("link", "set", "to_a", "up")
    b.ip("route", "add", "10.10.1.0/24", "dev", "to_a")
    for key, value in (("net.ipv4.ip_forward", 1), ("net.ipv4.conf.to_a.accept_local", 1),
                       ("net.ipv4.conf.to_a.rp_filter", 0), ("net.ipv4.conf.all.rp_filter", 0)):
        b.sysctl(key, value)


def sh(*argv: str | Path, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, argv))}: exit {result.returncode}\n{result.stdout}{result.stderr}"
                             f"\n{journal_text()}")
    return result


def journal_text() -> str:
    return subprocess.run(["journalctl", "-u", "greupd", "--no-pager", "-n", "60"], capture_output=True,
                          text=True, timeout=60).stdout


def eventually(check: Callable[[], bool], timeout: float = 30, what: str = "condition") -> None:
    waiting.eventually(check, timeout, what, detail=journal_text, interval=0.1)


def show(prop: str) -> str:
    return sh("systemctl", "show", "-P", prop, "greupd").stdout.strip()


def journal(*matches: str) -> list[dict[str, str]]:
    """greupd's journal entries with these FIELD=value matches, oldest first."""
    out = sh("journalctl", "-u", "greupd", "-o", "json", "--no-pager", *matches).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def greupd(*args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    return sh("/usr/bin/greupd", *args, check=check)


# --- the installed package -------------------------------------------------------------------------------------

def _deb() -> Path:
    handed_over = os.environ.get("GREUPD_LAB_DEB")
    if handed_over and Path(handed_over).is_file():
        return Path(handed_over)
    out = Path("/tmp/greupd-lab-deb")  # the guest's own tmpfs
    built = subprocess.run([REPO / "packaging" / "build-deb", "--out", out], capture_output=True, text=True,
                           timeout=1800)
    assert built.returncode == 0, built.stderr[-4000:]
    return Path(built.stdout.split()[-1])


@pytest.fixture(scope="module")
def installed() -> Path:
    deb = _deb()
    sh("dpkg", "-i", deb, timeout=600)
    return deb


@dataclass
class Seed:
    topology: SeedTopology

    @property
    def a(self) -> Host:
        return self.topology.a

    @property
    def b(self) -> Host:
        return self.topology.b

    def routes(self) -> str:
        return self.a.ip("route", "show", "proto", "greupd").stdout


@pytest.fixture(scope="module")
def lab_seed(installed: Path) -> Iterator[Seed]:
    """One seed network for the module (building it, and each daemon-reload, take seconds in the guest)."""
    with Lab() as lab:
        topology = seed_topology(lab)
        plain_peer(topology.b)
        DROP_IN.parent.mkdir(parents=True, exist_ok=True)
        # Only where it runs changes: the rest of the unit is the packaged one. TimeoutAbortSec: the watchdog's
        # SIGABRT to a stopped process waits for it, and a stopped process never dumps core.
        DROP_IN.write_text(f"[Service]\nNetworkNamespacePath=/run/netns/{topology.a.netns}\nTimeoutAbortSec=3s\n")
        sh("systemctl", "daemon-reload")
        yield Seed(topology)
        sh("systemctl", "stop", "greupd", check=False)
        for drop_in in DROP_IN.parent.glob("*.conf"):
            drop_in.unlink()
        sh("systemctl", "daemon-reload")


@pytest.fixture
def seed(lab_seed: Seed) -> Iterator[Seed]:
    """Router A as a fresh machine: greupd stopped, no tunnel yet, forwarding off; B alive."""
    a, b = lab_seed.a, lab_seed.b
    a.ip("link", "del", "My_Tunnel", check=False)
    a.sysctl("net.ipv4.ip_forward", 0)
    b.ip("link", "set", "to_a", "up")
    CONFIG.write_text(a_config())
    yield lab_seed
    sh("systemctl", "stop", "greupd", check=False)
    sh("systemctl", "reset-failed", "greupd", check=False)
    extra = [d for d in DROP_IN.parent.glob("*.conf") if d != DROP_IN]
    for drop_in in extra:
        drop_in.unlink()
    if extra:
        sh("systemctl", "daemon-reload")


def start(seed: Seed) -> None:
    sh("systemctl", "start", "greupd", timeout=180)
    eventually(lambda: show("StatusText") == "1 tunnel: 1 up", what="StatusText '1 tunnel: 1 up'")


def test_package_installs_everything_and_enables_nothing(installed: Path) -> None:
    assert sh("dpkg-query", "-W", "-f", "${Status}", "greupd").stdout == "install ok installed"
    assert sh("systemctl", "is-enabled", "greupd", check=False).stdout.strip() == "disabled"
    assert show("ActiveState") == "inactive"
    # The system user and group the unit runs as, made by systemd-sysusers from the package's sysusers.d file.
    assert sh("getent", "passwd", "greupd").stdout.split(":")[6].strip() in ("/usr/sbin/nologin", "/sbin/nologin")
    assert sh("getent", "group", "greupd").stdout.startswith("greupd:")
    assert sh("systemctl", "cat", "greupd@.service").returncode == 0
    # ip(8) knows the route protocol by name, and the catalog was indexed by systemd's dpkg trigger.
    sh("ip", "route", "show", "proto", "greupd")
    catalog = sh("journalctl", "--list-catalog", "--no-pager").stdout
    assert f"{MESSAGE_IDS[EventKind.TUNNEL_DOWN]} greupd: GRE tunnel @GREUPD_TUNNEL@ is down" in catalog
    assert "greupd status" in sh("man", "-P", "cat", "greupd").stdout


def test_start_returns_with_the_tunnel_in_place(seed: Seed) -> None:
    sh("systemctl", "start", "greupd", timeout=180)
    # Type=notify: start returned after READY=1, so the link and its routes exist already.
    assert show("ActiveState") == "active"
    assert "My_Tunnel" in seed.a.ip("link", "show", "My_Tunnel").stdout
    # Written through ReadWritePaths=/proc/sys/net by a daemon that is not root: the files are root's 0644, but
    # the kernel lets a holder of CAP_NET_ADMIN in the netns's user namespace write net.* (net_ctl_permissions).
    assert seed.a.sysctl_get("net.ipv4.ip_forward") == "1"
    # ... by a daemon confined as the unit says: user greupd, CAP_NET_ADMIN (12) and CAP_NET_RAW (13) only,
    # effective through the ambient set, no new privileges.
    proc_status = Path(f"/proc/{show('MainPID')}/status").read_text()
    uid = sh("id", "-u", "greupd").stdout.strip()
    assert re.search(rf"^Uid:\s+{uid}\s+{uid}\s+{uid}\s+{uid}$", proc_status, re.M), proc_status
    for caps in ("CapBnd", "CapEff", "CapAmb"):
        assert re.search(rf"^{caps}:\s+0000000000003000$", proc_status, re.M), proc_status
    assert re.search(r"^NoNewPrivs:\s+1$", proc_status, re.M), proc_status
    eventually(lambda: show("StatusText") == "1 tunnel: 1 up", what="StatusText '1 tunnel: 1 up'")
    assert "20.10.1.0/24 dev My_Tunnel" in seed.routes()
    assert seed.a.wait_ping("192.168.8.11")
    status = greupd("status", "--json", check=True)
    assert json.loads(status.stdout)["tunnels"][0]["state"] == "up"
    table = greupd("status", check=True).stdout
    assert re.search(r"My_Tunnel\s+up\s", table)


def test_every_state_change_is_a_structured_journal_entry(seed: Seed) -> None:
    start(seed)
    up = journal("GREUPD_TUNNEL=My_Tunnel", "GREUPD_STATE=up")
    assert up, journal_text()
    assert up[-1]["SYSLOG_IDENTIFIER"] == "greupd"
    assert up[-1]["MESSAGE_ID"] == MESSAGE_IDS[EventKind.TUNNEL_UP]
    assert up[-1]["PRIORITY"] == "5"

    seed.b.ip("link", "set", "to_a", "down")  # B dies
    eventually(lambda: bool(journal("GREUPD_TUNNEL=My_Tunnel", "GREUPD_STATE=down")), what="a tunnel-down entry")
    down = journal("GREUPD_TUNNEL=My_Tunnel", "GREUPD_STATE=down")[-1]
    assert down["MESSAGE_ID"] == MESSAGE_IDS[EventKind.TUNNEL_DOWN]
    assert down["PRIORITY"] == "4"
    assert down["GREUPD_PREVIOUS_STATE"] == "up"
    assert down["GREUPD_REASON"] == "keepalive-timeout"
    assert down["MESSAGE"].startswith("tunnel My_Tunnel down: ")
    assert "20.10.1.0/24" in down["MESSAGE"]
    assert "20.10.1.0/24" not in seed.routes()
    eventually(lambda: show("StatusText") == "1 tunnel: 1 down (My_Tunnel: keepalive timeout)",
               what="StatusText naming the dead tunnel")
    # journalctl -x explains the entry from the catalog.
    explained = sh("journalctl", "-u", "greupd", "-x", "--no-pager", f"MESSAGE_ID={down['MESSAGE_ID']}").stdout
    assert "Subject: GRE tunnel My_Tunnel is down" in explained

    seed.b.ip("link", "set", "to_a", "up")  # B is back
    eventually(lambda: len(journal("GREUPD_TUNNEL=My_Tunnel", "GREUPD_STATE=up")) == len(up) + 1,
               what="a second tunnel-up entry")
    assert journal("GREUPD_TUNNEL=My_Tunnel", "GREUPD_STATE=up")[-1]["GREUPD_REASON"] == "keepalive-restored"
    assert "20.10.1.0/24 dev My_Tunnel" in seed.routes()


def test_reload_applies_a_valid_config_and_fails_on_an_invalid_one(seed: Seed) -> None:
    start(seed)
    CONFIG.write_text(a_config(routes=("20.10.1.0/24", "20.10.2.0/24")))
    sh("systemctl", "reload", "greupd", timeout=180)
    # ExecReload= waited for the daemon's answer: the new route is there when reload returns.
    assert "20.10.2.0/24 dev My_Tunnel" in seed.routes()
    reloaded = journal(f"MESSAGE_ID={MESSAGE_IDS[EventKind.CONFIG_RELOADED]}")
    assert reloaded and reloaded[-1]["GREUPD_GENERATION"] == "2"

    CONFIG.write_text(a_config().replace("interval = 0.2", "interval = 0.001"))
    rejected = sh("systemctl", "reload", "greupd", check=False, timeout=180)
    assert rejected.returncode != 0
    assert show("ActiveState") == "active"  # the daemon carries on with the config in force
    assert "20.10.2.0/24 dev My_Tunnel" in seed.routes()
    entry = journal(f"MESSAGE_ID={MESSAGE_IDS[EventKind.CONFIG_REJECTED]}")[-1]
    assert entry["PRIORITY"] == "3"
    assert "tunnel[0].keepalive.interval" in entry["GREUPD_ERROR"]


def test_stop_keeps_or_removes_the_tunnel_as_on_exit_says(seed: Seed) -> None:
    start(seed)
    sh("systemctl", "stop", "greupd", timeout=120)
    assert journal(f"MESSAGE_ID={MESSAGE_IDS[EventKind.DAEMON_STOPPING]}")[-1]["GREUPD_ON_EXIT"] == "keep"
    assert "My_Tunnel" in seed.a.ip("link", "show", "My_Tunnel").stdout  # keep: traffic flows on
    assert "20.10.1.0/24 dev My_Tunnel" in seed.routes()
    assert show("Result") == "success"

    CONFIG.write_text(a_config(on_exit="remove"))
    start(seed)  # adopts the kept tunnel
    sh("systemctl", "stop", "greupd", timeout=120)
    assert seed.a.ip("link", "show", "My_Tunnel", check=False).returncode != 0
    assert seed.routes().strip() == ""


def test_watchdog_restarts_a_stuck_daemon(seed: Seed) -> None:
    (DROP_IN.parent / "watchdog.conf").write_text("[Service]\nWatchdogSec=3s\n")
    sh("systemctl", "daemon-reload")
    start(seed)
    stuck, restarts = show("MainPID"), int(show("NRestarts"))
    os.kill(int(stuck), signal.SIGSTOP)  # the event loop stops, and so do its pings
    eventually(lambda: int(show("NRestarts")) == restarts + 1 and show("ActiveState") == "active"
               and show("MainPID") != stuck, timeout=60, what="a restart by the watchdog")
    assert sh("journalctl", "-u", "greupd", "--no-pager", "-g", "[Ww]atchdog timeout").stdout.strip()
    # The restarted daemon adopts the tunnel its predecessor left (on_exit = keep; SIGKILL stops nothing).
    eventually(lambda: show("StatusText") == "1 tunnel: 1 up", what="the tunnel up under the new daemon")
    assert "20.10.1.0/24 dev My_Tunnel" in seed.routes()


def test_a_restart_into_a_broken_config_keeps_the_tunnel_managed(seed: Seed) -> None:
    start(seed)  # applied cleanly: kept in StateDirectory= as the last good config
    assert Path("/var/lib/greupd/last-good.json").is_file()
    # Half-edited, then the package upgrade's try-restart (review H4).
    CONFIG.write_text(a_config().replace('remote = "172.19.1.2"', 'remote = "172.19.1.'))
    sh("systemctl", "restart", "greupd", timeout=180)
    eventually(lambda: show("StatusText") == "1 tunnel: 1 up", what="the last good config's tunnel up")
    entry = journal(f"MESSAGE_ID={MESSAGE_IDS[EventKind.CONFIG_REJECTED]}")[-1]
    assert "TOML syntax" in entry["GREUPD_ERROR"]
    status = json.loads(greupd("status", "--json").stdout)
    assert status["last_error"].startswith("config rejected at start, running the last good config")
    # Still managed: a route deleted by hand comes back.
    seed.a.ip("route", "del", "20.10.1.0/24", "dev", "My_Tunnel")
    eventually(lambda: "20.10.1.0/24 dev My_Tunnel" in seed.routes(), what="the route put back")


def as_user(user: str, *argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command as another user with that user's groups, as a login would."""
    gid = sh("id", "-g", user).stdout.strip()
    return subprocess.run(["setpriv", f"--reuid={user}", f"--regid={gid}", "--init-groups", *argv],
                          capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})


def test_a_member_of_group_greupd_reads_the_status_and_no_one_else(seed: Seed) -> None:
    start(seed)
    sh("useradd", "--system", "--no-create-home", "--groups", "greupd", "monitor", check=False)
    sh("id", "monitor")
    socket_info = os.stat("/run/greupd/control.sock")
    assert (oct(socket_info.st_mode & 0o777), socket_info.st_gid) == ("0o660", int(sh("getent", "group", "greupd")
                                                                                .stdout.split(":")[2]))
    status = as_user("monitor", "/usr/bin/greupd", "status")
    assert status.returncode == 0, status.stderr
    assert re.search(r"My_Tunnel\s+up\s", status.stdout)
    reload = as_user("monitor", "/usr/bin/greupd", "reload")
    assert reload.returncode == 77 and "reload is for root" in reload.stderr, reload.stderr
    outsider = as_user("nobody", "/usr/bin/greupd", "status")
    assert outsider.returncode == 77 and "permission denied" in outsider.stderr.lower(), outsider.stderr


@contextlib.contextmanager
def netns_named(name: str, host: Host) -> Iterator[None]:
    """`ip netns` lists `name` as one more name of the host's netns (what `ip netns attach` does, by a bind mount)."""
    path = Path("/run/netns") / name
    path.touch()
    sh("mount", "--bind", f"/run/netns/{host.netns}", path)
    try:
        yield
    finally:
        sh("umount", path, check=False)
        path.unlink()


def test_greupd_at_ns1_manages_a_tunnel_inside_netns_ns1(seed: Seed) -> None:
    """greupd@ns1, the packaged template unchanged, with router A's netns named ns1; `greupd -n ns1` asks it."""
    instance = "greupd@ns1.service"
    config = Path("/etc/greupd/ns1/tunnels.toml")
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(a_config(on_exit="remove"))
    with netns_named("ns1", seed.a):
        try:
            sh("systemctl", "start", instance, timeout=180)
            assert sh("systemctl", "show", "-P", "User", instance).stdout.strip() == "greupd"
            assert "My_Tunnel" in sh("ip", "-n", "ns1", "link", "show", "My_Tunnel").stdout  # inside ns1 ...
            assert sh("ip", "link", "show", "My_Tunnel", check=False).returncode != 0  # ... and not in the guest's
            # `greupd -n ns1` finds the instance's socket (/run/greupd-netns/ns1/control.sock) by itself.
            eventually(lambda: '"state": "up"' in greupd("-n", "ns1", "status", "--json").stdout,
                       what="the instance's tunnel up (keepalives answered)")
            assert "20.10.1.0/24 dev My_Tunnel" in sh("ip", "-n", "ns1", "route", "show", "proto", "greupd").stdout
            assert seed.a.wait_ping("192.168.8.11")
            assert greupd("status").returncode == 3  # greupd.service is not running: -n made the difference
            sh("systemctl", "stop", instance, timeout=120)  # on_exit = "remove": the instance cleans up its netns
            assert seed.a.ip("link", "show", "My_Tunnel", check=False).returncode != 0
        finally:
            sh("systemctl", "stop", instance, check=False)
            sh("systemctl", "reset-failed", instance, check=False)
            config.unlink()


VICI_GROUP = "vici"
CHARON_GROUP_CONF = Path("/etc/strongswan.d/greupd-vici.conf")


def ipsec_status() -> dict[str, object]:
    tunnel = json.loads(greupd("status", "--json", check=True).stdout)["tunnels"][0]
    ipsec: dict[str, object] = tunnel["ipsec"]
    return ipsec


@pytest.fixture
def charon() -> Iterator[None]:
    """strongSwan's own unit (charon-systemd), as Debian ships it; stopped and its settings gone afterwards."""
    if not Path("/usr/sbin/charon-systemd").exists():
        pytest.skip("charon-systemd is not installed (apt-get install charon-systemd)")
    yield
    sh("systemctl", "stop", "strongswan", check=False, timeout=120)
    CHARON_GROUP_CONF.unlink(missing_ok=True)


@pytest.mark.usefixtures("charon")
def test_user_greupd_reaches_charon_through_a_group_of_its_own(seed: Seed) -> None:
    """[tunnel.ipsec] under User=greupd: charon's VICI socket is 0770 root:root, so greupd needs a group it shares
    with charon. greupd(8)'s recipe: `charon { group = vici }`, and SupplementaryGroups=vici for greupd."""
    psk = Path("/etc/greupd/psk/My_Tunnel")
    psk.parent.mkdir(parents=True, exist_ok=True)
    psk.write_text("a-pre-shared-key-of-32-characters\n")
    sh("chown", "greupd:greupd", psk)
    psk.chmod(0o600)
    CONFIG.write_text(a_config() + f'\n[tunnel.ipsec]\npsk_file = "{psk}"\nrequire = false\n')
    # The key the daemon (user greupd) needs is the key root's `greupd check` accepts: the package's restart-if-valid
    # and ansible's validate run it as root (review M5; before, "owned by uid N, not root").
    sh("/usr/bin/greupd", "check", CONFIG)
    sh("systemctl", "start", "strongswan", timeout=180)
    vici = os.stat("/run/charon.vici")
    assert (oct(vici.st_mode & 0o777), vici.st_gid) == ("0o770", 0)  # strongSwan's umask(007), owner root
    start(seed)
    eventually(lambda: "ermission denied" in str(ipsec_status()["error"]), what="greupd refused by charon's socket")
    refused = ipsec_status()
    assert refused["charon"] is False
    assert "SupplementaryGroups=vici" in str(refused["error"])  # the error says what to do

    sh("groupadd", "--system", VICI_GROUP)
    CHARON_GROUP_CONF.write_text(f"charon {{\n    group = {VICI_GROUP}\n}}\ncharon-systemd {{\n"
                                 f"    group = {VICI_GROUP}\n}}\n")
    (DROP_IN.parent / "vici.conf").write_text(f"[Service]\nSupplementaryGroups={VICI_GROUP}\n")
    sh("systemctl", "daemon-reload")
    sh("systemctl", "restart", "strongswan", timeout=180)
    assert os.stat("/run/charon.vici").st_gid == int(sh("getent", "group", VICI_GROUP).stdout.split(":")[2])
    sh("systemctl", "restart", "greupd", timeout=180)
    eventually(lambda: ipsec_status()["charon"] is True, what="greupd's VICI session with charon")
    # What greupd loaded over that session, as strongSwan's own tool lists it.
    assert "greupd-My_Tunnel" in sh("swanctl", "--list-conns").stdout


@pytest.fixture
def services_may_start() -> Iterator[None]:
    """No policy-rc.d veto: a container host's (Docker's `exit 101`) would stop every restart by a package."""
    policy = Path("/usr/sbin/policy-rc.d")
    aside = policy.with_name("policy-rc.d.lab-aside")
    if policy.exists():
        policy.rename(aside)  # in the guest's overlay: the host's file stays as it is
    yield
    if aside.exists():
        aside.rename(policy)


@pytest.mark.usefixtures("services_may_start")
def test_an_upgrade_restarts_the_daemon_only_onto_a_config_that_validates(seed: Seed, installed: Path) -> None:
    start(seed)
    running = show("MainPID")
    # The admin's config on disk does not validate when the package is upgraded (here: reinstalled, which runs
    # postinst as an upgrade): the running daemon is left alone, with a warning, rather than restarted into it.
    CONFIG.write_text(a_config().replace("interval = 0.2", "interval = 0.001"))
    upgrade = sh("dpkg", "-i", installed, timeout=600)
    assert "not restarting greupd.service" in upgrade.stderr, upgrade.stderr
    assert "tunnel[0].keepalive.interval" in upgrade.stderr
    assert (show("ActiveState"), show("MainPID")) == ("active", running)
    # Once the config is fixed, the next upgrade restarts it onto the new code, and the tunnel stays (keep).
    CONFIG.write_text(a_config())
    sh("dpkg", "-i", installed, timeout=600)
    assert show("MainPID") != running
    eventually(lambda: show("StatusText") == "1 tunnel: 1 up", what="the restarted daemon's tunnel up")
    assert "20.10.1.0/24 dev My_Tunnel" in seed.routes()
