"""`greupd doctor` against real faults made in netns hosts (#24's acceptance): each fault is made, doctor names
exactly that check with the right evidence, the fix it prints is applied, and the finding goes (and, where this
kernel can show it, the peer's answer gets through again).

Router a runs doctor on tunnel T1 (local 10.9.0.1, remote 10.9.0.2 over a veth); router b plays the peer: a
raw-socket reflector (what a peer's GRE tunnel does to a Cisco keepalive: decapsulate, route the inner packet
back), so no ip_gre is needed on either side. This machine's kernel has none, so `gre-module-missing` is real
here and is left out of "exactly" where a test is about another check (test_gre_module_missing_is_... holds it).
`iptables` is not installed here: the iptables-nft fault is made with nft, as the same kernel objects
(`table ip filter`, chain FORWARD, policy drop) that `iptables -P FORWARD DROP` makes through iptables-nft.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lab.hosts import Host, Lab
from lab.kernel import capabilities

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.needs_root

CONFIG = """[daemon]
ip_forward = {forward}

[[tunnel]]
name = "T1"
mode = "gre"
local = "{local}"
remote = "{remote}"
routes = ["192.168.50.0/24"]
{extra}
[tunnel.keepalive]
interval = "10s"
"""

# What a peer's GRE tunnel does to a Cisco keepalive: the inner packet (to us) is routed back out.
REFLECTOR = r"""
import socket, struct, sys
rx = socket.socket(socket.AF_INET, socket.SOCK_RAW, 47)
tx = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
print("ready", flush=True)
while True:
    data, (src, _) = rx.recvfrom(65535)
    ihl = (data[0] & 0x0F) * 4
    flags, proto = struct.unpack_from("!HH", data, ihl)
    if proto != 0x0800:
        continue
    at = ihl + 4 + 4 * bool(flags & 0x8000) + 4 * bool(flags & 0x2000) + 4 * bool(flags & 0x1000)
    inner = data[at:]
    try:
        tx.sendto(inner, (socket.inet_ntoa(inner[16:20]), 0))
    except OSError:
        pass  # no route to the inner destination: what a peer behind a NAT's far side meets
"""

# Does the peer's answer reach this host's local delivery? One keepalive out, then GRE from the remote read on
# a raw IPPROTO_GRE socket (which gets a copy of every GRE packet delivered here).
ANSWERED = r"""
import select, socket, sys, time
from ipaddress import ip_address
from greupd.keepalive.codec import build_probe_template, new_token
local, remote = ip_address(sys.argv[1]), ip_address(sys.argv[2])
rx = socket.socket(socket.AF_INET, socket.SOCK_RAW, 47)
tx = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
probe = build_probe_template(local, remote, None, None)
deadline = time.monotonic() + 3
while time.monotonic() < deadline:
    try:
        tx.sendto(probe.with_token(new_token()), (str(remote), 0))
    except OSError:
        pass
    end = time.monotonic() + 0.3
    while (left := end - time.monotonic()) > 0 and select.select([rx], [], [], left)[0]:
        if rx.recvfrom(65535)[1][0] == str(remote):
            sys.exit(0)
