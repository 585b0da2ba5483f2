"""The seed's MSS clamp and NAT acting on real traffic through a GRE tunnel (a kernel with ip_gre and nft inet).

Routers A and B, LANs 10.10.1.0/24 behind A and 20.10.1.0/24 behind B. The tunnel is built by hand with
`ip` (as in the seed how-to: the daemon is not under test here); only greupd's nftables table on A is
greupd's. Then a person's checks: the SYN a LAN host sends with MSS 1460 arrives with the clamped MSS, and
the far side sees the masqueraded address.

The hosts' sockets are opened in forked children that enter a host's netns (setns), not in new Python
processes: in the qemu guest these tests run in, a fresh interpreter's imports take many seconds.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import socket
import struct
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from greupd.config import load_config_text
from greupd.nft.render import Ruleset, render_ruleset
from greupd.nft.table import NftTable
from lab.hosts import Host, SeedTopology

pytestmark = pytest.mark.needs_nft_gre

SEED_TEXT = (Path(__file__).resolve().parents[1] / "etc" / "greupd" / "tunnels.toml").read_text()
CLONE_NEWNET = 0x40000000
ETH_P_IP = 0x0800
TIMEOUT = 30.0  # seconds; the guest emulates its CPU, so be patient (this is no performance assertion)


def seed_ruleset(clamp: str = "1436") -> Ruleset:
    return render_ruleset(load_config_text(SEED_TEXT.replace("clamp = 1436", f"clamp = {clamp}")))


# --- running code inside a host's netns ---------------------------------------------------------------------


def _enter(netns: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), f"setns {netns}")
    os.close(fd)


@dataclass
class Child:
    """A forked child that runs one function in a host's netns; it reports "ready", then a JSON result."""

    pid: int
    reader: int

    def _line(self, timeout: float) -> str:
        line = b""
        deadline = time.monotonic() + timeout
        while not line.endswith(b"\n"):
            ready, _, _ = select.select([self.reader], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError("the child in the netns did not answer")
            chunk = os.read(self.reader, 1)
            if not chunk:
                break
            line += chunk
        return line.decode()

    def wait_ready(self) -> None:
        line = self._line(TIMEOUT)
        assert line == "ready\n", f"child failed before ready: {line}"

    def result(self) -> dict[str, object]:
        line = self._line(TIMEOUT * 2)
        os.waitpid(self.pid, 0)
        os.close(self.reader)
        outcome: dict[str, object] = json.loads(line) if line else {"error": "child died"}
        assert "error" not in outcome, outcome.get("error")
        return outcome


def spawn(host: Host, body: Callable[[Callable[[], None]], dict[str, object]]) -> Child:
    reader, writer = os.pipe()
    pid = os.fork()
    if pid:
        os.close(writer)
        return Child(pid, reader)
    status = 1
    try:
        os.close(reader)
        _enter(host.netns)

        def ready() -> None:
            os.write(writer, b"ready\n")

        result = body(ready)
        status = 0
    except BaseException:
        result = {"error": traceback.format_exc()}
    finally:
        # Whatever happens, the child ends here: it must never return into the parent's pytest.
        with contextlib.suppress(BaseException):
            os.write(writer, (json.dumps(result) + "\n").encode())
        os._exit(status)


def in_netns(host: Host, body: Callable[[], dict[str, object]]) -> dict[str, object]:
    return spawn(host, lambda ready: body()).result()


def apply_on(host: Host, ruleset: Ruleset) -> None:
    def apply() -> dict[str, object]:
        table = NftTable(ruleset.table)
        table.apply(ruleset)
        return {"matches": table.matches(ruleset)}

    assert in_netns(host, apply) == {"matches": True}


# --- a TCP handshake, watched on both LAN hosts -------------------------------------------------------------


def syn_options(frame: bytes, port: int, ack: bool) -> tuple[str, int | None] | None:
    """(source address, MSS option) of an Ethernet frame holding a SYN (or SYN-ACK) for `port`, else None."""
    ip = frame[14:]
    if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != socket.IPPROTO_TCP:
        return None
    tcp = ip[(ip[0] & 0x0F) * 4:]
    sport, dport = struct.unpack_from("!HH", tcp)
    flags = tcp[13]
    if not flags & 0x02 or bool(flags & 0x10) != ack or (sport if ack else dport) != port:
        return None
    options, mss, i = tcp[20:(tcp[12] >> 4) * 4], None, 0
    while i < len(options) and options[i] != 0:
        if options[i] == 1:
            i += 1
            continue
        if options[i] == 2:
            mss = struct.unpack_from("!H", options, i + 2)[0]
        i += max(2, options[i + 1])
    return socket.inet_ntoa(ip[12:16]), mss


def capture() -> socket.socket:
    """Every IPv4 frame arriving at (or leaving) this host's eth0, as a person would run tcpdump there."""
    sniffer = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_IP))
    sniffer.bind(("eth0", 0))
    sniffer.settimeout(TIMEOUT)
    return sniffer


