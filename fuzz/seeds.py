"""Builds the committed seed corpus, fuzz/corpus/<target>/: `python -m fuzz.seeds` (as root, for the netlink
dumps). The files are committed; this is how they were made, and how to make them again.

- config: the repository's configs (etc/greupd, tests/configs: valid, broken, drop-ins joined with DROPIN).
- gre: packets built with scapy: our probes (every key combination) and their reflections, a Cisco's own
  probe and reply, IP options, GRE checksums, fragments, tunnel traffic (IPv4, IPv6, GRE in GRE), truncations.
- rtnl: dumps of links, addresses and routes of a network namespace of this host's kernel set up with bridge,
  ifb and veth links (this host's kernel has no dummy or GRE), IPv4/IPv6 addresses, routes of greupd's protocol
  222 and others; the kernel's error answers (with its extended ACK text); and GRE links as rtnl encodes them
  (the kernel answers in the same layout).
- vici: framed VICI packets as charon sends them, encoded by strongSwan's own vici library: command responses
  (success, errmsg), list-sas / list-conns events of greupd's connections, ike-updown events, unknown ones.
- control, metrics: request lines and HTTP requests, good and bad.
- netplan, networkd, ifupdown: tests/configs/import, whole and file by file.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

from fuzz.findings import CORPUS
from fuzz.targets import DROPIN, NEXT_FILE

REPO = Path(__file__).resolve().parent.parent


def save(target: str, inputs: Iterable[bytes]) -> int:
    folder = CORPUS / target
    if folder.is_dir():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    count = 0
    for data in inputs:
        (folder / hashlib.sha1(data).hexdigest()).write_bytes(data)
        count += 1
    return count


_TUNNEL = b"""[[tunnel]]
name = "My_Tunnel"
mode = "gre"
local = "172.19.1.1"
remote = "172.19.1.2"
address = "192.168.8.1/30"
routes = ["20.10.1.0/24"]
"""
_IPSEC_PSK = _TUNNEL + b"""
[tunnel.ipsec]
psk_file = "/etc/greupd/psk/My_Tunnel"
proposals = "aes256gcm16-prfsha384-ecp384"
esp_proposals = "aes256gcm16-ecp384"
local_id = "172.19.1.1"
remote_id = "router-b.example.net"
start_action = "start"
dpd_delay = "30s"
require = true
"""
_IPSEC_CERTS = _TUNNEL + b"""
[tunnel.ipsec]
cert = "/etc/ssl/certs/ca-certificates.crt"
key = "/etc/greupd/router-a.key"
ca = "/etc/ssl/certs/ca-certificates.crt"
remote_id = "CN=router-b"
"""
_DAEMON = b"""[daemon]
metrics_listen = "[::1]:9474"
metrics_textfile = "/var/lib/prometheus/node-exporter/greupd.prom"
vici_socket = "/var/run/charon.vici"
control_socket = "/run/greupd/control.sock"
state_dir = "/var/lib/greupd"
nft_table = "greupd"
on_exit = "keep"
ip_forward = true

