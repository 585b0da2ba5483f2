"""Tests of the test lab itself: netns hosts, the seed topology, GRE through pyroute2, the guests."""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

from lab import guest, kernel, pytest_plugin
from lab.hosts import Host, Lab, LabCommandError, SeedTopology, netns_list

GRE_KEY = 0x2000  # GRE_KEY in gre_iflags/gre_oflags: the ikey/okey fields are used


def gre_tunnel(h: Host, name: str, local: str, remote: str, addr: str, peer: str, key: int | None = None) -> None:
    """What greupd does for one [[tunnel]], done here with pyroute2 directly."""
    spec: dict[str, Any] = {"ifname": name, "kind": "gre", "gre_local": local, "gre_remote": remote, "gre_ttl": 64}
    if key is not None:
        spec |= {"gre_ikey": key, "gre_okey": key, "gre_iflags": GRE_KEY, "gre_oflags": GRE_KEY}
    with h.iproute() as ipr:
        ipr.link("add", **spec)
        (idx,) = ipr.link_lookup(ifname=name)
        # ip addr add A peer P: IFA_LOCAL is our address, IFA_ADDRESS the peer's (pyroute2 has no "peer")
        ipr.addr("add", index=idx, local=addr, address=peer, prefixlen=32)
        ipr.link("set", index=idx, state="up")


def route_via(h: Host, prefix: str, ifname: str) -> None:
    dst, plen = prefix.split("/")
    with h.iproute() as ipr:
        (idx,) = ipr.link_lookup(ifname=ifname)
        ipr.route("add", dst=dst, dst_len=int(plen), oif=idx)