sys.exit(1)
"""


@dataclass
class Pair:
    a: Host
    b: Host
    lab: Lab
    files: Path

    def config(self, local: str = "10.9.0.1", remote: str = "10.9.0.2", extra: str = "",
               forward: str = "true") -> str:
        path = self.files / "tunnels.toml"
        path.write_text(CONFIG.format(local=local, remote=remote, extra=extra, forward=forward))
        return str(path)

    def doctor(self, config: str | None = None) -> tuple[int, list[dict[str, str]]]:
        done = self.a.run(sys.executable, "-m", "greupd", "doctor", "--json", "-c", config or self.config(),
                          "--socket", str(self.files / "none.sock"), check=False, timeout=120,
                          env=_env())
        assert done.returncode in (0, 1), done.stderr
        return done.returncode, json.loads(done.stdout)["findings"]

    def answered(self, local: str = "10.9.0.1", remote: str = "10.9.0.2") -> bool:
        return self.a.run(sys.executable, "-c", ANSWERED, local, remote, check=False, env=_env()).returncode == 0

    def reflect(self) -> subprocess.Popen[str]:
        proc = self.b.popen(sys.executable, "-c", REFLECTOR, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        return proc


def _env() -> dict[str, str]:
    import os

    return {**{k: v for k, v in os.environ.items() if not k.startswith("GREUPD_")}, "PYTHONPATH": str(REPO)}


NO_GRE = "gre" not in capabilities()


def others(findings: list[dict[str, str]]) -> list[dict[str, str]]:
    """The findings, but gre-module-missing on a kernel that really lacks ip_gre (this machine's)."""
    return [f for f in findings if not (f["check"] == "gre-module-missing" and NO_GRE)]


def checks(findings: list[dict[str, str]]) -> list[str]:
    return [f["check"] for f in others(findings)]


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    with Lab() as lab:
        a, b = lab.host("a"), lab.host("b")
        lab.link(a, b, "10.9.0.1/24", "10.9.0.2/24")
        found = Pair(a, b, lab, tmp_path)
        found.reflect()
        yield found


def test_nothing_on_a_clean_pair(pair: Pair) -> None:
    """No false positives: the seed's shape (a tunnel with routes and keepalives, a peer that answers)."""
    code, findings = pair.doctor()
    assert others(findings) == []
    assert code == (1 if NO_GRE else 0)


def test_gre_module_missing_is_named_when_the_kernel_has_no_ip_gre(pair: Pair) -> None:
    _, findings = pair.doctor()
    missing = [f for f in findings if f["check"] == "gre-module-missing"]
    if NO_GRE:  # this machine: CONFIG_MODULES off, no ip_gre built in; the fix is another kernel
        (finding,) = missing
        assert finding["tunnel"] == "T1" and "the kernel has no ip_gre" in finding["message"]
        assert "/sys/module/ip_gre does not exist" in finding["evidence"]
        assert "CONFIG_NET_IPGRE" in finding["fix"] or "modprobe ip_gre" in finding["fix"]
    else:
        assert missing == []


def test_firewall_drops_gre_in_another_tables_input_chain(pair: Pair) -> None:
    assert pair.answered()
    pair.a.run("nft", "-f", "-", input="table ip other {\n chain input {\n"
               "  type filter hook input priority 0; policy accept;\n  ip protocol gre counter drop\n }\n}\n")
    assert not pair.answered()
    _, findings = pair.doctor()
    assert checks(findings) == ["firewall-drops-gre"]
    (finding,) = others(findings)
    assert finding["tunnel"] == "T1" and finding["message"] == "ip other input drops GRE from 10.9.0.2"
    assert finding["evidence"].startswith("nftables trace ")  # traced, not inferred
    assert "decided by table ip other chain input: ip protocol gre counter drop # handle 2 (verdict drop)" \
        in finding["evidence"]
    assert finding["fix"] == ("nft insert rule ip other input position 2 ip saddr 10.9.0.2 ip daddr 10.9.0.1 "
                              "ip protocol gre accept")
    pair.a.run(*finding["fix"].split())
    assert others(pair.doctor()[1]) == []
    assert pair.answered()


def test_firewall_drops_our_keepalive_on_output(pair: Pair) -> None:
    pair.a.run("nft", "-f", "-", input="table inet host {\n chain out {\n"
               "  type filter hook output priority 10; policy accept;\n  meta l4proto gre reject\n }\n}\n")
    assert not pair.answered()
    _, findings = pair.doctor()
    assert checks(findings) == ["firewall-drops-gre"]  # and no peer-silent: this host explains the silence
    (finding,) = others(findings)
    assert finding["message"] == "inet host out rejects our keepalive to 10.9.0.2"
    assert "decided by table inet host chain out: meta l4proto gre reject # handle 2" in finding["evidence"]
    pair.a.run(*finding["fix"].split())
    assert others(pair.doctor()[1]) == []
    assert pair.answered()


def test_forward_drop_of_iptables_nft_forward_policy(pair: Pair) -> None:
    """`iptables -P FORWARD DROP` (Docker's), as iptables-nft leaves it in the kernel."""
    pair.a.run("nft", "-f", "-", input="table ip filter {\n chain FORWARD {\n"
               "  type filter hook forward priority 0; policy drop;\n }\n}\n")
    _, findings = pair.doctor()
    assert checks(findings) == ["forward-drop"]
    (finding,) = others(findings)
    assert finding["message"] == ("table ip filter chain FORWARD (hook forward) has policy drop: traffic routed "
                                  "through T1 is dropped there")
    assert "none of its rules accepts iifname T1 or oifname T1" in finding["evidence"]
    assert finding["fix"] == "iptables -I FORWARD -i T1 -j ACCEPT\niptables -I FORWARD -o T1 -j ACCEPT"
    # iptables is not installed here: the same two rules, as iptables-nft writes them
    pair.a.run("nft", "insert", "rule", "ip", "filter", "FORWARD", "iifname", "T1", "counter", "accept")
    pair.a.run("nft", "insert", "rule", "ip", "filter", "FORWARD", "oifname", "T1", "counter", "accept")
    assert others(pair.doctor()[1]) == []


def test_ip_forward_off(pair: Pair) -> None:
    pair.a.sysctl("net.ipv4.ip_forward", 0)
    config = pair.config(forward="false")
    _, findings = pair.doctor(config)
    assert checks(findings) == ["ip-forward-off"]
    (finding,) = others(findings)
    assert finding["evidence"] == "net.ipv4.ip_forward = 0; [daemon] ip_forward = false"
    in_config, by_hand = finding["fix"].splitlines()
    assert in_config.startswith("in [daemon]: ip_forward = true   # greupd then switches it on")
    # the config line: greupd switches forwarding on when it runs, so doctor (no daemon here) is content
    fixed = Path(pair.config(forward="true"))
    assert others(pair.doctor(str(fixed))[1]) == []
    # the command, as printed after "or: "
    pair.a.run(*by_hand.removeprefix("or: ").split())
    assert pair.a.sysctl_get("net.ipv4.ip_forward") == "1"
    assert others(pair.doctor(pair.config(forward="false"))[1]) == []


def peer_keepalive_gets_in(pair: Pair, quiet: float) -> bool:
    """Does the peer's own keepalive get through a's stateful firewall `quiet` seconds after a's last one?

    a sends a keepalive and hears its reflection (the GRE flow is ESTABLISHED in a's conntrack); then nothing for
    `quiet` seconds, as between two keepalives; then b sends its own (outer b > a: the flow's reply direction).
    Sockets opened in each host's netns from this process (lab.hosts.in_netns): no interpreter per look."""
    import select
    import socket
    import time
    from ipaddress import IPv4Address

    from greupd.keepalive.codec import build_probe_template, new_token
    from lab.hosts import in_netns

    local, remote = IPv4Address("10.9.0.1"), IPv4Address("10.9.0.2")
    with in_netns(pair.a):
        rx = socket.socket(socket.AF_INET, socket.SOCK_RAW, 47)
        tx_a = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    with in_netns(pair.b):
        tx_b = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)

    def heard(seconds: float) -> bool:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0 and select.select([rx], [], [], left)[0]:
            if rx.recvfrom(65535)[1][0] == str(remote):
                return True
        return False

    with rx, tx_a, tx_b:
        tx_a.sendto(build_probe_template(local, remote, None, None).with_token(new_token()), (str(remote), 0))
        assert heard(3), "a's own keepalive got no answer"
        time.sleep(quiet)  # the silence between two keepalives is what this story is about, not a wait for a result
        while heard(0):
            pass  # the reflection's duplicates, if any
        tx_b.sendto(build_probe_template(remote, local, None, None).with_token(new_token()), (str(local), 0))
        return heard(1)