""" + _TUNNEL


def config_seeds() -> list[bytes]:
    configs = REPO / "tests" / "configs"
    seeds = [(REPO / "etc" / "greupd" / "tunnels.toml").read_bytes()]
    seeds += [p.read_bytes() for p in sorted(configs.rglob("*.toml")) if "tunnels.d" not in p.parts]
    seeds += [_IPSEC_PSK, _IPSEC_CERTS, _DAEMON]  # what tests/configs has no file of
    for folder in ("dropins", "broken-dropin"):
        dropins = sorted((configs / folder / "tunnels.d").glob("*.toml"))
        main = (configs / folder / "tunnels.toml").read_bytes()
        seeds.append(DROPIN.join([main, *(p.read_bytes() for p in dropins)]))
    return seeds


def gre_seeds() -> list[bytes]:
    from scapy.layers.inet import IP, UDP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import GRE, Ether
    from scapy.packet import Raw

    from greupd.keepalive import codec

    a, b = ipaddress.IPv4Address("172.19.1.1"), ipaddress.IPv4Address("172.19.1.2")
    seeds: list[bytes] = []
    for okey in (None, 42):
        for ikey in (None, 7):
            probe = codec.build_probe_template(a, b, okey, ikey).with_token(0x1234_89ABCDEF)
            seeds.append(probe)
            request = codec.parse_gre(probe)
            assert isinstance(request, codec.KeepaliveRequest)
            seeds.append(request.reflection)
    cisco_reply = IP(src="172.19.1.2", dst="172.19.1.1", proto=47) / GRE(proto=0)
    cisco_probe = IP(src="172.19.1.2", dst="172.19.1.1", proto=47) / GRE(proto=0x0800) / cisco_reply
    seeds += [bytes(cisco_reply), bytes(cisco_probe)]
    seeds.append(bytes(IP(src="172.19.1.2", dst="172.19.1.1", options=b"\x01\x01\x01\x00", proto=47)
                       / GRE(chksum_present=1, key_present=1, key=42, seqnum_present=1, sequence_number=9, proto=0)))
    seeds.append(bytes(IP(src="172.19.1.2", dst="172.19.1.1", proto=47) / GRE(chksum_present=1, proto=0x0800)
                       / IP(src="172.19.1.1", dst="172.19.1.2", options=b"\x01\x01\x01\x00", proto=47) / GRE(proto=0)))
    seeds.append(bytes(IP(src="172.19.1.2", dst="172.19.1.1", flags="MF", proto=47) / GRE(proto=0)))
    seeds.append(bytes(IP(src="172.19.1.2", dst="172.19.1.1", frag=3, proto=47) / GRE(proto=0)))
    seeds.append(bytes(IP(src="172.19.1.2", dst="172.19.1.1", proto=47) / GRE(proto=0x0800)
                       / IP(src="10.0.0.1", dst="20.10.1.1") / UDP(dport=53) / Raw(b"x" * 20)))
    seeds.append(bytes(IP(src="172.19.1.2", dst="172.19.1.1", proto=47) / GRE(proto=0x86DD)
                       / IPv6(src="fd00::1", dst="fd00::2") / UDP()))
    seeds.append(bytes(IP(src="172.19.1.2", dst="172.19.1.1", proto=47) / GRE(proto=0x6558)
                       / Ether() / IP() / UDP()))
    seeds.append(bytes(IP(src="172.19.1.2", dst="172.19.1.1", proto=47) / GRE(proto=0x0800)
                       / IP(src="1.1.1.1", dst="2.2.2.2", proto=47) / GRE(proto=0x0800) / IP()))
    seeds.append(bytes(IP(src="172.19.1.2", dst="172.19.1.1", proto=47) / GRE(version=1, proto=0x880B)))
    seeds.append(bytes(IP(src="172.19.1.2", dst="172.19.1.1", proto=47) / GRE(routing_present=1, proto=0)))
    seeds += [s[:n] for s in seeds[:2] for n in (19, 23, 27, 40)]
    return seeds


# --- netlink: a namespace of this host's kernel, dumped -------------------------------------------------------

_NETNS = "greupd-fuzz-seeds"
_SETUP = [
    "link add name dummy0 type bridge", "link set dummy0 up",
    "link add name My_Tunnel type ifb", "link set My_Tunnel alias greupd up mtu 1476",
    "link add name veth0 type veth peer name veth1", "link set veth0 up", "link set veth1 up",
    "addr add 192.168.8.1 peer 192.168.8.11 dev My_Tunnel", "addr add 172.19.1.1/24 dev dummy0",
    "addr add fd00::1/64 dev dummy0 nodad", "addr add 10.0.0.1/30 dev veth0",
    "route add 20.10.1.0/24 dev My_Tunnel proto 222 metric 10",
    "route add 20.10.2.0/24 via 172.19.1.2 dev dummy0 proto 222 table 1000",
    "route add fd02::/48 dev dummy0 proto 222", "route add 0.0.0.0/0 dev My_Tunnel proto static table 100",
    "route add 198.51.100.0/24 dev veth0 proto ra metric 1024",
]


def _dump_in_netns() -> list[bytes]:
    """Run in the namespace: every datagram of four dumps, and the kernel's answers to two bad requests."""
    from greupd.netlink import nlmsg, rtnl

    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    sock.setsockopt(nlmsg.SOL_NETLINK, nlmsg.NETLINK_EXT_ACK, 1)
    sock.bind((0, 0))
    datagrams: list[bytes] = []
    requests = [rtnl.dump_links(), rtnl.dump_addresses(0), rtnl.dump_routes(socket.AF_INET, 0),
                rtnl.dump_routes(socket.AF_INET6, 0), rtnl.del_link(4242), rtnl.get_link("no-such-link")]
    for seq, request in enumerate(requests, start=1):
        sock.send(nlmsg.message(request.type, request.flags, seq, 0, request.body))
        while True:
            data = sock.recv(1 << 16)
            datagrams.append(data)
            if any(kind in (nlmsg.NLMSG_DONE, nlmsg.NLMSG_ERROR) or not flags & nlmsg.NLM_F_MULTI
                   for kind, flags, *_ in nlmsg.messages(data)):
                break
    return datagrams