def seen(sniffer: socket.socket, port: int, ack: bool) -> tuple[str, int | None]:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        found = syn_options(sniffer.recv(65535), port, ack)
        if found:
            return found
    raise TimeoutError(f"no {'SYN-ACK' if ack else 'SYN'} for port {port} seen")


@dataclass(frozen=True)
class Handshake:
    syn_source: str  # as the server's LAN interface saw the SYN
    syn_mss: int | None
    server_saw_peer: str  # getpeername() of the accepted connection
    synack_mss: int | None  # as the client's LAN interface saw the SYN-ACK (None if not watched)


def handshake(client: Host, server: Host, server_addr: str, port: int, client_addr: str | None = None,
              watch_client: bool = True) -> Handshake:
    """Connect client -> server_addr:port; what the SYN looked like on arrival, and who the server saw."""

    def serve(ready: Callable[[], None]) -> dict[str, object]:
        listener = socket.create_server(("0.0.0.0", port))
        listener.settimeout(TIMEOUT)
        sniffer = capture()
        ready()
        conn, peer = listener.accept()
        source, mss = seen(sniffer, port, ack=False)
        conn.close()
        return {"source": source, "mss": mss, "peer": peer[0]}

    def connect(ready: Callable[[], None]) -> dict[str, object]:
        sniffer = capture() if watch_client else None
        ready()
        with socket.socket() as conn:
            conn.settimeout(TIMEOUT)
            if client_addr:
                conn.bind((client_addr, 0))
            conn.connect((server_addr, port))
        return {"mss": seen(sniffer, port, ack=True)[1] if sniffer else None}

    server_side = spawn(server, serve)
    server_side.wait_ready()
    client_side = spawn(client, connect)
    client_side.wait_ready()
    got_client, got_server = client_side.result(), server_side.result()
    mss = got_client["mss"]
    syn_mss = got_server["mss"]
    return Handshake(str(got_server["source"]), syn_mss if isinstance(syn_mss, int) else None,
                     str(got_server["peer"]), mss if isinstance(mss, int) else None)


# --- the seed's tunnel, by hand ---------------------------------------------------------------------------------


def build_tunnel(seed: SeedTopology) -> None:
    for router, local, remote, address, peer, far_lan in (
        (seed.a, "172.19.1.1", "172.19.1.2", "192.168.8.1", "192.168.8.11", "20.10.1.0/24"),
        (seed.b, "172.19.1.2", "172.19.1.1", "192.168.8.11", "192.168.8.1", "10.10.1.0/24"),
    ):
        router.ip("tunnel", "add", "My_Tunnel", "mode", "gre", "local", local, "remote", remote, "ttl", "64")
        router.ip("addr", "add", address, "peer", peer, "dev", "My_Tunnel")
        router.ip("link", "set", "My_Tunnel", "up")
        router.ip("route", "add", far_lan, "dev", "My_Tunnel")
    assert seed.a.wait_ping("192.168.8.11", timeout=TIMEOUT), "the hand-made GRE tunnel does not carry a ping"


def test_seed_clamp_and_nat_act_on_connections_through_the_tunnel(seed: SeedTopology) -> None:
    build_tunnel(seed)
    # Without greupd's table: the LAN's own MSS and addresses go through untouched.
    plain = handshake(seed.lan_a, seed.lan_b, "20.10.1.2", 5001)
    assert (plain.syn_source, plain.syn_mss, plain.synack_mss) == ("10.10.1.2", 1460, 1460)

    apply_on(seed.a, seed_ruleset())

    # lan_a -> lan_b: clamped to 1436 on the way out, masqueraded as A's tunnel address; B's SYN-ACK is
    # clamped on its way in.
    out = handshake(seed.lan_a, seed.lan_b, "20.10.1.2", 5002)
    assert (out.syn_mss, out.syn_source, out.server_saw_peer) == (1436, "192.168.8.1", "192.168.8.1")
    assert out.synack_mss == 1436
    # B's tunnel address -> lan_a: leaves A's LAN interface as A's LAN address.
    back = handshake(seed.b, seed.lan_a, "10.10.1.2", 5003, client_addr="192.168.8.11", watch_client=False)
    assert (back.syn_source, back.server_saw_peer) == ("10.10.1.1", "10.10.1.1")


def test_pmtu_clamp_follows_the_tunnel_mtu(seed: SeedTopology) -> None:
    build_tunnel(seed)
    seed.a.ip("link", "set", "My_Tunnel", "mtu", "1400")

    apply_on(seed.a, seed_ruleset('"pmtu"'))
    through = handshake(seed.lan_a, seed.lan_b, "20.10.1.2", 5004)

    assert through.syn_mss == 1400 - 40  # route MTU less the IPv4 and TCP headers
    # The SYN-ACK comes in from the tunnel and leaves by A's LAN (MTU 1500), but `rt mtu` also takes the
    # route back to its source, through the tunnel: clamped to the tunnel's MTU too.
    assert through.synack_mss == 1400 - 40
