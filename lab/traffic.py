"""A TCP handshake between two lab hosts, watched on both LAN interfaces as a person would with tcpdump.

What a SYN looked like when it left the client and when it arrived at the server (source address, MSS
option), and whom the server's accept() saw: the evidence for NAT and MSS clamping on the way. The
sockets live in children forked into each host's netns (lab/forked.py), not in new interpreters.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from lab.forked import spawn
from lab.hosts import Host

ETH_P_ALL = 0x0003  # not ETH_P_IP: a packet socket bound to one protocol sees only frames coming in
ETH_P_IP = 0x0800
TIMEOUT = 30.0  # seconds; the qemu guest emulates its CPU, so be patient (this is no performance assertion)


def syn_options(frame: bytes, port: int, ack: bool) -> tuple[str, int | None] | None:
    """(source address, MSS option) of an Ethernet frame holding a SYN (or SYN-ACK) for `port`, else None."""
    if frame[12:14] != ETH_P_IP.to_bytes(2, "big"):
        return None
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


def capture(ifname: str = "eth0") -> socket.socket:
    """Every frame arriving at or leaving this host's interface."""
    sniffer = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sniffer.bind((ifname, 0))
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
    syn_sent_source: str | None  # the SYN as it left the client's eth0 (None if not watched)
    syn_sent_mss: int | None
    syn_source: str  # as the server's eth0 saw the SYN arrive
    syn_mss: int | None
    server_saw_peer: str  # getpeername() of the accepted connection
    synack_mss: int | None  # as the client's eth0 saw the SYN-ACK arrive (None if not watched)


def _int(value: object) -> int | None:
    return value if isinstance(value, int) else None


def handshake(client: Host, server: Host, server_addr: str, port: int, client_addr: str | None = None,
              watch_client: bool = True) -> Handshake:
    """Connect client -> server_addr:port; what the SYN looked like on both ends, and who the server saw."""

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
        if sniffer is None:
            return {}
        # The packet socket holds the frames in order: our SYN went out before the SYN-ACK came in.
        sent_source, sent_mss = seen(sniffer, port, ack=False)
        return {"sent_source": sent_source, "sent_mss": sent_mss, "synack_mss": seen(sniffer, port, ack=True)[1]}

    server_side = spawn(server, serve, TIMEOUT)
    server_side.wait_ready()
    client_side = spawn(client, connect, TIMEOUT)
    client_side.wait_ready()
    got_client, got_server = client_side.result(), server_side.result()
    sent_source = got_client.get("sent_source")
    return Handshake(str(sent_source) if sent_source else None, _int(got_client.get("sent_mss")),
                     str(got_server["source"]), _int(got_server["mss"]), str(got_server["peer"]),
                     _int(got_client.get("synack_mss")))