def rtnl_seeds() -> list[bytes]:
    from greupd.model import AddressSpec, LinkSpec, RouteSpec
    from greupd.netlink import nlmsg, rtnl

    seeds: list[bytes] = []
    if os.geteuid() == 0:
        subprocess.run(["ip", "netns", "del", _NETNS], capture_output=True)
        subprocess.run(["ip", "netns", "add", _NETNS], check=True)
        try:
            for command in _SETUP:
                subprocess.run(["ip", "-n", _NETNS, *command.split()], check=True)
            out = subprocess.run(["ip", "netns", "exec", _NETNS, sys.executable, "-c",
                                  "import json; from fuzz.seeds import _dump_in_netns;"
                                  "print(json.dumps([d.hex() for d in _dump_in_netns()]))"],
                                 check=True, capture_output=True, text=True, cwd=REPO).stdout
        finally:
            subprocess.run(["ip", "netns", "del", _NETNS], capture_output=True)
        for datagram in (bytes.fromhex(h) for h in json.loads(out)):
            seeds.append(datagram[:4096])
            seeds += [m.raw for m in nlmsg.messages(datagram)][:12]
    else:
        print("rtnl: not root, no kernel dumps (only encoded messages)", file=sys.stderr)
    a, b = ipaddress.ip_address("172.19.1.1"), ipaddress.ip_address("172.19.1.2")
    a6, b6 = ipaddress.ip_address("fd00::1"), ipaddress.ip_address("fd00::2")
    links = [LinkSpec("My_Tunnel", "gre", a, b), LinkSpec("My_Tunnel", "gre", a, b, ikey=1, okey=42, ttl=0, tos=16,
                                                           pmtudisc=False, mtu=1400),
             LinkSpec("Tap", "gretap", a, b, ikey=0, ttl=255, mtu=1462),
             LinkSpec("t6", "ip6gre", a6, b6, ikey=42, okey=42, ttl=64, tos=None, pmtudisc=None, encap_limit=4),
             LinkSpec("t6tap", "ip6gretap", a6, b6, okey=7, tos=None, pmtudisc=None, encap_limit="none")]
    for number, link in enumerate(links, start=3):
        request = rtnl.new_link(link)
        seeds.append(nlmsg.message(rtnl.RTM_NEWLINK, nlmsg.NLM_F_MULTI, 1, 0,
                                   request.body[:4] + number.to_bytes(4, "little") + request.body[8:]))
    for add in (rtnl.address(True, 3, AddressSpec("My_Tunnel", ipaddress.ip_interface("10.0.0.1/30"))),
                rtnl.address(True, 3, AddressSpec("My_Tunnel", ipaddress.ip_interface("192.168.8.1/32"),
                                                   ipaddress.ip_address("192.168.8.11")))):
        seeds.append(nlmsg.message(rtnl.RTM_NEWADDR, 0, 0, 0, add.body))
    for spec in (RouteSpec("My_Tunnel", ipaddress.ip_network("20.10.1.0/24"), metric=10),
                 RouteSpec("My_Tunnel", ipaddress.ip_network("fd02::/48"), table=1000, gateway=b6)):
        request = rtnl.route(True, 3, spec, 222)
        seeds.append(nlmsg.message(rtnl.RTM_NEWROUTE, 0, 0, 0, request.body))
    return seeds


# --- VICI ---------------------------------------------------------------------------------------------------




_PSK = "fuzz-seed-psk-0123456789abcdef"


def _vici_exchange(path: Path, packets: list[bytes]) -> bytes:
    """Send framed packets to charon's VICI socket; everything charon answers until its command response."""
    from vici.protocol import Packet

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        stream = b""
        for packet in packets:
            sock.sendall(len(packet).to_bytes(4, "big") + packet)
            while True:
                head = sock.recv(4, socket.MSG_WAITALL)
                body = sock.recv(int.from_bytes(head, "big"), socket.MSG_WAITALL)
                stream += head + body
                if body[0] != Packet.EVENT:
                    break
        return stream


