"""ip6gre's Tunnel Encapsulation Limit (review L5), as `ip -d link show` and the wire show it.

greupd used to send no limit, and the kernel zeroes an ip6gre link's parameters: every packet carried an
8-byte destination option with limit 0. Now the default is iproute2's 4, `encap_limit = "none"` sends no
option at all, and a reload changes the limit on the link that is there (same ifindex, no flap).
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from lab.greupd_process import GreupdProcess
from lab.hosts import Host, Lab, in_netns
from lab.traffic import capture
from lab.waiting import eventually

pytestmark = pytest.mark.needs_gre

ETH_P_IPV6 = 0x86DD
NEXTHDR_DEST = 60  # an IPv6 Destination Options header: where the kernel puts the Tunnel Encapsulation Limit
IPV6_TLV_TNL_ENCAP_LIMIT = 4

ROUTER = """
[[tunnel]]
name = "t_default"
mode = "ip6gre"
local = "2001:db8:ff::1"
remote = "2001:db8:ff::2"

[[tunnel]]
name = "t_none"
mode = "ip6gre"
local = "2001:db8:ff::1"
remote = "2001:db8:ff::3"
encap_limit = "none"

[[tunnel]]
name = "t_tap"
mode = "ip6gretap"
local = "2001:db8:ff::1"
remote = "2001:db8:ff::4"
encap_limit = 0
"""


@pytest.fixture
def router() -> Iterator[Host]:
    with Lab() as lab:
        a = lab.host("a")
        a.ip_batch("link add wan0 type dummy", "addr add 2001:db8:ff::1/64 dev wan0 nodad", "link set wan0 up")
        yield a




def mtu(host: Host, name: str) -> int:
    found = re.search(r" mtu (\d+) ", host.ip("-o", "link", "show", name).stdout)
    assert found is not None
    return int(found.group(1))


def test_ip_link_shows_encaplimit_4_by_default_none_and_0_as_configured(router: Host) -> None:
    daemon = GreupdProcess(router, ROUTER).start()

    assert "encaplimit 4 " in router.link_details("t_default")
    assert "encaplimit none " in router.link_details("t_none")
    assert "encaplimit 0 " in router.link_details("t_tap")
    # The kernel leaves room for the 8-byte option only where it is sent: 1500 - 40 (IPv6) - 4 (GRE) [- 8].
    assert (mtu(router, "t_default"), mtu(router, "t_none")) == (1448, 1456)
    # What greupd created reads back as what it wants: nothing to change, and nothing being done.
    plan = daemon.cli("plan").stdout
    assert plan.startswith("# kernel\nnothing to change"), plan
    settled = daemon.status()
    time.sleep(2)
    after = daemon.status()
    assert settled is not None and after is not None
    assert after["netlink_requests"] == settled["netlink_requests"], daemon.output()

    # Somebody sets a limit by hand: greupd puts its own back, on the same link.
    index = router.ifindex("t_none")
    router.ip("link", "set", "t_none", "type", "ip6gre", "local", "2001:db8:ff::1", "remote", "2001:db8:ff::3",
              "encaplimit", "9")
    eventually(lambda: "encaplimit none " in router.link_details("t_none"), 20, "drift repaired",
               daemon.output)
    assert router.ifindex("t_none") == index


@dataclass
class Pair:
    """Two routers joined by a veth (A fd00:1::1, B fd00:1::2) and an ip6gre tunnel between them: greupd's on A,
    one made by hand on B with `encaplimit none` (a Cisco-like peer sends no option)."""

    a: Host
    b: Host
    greupd: GreupdProcess


def a_config(encap_limit: str = "") -> str:
    return f"""
