"""Follow one marked keepalive per tunnel, and the GRE that comes back, through every nftables table (issue #24
item 2): the trace names the table, chain and rule that decided, so doctor reports that rule, not a guess.

How: a table of doctor's own (`inet greupd_doctor`) sets `meta nftrace` on packets carrying doctor's mark (its
keepalives, sent from a raw socket with SO_MARK) at hook output, and on GRE from each tunnel's remote to its
local address at hook prerouting, both at priority -400 (before conntrack, raw and every filter). `nft monitor
trace` (libnftables' own printer: the Python bindings cannot stream events) reports every rule that matched and
every verdict; the table goes again before doctor answers. iptables-nft's tables are nftables tables, so
their rules are traced the same way; only legacy iptables (x_tables) is invisible to it.
"""

from __future__ import annotations

import ipaddress
import os
import re
import select
import socket
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address

from greupd.config import TunnelConfig
from greupd.doctor.facts import TracedPacket, TraceEvent, TunnelTrace
from greupd.keepalive.codec import (
    KeepaliveRequest,
    MalformedPacket,
    ProbeReply,
    build_probe_template,
    new_token,
    parse_gre,
)

TRACE_TABLE = "greupd_doctor"
MARK = 0x47524544  # "GRED": doctor's keepalives, and nothing else on a host, carry this fwmark
WINDOW = 2.0  # seconds: a reflected keepalive comes back in milliseconds; a slow peer gets a few more tries
PROBE_EVERY = 0.25
START_CAP = 10.0  # seconds to wait for `nft monitor trace` to report our first keepalive at all
SETTLE = 0.3  # after both directions were seen: time for their later hooks' events to arrive
SO_MARK = 36  # asm-generic/socket.h (socket.SO_MARK from Python 3.12 on)


def trace_ruleset(tunnels: Sequence[TunnelConfig]) -> str:
    """doctor's trace table in nft syntax (replaced whole: `delete` first if a killed doctor left one)."""
    incoming = []
    for t in tunnels:
        ip = "ip6" if t.remote.version == 6 else "ip"
        incoming.append(f"    {ip} saddr {t.remote} {ip} daddr {t.local} meta l4proto gre meta nftrace set 1")
    return "\n".join([
        f"table inet {TRACE_TABLE} {{",
        "  chain keepalives {",
        "    type filter hook output priority -400; policy accept;",
        f"    meta mark {MARK:#x} meta nftrace set 1",
        "  }",
        "  chain from_remotes {",
        "    type filter hook prerouting priority -400; policy accept;",
        *incoming,
        "  }",
        "}",
    ]) + "\n"


# `nft monitor trace` lines: "trace id 34727401 ip other output rule ip protocol gre drop # handle 2 (verdict drop)"
_LINE = re.compile(r"^trace id (?P<id>\S+) (?P<family>\S+) (?P<table>\S+) (?P<chain>\S+) "
                   r"(?P<kind>packet:|rule|policy|unknown rule handle) ?(?P<rest>.*)$")
_RULE = re.compile(r"^(?P<rule>.*?)(?: # handle (?P<handle>\d+))? \(verdict (?P<verdict>[^)]*)\)\s*$")
_COUNTER = re.compile(r"counter packets \d+ bytes \d+")
_FIELD = re.compile(r'\b(iif|oif|saddr|daddr) "?([^" ]+)"?')


@dataclass
class _Packet:
    trace_id: str
    iif: str | None = None
    oif: str | None = None
    saddr: str = ""
    daddr: str = ""
    events: list[TraceEvent] | None = None
    chains: set[tuple[str, str, str]] = field(default_factory=set)