def vici_capture() -> list[bytes]:
    """charon's own answers: two charons in two namespaces of this host's kernel, an IKE SA and an ESP SA
    (transport, GRE) between them, and what A's VICI socket says to version, stats, list-conns, list-sas,
    an initiate of a connection that is there and one that is not, and an unknown command."""
    from vici.protocol import Message, Packet

    from lab.charon import Charon, available, gre_transport_conf
    from lab.hosts import Lab

    if os.geteuid() != 0 or available() is not None:
        print(f"vici: no capture ({available() or 'not root'})", file=sys.stderr)
        return []
    with Lab("-fuzzseeds") as lab:
        a, b = lab.host("a"), lab.host("b")
        lab.link(a, b, "172.19.1.1/24", "172.19.1.2/24")
        charons = [Charon(a).start(), Charon(b).start()]
        try:
            charons[0].load(gre_transport_conf("greupd-My_Tunnel", "172.19.1.1", "172.19.1.2", _PSK, "none"))
            charons[1].load(gre_transport_conf("greupd-to_a", "172.19.1.2", "172.19.1.1", _PSK, "none"))
            # The ESP SA needs xfrm in the kernel (this host's may refuse it): the IKE SA is there either way.
            charons[0].swanctl("--initiate", "--child", "gre", "--ike", "greupd-My_Tunnel", check=False, timeout=60)
            socket_path = charons[0].socket

            def request(command: str, message: dict[str, object] | None = None) -> bytes:
                return bytes(Packet.request(command, Message.serialize(message) if message is not None else None))

            def streamed(event: str, command: str) -> bytes:
                return _vici_exchange(socket_path, [Packet.register_event(event), request(command),
                                                    Packet.unregister_event(event)])

            return [_vici_exchange(socket_path, [request("version")]),
                    _vici_exchange(socket_path, [request("stats")]),
                    streamed("list-conn", "list-conns"), streamed("list-sa", "list-sas"),
                    _vici_exchange(socket_path, [request("get-conns")]),
                    _vici_exchange(socket_path, [request("initiate", {"child": "gre", "ike": "nope",
                                                                      "timeout": "1000"})]),
                    _vici_exchange(socket_path, [request("no-such-command")]),
                    _vici_exchange(socket_path, [Packet.register_event("no-such-event")])]
        finally:
            for charon in charons:
                charon.stop()


def vici_seeds() -> list[bytes]:
    from vici.protocol import Message, Packet

    def frame(packet: bytes) -> bytes:
        return len(packet).to_bytes(4, "big") + packet

    def response(message: dict[str, object]) -> bytes:
        return frame(bytes([Packet.CMD_RESPONSE]) + Message.serialize(message))

    def event(name: str, message: dict[str, object]) -> bytes:
        return frame(bytes([Packet.EVENT, len(name)]) + name.encode() + Message.serialize(message))

    child = {"name": "gre", "uniqueid": "7", "reqid": "1", "state": "INSTALLED", "mode": "TRANSPORT",
             "protocol": "ESP", "spi-in": "c1a2b3c4", "spi-out": "c5d6e7f8", "encr-alg": "AES_GCM_16",
             "encr-keysize": "256", "bytes-in": "1200", "packets-in": "10", "local-ts": ["172.19.1.1/32[gre]"],
             "remote-ts": ["172.19.1.2/32[gre]"]}
    ike = {"uniqueid": "3", "version": "2", "state": "ESTABLISHED", "local-host": "172.19.1.1",
           "local-port": "500", "local-id": "172.19.1.1", "remote-host": "172.19.1.2", "remote-port": "500",
           "remote-id": "172.19.1.2", "initiator": "yes", "encr-alg": "AES_CBC", "encr-keysize": "256",
           "integ-alg": "HMAC_SHA2_256_128", "prf-alg": "PRF_HMAC_SHA2_256", "dh-group": "CURVE_25519",
           "established": "12", "rekey-time": "13000", "child-sas": {"gre-7": child}}
    connecting = {**ike, "state": "CONNECTING", "child-sas": {}}
    conn = {"local_addrs": ["172.19.1.1"], "remote_addrs": ["172.19.1.2"], "version": "IKEv2",
            "reauth_time": "0", "rekey_time": "14400", "unique": "UNIQUE_NO",
            "local-1": {"class": "pre-shared key", "id": "172.19.1.1", "groups": [], "certs": []},
            "children": {"gre": {"mode": "TRANSPORT", "rekey_time": "3600", "local-ts": ["dynamic[gre]"],
                                 "remote-ts": ["dynamic[gre]"]}}}
    confirm, unknown = frame(bytes([Packet.EVENT_CONFIRM])), frame(bytes([Packet.CMD_UNKNOWN]))
    ok, refused = response({"success": "yes"}), response({"success": "no", "errmsg": "loading 'x' failed"})
    return [
        ok, refused, confirm, unknown, frame(bytes([Packet.EVENT_UNKNOWN])),
        confirm + event("list-sa", {"greupd-My_Tunnel": ike}) + event("list-sa", {"greupd-to_b": connecting})
        + event("list-sa", {"other": ike}) + response({}) + confirm,
        confirm + event("list-conn", {"greupd-My_Tunnel": conn}) + response({}) + confirm,
        event("ike-updown", {"up": "yes", "greupd-My_Tunnel": ike}),
        event("child-updown", {"greupd-to_c": {**ike, "child-sas": {"gre-8": {**child, "state": "REKEYED"}}}}),
        response({"success": "yes", "matches": "1", "terminated": "1"}),
        response({"daemon": "charon-systemd", "version": "5.9.8", "sysname": "Linux", "release": "6.1.0"}),
        event("list-sa", {"greupd-My_Tunnel": ike})[:60],
        *vici_capture(),
    ]


