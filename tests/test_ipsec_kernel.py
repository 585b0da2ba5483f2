"""GRE over IPsec with a real strongSwan: the seed's routers A and B, a charon in each (lab/charon.py).

- greupd keeps charon holding its connections (a hand-unloaded one comes back, a restarted charon gets them
  again) and never touches an operator's own connection: on the running kernel, in a netns (no GRE needed).
- The seed topology with [tunnel.ipsec] on both ends: LAN pings pass and the underlay carries only ESP.
- Interop: B is plain strongSwan with a hand-written swanctl.conf and a hand-made GRE link.
- B's charon dies: A's keepalives declare the tunnel down in time, no cleartext GRE leaves A; charon back: up.

Where the no-cleartext guarantee comes from, honestly: UML's nftables has no inet family, so in the UML
guest greupd's drop rules cannot be installed, and a tunnel with `require = true` (the default) stays in error
there with no link at all (tests/test_ipsec_fail_closed.py). These UML tests therefore say `require = false`:
what keeps GRE inside ESP here is charon's kernel policy alone. greupd's own nftables drop is tested in the
qemu guest (`needs_nft_gre`): with no charon at all, not one GRE packet leaves A in cleartext.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from greupd.config import load_config_text
from greupd.ipsec.connections import desired_connections
from greupd.ipsec.supervisor import IpsecSupervisor
from greupd.nft.ipsec import render_ipsec_ruleset
from lab import charon as charon_lab
from lab.charon import Charon, gre_transport_conf
from lab.greupd_process import GreupdProcess, _scratch
from lab.hosts import Host, Lab, SeedTopology, seed_topology
from lab.waiting import wait_until

INTERVAL = 0.5
RETRIES = 3
PSK = "seed-story-psk-0123456789abcdef"
pytestmark = pytest.mark.skipif(charon_lab.available() is not None, reason=charon_lab.available() or "")


def psk_file(host: Host, directory: Path | None = None) -> Path:
    path = (directory or Path(_scratch())) / f"psk-{host.netns}"
    path.write_text(PSK + "\n")
    path.chmod(0o600)
    return path


def router_config(host: Host, local: str, remote: str, address: str, peer: str, routes: str,
                  vici: Path, keepalive: bool = True, require: bool = True, secrets: Path | None = None) -> str:
    text = (f'[daemon]\nvici_socket = "{vici}"\n\n'
            f'[[tunnel]]\nname = "My_Tunnel"\nlocal = "{local}"\nremote = "{remote}"\naddress = "{address}"\n'
            f'peer = "{peer}"\nroutes = ["{routes}"]\n')
    if keepalive:
        text += f"[tunnel.keepalive]\ninterval = {INTERVAL}\nretries = {RETRIES}\n"
    text += f'[tunnel.ipsec]\npsk_file = "{psk_file(host, secrets)}"\nrequire = {str(require).lower()}\n'
    return text


# --- the connections in charon (running kernel, no GRE needed) --------------------------------------------

OPERATOR_CONF = """connections {
  office {
    remote_addrs = 198.51.100.7
    local { auth = psk }
    remote { auth = psk }
    children { office { remote_ts = 10.99.0.0/16 } }
  }
}
"""


def conns(c: Charon) -> list[str]:
    return re.findall(r"^(\S+): IKEv", c.swanctl("--list-conns").stdout, flags=re.M)


@pytest.mark.needs_root
def test_greupd_keeps_its_connections_in_charon_and_touches_no_other(lab: Lab) -> None:
    a = lab.host("a")
    a.ip("link", "add", "wan0", "type", "veth", "peer", "name", "wan1")
    a.ip("addr", "add", "172.19.1.1/24", "dev", "wan0")
    a.ip("link", "set", "wan0", "up")
    charon = Charon(a).start()
    charon.load(OPERATOR_CONF)  # the operator's own VPN, loaded by swanctl
    config = load_config_text(router_config(a, "172.19.1.1", "172.19.1.2", "192.168.8.1", "192.168.8.11",
                                            "20.10.1.0/24", charon.socket))
    changes: list[tuple[str, str | None]] = []
    errors: list[str] = []

    async def story() -> None:
        supervisor = IpsecSupervisor(charon.socket, lambda _, state, previous, __: changes.append((state, previous)),
                                     errors.append, poll_interval=0.5)
        supervisor.configure(desired_connections(config))  # in a running loop: starts it

        async def until(check: object, timeout: float = 15) -> bool:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if callable(check) and check():
                    return True
                await asyncio.sleep(0.1)
            return False

        assert await until(lambda: conns(charon) == ["office", "greupd-My_Tunnel"]), charon.output()
        status = supervisor.status("My_Tunnel")
        assert status is not None and status["state"] == "connecting" and status["charon"]  # trap, no traffic
        assert "greupd-My_Tunnel" in charon.swanctl("--list-pols").stdout  # the trap policy for GRE

        # The operator reloads swanctl.conf: swanctl unloads every connection its file lacks, ours too.
        charon.load(OPERATOR_CONF)
        assert await until(lambda: conns(charon) == ["office", "greupd-My_Tunnel"]), "not put back"

        # charon crashes and comes back (without the operator's swanctl --load-all, say).
        charon.kill()
        assert await until(lambda: (s := supervisor.status("My_Tunnel")) is not None and s["state"] == "down")
        charon.start()
        assert await until(lambda: conns(charon) == ["greupd-My_Tunnel"]), charon.output()
        assert await until(lambda: (s := supervisor.status("My_Tunnel")) is not None
                           and s["state"] == "connecting")

        # Stopping with on_exit = "remove": ours go, the operator's stays.
        charon.load(OPERATOR_CONF)
        await until(lambda: conns(charon) == ["office", "greupd-My_Tunnel"])
        await supervisor.close(unload=True)
        assert conns(charon) == ["office"]
        assert "greupd-My_Tunnel" not in charon.swanctl("--list-creds", check=False).stdout

    asyncio.run(story())
    assert changes == [("connecting", None), ("down", "connecting"),
                                                        ("connecting", "down")]
    assert errors and all("charon" in e for e in errors), errors
    assert not any(PSK in e for e in errors)


# --- the seed topology, GRE inside ESP (UML guest) ---------------------------------------------------------


class Capture:
    """tcpdump on a host's underlay interface, to a file; `packets(filter)` reads it back."""

    def __init__(self, host: Host, ifname: str = "wan0") -> None:
        self.host = host
        # In the guest's own /tmp: the qemu guest sees the host's file system read-only.
        self.path = Path(tempfile.mkdtemp(prefix="capture-")) / f"{host.netns}.pcap"
        self.proc = host.popen("tcpdump", "-n", "-U", "-i", ifname, "-w", str(self.path),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert wait_until(self.path.exists, 10), "tcpdump did not start"
        time.sleep(0.5)  # the file exists before the capture is attached

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            self.proc.wait(10)

    def packets(self, bpf: str) -> list[str]:
        out = self.host.run("tcpdump", "-n", "-r", str(self.path), bpf, check=False).stdout
        return [line for line in out.splitlines() if line.strip()]


@dataclass
class IpsecSeed:
    seed: SeedTopology
    charon_a: Charon
    charon_b: Charon
    a: GreupdProcess
    b: GreupdProcess | None


def wait_ipsec(greupd: GreupdProcess, state: str, timeout: float = 60, interval: float = 0.2) -> dict[str, object]:
    def reached() -> bool:
        ipsec = greupd.tunnel("My_Tunnel").get("ipsec") or {}
        return bool(ipsec.get("state") == state)
    assert wait_until(reached, timeout, interval=interval), \
        f"ipsec not {state}: {greupd.tunnel('My_Tunnel')}\n{greupd.output()[-3000:]}"
    ipsec: dict[str, object] = greupd.tunnel("My_Tunnel")["ipsec"]
    return ipsec


A_SIDE = ("172.19.1.1", "172.19.1.2", "192.168.8.1", "192.168.8.11", "20.10.1.0/24")
B_SIDE = ("172.19.1.2", "172.19.1.1", "192.168.8.11", "192.168.8.1", "10.10.1.0/24")


@pytest.fixture
def both_ends() -> Iterator[IpsecSeed]:
    """The seed's A and B, each with charon and greupd, the tunnel under [tunnel.ipsec] on both ends."""
    with Lab() as lab:
        seed = seed_topology(lab)
        charon_a, charon_b = Charon(seed.a).start(), Charon(seed.b).start()
        # require = false: UML cannot hold the drops (module docstring), so a require tunnel would wait for ever.
        a = GreupdProcess(seed.a, router_config(seed.a, *A_SIDE, vici=charon_a.socket, require=False)).start()
        b = GreupdProcess(seed.b, router_config(seed.b, *B_SIDE, vici=charon_b.socket, require=False)).start()
        yield IpsecSeed(seed, charon_a, charon_b, a, b)


@pytest.mark.needs_gre
def test_the_seed_tunnel_under_ipsec_carries_the_lans_and_only_esp_crosses_the_underlay(
        both_ends: IpsecSeed) -> None:
    seed, a, b = both_ends.seed, both_ends.a, both_ends.b
    assert b is not None
    # The first keepalive trips the trap policy; charon negotiates; the tunnel comes up through ESP.
    assert wait_ipsec(a, "established")["child_sa"] == "INSTALLED"
    wait_ipsec(b, "established")
    a.wait_for("My_Tunnel", "up", timeout=30)
    assert "mtu 1395" in seed.a.ip("link", "show", "My_Tunnel").stdout  # room for ESP, by default

    capture = Capture(seed.a)
    assert seed.lan_a.wait_ping("20.10.1.2", timeout=20)
    assert seed.lan_a.ping("20.10.1.2", count=5)
    received = a.tunnel("My_Tunnel")["keepalive"]["received"]
    assert wait_until(lambda: a.tunnel("My_Tunnel")["keepalive"]["received"] >= received + 3, 10)
    capture.stop()
    assert capture.packets("ip proto 50 and host 172.19.1.2"), "no ESP on the underlay"
    assert capture.packets("ip proto 47") == []  # neither the LAN pings nor a keepalive in cleartext
    assert "tunnel My_Tunnel ipsec established: ESP SA installed (greupd-My_Tunnel)" in a.output()
    assert PSK not in a.output() and PSK not in both_ends.charon_a.swanctl("--list-conns").stdout




@pytest.mark.needs_gre
def test_interop_with_a_hand_written_swanctl_conf_and_a_hand_made_gre_link(lab: Lab) -> None:
    seed = seed_topology(lab)
    charon_a, charon_b = Charon(seed.a).start(), Charon(seed.b).start()
    # B: no greupd. An operator's swanctl.conf, a GRE link by hand, the kernel reflecting A's keepalives.
    charon_b.load(gre_transport_conf("to-a", "172.19.1.2", "172.19.1.1", PSK))
    seed.b.ip("tunnel", "add", "to_a", "mode", "gre", "local", "172.19.1.2", "remote", "172.19.1.1", "ttl", "64")
    seed.b.ip("addr", "add", "192.168.8.11", "peer", "192.168.8.1", "dev", "to_a")
    seed.b.ip("link", "set", "to_a", "up")
    seed.b.ip("route", "add", "10.10.1.0/24", "dev", "to_a")
    for key in ("net.ipv4.conf.to_a.accept_local", "net.ipv4.conf.to_a.rp_filter", "net.ipv4.conf.all.rp_filter"):
        seed.b.sysctl(key, 0 if "rp_filter" in key else 1)
    a = GreupdProcess(seed.a, router_config(seed.a, *A_SIDE, vici=charon_a.socket, require=False)).start()

    wait_ipsec(a, "established")
    a.wait_for("My_Tunnel", "up", timeout=30)
    capture = Capture(seed.a)
    received = a.tunnel("My_Tunnel")["keepalive"]["received"]
    assert wait_until(lambda: a.tunnel("My_Tunnel")["keepalive"]["received"] >= received + 3, 10), a.output()
    assert seed.lan_a.wait_ping("20.10.1.2", timeout=20)
    capture.stop()
    assert capture.packets("ip proto 47") == []
    assert "to-a" in charon_b.swanctl("--list-sas").stdout  # B's own connection carries it


@pytest.mark.needs_gre
def test_a_dead_charon_takes_the_tunnel_down_without_cleartext_and_back_up(both_ends: IpsecSeed) -> None:
    seed, a, charon_b = both_ends.seed, both_ends.a, both_ends.charon_b
    wait_ipsec(a, "established")
    a.wait_for("My_Tunnel", "up", timeout=30)
    assert seed.lan_a.wait_ping("20.10.1.2", timeout=20)

    capture = Capture(seed.a)
    # B's charon stops (systemctl stop strongswan, or a crash its kernel state does not survive): B's SAs go,
    # so A's ESP reaches nobody who can read it.
    stopped = time.monotonic()
    charon_b.stop()
    a.wait_for("My_Tunnel", "down", timeout=15)
    took = time.monotonic() - stopped
    assert took <= INTERVAL * (RETRIES + 1) + 1.0, f"down after {took:.2f} s"
    assert not seed.lan_a.ping("20.10.1.2", count=2)
    time.sleep(2 * INTERVAL)

    charon_b.start()
    a.wait_for("My_Tunnel", "up", timeout=90)
    wait_ipsec(a, "established")
    assert seed.lan_a.wait_ping("20.10.1.2", timeout=20)
    capture.stop()
    # While B had no SA and while the SAs were negotiated again, not one GRE packet left A in cleartext.
    assert capture.packets("ip proto 47 and src 172.19.1.1") == []


# --- greupd's own drop of cleartext GRE (qemu guest: GRE and nftables inet in one kernel) -----------------


def rx_packets(host: Host, ifname: str) -> int:
    match = re.search(r"RX:.*\n\s+\d+\s+(\d+)", host.ip("-s", "link", "show", ifname).stdout)
    assert match, host.ip("-s", "link", "show", ifname).stdout
    return int(match.group(1))


@pytest.mark.needs_nft_gre
def test_require_drops_cleartext_gre_both_ways_with_no_charon_at_all(seed: SeedTopology, tmp_path: Path) -> None:
    from tests.test_nft_traffic import apply_on, build_tunnel

    build_tunnel(seed)  # the seed's GRE link by hand on both ends; it carries a ping in cleartext
    # (tmp_path: the qemu guest sees the host's file system read-only)
    text = router_config(seed.a, *A_SIDE, vici=Path("/nonexistent/charon.vici"), keepalive=False, secrets=tmp_path)
    # The worst case for a leak: no charon, so no IPsec policy at all. Only greupd's drops stand in the way
    # (their own table since #21 M1, apart from the clamp and NAT).
    apply_on(seed.a, render_ipsec_ruleset(load_config_text(text)))
    received = rx_packets(seed.a, "My_Tunnel")

    capture = Capture(seed.b)
    assert not seed.a.ping("192.168.8.11", count=3)  # out: A's GRE never leaves
    assert not seed.b.ping("192.168.8.1", count=3)  # in: B's cleartext GRE arrives, and is dropped
    capture.stop()
    assert capture.packets("ip proto 47 and src 172.19.1.2")  # B did send, in cleartext
    assert capture.packets("ip proto 47 and src 172.19.1.1") == []
    assert rx_packets(seed.a, "My_Tunnel") == received  # dropped before A's tunnel decapsulated any

    # require = false: no drops' table, and the same tunnel carries the same ping in cleartext again.
    relaxed = render_ipsec_ruleset(load_config_text(text.replace("require = true", "require = false")))
    assert not relaxed.wanted
    apply_on(seed.a, relaxed)
    assert seed.a.wait_ping("192.168.8.11", timeout=30)


@pytest.mark.needs_root
def test_on_exit_remove_unloads_greupds_connections_when_the_daemons_loop_ends(lab: Lab) -> None:
    a = lab.host("a")
    a.ip("link", "add", "wan0", "type", "veth", "peer", "name", "wan1")
    charon = Charon(a).start()
    text = router_config(a, *A_SIDE, vici=charon.socket).replace("[[tunnel]]", 'on_exit = "remove"\n\n[[tunnel]]')
    config = load_config_text(text)

    async def daemon_lifetime() -> None:
        # As in the daemon: built inside the running loop from the config, it starts on its own.
        supervisor = IpsecSupervisor(config, lambda *_: None, lambda _: None)
        await supervisor.settled(timeout=10)
        assert conns(charon) == ["greupd-My_Tunnel"]

    asyncio.run(daemon_lifetime())  # returns: asyncio.run cancels what is left, as at the daemon's stop
    assert conns(charon) == []


def certificates(directory: Path) -> dict[str, Path]:
    """A CA, and a key and certificate it signed for 172.19.1.1 (ECDSA P-256), as files greupd's config takes."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(text: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("lab ca")).issuer_name(name("lab ca"))
          .public_key(ca_key.public_key()).serial_number(1).not_valid_before(now)
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder().subject_name(name("172.19.1.1")).issuer_name(name("lab ca"))
            .public_key(key.public_key()).serial_number(2).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(ca_key, hashes.SHA256()))
    paths = {"ca": directory / "ca.pem", "cert": directory / "a.pem", "key": directory / "a.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    paths["key"].chmod(0o600)
    return paths


@pytest.mark.needs_root
def test_a_private_key_greupd_loaded_leaves_charon_with_its_tunnel(lab: Lab) -> None:
    """Review round 3, L3: on dac2a7b `load-key` was sent on every load and `unload-key` never, so the key of a
    tunnel that was gone stayed in charon. Now it is unloaded with the last tunnel that uses it."""
    from greupd.ipsec.vici import ViciError, ViciSession

    a = lab.host("a")
    a.ip("link", "add", "wan0", "type", "veth", "peer", "name", "wan1")
    charon = Charon(a).start()
    paths = certificates(Path(tempfile.mkdtemp(dir=_scratch())))
    text = (f'[daemon]\nvici_socket = "{charon.socket}"\n\n'
            '[[tunnel]]\nname = "My_Tunnel"\nlocal = "172.19.1.1"\nremote = "172.19.1.2"\n'
            f'[tunnel.ipsec]\ncert = "{paths["cert"]}"\nkey = "{paths["key"]}"\nca = "{paths["ca"]}"\n')
    config = load_config_text(text)

    async def story() -> None:
        supervisor = IpsecSupervisor(charon.socket, lambda *_: None, lambda _: None, poll_interval=0.5)
        supervisor.configure(desired_connections(config))
        await supervisor.settled(timeout=15)
        assert conns(charon) == ["greupd-My_Tunnel"], charon.output()
        key_id = supervisor._keys["greupd-My_Tunnel"]
        assert re.fullmatch(r"[0-9a-f]{40}", key_id), key_id  # the SHA-1 key identifier load-key answered

        supervisor.configure({})  # the tunnel leaves the config
        deadline = time.monotonic() + 15
        while conns(charon) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert conns(charon) == []
        assert supervisor._keys == {}
        await supervisor.close(unload=False)
        # Is the key still in charon? unload-key by its id answers whether there was one to unload.
        session = ViciSession(charon.socket)
        await session.connect()
        try:
            with pytest.raises(ViciError, match="unload-key"):
                await session.request("unload-key", {"id": key_id})
        finally:
            session.close()

    asyncio.run(story())