def parse_trace(lines: Iterable[str], skip_table: str = TRACE_TABLE) -> list[TracedPacket]:
    """Packets from `nft -a monitor trace` output, in order of first appearance; doctor's own table's events are
    left out (they only set the trace flag)."""
    current: dict[str, _Packet] = {}
    done: list[_Packet] = []
    for line in lines:
        match = _LINE.match(line.strip())
        if match is None:
            continue
        chain = (match["family"], match["table"], match["chain"])
        packet = current.get(match["id"])
        # The kernel derives a trace id from the packet's buffer, which the next packet may reuse: a chain seen
        # again under the same id is a new packet.
        if packet is None or (match["kind"] == "packet:" and chain in packet.chains):
            packet = current[match["id"]] = _Packet(match["id"], events=[])
            done.append(packet)
        packet.chains.add(chain)
        if match["kind"] == "packet:":
            fields = dict(_FIELD.findall(match["rest"]))
            packet.iif = packet.iif or fields.get("iif")
            packet.oif = packet.oif or fields.get("oif")
            packet.saddr = packet.saddr or fields.get("saddr", "")
            packet.daddr = packet.daddr or fields.get("daddr", "")
            continue
        if match["table"] == skip_table and match["family"] == "inet":
            continue
        assert packet.events is not None
        if match["kind"] == "policy":
            verdict = match["rest"].split()[0] if match["rest"] else "accept"
            packet.events.append(TraceEvent(match["id"], match["family"], match["table"], match["chain"], "policy",
                                            "", None, verdict))
        elif (rule := _RULE.match(match["rest"])) is not None:
            handle = int(rule["handle"]) if rule["handle"] else None
            text = _COUNTER.sub("counter", rule["rule"]).strip()
            packet.events.append(TraceEvent(match["id"], match["family"], match["table"], match["chain"], "rule",
                                            text, handle, rule["verdict"].split()[0]))
    return [TracedPacket(p.trace_id, p.oif is not None and p.iif is None, p.iif, p.oif, p.saddr, p.daddr,
                         tuple(p.events or ())) for p in done]


def by_tunnel(tunnels: Sequence[TunnelConfig], packets: Iterable[TracedPacket],
              sent: dict[str, int]) -> dict[str, TunnelTrace]:
    """Each tunnel's packets: ours to its remote, and GRE from its remote (pure)."""
    found: dict[str, list[TracedPacket]] = {t.name: [] for t in tunnels}
    for packet in packets:
        for t in tunnels:
            pair = (str(t.local), str(t.remote)) if packet.outgoing else (str(t.remote), str(t.local))
            if (_normal(packet.saddr), _normal(packet.daddr)) == pair:
                found[t.name].append(packet)
                break
    return {name: TunnelTrace(sent.get(name, 0), tuple(packets)) for name, packets in found.items()}


def _normal(address: str) -> str:
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return address


# --- the I/O: the table, the monitor, the keepalives ------------------------------------------------------------

class TraceUnavailable(Exception):
    """Tracing cannot run here (no nft, no permission, no inet family): the checks fall back to the rule text."""


def trace_tunnels(tunnels: Sequence[TunnelConfig], window: float = WINDOW) -> dict[str, TunnelTrace]:
    """Trace `tunnels` for up to `window` seconds; raises TraceUnavailable saying why it cannot."""
    import nftables

    nft = nftables.Nftables()
    nft.set_handle_output(True)
    nft.cmd(f"delete table inet {TRACE_TABLE}")  # a killed doctor's; an error when none, which is fine
    rc, _, error = nft.cmd(trace_ruleset(tunnels))
    if rc != 0:
        raise TraceUnavailable(f"cannot add doctor's trace table: {error.strip()}")
    try:
        try:
            monitor = subprocess.Popen(["nft", "-a", "monitor", "trace"], stdout=subprocess.PIPE,
                                       stderr=subprocess.DEVNULL)
        except OSError as exc:
            raise TraceUnavailable(f"cannot run `nft monitor trace`: {exc.strerror}") from None
        try:
            lines, sent, heard = _probe_and_listen(tunnels, monitor, window)
        finally:
            monitor.terminate()
            monitor.wait()
    finally:
        nft.cmd(f"delete table inet {TRACE_TABLE}")
    return {name: replace(trace, reflected=heard.reflected.get(name, 0),
                          peer_sources=tuple(sorted(heard.sources.get(name, set()))))
            for name, trace in by_tunnel(tunnels, parse_trace(lines), sent).items()}