@pytest.mark.needs_root
def test_seed_topology_without_gre(seed: SeedTopology) -> None:
    assert seed.lan_a.ping("10.10.1.1")
    assert seed.lan_b.ping("20.10.1.1")
    assert seed.a.ping("172.19.1.2")
    assert seed.a.run("sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "1"
    # No route between the LANs yet: B has none back to 10.10.1.0/24, and A none to 20.10.1.0/24.
    assert not seed.lan_a.ping("20.10.1.2", timeout=0.5)
    # The underlay is a bridge: a third router can join it.
    c = seed.add_router("c", "172.19.1.3")
    assert c.ping("172.19.1.1") and c.ping("172.19.1.2")


@pytest.mark.needs_root
def test_lab_removes_its_namespaces_also_when_the_test_fails() -> None:
    with pytest.raises(RuntimeError), Lab() as lab:
        h = lab.host("x")
        proc = h.popen("sleep", "300")
        names = [h.netns]
        raise RuntimeError("test failed")
    assert proc.poll() is not None
    assert not set(names) & set(netns_list())


@pytest.mark.needs_root
def test_host_run_reports_the_host_on_failure(lab: Lab) -> None:
    h = lab.host("r")
    with pytest.raises(LabCommandError, match=r"\[r\] ip link show nosuch(.|\n)*does not exist"):
        h.run("ip", "link", "show", "nosuch")


@pytest.mark.needs_gre
@pytest.mark.parametrize("key", [None, 42])
def test_gre_between_seed_lans(seed: SeedTopology, key: int | None) -> None:
    gre_tunnel(seed.a, "gre1", "172.19.1.1", "172.19.1.2", "192.168.8.1", "192.168.8.11", key)
    gre_tunnel(seed.b, "gre1", "172.19.1.2", "172.19.1.1", "192.168.8.11", "192.168.8.1", key)
    route_via(seed.a, "20.10.1.0/24", "gre1")
    route_via(seed.b, "10.10.1.0/24", "gre1")
    assert seed.a.wait_ping("192.168.8.11")
    assert seed.lan_a.ping("20.10.1.2", count=3)
    assert seed.lan_b.ping("10.10.1.2")
    link = seed.a.run("ip", "-d", "link", "show", "gre1").stdout
    assert "remote 172.19.1.2 local 172.19.1.1" in link
    if key is not None:
        assert "ikey 0.0.0.42" in link and "okey 0.0.0.42" in link


@pytest.mark.needs_nft_gre
def test_gre_and_nft_inet_in_one_kernel(lab: Lab) -> None:
    h = lab.host("n")
    h.ip("link", "add", "gre1", "type", "gre", "local", "127.0.0.1", "remote", "127.0.0.2")
    h.run("nft", "add", "table", "inet", "t")
    h.run("nft", "add chain inet t fw { type filter hook forward priority 0; }")
    h.run("nft", "add rule inet t fw oifname gre1 tcp flags syn tcp option maxseg size set rt mtu")
    assert "maxseg size set rt mtu" in h.run("nft", "list", "table", "inet", "t").stdout


@pytest.mark.needs_systemd
@pytest.mark.distro  # with the other uml-systemd tests (make install-test): a guest's boot for one look is dear
def test_systemd_is_pid1_in_the_guest() -> None:
    assert Path("/proc/1/comm").read_text().strip() == "systemd"
    out = subprocess.run(["systemctl", "is-system-running"], capture_output=True, text=True).stdout
    assert out.strip() in ("running", "degraded")
    # The host's disk is safe: writes outside the run dir land in the overlay's tmpfs.
    assert "overlay" in subprocess.run(["findmnt", "-no", "FSTYPE", "/"], capture_output=True, text=True).stdout


@pytest.mark.needs_gre
def test_guest_environment() -> None:
    """Where a delegated test runs: it knows the guest, and CI passes through."""
    here = kernel.current_guest()
    if here is None:  # a kernel with GRE of its own: nothing was delegated
        return
    assert here in guest.KINDS
    assert os.environ.get("GREUPD_LAB_RUNDIR")
    assert socket.gethostname() == "greupd-lab" or here == "vng"


def test_guest_script_passes_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    monkeypatch.setenv("GREUPD_CONFIG", "/x y/t.toml")
    env = guest.guest_env("uml")
    assert env["CI"] == "true" and env["GREUPD_LAB_GUEST"] == "uml" and env["GREUPD_CONFIG"] == "/x y/t.toml"
    assert "PATH" in env


def test_missing_guest_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GREUPD_LAB_UML_KERNEL", "/nonexistent/linux.uml")
    res = guest.run("uml", ["true"])
    assert res.status is None and not res.booted
    assert res.error is not None and "no user-mode-linux kernel" in res.error


def test_the_vng_systemd_guest_boots_our_init_and_it_execs_systemd_in_an_overlay(tmp_path: Path) -> None:
    """virtme-ng has no option for another init: a second -append (qemu keeps the last) names ours."""
    argv = guest._guest_argv("vng-systemd", tmp_path)
    (opts,) = [a for a in argv if a.startswith("--qemu-opts=")]
    words = shlex.split(opts.removeprefix("--qemu-opts="))  # virtme-ng hands it to a shell
    cmdline = words[words.index("-append") + 1].split()
    assert f"init={tmp_path}/init" in cmdline and "console=ttyS0" in cmdline
    init = guest._vng_systemd_init(tmp_path, None).splitlines()
    assert init[-1] == f"exec chroot /run/ov/root /lib/systemd/systemd --unit={guest.UNIT} --show-status=false"
    assert any(line.startswith("mount -t 9p -o trans=virtio") and line.split()[5] == guest.VNG_RUNDIR_TAG
               for line in init)
    assert "mount -t overlay overlay -o lowerdir=/,upperdir=/run/ov/upper,workdir=/run/ov/work /run/ov/root" in init


def test_the_vng_guest_boots_our_init_too_and_runs_the_command_in_the_overlay(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """GREUPD_LAB_VNG_INIT=own, no virtme-ng-init (its udev coldplug): the same -append as vng-systemd, the command
    instead of systemd."""
    monkeypatch.setenv("GREUPD_LAB_VNG_INIT", "own")
    argv = guest._guest_argv("vng", tmp_path)
    (opts,) = [a for a in argv if a.startswith("--qemu-opts=")]
    assert f"init={tmp_path}/init" in opts
    init = guest._vng_systemd_init(tmp_path, None, systemd=False).splitlines()
    assert init[-1] == f"exec chroot /run/ov/root /bin/sh {tmp_path}/in-root"
    assert "mount -t tmpfs -o mode=0755 tmpfs /run/ov/root/run" in init  # not the host's /run
    assert not any("systemd" in line for line in init)
    in_root = (tmp_path / "in-root").read_text().splitlines()
    assert f"sh {tmp_path}/cmd.sh" in in_root and "echo o >/proc/sysrq-trigger" in in_root
    monkeypatch.delenv("GREUPD_LAB_VNG_INIT")  # the default: virtme-ng's own init, which runs _vng_init's script
    assert not any(a.startswith("--qemu-opts=") for a in guest._guest_argv("vng", tmp_path))


def test_the_guest_binds_back_the_folders_it_needs_from_tmp() -> None:
    kept = guest.folders_under_tmp(["/tmp/greupd/.lab/uml-1", "/tmp/greupd", "/tmp/venv/bin/..", "/work/x", "/tmp"])
    assert kept == [Path("/tmp/greupd"), Path("/tmp/venv")]


def test_the_uml_batch_is_split_into_shards_of_about_equal_time() -> None:
    """Two UML guests side by side: the slow soak alone in one, the many short tests in the other."""
    took = {"soak": 105.0, "ping": 10.0, "drift": 30.0, "reload": 20.0, "fight": 40.0, "import": 5.0}
    shards = pytest_plugin.balance(took, 2)
    assert sorted(n for shard in shards for n in shard) == sorted(took)  # every test once, none dropped
    assert shards == [["soak"], ["ping", "drift", "reload", "fight", "import"]]  # each keeps the file's order
    assert pytest_plugin.balance({"only": 5.0}, 2) == [["only"], []]


@pytest.mark.needs_root
def test_a_checkout_under_tmp_is_seen_in_the_uml_guest(monkeypatch: pytest.MonkeyPatch) -> None:
    """`git clone ... /tmp/greupd && make demo`: the guest's fresh /tmp must not hide the checkout."""
    if kernel.current_guest():
        pytest.skip("boots a guest of its own: only from the host")
    why = guest.unavailable("uml")
    if why:
        pytest.skip(why)
    checkout = Path(tempfile.mkdtemp(prefix="greupd-clone-", dir="/tmp"))
    try:
        (checkout / "README.md").write_text("two routers and a tunnel\n")
        monkeypatch.setenv("GREUPD_LAB_DIR", str(checkout / ".lab"))
        res = guest.run("uml", ["sh", "-c", "cat README.md && touch written-in-the-guest"], cwd=checkout, timeout=300)
        assert res.ok, res.describe()
        assert res.output == "two routers and a tunnel\n"
        assert (checkout / "written-in-the-guest").exists()
    finally:
        shutil.rmtree(checkout)
