"""A change in place keeps what greupd does not manage: a hand-made tunnel's checksums, sequence numbers, mark,
underlay device and ip6 traffic-class flags, as `ip -d link show` shows them.

The kernel's changelink for gre and ip6gre starts from zeroed parameters, so a change that sends only greupd's
own attributes (ttl, tos, keys, pmtudisc, encap_limit) silently cleared the rest of an adopted link. greupd
promises to adopt a link without changing anything it was not told to change.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from lab.greupd_process import GreupdProcess
from lab.hosts import Host, Lab
from lab.waiting import eventually

pytestmark = pytest.mark.needs_gre

# Greupd manages the endpoints, key, ttl and tos; the rest of each line is the operator's.
GRE_BY_HAND = ("local 172.19.1.1 remote 172.19.1.2 key 42 ttl inherit tos 0 icsum ocsum iseq oseq fwmark 7 "
               "dev wan0")
GRE_KEPT = ("icsum", "ocsum", "iseq", "oseq", "fwmark 0x7", "dev wan0")
IP6GRE_BY_HAND = "local 2001:db8:ff::1 remote 2001:db8:ff::2 tclass inherit flowlabel inherit fwmark 7 dev wan0"
IP6GRE_KEPT = ("tclass inherit", "flowlabel inherit", "fwmark 0x7", "dev wan0")

CONFIG = """
[[tunnel]]
name = "Hand4"
local = "172.19.1.1"
remote = "172.19.1.2"
key = 42
ttl = 64
tos = 0
adopt = true

[[tunnel]]
name = "Hand6"
mode = "ip6gre"
local = "2001:db8:ff::1"
remote = "2001:db8:ff::2"
encap_limit = "none"
adopt = true
"""


@pytest.fixture
def router() -> Iterator[Host]:
    with Lab() as lab:
        a = lab.host("a")
        a.ip_batch("link add wan0 type dummy", "addr add 172.19.1.1/24 dev wan0",
                   "addr add 2001:db8:ff::1/64 dev wan0 nodad", "link set wan0 up",
                   f"link add Hand4 type gre {GRE_BY_HAND}", f"link add Hand6 type ip6gre {IP6GRE_BY_HAND}",
                   "link set Hand4 up", "link set Hand6 up")
        yield a




def missing(details: str, kept: tuple[str, ...]) -> list[str]:
    return [word for word in kept if f" {word} " not in details]


def test_adopting_with_another_ttl_and_encap_limit_keeps_the_hand_made_parameters(router: Host) -> None:
    assert missing(router.link_details("Hand4"), GRE_KEPT) == [], router.link_details("Hand4")
    assert missing(router.link_details("Hand6"), IP6GRE_KEPT) == [], router.link_details("Hand6")
    indices = router.ifindex("Hand4"), router.ifindex("Hand6")

    daemon = GreupdProcess(router, CONFIG).start()
    daemon.wait_for("Hand4", "up")
    daemon.wait_for("Hand6", "up")

    gre, ip6gre = router.link_details("Hand4"), router.link_details("Hand6")
    assert " ttl 64 " in gre and " encaplimit none " in ip6gre, (gre, ip6gre, daemon.output())
    assert (router.ifindex("Hand4"), router.ifindex("Hand6")) == indices  # changed in place, both adopted
    assert "alias greupd" in gre and "alias greupd" in ip6gre
    assert missing(gre, GRE_KEPT) == [], gre
    assert missing(ip6gre, IP6GRE_KEPT) == [], ip6gre
    assert daemon.cli("plan", "--detailed-exitcode").returncode == 0  # the kept parameters are no drift

    # Somebody changes the ttl by hand: greupd repairs it (maybe before we look), keeping the checksums and the rest.
    settled = daemon.status()
    assert settled is not None
    router.ip("link", "set", "Hand4", "type", "gre", *GRE_BY_HAND.replace("ttl inherit", "ttl 9").split())

    def repaired() -> bool:
        now = daemon.status()
        return now is not None and now["netlink_requests"] > settled["netlink_requests"] and (
            " ttl 64 " in router.link_details("Hand4"))

    eventually(repaired, 20, "ttl drift repaired", daemon.output)
    assert missing(router.link_details("Hand4"), GRE_KEPT) == [], router.link_details("Hand4")
    assert router.ifindex("Hand4") == indices[0]