def test_conntrack_timeout_shorter_than_the_keepalive_interval(pair: Pair) -> None:
    """conntrack's GRE timeouts at 1 s, keepalives every 1.5 s, and a firewall that lets GRE in only when it is
    ESTABLISHED: conntrack forgets the flow between two keepalives, so the peer's own keepalive arrives as NEW
    and is dropped. Doctor names conntrack-timeout; its `sysctl -w` lines, run as printed, keep the flow, and the
    peer's keepalive gets in."""
    pair.a.sysctl("net.netfilter.nf_conntrack_gre_timeout", 1)
    pair.a.sysctl("net.netfilter.nf_conntrack_gre_timeout_stream", 1)
    pair.a.run("nft", "-f", "-", input="table ip fw {\n chain input {\n"
               "  type filter hook input priority 0; policy accept;\n  ip protocol gre ct state established accept\n"
               "  ip protocol gre drop\n }\n}\n")
    config = pair.config()
    Path(config).write_text(Path(config).read_text().replace('interval = "10s"', 'interval = "1.5s"'))
    assert not peer_keepalive_gets_in(pair, 1.5)
    _, findings = pair.doctor(config)
    assert checks(findings) == ["conntrack-timeout"]
    (finding,) = others(findings)
    assert finding["message"] == "conntrack forgets this tunnel's GRE after 1 s, but keepalives come every 1.5 s"
    assert finding["evidence"].startswith("net.netfilter.nf_conntrack_gre_timeout = 1; "
                                          "net.netfilter.nf_conntrack_gre_timeout_stream = 1; keepalive interval 1.5 s")
    fixes = [line.split("#")[0].split() for line in finding["fix"].splitlines() if line.startswith("sysctl -w")]
    assert [f[2].split("=")[0] for f in fixes] == ["net.netfilter.nf_conntrack_gre_timeout",
                                                   "net.netfilter.nf_conntrack_gre_timeout_stream"]
    for command in fixes:
        pair.a.run(*command)
    # The flow tracked with 1 s timeouts keeps them while keepalives refresh it: the printed conntrack lines
    # end it (exit status 1 when it had expired already).
    flows = [line.split("#")[0].split() for line in finding["fix"].splitlines() if line.startswith("conntrack -D")]
    assert [f[f.index("--orig-src") + 1] for f in flows] == ["10.9.0.1", "10.9.0.2"]
    for command in flows:
        pair.a.run(*command, check=False)
    assert others(pair.doctor(config)[1]) == []
    assert peer_keepalive_gets_in(pair, 1.5)