def control_seeds() -> list[bytes]:
    return [b'{"command": "status"}\n', b'{"command": "reload"}\n', b'{"command": "metrics"}\n',
            b'{"command": "status"}\n{"command": "metrics"}\n', b'{"command": "stop"}\n', b'{"command": 1}\n',
            b'["status"]\n', b'status\n', b'{"command": "status"', b'\n', b'{"command": "st\\u00e4tus"}\n',
            b'\xff\xfe{"command": "status"}\n', b'[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\n']


def metrics_seeds() -> list[bytes]:
    return [b"GET /metrics HTTP/1.1\r\nHost: router-a:9474\r\nAccept: text/plain\r\n\r\n",
            b"HEAD /metrics HTTP/1.1\r\n\r\n", b"GET /metrics?name[]=greupd_up HTTP/1.0\r\n\r\n",
            b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", b"GET / HTTP/1.1\r\n\r\n",
            b"GET /metrics\r\n\r\n", b"GET /metrics HTTP/2\r\n\r\n", b"GET /metrics HTTP/1.1\r\n",
            b"\r\n\r\n", b"GET  /metrics HTTP/1.1\r\n\r\n"]


def netplan_seeds() -> list[bytes]:
    text = (REPO / "tests/configs/import/netplan/60-tunnels.yaml").read_bytes()
    return [text, b"network:\n  version: 2\n", b"network:\n  tunnels:\n    t:\n      mode: gre\n"
            b"      local: 172.19.1.1\n      remote: 172.19.1.2\n      keys: {input: 1, output: 0.0.0.2}\n"]


def networkd_seeds() -> list[bytes]:
    folder = REPO / "tests/configs/import/networkd"
    seeds = []
    for netdev in sorted(folder.glob("*.netdev")):
        network = netdev.with_suffix(".network")
        seeds.append(netdev.read_bytes() + NEXT_FILE + (network.read_bytes() if network.exists() else b""))
    seeds.append(NEXT_FILE.join(
        p.read_bytes() for n in sorted(folder.glob("*.netdev")) for p in (n, n.with_suffix(".network"))))
    return seeds


def ifupdown_seeds() -> list[bytes]:
    folder = REPO / "tests/configs/import/ifupdown"
    main = (folder / "interfaces").read_bytes()
    extra = [p.read_bytes() for p in sorted((folder / "interfaces.d").iterdir())]
    return [NEXT_FILE.join([main, *extra]), main, *extra]


# --- libFuzzer dictionaries: the words of each format, which random mutation would take long to spell -------

DICTS = CORPUS.parent / "dict"


def _dict_entry(token: bytes) -> str:
    return '"' + "".join(chr(c) if 32 <= c < 127 and c not in b'"\\' else f"\\x{c:02x}" for c in token) + '"'