@dataclass
class Heard:
    """What the raw GRE socket read during the trace, by tunnel: reflections of our keepalives, and the inner
    source addresses of the peer's own keepalives."""

    by_remote: dict[int, str]
    reflected: dict[str, int] = field(default_factory=dict)
    sources: dict[str, set[str]] = field(default_factory=dict)

    def read(self, data: bytes) -> None:
        try:
            message = parse_gre(data)
        except MalformedPacket:
            return
        if isinstance(message, ProbeReply) and message.src in self.by_remote:
            name = self.by_remote[message.src]
            self.reflected[name] = self.reflected.get(name, 0) + 1
        elif isinstance(message, KeepaliveRequest) and message.src in self.by_remote:
            self.sources.setdefault(self.by_remote[message.src], set()).add(str(IPv4Address(message.inner_src)))


def _probe_and_listen(tunnels: Sequence[TunnelConfig], monitor: subprocess.Popen[bytes],
                      window: float) -> tuple[list[str], dict[str, int], Heard]:
    probed = [t for t in tunnels if t.mode == "gre" and t.keepalive is not None]
    heard = Heard({int(t.remote): t.name for t in probed})
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    rx = socket.socket(socket.AF_INET, socket.SOCK_RAW, 47)
    sent = {t.name: 0 for t in probed}
    buffer = b""
    assert monitor.stdout is not None
    fd = monitor.stdout.fileno()
    os.set_blocking(fd, False)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, MARK)
        templates = {t.name: build_probe_template(t.local, t.remote, _okey(t), _ikey(t))
                     for t in probed if isinstance(t.local, IPv4Address) and isinstance(t.remote, IPv4Address)}
        # The window counts from the first traced event: `nft monitor trace` subscribes some time after it starts
        # (seconds on a slow or emulated machine), and keepalives sent before that are traced by nobody.
        started = not probed
        deadline = time.monotonic() + (window if started else START_CAP)
        next_probe = time.monotonic()
        while (now := time.monotonic()) < deadline:
            if now >= next_probe:
                for t in (t for t in probed if t.name in templates):
                    try:
                        sock.sendto(templates[t.name].with_token(new_token()), (str(t.remote), 0))
                        sent[t.name] += 1
                    except OSError:
                        pass  # EPERM from an output drop, or no route: the trace (or its absence) tells
                next_probe = now + PROBE_EVERY
            ready, _, _ = select.select([fd, rx.fileno()], [], [], min(PROBE_EVERY, max(deadline - now, 0)))
            if rx.fileno() in ready:
                heard.read(rx.recv(65535))
            if fd in ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                buffer += chunk
                if not started:
                    started = True
                    deadline = min(deadline, time.monotonic() + window)
                if probed and _both_ways(probed, buffer, sent) and all(heard.reflected.get(t.name) for t in probed):
                    deadline = min(deadline, time.monotonic() + SETTLE)  # the rest of their hooks' events
    finally:
        sock.close()
        rx.close()
    return buffer.decode(errors="replace").splitlines(), sent, heard


def _both_ways(probed: Sequence[TunnelConfig], buffer: bytes, sent: dict[str, int]) -> bool:
    """Every probed tunnel has a keepalive traced out and GRE from its remote traced in: enough to judge."""
    traces = by_tunnel(probed, parse_trace(buffer.decode(errors="replace").splitlines()), sent)
    return all(trace.outgoing and trace.incoming for trace in traces.values())


def _okey(t: TunnelConfig) -> int | None:
    return t.okey if t.okey is not None else t.key


def _ikey(t: TunnelConfig) -> int | None:
    return t.ikey if t.ikey is not None else t.key
