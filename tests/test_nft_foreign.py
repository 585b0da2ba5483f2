"""Other tables' forward drops that defeat greupd's forward accepts (review M9), judged from listings as
libnftables prints them (`nft -j list chains`, `nft -j list chain ...`, copied from nft 1.0.6)."""

from __future__ import annotations

from greupd.config import load_config_text
from greupd.nft.foreign import ForwardDrop, forward_base_chains, forward_drop, tunnels_with_accepts, warnings
from greupd.nft.render import Json

DOCKER: dict[str, Json] = {"family": "ip", "table": "filter", "name": "FORWARD", "handle": 1, "type": "filter",
    "hook": "forward", "prio": 0, "policy": "drop"}
FIREWALLD: dict[str, Json] = {"family": "inet", "table": "firewalld", "name": "filter_FORWARD", "handle": 1,
    "type": "filter", "hook": "forward", "prio": 10, "policy": "accept"}
FIREWALLD_RULES: list[Json] = [
    {"rule": {"family": "inet", "table": "firewalld", "chain": "filter_FORWARD", "handle": 2, "expr": [
        {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}},
        {"accept": None}]}},
    {"rule": {"family": "inet", "table": "firewalld", "chain": "filter_FORWARD", "handle": 3, "expr": [
        {"counter": {"packets": 0, "bytes": 0}}, {"reject": {"type": "icmpx", "expr": "admin-prohibited"}}]}},
]
OURS: dict[str, Json] = {"family": "inet", "table": "greupd", "name": "forward", "handle": 2, "type": "filter",
    "hook": "forward", "prio": 0, "policy": "accept"}
BRIDGE: dict[str, Json] = {"family": "bridge", "table": "br", "name": "f", "handle": 1, "type": "filter",
    "hook": "forward", "prio": 0, "policy": "drop"}
NAT_OUT: dict[str, Json] = {"family": "ip", "table": "nat", "name": "POSTROUTING", "handle": 3, "type": "nat",
    "hook": "postrouting", "prio": 100, "policy": "accept"}
IP6_DROP: dict[str, Json] = {"family": "ip6", "table": "filter", "name": "FORWARD", "handle": 1, "type": "filter",
    "hook": "forward", "prio": 0, "policy": "drop"}

CONFIG = """
[[tunnel]]
name = "to_b"
local = "172.19.1.1"
remote = "172.19.1.2"
[tunnel.nat]
into_tunnel = ["10.10.1.0/24"]

[[tunnel]]
name = "to_c"
local = "172.19.1.1"
remote = "172.19.1.3"
[tunnel.nat]
from_tunnel = ["eth1"]

[[tunnel]]
name = "plain"
local = "172.19.1.1"
remote = "172.19.1.4"
"""


def test_only_other_tables_filter_chains_on_the_forward_hook_of_routed_families_are_looked_at() -> None:
    chains: list[Json] = [{"chain": c} for c in (DOCKER, FIREWALLD, OURS, BRIDGE, NAT_OUT)]
    listing: list[Json] = [{"metainfo": {"version": "1.0.6"}}, *chains]

    assert [c["table"] for c in forward_base_chains(listing, "greupd")] == ["filter", "firewalld"]
    # a table of our name in another family is someone else's
    assert [c["table"] for c in forward_base_chains([{"chain": OURS}], "other")] == ["greupd"]


def test_a_policy_drop_and_a_final_drop_of_everything_are_drops_a_conditional_one_is_not() -> None:
    assert forward_drop(DOCKER, []) == ForwardDrop("ip", "filter", "FORWARD", 0, "policy drop")
    assert str(forward_drop(FIREWALLD, FIREWALLD_RULES)) == \
        "table inet firewalld chain filter_FORWARD (hook forward priority 10): ends with a reject of everything"
    conditional: list[Json] = [{"rule": {"expr": [
        {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "eth1"}}, {"drop": None}]}}]
    assert forward_drop(FIREWALLD, conditional) is None
    assert forward_drop(FIREWALLD, FIREWALLD_RULES[:1]) is None
    assert forward_drop(FIREWALLD, []) is None


def test_the_warning_names_the_tunnels_whose_accepts_the_drop_defeats() -> None:
    config = load_config_text(CONFIG)
    assert tunnels_with_accepts(config) == {"to_b": frozenset({4}), "to_c": frozenset({4, 6})}

    docker = forward_drop(DOCKER, [])
    ip6 = forward_drop(IP6_DROP, [])
    assert docker is not None and ip6 is not None
    (line,) = warnings(config, [docker])
    assert line.startswith("nftables: table ip filter chain FORWARD (hook forward priority 0): policy drop:"
                           " the forward accepts greupd keeps for to_b, to_c ([tunnel.nat]) cannot override it")
    # to_b's accepts are IPv4 only: an ip6 table's drop is not theirs to worry about
    (line6,) = warnings(config, [ip6])
    assert "keeps for to_c (" in line6
    assert warnings(load_config_text(CONFIG.split("[[tunnel]]\nname = \"to_c\"")[0]), [ip6]) == []