def dictionaries() -> dict[str, list[bytes]]:
    from greupd.config import json_schema

    keys: set[str] = set()

    def walk(node: object) -> None:
        if isinstance(node, dict):
            properties = node.get("properties")
            keys.update(properties if isinstance(properties, dict) else {})
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json_schema())
    values = [b'"gre"', b'"ip6gre"', b'"gretap"', b'"ip6gretap"', b'"172.19.1.1"', b'"fd00::1"', b'"20.10.1.0/24"',
              b'"0.0.0.42"', b'"inherit"', b'"300ms"', b'"2s"', b'"main"', b"true", b"false", b"4294967295", b"[[",
              b"]]", b"{", b"}", b'"""', b"'''", b"\\u00e4", b"1e400", b"0x", b"-0", b"nan", b"inf"]
    tables = [b"[[tunnel]]\n", b"[daemon]\n", b"[defaults]\n", b"[tunnel.keepalive]\n", b"[tunnel.ipsec]\n",
              b"[tunnel.nat]\n", b"[tunnel.mss]\n", b"[defaults.keepalive]\n"]
    return {
        "config": [*(k.encode() + b" = " for k in sorted(keys)), *values, *tables, DROPIN],
        "control": [b'"command"', b'"status"', b'"reload"', b'"metrics"', b"\n", b"\\u0000", b"[", b"{", b"null"],
        "metrics": [b"GET ", b"HEAD ", b"/metrics", b" HTTP/1.1", b" HTTP/1.0", b"\r\n", b"\r\n\r\n", b"?", b"Host: "],
        "netplan": [b"network:", b"tunnels:", b"version: 2", b"mode: ", b"gre", b"ip6gre", b"gretap", b"local: ",
                    b"remote: ", b"key: ", b"keys:", b"input: ", b"output: ", b"ttl: ", b"mtu: ", b"addresses:",
                    b"routes:", b"to: ", b"via: ", b"metric: ", b"table: ", b"default", b"- ", b"{", b"[", b"&a",
                    b"*a", b"!!", b"172.19.1.1", b"fd00::1", b"20.10.1.0/24"],
        "networkd": [b"[NetDev]\n", b"[Tunnel]\n", b"[Match]\n", b"[Network]\n", b"[Address]\n", b"[Route]\n",
                     b"Name=", b"Kind=gre", b"Kind=ip6gre", b"Kind=gretap", b"MTUBytes=", b"Local=", b"Remote=",
                     b"Key=", b"InputKey=", b"OutputKey=", b"TTL=", b"TOS=", b"DiscoverPathMTU=", b"Address=",
                     b"Peer=", b"Destination=", b"Gateway=", b"Metric=", b"Table=", b"172.19.1.1", b"fd00::1",
                     b"20.10.1.0/24", NEXT_FILE],
        "ifupdown": [b"iface ", b" inet tunnel\n", b" inet6 tunnel\n", b"auto ", b"source interfaces.d/*\n",
                     b"mode gre", b"mode ip6gre", b"mode gretap", b"local ", b"endpoint ", b"address ", b"netmask ",
                     b"dstaddr ", b"ttl ", b"mtu ", b"key ", b"ikey ", b"okey ", b"gateway ", b"up ", b"post-up ",
                     b"ip route add ", b" dev ", b" metric ", b" table ", b"route add -net ", b"-host ",
                     b"iptables -t nat -A POSTROUTING -o ", b"-j MASQUERADE", b"-j TCPMSS --set-mss ", b" -s ",
                     b"\\\n", b"'", b'"', NEXT_FILE],
    }


def write_dictionaries() -> None:
    DICTS.mkdir(exist_ok=True)
    for target, tokens in dictionaries().items():
        (DICTS / f"{target}.dict").write_text("".join(_dict_entry(t) + "\n" for t in tokens))


def main() -> None:
    write_dictionaries()
    for target, seeds in (("config", config_seeds), ("gre", gre_seeds), ("rtnl", rtnl_seeds), ("vici", vici_seeds),
                          ("control", control_seeds), ("metrics", metrics_seeds), ("netplan", netplan_seeds),
                          ("networkd", networkd_seeds), ("ifupdown", ifupdown_seeds)):
        print(f"{target}: {save(target, seeds())} seeds")


if __name__ == "__main__":
    main()