def test_local_address_missing(pair: Pair) -> None:
    config = pair.config(local="10.9.0.99")
    _, findings = pair.doctor(config)
    assert checks(findings) == ["local-address-missing"]  # not peer-silent as well: this is why it is silent
    (finding,) = others(findings)
    assert finding["evidence"] == "IPv4 addresses on this host: 10.9.0.1 (eth0)"
    assert finding["fix"].startswith("ip address add 10.9.0.99/32 dev <the underlay interface>")
    pair.a.run(*finding["fix"].splitlines()[0].replace("<the underlay interface>", "eth0").split())
    assert others(pair.doctor(config)[1]) == []
    assert pair.answered(local="10.9.0.99")  # the peer's answer reaches it now


def test_interface_missing(pair: Pair) -> None:
    config = pair.config(extra='[tunnel.nat]\nfrom_tunnel = ["lan0"]\n')
    _, findings = pair.doctor(config)
    assert checks(findings) == ["interface-missing"]
    (finding,) = others(findings)
    assert "from_tunnel names lan0, which does not exist" in finding["message"]
    assert finding["fix"] == 'in [[tunnel]] name = "T1", [tunnel.nat]: from_tunnel = ["<an existing interface>"]'
    fixed = pair.config(extra='[tunnel.nat]\nfrom_tunnel = ["eth0"]\n')  # the fix's line, an interface a has
    assert others(pair.doctor(fixed)[1]) == []


def test_peer_silent(pair: Pair) -> None:
    for proc in pair.lab._procs:
        proc.kill()
        proc.wait()
    _, findings = pair.doctor()
    assert checks(findings) == ["peer-silent"]
    (finding,) = others(findings)
    assert finding["severity"] == "warning"
    assert "traced out through every table; none came back within the trace" in finding["evidence"]
    pair.reflect()  # the fix is on the peer: its tunnel back (what reflects a keepalive)
    assert others(pair.doctor()[1]) == []
    assert pair.answered()


