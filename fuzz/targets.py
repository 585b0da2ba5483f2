"""The harnesses: one function per target, bytes in. Each catches its target's documented errors, the ones
greupd turns into a clear message; any other exception escapes and is a crash. Some also check a property the
code documents (e.g. `greupd import` output always validates), as an AssertionError.

Nothing here imports atheris: the smoke test (tests/test_fuzz_smoke.py) and the coverage replay call these too.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import re
import shutil
import socket
import struct
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, cast


@dataclass(frozen=True)
class Target:
    name: str
    run: Callable[[bytes], None]
    errors: str  # the documented errors, as RELIABILITY.md lists them
    modules: tuple[str, ...]  # greupd's modules it reads: what the coverage replay measures (paths in the repo)
    instrument: tuple[str, ...]  # what atheris instruments for guidance (greupd, plus the parser it drives)
    seconds: int  # default time of a `make fuzz` run
    max_len: int  # libFuzzer's -max_len
    # The functions of `modules` on the path of these bytes (qualified names), when a module holds more than its
    # parser (a server's sockets, a supervisor's loop): the coverage replay reports their lines apart.
    functions: tuple[str, ...] = ()


_WORK: Path | None = None


def workdir(name: str) -> Path:
    """A scratch folder for the harnesses that read files (tmpfs when there is one). Under atheris the worker
    ends in libFuzzer's exit(), where no atexit handler runs: the runner and the smoke test give it a folder
    (GREUPD_FUZZ_WORK) and remove that themselves."""
    global _WORK
    if _WORK is None:
        given = os.environ.get("GREUPD_FUZZ_WORK")
        if given:
            _WORK = Path(given)
            _WORK.mkdir(parents=True, exist_ok=True)
        else:
            base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
            _WORK = Path(tempfile.mkdtemp(prefix="greupd-fuzz-", dir=base))
            atexit.register(shutil.rmtree, _WORK, True)
    folder = _WORK / name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir()
    return folder


_LOOP: asyncio.AbstractEventLoop | None = None


def _run(coroutine: Any) -> Any:
    global _LOOP
    if _LOOP is None:
        _LOOP = asyncio.new_event_loop()
    return _LOOP.run_until_complete(coroutine)


# --- 1. the TOML config loader ---------------------------------------------------------------------------

DROPIN = b"\n#%dropin\n"  # in a config input: what follows is the next tunnels.d/NN.toml


def config(data: bytes) -> None:
    """tunnels.toml (and tunnels.d/*.toml after each DROPIN line) through load_config, read_daemon_table (never
    raises: it is what `greupd reload` reads from a half-edited file) and load_config_text. Errors: ConfigError."""
    from greupd.config import ConfigError, load_config, load_config_text, read_daemon_table

    main, *dropins = data.split(DROPIN)
    folder = workdir("config")
    path = folder / "tunnels.toml"
    path.write_bytes(main)
    if dropins:
        (folder / "tunnels.d").mkdir()
        for number, dropin in enumerate(dropins):
            (folder / "tunnels.d" / f"{number:02}.toml").write_bytes(dropin)
    daemon = read_daemon_table(path)
    assert isinstance(daemon, dict)
    try:
        load_config(path)
    except ConfigError as exc:
        assert exc.problems and str(exc)
    try:
        text = main.decode("utf-8")
    except UnicodeDecodeError:
        return
    try:
        load_config_text(text)
    except ConfigError as exc:
        assert exc.problems and str(exc)


# --- 2. the GRE keepalive codec ----------------------------------------------------------------------------


def gre(data: bytes) -> None:
    """parse_gre on any bytes from the raw GRE socket. Errors: MalformedPacket. Properties: the fast path
    (_usual_message) says what the general path says whenever it answers; a request's reflection reads back as
    a reply from the requester; a probe built from the input's first 23 bytes reads back as what was built."""
    from greupd.keepalive import codec

    try:
        message: object = codec.parse_gre(data)
    except codec.MalformedPacket:
        message = "malformed"
    usual = codec._usual_message(data)
    if not isinstance(usual, codec._Unusual):
        try:
            general: object = codec._general_message(data)
        except codec.MalformedPacket as exc:
            general = f"malformed: {exc}"
        assert usual == general, f"fast path {usual!r}, general path {general!r}"
    if isinstance(message, codec.KeepaliveRequest):
        reflected = codec.parse_gre(message.reflection)
        assert isinstance(reflected, codec.ProbeReply), reflected
        assert (reflected.src, reflected.dst) == (message.inner_src, message.inner_dst)
    _probe_round_trip(data[:23].ljust(23, b"\0"))


def _probe_round_trip(head: bytes) -> None:
    from greupd.keepalive import codec

    local, remote = IPv4Address(head[0:4]), IPv4Address(head[4:8])
    okey = int.from_bytes(head[9:13]) if head[8] & 1 else None
    ikey = int.from_bytes(head[13:17]) if head[8] & 2 else None
    token = int.from_bytes(head[17:23]) | (1 << 32 if not head[17:19].strip(b"\0") else 0)
    probe = codec.build_probe_template(local, remote, okey, ikey).with_token(token)
    request = codec.parse_gre(probe)
    assert isinstance(request, codec.KeepaliveRequest), request
    assert request[:5] == (int(local), int(remote), okey, int(remote), int(local)), request
    assert codec.parse_gre(request.reflection) == codec.ProbeReply(int(remote), int(local), ikey, token)


# --- 3. the rtnetlink decoder ------------------------------------------------------------------------------


class _EveryIndex(Mapping[int, str]):
    """ifindex -> name for every index: the decoders go past "not one of ours" to the attributes."""

    def __getitem__(self, index: int) -> str:
        return f"if{index}"

    def __contains__(self, index: object) -> bool:
        return isinstance(index, int)

    def __iter__(self) -> Iterator[int]:
        return iter(())

    def __len__(self) -> int:
        return 0


def rtnl(data: bytes) -> None:
    """A datagram from the rtnetlink socket: framed by nlmsg.messages (never raises, whatever the lengths say),
    each message pre-filtered by may_concern_us (never raises), then decoded as the event watch, the observer
    and the request socket (Answers) decode it. Errors of the decoders: ValueError and struct.error, for a
    message shorter than its fixed header or an attribute of the wrong size (the kernel sends neither)."""
    from greupd.model import ROUTE_PROTO
    from greupd.netlink import nlmsg
    from greupd.netlink import rtnl as codec

    messages = list(nlmsg.messages(data))
    for kind, _, _, _, body, raw in messages:
        codec.may_concern_us(kind, raw, ROUTE_PROTO)
        list(nlmsg.attributes(body))
        if len(body) >= 4:
            nlmsg.ext_ack_message(body)
            nlmsg.done_code(body)
        with contextlib.suppress(ValueError, struct.error):
            _decode_one(kind, raw)
    seqs = list(dict.fromkeys(seq for _, _, seq, _, _, _ in messages if seq))[:64]
    answers = codec.Answers(seqs, [codec.dump_links() if n % 2 else codec.get_link("x") for n in range(len(seqs))])
    try:
        answers.feed(data)
        if answers.complete:
            for outcome in answers.outcomes():
                str(outcome)
    except (ValueError, struct.error):
        pass


def _decode_one(kind: int, raw: bytes) -> None:
    from greupd.netlink import rtnl as codec

    names = _EveryIndex()
    if kind in (codec.RTM_NEWLINK, codec.RTM_DELLINK):
        codec.link_name_and_index(raw)
        codec.link_index(raw)
        codec.link_from_message(raw)
    elif kind in (codec.RTM_NEWADDR, codec.RTM_DELADDR):
        codec.address_index(raw)
        codec.address_from_message(raw, names)
    elif kind in (codec.RTM_NEWROUTE, codec.RTM_DELROUTE):
        codec.route_protocol_and_type(raw)
        codec.route_oif(raw)
        codec.route_from_message(raw, names)


# --- 4. the VICI decoder -----------------------------------------------------------------------------------


def vici(data: bytes) -> None:
    """The byte stream from charon's VICI socket, as ViciSession reads it: framing (receive), packets, messages
    (_decode, _result), and what the supervisor makes of list-sas answers (tunnel_states, change_message).
    Errors: ViciError."""
    _run(_vici(data))


async def _vici(data: bytes) -> None:
    from vici.protocol import Packet

    from greupd.ipsec.supervisor import change_message, tunnel_states
    from greupd.ipsec.vici import ViciError, ViciSession, _decode

    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    session = ViciSession(Path("/nonexistent/charon.vici"))
    session._reader = reader
    connections = _vici_connections()
    for _ in range(64):
        try:
            packet = await session.receive()
            if packet.response_type == Packet.EVENT:
                decoded = _decode(packet.payload)
            else:
                decoded = ViciSession._result("list-sas", packet)
        except ViciError as exc:
            assert str(exc)
            if session._reader is None:
                return
            continue
        statuses = tunnel_states(connections, set(connections), [decoded], {})
        for tunnel, status in statuses.items():
            change_message(tunnel, status)


_CONNECTIONS: dict[str, Any] = {}


def _vici_connections() -> dict[str, Any]:
    from greupd.ipsec.connections import IpsecConnection, connection_name

    if not _CONNECTIONS:
        for tunnel in ("My_Tunnel", "to_b", "to_c"):
            name = connection_name(tunnel)
            _CONNECTIONS[name] = IpsecConnection(name, tunnel, "{}", "psk", Path("/etc/greupd/psk"), None, None, None,
                                                 "172.19.1.1", "172.19.1.2")
    return _CONNECTIONS


# --- 5. the control protocol -------------------------------------------------------------------------------


class _Writer:
    """What the servers use of an asyncio.StreamWriter, collecting the bytes."""

    def __init__(self, sock: object = None) -> None:
        self.sent = bytearray()
        self._sock = sock
        self.closed = False

    def get_extra_info(self, name: str) -> object:
        return self._sock if name == "socket" else None

    def write(self, data: bytes) -> None:
        self.sent += data

    async def drain(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    async def wait_closed(self) -> None:
        pass


class _Peer:
    """A connecting process's credentials, as SO_PEERCRED / SO_PEERGROUPS give them."""

    def __init__(self, uid: int, gid: int) -> None:
        self.uid, self.gid = uid, gid

    def getsockopt(self, level: int, optname: int, buflen: int) -> bytes:
        if optname == socket.SO_PEERCRED:
            return struct.pack("3i", 4242, self.uid, self.gid)
        return b""


def control(data: bytes) -> None:
    """Request lines on the control socket, as ControlServer serves a connection (readline with its 64 KiB
    limit, parse_request, the answer), from root, from a member of the daemon's group and from a stranger (who
    is answered "permission denied" once). Errors: none: every line gets one JSON answer, and the connection is
    closed."""
    import json

    for peer in (_Peer(0, 0), _Peer(os.geteuid() + 1, os.getegid()), _Peer(os.geteuid() + 1, os.getegid() + 1)):
        sent = _run(_control(data, peer))
        answers = sent.splitlines()
        lines = data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1)
        assert answers or not data, "no answer"
        assert len(answers) <= max(lines, 1), (len(answers), lines)
        for answer in answers:
            assert isinstance(json.loads(answer), dict)


async def _control(data: bytes, peer: _Peer) -> bytes:
    from greupd.control import _MAX_LINE, ControlServer

    async def reload() -> Any:
        return {"generation": 1}

    status = cast(Any, {"tunnels": []})
    server = ControlServer(Path("/nonexistent/control.sock"), lambda: status, reload, metrics=lambda: "# greupd\n")
    reader = asyncio.StreamReader(limit=_MAX_LINE)
    reader.feed_data(data)
    reader.feed_eof()
    writer = _Writer(peer)
    await server._serve_connection(reader, writer)  # type: ignore[arg-type]
    assert writer.closed
    return bytes(writer.sent)


# --- 6. the metrics HTTP request parser --------------------------------------------------------------------


def metrics(data: bytes) -> None:
    """One connection to metrics_listen, as MetricsListener serves it (readuntil a blank line within 8 KiB, the
    request line, the answer). Errors: none: every connection gets one HTTP/1.1 answer whose Content-Length is
    its body's length (the GET's), and is closed."""
    sent = _run(_metrics(data))
    head, _, body = sent.partition(b"\r\n\r\n")
    status = head.split(b"\r\n")[0]
    assert re.fullmatch(rb"HTTP/1\.1 [0-9]{3} [A-Za-z ]+", status), status
    length = re.search(rb"\r\nContent-Length: ([0-9]+)(\r\n|$)", head)
    assert length is not None, head
    if body:  # a HEAD's answer has none
        assert int(length.group(1)) == len(body), head


async def _metrics(data: bytes) -> bytes:
    from greupd.metrics import _MAX_REQUEST, MetricsListener

    listener = MetricsListener("127.0.0.1:9474", lambda: "# TYPE greupd_up gauge\ngreupd_up 1\n")
    reader = asyncio.StreamReader(limit=_MAX_REQUEST)
    reader.feed_data(data)
    reader.feed_eof()
    writer = _Writer()
    await listener._serve(reader, writer)  # type: ignore[arg-type]
    assert writer.closed
    return bytes(writer.sent)


# --- 7-9. the importers -----------------------------------------------------------------------------------

NEXT_FILE = b"\n#%file\n"  # in a networkd or ifupdown input: what follows is the next file


def _imported(source: str, path: Path) -> None:
    """`greupd import --from SOURCE PATH`. Errors: ImportProblem. Property (importer/write.py): the file it
    prints always validates, a tunnel greupd would refuse being printed commented out."""
    from greupd.config import ConfigError, load_config_text
    from greupd.importer import ImportProblem
    from greupd.importer.sources import import_config

    try:
        text = import_config(source, path, [])  # type: ignore[arg-type]
    except ImportProblem as exc:
        assert str(exc)
        return
    try:
        load_config_text(text)
    except ConfigError as exc:
        raise AssertionError(f"greupd import printed a file greupd check refuses: {exc}\n{text}") from None


def netplan(data: bytes) -> None:
    """A netplan YAML file. Errors: ImportProblem."""
    folder = workdir("netplan")
    (folder / "60-tunnels.yaml").write_bytes(data)
    _imported("netplan", folder)


def networkd(data: bytes) -> None:
    """.netdev and .network files (alternately, split at NEXT_FILE lines). Errors: ImportProblem."""
    folder = workdir("networkd")
    for number, text in enumerate(data.split(NEXT_FILE)[:8]):
        (folder / f"{30 + number // 2}-t{number // 2}.{'network' if number % 2 else 'netdev'}").write_bytes(text)
    _imported("networkd", folder)


_SOURCE = re.compile(r"^source(-directory)?\s+(?P<path>.*)$")


def ifupdown(data: bytes) -> None:
    """/etc/network/interfaces, then interfaces.d/ files (split at NEXT_FILE lines; `source interfaces.d/*`
    reads them). Errors: ImportProblem. Inputs whose `source` lines leave the scratch folder (an absolute path,
    `..`) are skipped: they would read this machine's files (and /dev/zero or /proc/kmsg never end)."""
    from greupd.importer.ifupdown import _logical_lines

    folder = workdir("ifupdown")
    (folder / "interfaces.d").mkdir()
    main, *extra = data.split(NEXT_FILE)[:8]
    (folder / "interfaces").write_bytes(main)
    for number, text in enumerate(extra):
        (folder / "interfaces.d" / f"f{number}").write_bytes(text)
    for file in [folder / "interfaces", *sorted((folder / "interfaces.d").iterdir())]:
        try:
            lines = _logical_lines(file)
        except Exception:
            continue  # not UTF-8: import_config says so
        for line in lines:
            found = _SOURCE.match(line)
            if found and (found["path"].strip().startswith("/") or ".." in found["path"]):
                return
    _imported("ifupdown", folder / "interfaces")


# --- the list ----------------------------------------------------------------------------------------------

_GRE_PATH = ("parse_gre", "_usual_message", "_general_message", "_ipv4_header", "_gre_header", "_gre_length",
             "build_probe_template", "probe_shape", "_offsets", "ones_complement_sum", "ipv4_checksum",
             "ProbeBytes.__init__", "ProbeBytes.stamp", "ProbeTemplate.with_token", "ProbeTemplate.outer_header_length")
_RTNL_PATH = ("_text", "_u32_of", "_be16_of", "_gre_value", "link_from_message", "link_name_and_index", "address_index",
              "address_from_message", "route_protocol_and_type", "route_oif", "route_from_message", "link_index",
              "may_concern_us", "Outcome.__str__", "Answers.__init__", "Answers.complete", "Answers.feed",
              "Answers.outcomes", "messages", "attributes", "error_code", "ext_ack_message", "done_code")
_VICI_PATH = ("_text", "_decode", "ViciSession.receive", "ViciSession._result", "tunnel_states", "change_message")
_CONTROL_PATH = ("ControlServer._serve_connection", "ControlServer._answer", "parse_request", "command_error", "_send",
                 "_peer_access")
_METRICS_PATH = ("MetricsListener._serve", "MetricsListener._answer", "_response")

TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("config", config, "ConfigError", ("greupd/config.py",), ("greupd", "tomllib"), 120, 8192),
    Target("gre", gre, "MalformedPacket", ("greupd/keepalive/codec.py",), ("greupd",), 60, 2048, _GRE_PATH),
    Target("rtnl", rtnl, "none in framing; ValueError, struct.error in decoders",
           ("greupd/netlink/rtnl.py", "greupd/netlink/nlmsg.py"), ("greupd",), 60, 4096, _RTNL_PATH),
    Target("vici", vici, "ViciError", ("greupd/ipsec/vici.py", "greupd/ipsec/supervisor.py"),
           ("greupd", "vici"), 60, 8192, _VICI_PATH),
    Target("control", control, "none (an error answer)", ("greupd/control.py",), ("greupd", "json"), 60, 4096,
           _CONTROL_PATH),
    Target("metrics", metrics, "none (an error answer)", ("greupd/metrics.py",), ("greupd",), 45, 9000,
           _METRICS_PATH),
    Target("netplan", netplan, "ImportProblem", ("greupd/importer/netplan.py", "greupd/importer/write.py"),
           ("greupd", "yaml"), 90, 4096),
    Target("networkd", networkd, "ImportProblem", ("greupd/importer/networkd.py", "greupd/importer/write.py"),
           ("greupd",), 90, 4096),
    Target("ifupdown", ifupdown, "ImportProblem",
           ("greupd/importer/ifupdown.py", "greupd/importer/iptables.py", "greupd/importer/write.py"),
           ("greupd", "shlex"), 90, 4096),
)}