[[tunnel]]
name = "Tunnel6"
mode = "ip6gre"
local = "fd00:1::1"
remote = "fd00:1::2"
address = "10.6.0.1/30"
{encap_limit}
"""


@pytest.fixture
def pair() -> Iterator[Pair]:
    with Lab() as lab:
        a, b = lab.bare_hosts("a", "b")
        a.ip_batch("link set lo up", f"link add eth0 type veth peer name eth0 netns {b.netns}",
                   "addr add fd00:1::1/64 dev eth0 nodad", "link set eth0 up")
        b.ip_batch("link set lo up", "addr add fd00:1::2/64 dev eth0 nodad", "link set eth0 up",
                   "link add Tunnel6 type ip6gre local fd00:1::2 remote fd00:1::1 encaplimit none",
                   "addr add 10.6.0.2/30 dev Tunnel6", "link set Tunnel6 up")
        greupd = GreupdProcess(a, a_config('encap_limit = "none"')).start()
        yield Pair(a, b, greupd)


def outer_limit(frame: bytes, source: str) -> int | str | None:
    """What an outer IPv6 packet from `source` carried: its Tunnel Encapsulation Limit, "none" when GRE follows
    the IPv6 header directly, None for any other frame."""
    if frame[12:14] != ETH_P_IPV6.to_bytes(2, "big") or frame[22:38] != socket.inet_pton(socket.AF_INET6, source):
        return None
    next_header, payload = frame[20], frame[54:]
    if next_header == socket.IPPROTO_GRE:
        return "none"
    if next_header == NEXTHDR_DEST and payload[0] == socket.IPPROTO_GRE and payload[2] == IPV6_TLV_TNL_ENCAP_LIMIT:
        return payload[4]
    return None


def limits_seen_at_b(pair: Pair) -> set[int | str]:
    """Ping B through the tunnel from A; the limits of A's GRE packets as B's eth0 received them."""
    with in_netns(pair.b):
        sniffer = capture("eth0")
    try:
        assert pair.a.ping("10.6.0.2", count=3), pair.greupd.output()
        sniffer.settimeout(1.0)
        seen: set[int | str] = set()
        try:
            while len(seen) < 2:
                limit = outer_limit(sniffer.recv(65535), "fd00:1::1")
                if limit is not None:
                    seen.add(limit)
        except TimeoutError:
            pass
        return seen
    finally:
        sniffer.close()


def test_a_ping_through_ip6gre_with_no_limit_then_a_reload_to_the_default_keeps_the_link(pair: Pair) -> None:
    index = pair.a.ifindex("Tunnel6")
    assert limits_seen_at_b(pair) == {"none"}

    result = pair.greupd.reload(a_config())
    assert result.returncode == 0, result.stderr
    eventually(lambda: "encaplimit 4 " in pair.a.link_details("Tunnel6"), 20, "encaplimit 4 after the reload",
               pair.greupd.output)
    assert pair.a.ifindex("Tunnel6") == index  # changed in place: the same link, its address and routes kept
    assert limits_seen_at_b(pair) == {4}


def test_import_from_the_kernel_writes_the_limit_of_a_hand_made_tunnel_and_adopts_it_unchanged(router: Host) -> None:
    router.ip_batch("link add Plain6 type ip6gre local 2001:db8:ff::1 remote 2001:db8:ff::2",
                    "link add NoLimit6 type ip6gre local 2001:db8:ff::1 remote 2001:db8:ff::3 encaplimit none",
                    "link add Zero6 type ip6gre local 2001:db8:ff::1 remote 2001:db8:ff::4 encaplimit 0",
                    "link set Plain6 up", "link set NoLimit6 up", "link set Zero6 up")
    greupd = GreupdProcess(router, "")
    result = greupd.cli("import", "--from", "kernel")
    assert result.returncode == 0, result.stderr
    entries = {m.group(1): m.group(0) for m in re.finditer(r'name = "(\w+)"\n(?:\w+ = .*\n)*', result.stdout)}
    assert "encap_limit" not in entries["Plain6"], result.stdout  # iproute2's 4 is greupd's default
    assert 'encap_limit = "none"\n' in entries["NoLimit6"], result.stdout
    assert "encap_limit = 0\n" in entries["Zero6"], result.stdout

    greupd.config_path.write_text(result.stdout)
    plan = json.loads(greupd.cli("plan", "--json").stdout)
    assert plan["errors"] == []
    assert {c["action"] for c in plan["changes"]} == {"adopt-link"}, json.dumps(plan, indent=1)