def test_rp_filter_with_an_asymmetric_path(tmp_path: Path) -> None:
    """GRE from b arrives on a's eth0, while a's route to b's address leaves by eth1; rp_filter 1 (strict)."""
    with Lab() as lab:
        a, b = lab.host("a"), lab.host("b")
        lab.link(a, b, "10.9.0.1/24", "10.9.0.2/24")
        lab.link(a, b, "10.8.0.1/24", "10.8.0.2/24", "eth1", "eth1")
        b.ip("address", "add", "10.7.0.2/32", "dev", "lo")
        a.ip("route", "add", "10.7.0.2/32", "via", "10.8.0.2", "dev", "eth1")
        pair = Pair(a, b, lab, tmp_path)
        pair.reflect()
        config = pair.config(remote="10.7.0.2")
        assert pair.answered(remote="10.7.0.2")
        a.sysctl("net.ipv4.conf.all.rp_filter", 1)
        assert not pair.answered(remote="10.7.0.2")
        _, findings = pair.doctor(config)
        assert checks(findings) == ["rp-filter"]
        (finding,) = others(findings)
        assert finding["message"] == ("strict rp_filter on eth0 drops GRE from 10.7.0.2: it arrives on eth0, "
                                      "the route back leaves by eth1")
        assert finding["evidence"].startswith("net.ipv4.conf.all.rp_filter = 1, net.ipv4.conf.eth0.rp_filter = 0 "
                                              "(the kernel uses the larger: 1, strict)")
        assert "nftables traced GRE from 10.7.0.2 arriving on eth0; ip route get 10.7.0.2: dev eth1" \
            in finding["evidence"]
        a.run(*finding["fix"].splitlines()[0].split("#")[0].split())
        assert others(pair.doctor(config)[1]) == []
        assert pair.answered(remote="10.7.0.2")


def test_plan_warns_of_what_the_kernel_lacks(pair: Pair) -> None:
    """#24 item 4: `greupd plan` says it before `run` meets errno 95 or a silent tunnel."""
    config = pair.config(local="10.9.0.99", extra='[tunnel.nat]\nfrom_tunnel = ["lan0"]\n')
    done = pair.a.run(sys.executable, "-m", "greupd", "plan", config, env=_env(), check=False)
    assert "# warning: T1: local = 10.9.0.99 is on no interface of this host" in done.stdout
    assert "(greupd doctor: local-address-missing; fix: ip address add 10.9.0.99/32 dev <the underlay interface>)" \
        in done.stdout
    assert "# warning: T1: [tunnel.nat] from_tunnel names lan0, which does not exist" in done.stdout
    if NO_GRE:
        assert "# warning: T1: the kernel has no ip_gre: it cannot make this tunnel's link" in done.stdout


# Docker's iptables-nft tables as a Docker host lists them, plus the two accepts an admin adds for a tunnel
# (`iptables -I DOCKER-USER -i T1 -j ACCEPT`, `-o T1`).
DOCKER = """table ip nat {
 chain DOCKER {
 }
 chain PREROUTING {
  type nat hook prerouting priority dstnat; policy accept;
  fib daddr type local counter jump DOCKER
 }
 chain POSTROUTING {
  type nat hook postrouting priority srcnat; policy accept;
  oifname != "docker0" ip saddr 172.17.0.0/16 counter masquerade
 }
}
table ip filter {
 chain DOCKER {
 }
 chain DOCKER-ISOLATION-STAGE-2 {
  oifname "docker0" counter drop
  counter return
 }
 chain DOCKER-ISOLATION-STAGE-1 {
  iifname "docker0" oifname != "docker0" counter jump DOCKER-ISOLATION-STAGE-2
  counter return
 }
 chain DOCKER-USER {
  iifname "T1" counter accept
  oifname "T1" counter accept
  counter return
 }
 chain FORWARD {
  type filter hook forward priority filter; policy drop;
  counter jump DOCKER-USER
  counter jump DOCKER-ISOLATION-STAGE-1
  oifname "docker0" ct state related,established counter accept
  oifname "docker0" counter jump DOCKER
  iifname "docker0" oifname != "docker0" counter accept
  iifname "docker0" oifname "docker0" counter accept
 }
}
"""

# firewalld's nftables backend, its default shape (zone public on eth0), with GRE allowed as
# `firewall-cmd --add-protocol=gre` and the tunnel in zone trusted (`--zone=trusted --add-interface=T1`).
FIREWALLD = """table inet firewalld {
 chain filter_IN_public_allow {
  tcp dport 22 ct state new,untracked accept
  meta l4proto gre ct state new,untracked accept
 }
 chain filter_IN_public {
  jump filter_IN_public_allow
  meta l4proto { icmp, ipv6-icmp } accept
 }
 chain filter_INPUT_ZONES {
  iifname "eth0" goto filter_IN_public
  goto filter_IN_public
 }
 chain filter_INPUT {
  type filter hook input priority filter + 10; policy accept;
  ct state established,related accept
  ct status dnat accept
  iifname "lo" accept
  ct state invalid drop
  jump filter_INPUT_ZONES
  reject with icmpx admin-prohibited
 }
 chain filter_FWD_trusted {
  accept
 }
 chain filter_FORWARD_ZONES {
  iifname "T1" goto filter_FWD_trusted
 }
 chain filter_FORWARD {
  type filter hook forward priority filter + 10; policy accept;
  ct state established,related accept
  ct status dnat accept
  iifname "lo" accept
  jump filter_FORWARD_ZONES
  ct state invalid drop
  reject with icmpx admin-prohibited
 }
 chain filter_OUTPUT {
  type filter hook output priority filter + 10; policy accept;
  ct state established,related accept
  oifname "lo" accept
 }
}
"""


def test_nothing_under_dockers_and_firewallds_rulesets_that_allow_the_tunnel(pair: Pair) -> None:
    """No false positives: both default rulesets present, each letting the tunnel's GRE and traffic through."""
    pair.a.run("nft", "-f", "-", input=DOCKER + FIREWALLD)
    assert pair.answered()
    _, findings = pair.doctor()
    assert others(findings) == []
    # and without the admin's accepts, Docker's FORWARD drops the tunnel's traffic: named, and only that
    pair.a.run("nft", "flush", "chain", "ip", "filter", "DOCKER-USER")
    assert checks(pair.doctor()[1]) == ["forward-drop"]


def _routed(lab: Lab, tmp_path: Path, icmp_dropped: bool) -> Pair:
    """a - r - b, r's link to b at MTU 1400; with `icmp_dropped`, r's "fragmentation needed" never leaves it."""
    a, r, b = lab.host("a"), lab.host("r"), lab.host("b")
    lab.link(a, r, "10.1.0.1/24", "10.1.0.254/24", then1=["route add default via 10.1.0.254"])
    lab.link(r, b, "10.2.0.254/24", "10.2.0.2/24", "eth1", "eth0", then1=["link set eth1 mtu 1400"],
             then2=["link set eth0 mtu 1400", "route add default via 10.2.0.254"])
    r.sysctl("net.ipv4.ip_forward", 1)
    if icmp_dropped:
        r.run("nft", "-f", "-", input="table ip r {\n chain out {\n  type filter hook output priority 0;\n"
              "  icmp type destination-unreachable drop\n }\n}\n")
    pair = Pair(a, b, lab, tmp_path)
    pair.reflect()
    return pair


def test_mtu_blackhole_when_the_path_is_narrower_and_icmp_is_dropped(tmp_path: Path) -> None:
    with Lab() as lab:
        pair = _routed(lab, tmp_path, icmp_dropped=True)
        config = pair.config(local="10.1.0.1", remote="10.2.0.2")
        _, findings = pair.doctor(config)
        assert checks(findings) == ["mtu-blackhole"]
        (finding,) = others(findings)
        assert finding["message"] == ("the path to 10.2.0.2 carries packets of at most 1400 bytes, the tunnel needs "
                                      "1500, and no ICMP error says so: larger packets vanish")
        assert "1400 bytes came back, 1401 did not" in finding["evidence"]
        assert finding["fix"].startswith('in [[tunnel]] name = "T1": mtu = 1376\n')
        line = finding["fix"].splitlines()[0].split(": ", 1)[1]  # the config line, into T1's table
        fixed = pair.config(local="10.1.0.1", remote="10.2.0.2", extra=f"{line}\n")
        assert others(pair.doctor(fixed)[1]) == []  # padded keepalives of the size it needs now come back


def test_no_mtu_blackhole_when_icmp_tells_the_path_mtu(tmp_path: Path) -> None:
    """Narrower path, but r's ICMP gets through: path MTU discovery works, nothing to report."""
    with Lab() as lab:
        pair = _routed(lab, tmp_path, icmp_dropped=False)
        assert others(pair.doctor(pair.config(local="10.1.0.1", remote="10.2.0.2"))[1]) == []


# The peer's own keepalives, as a peer configured with `local = 10.2.0.2`, `remote = REMOTE` sends them.
SENDER = r"""
import socket, sys, time
from ipaddress import ip_address
from greupd.keepalive.codec import build_probe_template, new_token
probe = build_probe_template(ip_address("10.2.0.2"), ip_address(sys.argv[1]), None, None)
tx = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
while True:
    try:
        tx.sendto(probe.with_token(new_token()), (sys.argv[1], 0))
    except OSError:
        pass
    time.sleep(0.5)
"""


def test_nat_in_path(tmp_path: Path) -> None:
    """a - n - b, n masquerading a's side; b (the peer) knows a as n's address, 10.2.0.254, and has no route to
    a's own 10.1.0.1: a's keepalives get no answer, b's own ones arrive naming a as 10.2.0.254."""
    with Lab() as lab:
        a, n, b = lab.host("a"), lab.host("n"), lab.host("b")
        lab.link(a, n, "10.1.0.1/24", "10.1.0.254/24", then1=["route add default via 10.1.0.254"])
        lab.link(n, b, "10.2.0.254/24", "10.2.0.2/24", "eth1", "eth0")
        n.sysctl("net.ipv4.ip_forward", 1)
        n.run("nft", "-f", "-", input="table ip nat {\n chain post {\n"
              "  type nat hook postrouting priority srcnat; policy accept;\n  oifname \"eth1\" masquerade\n }\n}\n")
        pair = Pair(a, b, lab, tmp_path)
        pair.reflect()
        # a speaks first, as a host behind a NAT must: its GRE opens n's mapping (n, asked first by b, would
        # keep b's GRE for itself, an entry b's every keepalive refreshes).
        assert not pair.answered(local="10.1.0.1", remote="10.2.0.2")
        sender = b.popen(sys.executable, "-c", SENDER, "10.2.0.254", env=_env())
        config = pair.config(local="10.1.0.1", remote="10.2.0.2")
        text = Path(config).read_text().replace('interval = "10s"', 'interval = "1s"')
        Path(config).write_text(text)
        _, findings = pair.doctor(config)
        assert checks(findings) == ["nat-in-path"]  # and not peer-silent: this is why
        (finding,) = others(findings)
        assert finding["message"] == ("a NAT between this host and 10.2.0.2: the peer knows this host as 10.2.0.254, "
                                      "not 10.1.0.1, and routes the keepalives it reflects to 10.1.0.1, which it "
                                      "cannot reach")
        assert "inner packet from 10.2.0.254 (the peer's `remote` for this host) to 10.2.0.2" in finding["evidence"]
        # The fix's first way: GRE between the two without NAT, and a route back to a; the peer then names a
        # by its own address.
        n.run("nft", "insert", "rule", "ip", "nat", "post", "ip", "protocol", "gre", "accept")
        n.run(sys.executable, "-c", "from pyroute2 import Conntrack; Conntrack().flush()", env=_env())
        b.ip("route", "add", "10.1.0.0/24", "via", "10.2.0.254")
        sender.kill()
        b.popen(sys.executable, "-c", SENDER, "10.1.0.1", env=_env())
        assert others(pair.doctor(config)[1]) == []
        assert pair.answered(local="10.1.0.1", remote="10.2.0.2")


def test_the_daemon_says_the_kernel_has_no_ip_gre_instead_of_errno_95_alone(pair: Pair) -> None:
    """#24 item 4 on this machine's own kernel (no ip_gre, no modules): `greupd status` has doctor's finding as a
    warning, the log says it once beside the errno, and the refused link is retried with a backoff, not a loop."""
    from lab.greupd_process import GreupdProcess
    from lab.waiting import wait_until

    daemon = GreupdProcess(pair.a, CONFIG.format(local="10.9.0.1", remote="10.9.0.2", extra="", forward="true"))
    daemon.start(wait=False)
    try:
        daemon.wait_ready()
        mine = [w for w in daemon.status()["warnings"] if "(greupd doctor: " in w]  # type: ignore[index]
        if not NO_GRE:
            assert mine == []
            return
        assert mine == ["T1: the kernel has no ip_gre: it cannot make this tunnel's link (greupd doctor: "
                        "gre-module-missing; fix: boot a kernel built with CONFIG_NET_IPGRE (every Debian, Ubuntu "
                        "and RHEL kernel has it as a module))"]
        shown = daemon.cli("status").stdout
        assert f"warning: {mine[0]}" in shown
        assert wait_until(lambda: "trying again in 4 s" in daemon.output(), 30)
        lines = daemon.output().splitlines()
        assert sum(f"greupd warning: {mine[0]}" in line for line in lines) == 1
        retries = [line.rsplit("trying again in ", 1)[1] for line in lines if "trying again in" in line]
        assert retries[:3] == ["1 s", "2 s", "4 s"]
    finally:
        daemon.stop()
