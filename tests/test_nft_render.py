"""greupd's nftables table, rendered from the config without a kernel: what `greupd plan` would show."""

from __future__ import annotations

import ipaddress
import json
import struct
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from greupd.config import Config, DaemonConfig, TunnelConfig, load_config, load_config_text
from greupd.nft.render import FROM_TUNNEL_MARK, Json, Ruleset, describe_ruleset, render_ruleset
from greupd.nft.table import NftError, NftTable, normalize_listing
from greupd.nft.watch import (
    NFNL_SUBSYS_NFTABLES,
    NFPROTO_INET,
    NFT_MSG_NEWGEN,
    NftEvent,
    TransactionFilter,
    parse_events,
)

SEED = Path(__file__).resolve().parents[1] / "etc" / "greupd" / "tunnels.toml"

TUNNEL = """
[[tunnel]]
name = "My_Tunnel"
local = "172.19.1.1"
remote = "172.19.1.2"
address = "192.168.8.1"
peer = "192.168.8.11"
routes = ["20.10.1.0/24"]
"""


def config(extra: str = "", daemon: str = "") -> Config:
    return load_config_text(f"[daemon]\n{daemon}\n{TUNNEL}\n{extra}")


def rule_lines(ruleset: Ruleset) -> list[str]:
    return [line.strip() for line in describe_ruleset(ruleset).splitlines() if line.startswith("\t\t")]


def test_seed_config_clamps_both_ways_and_masquerades_both_ways() -> None:
    ruleset = render_ruleset(load_config(SEED))

    assert describe_ruleset(ruleset) == (
        "table inet greupd {\n"
        "\tchain mss_clamp {\n"
        "\t\ttype filter hook forward priority mangle; policy accept;\n"
        '\t\toifname "My_Tunnel" tcp flags syn / syn,rst'
        ' tcp option maxseg size set meta nfproto map { ipv4 : 1436, ipv6 : 1416 }'
        ' comment "My_Tunnel: clamp mss out"\n'
        '\t\tiifname "My_Tunnel" tcp flags syn / syn,rst'
        ' tcp option maxseg size set meta nfproto map { ipv4 : 1436, ipv6 : 1416 }'
        ' comment "My_Tunnel: clamp mss in"\n'
        "\t}\n"
        "\n"
        "\tchain forward {\n"
        "\t\ttype filter hook forward priority filter; policy accept;\n"
        '\t\tip saddr 10.10.1.0/24 oifname "My_Tunnel" accept'
        ' comment "My_Tunnel: forward 10.10.1.0/24 into the tunnel"\n'
        '\t\tiifname "My_Tunnel" oifname "eth1" meta mark set meta mark | 0x20000000 accept'
        ' comment "My_Tunnel: forward from the tunnel to eth1"\n'
        "\t}\n"
        "\n"
        "\tchain postrouting {\n"
        "\t\ttype nat hook postrouting priority srcnat; policy accept;\n"
        '\t\tip saddr 10.10.1.0/24 oifname "My_Tunnel" masquerade'
        ' comment "My_Tunnel: masquerade 10.10.1.0/24 into the tunnel"\n'
        '\t\tmeta mark & 0x20000000 == 0x20000000 oifname "eth1" masquerade'
        ' comment "My_Tunnel: masquerade from the tunnel to eth1"\n'
        "\t}\n"
        "}\n"
    )


def test_seed_ruleset_is_one_transaction_that_replaces_the_table() -> None:
    commands = render_ruleset(load_config(SEED)).commands()
    table = {"family": "inet", "name": "greupd"}

    assert commands[:3] == [{"add": {"table": table}}, {"delete": {"table": table}}, {"add": {"table": table}}]
    kinds = [next(iter(c["add"])) for c in commands[2:]]  # type: ignore[arg-type]
    assert kinds == ["table", "chain", "chain", "chain", *["rule"] * 6]
    json.dumps(commands)  # what libnftables gets


def test_pmtu_clamps_to_the_route_mtu() -> None:
    ruleset = render_ruleset(config('[tunnel.mss]\nclamp = "pmtu"'))

    assert rule_lines(ruleset)[1:] == [
        'oifname "My_Tunnel" tcp flags syn / syn,rst tcp option maxseg size set rt mtu'
        ' comment "My_Tunnel: clamp mss out"',
        'iifname "My_Tunnel" tcp flags syn / syn,rst tcp option maxseg size set rt mtu'
        ' comment "My_Tunnel: clamp mss in"',
    ]
    assert [c.name for c in ruleset.chains] == ["mss_clamp"]  # no nat chain: conntrack/NAT not needed


def test_a_fixed_clamp_gives_ipv6_syns_20_bytes_less() -> None:
    # clamp = 1436 fits IPv4 in a 1476-byte GRE tunnel (1476 - 20 - 20); an IPv6 SYN through the same tunnel
    # carries a 40-byte header, so its segments must be 1416 or they are 20 bytes too big (review M6).
    [out, _] = render_ruleset(config("[tunnel.mss]\nclamp = 1436")).rules
    [mangle] = [s.json for s in out.statements if "mangle" in s.json]  # type: ignore[operator]
    assert mangle == {"mangle": {"key": {"tcp option": {"name": "maxseg", "field": "size"}}, "value": {"map": {
        "key": {"meta": {"key": "nfproto"}}, "data": {"set": [["ipv4", 1436], ["ipv6", 1416]]}}}}}


def test_no_clamp_and_no_nat_means_no_table() -> None:
    ruleset = render_ruleset(config('[tunnel.mss]\nclamp = "off"'))

    assert not ruleset.wanted
    assert ruleset.chains == () and ruleset.rules == ()
    assert ruleset.commands() == [{"add": {"table": {"family": "inet", "name": "greupd"}}},
                                  {"delete": {"table": {"family": "inet", "name": "greupd"}}}]
    assert describe_ruleset(ruleset).startswith("# no table inet greupd")


def test_without_the_bindings_no_table_is_fine_and_a_wanted_one_is_a_clear_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "nftables", None)  # what `import nftables` meets when not installed
    table = NftTable("greupd")

    assert table.matches(render_ruleset(config()))  # nothing wanted, nothing needed
    table.apply(render_ruleset(config()))
    with pytest.raises(NftError, match="pip-nftables") as refused:
        table.apply(render_ruleset(load_config(SEED)))
    assert refused.value.rule is None  # not blamed on a rule: nothing reached the kernel


def test_disabled_tunnel_contributes_nothing() -> None:
    asks = '[tunnel.mss]\nclamp = 1400\n[tunnel.nat]\nfrom_tunnel = ["eth1"]'
    ruleset = render_ruleset(config(f"enabled = false\n{asks}"))

    assert not ruleset.wanted


def test_nat_from_tunnel_marks_in_forward_and_masquerades_on_the_mark() -> None:
    ruleset = render_ruleset(config('[tunnel.nat]\nfrom_tunnel = ["eth1", "eth2"]'))

    assert [c.name for c in ruleset.chains] == ["forward", "postrouting"]
    mark = f"{FROM_TUNNEL_MARK:#010x}"
    assert [r.text.split(" comment ")[0] for r in ruleset.rules] == [
        f'iifname "My_Tunnel" oifname "eth1" meta mark set meta mark | {mark} accept',
        f'iifname "My_Tunnel" oifname "eth2" meta mark set meta mark | {mark} accept',
        f'meta mark & {mark} == {mark} oifname "eth1" masquerade',
        f'meta mark & {mark} == {mark} oifname "eth2" masquerade',
    ]


def test_nat_prefixes_of_both_families_and_single_hosts() -> None:
    ruleset = render_ruleset(config('[tunnel.nat]\ninto_tunnel = ["2001:db8::/32", "10.0.0.7/32"]',
                                    daemon='nft_table = "edge"'))

    assert ruleset.table == "edge"
    assert [r.text.split(" comment ")[0] for r in ruleset.rules if r.chain == "postrouting"] == [
        'ip6 saddr 2001:db8::/32 oifname "My_Tunnel" masquerade',
        'ip saddr 10.0.0.7 oifname "My_Tunnel" masquerade',  # nft lists a /32 as the address
    ]


def test_two_tunnels_keep_config_order_within_each_chain() -> None:
    text = (f"{TUNNEL}\n[tunnel.mss]\nclamp = 1436\n"
            '[[tunnel]]\nname = "Backup"\nlocal = "172.19.1.1"\nremote = "172.19.1.3"\n'
            "[tunnel.mss]\nclamp = 1400\n")
    ruleset = render_ruleset(load_config_text(text))

    assert [(r.chain, r.tunnel) for r in ruleset.rules] == [
        ("mss_clamp", "My_Tunnel"), ("mss_clamp", "My_Tunnel"), ("mss_clamp", "Backup"), ("mss_clamp", "Backup")]


def test_normalized_listing_ignores_handles_and_metainfo_but_not_an_extra_rule() -> None:
    ruleset = render_ruleset(load_config(SEED))
    listed: list[Json] = [{"metainfo": {"version": "1.0.6"}}]
    for number, obj in enumerate(ruleset.objects()):
        ((kind, body),) = obj.items()
        assert isinstance(body, dict)
        listed.append({kind: {**body, "handle": number}})
    extra: Json = {"rule": {"family": "inet", "table": "greupd", "chain": "forward", "handle": 99,
                      "expr": [{"drop": None}]}}

    assert normalize_listing(listed) == normalize_listing(ruleset.objects())
    assert normalize_listing([*listed, extra]) != normalize_listing(ruleset.objects())
    assert normalize_listing(list(reversed(listed))) != normalize_listing(ruleset.objects())  # rule order


def test_nft_error_names_the_tunnel_and_rule() -> None:
    error = NftError("Could not process rule: Operation not supported", "My_Tunnel", "chain postrouting: masquerade")

    assert str(error) == ("Could not process rule: Operation not supported"
                          " (tunnel My_Tunnel: chain postrouting: masquerade)")


def test_table_refuses_a_ruleset_for_another_table() -> None:
    try:
        NftTable("greupd").matches(Ruleset("other"))
    except ValueError as exc:
        assert "other" in str(exc)
    else:
        raise AssertionError("expected ValueError")


# --- property: whatever the tunnels ask, the ruleset is complete and consistent ----------------------------

names = st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,9}", fullmatch=True)
prefixes = st.one_of(
    st.builds(lambda a, n: str(ipaddress.ip_network((a, n), strict=False)),
              st.ip_addresses(v=4).map(str), st.integers(0, 32)),
    st.builds(lambda a, n: str(ipaddress.ip_network((a, n), strict=False)),
              st.ip_addresses(v=6).map(str), st.integers(0, 128)),
)
tunnel_specs = st.fixed_dictionaries({
    "clamp": st.one_of(st.just("off"), st.just("pmtu"), st.integers(536, 65495)),
    "into": st.lists(prefixes, max_size=3),
    "from": st.lists(names, max_size=3),
    "enabled": st.booleans(),
})


@settings(max_examples=150, deadline=None)
@given(st.lists(tunnel_specs, max_size=4), names)
def test_rendered_rules_match_what_each_tunnel_asks(specs: list[dict[str, object]], table: str) -> None:
    tunnels = tuple(
        TunnelConfig.model_validate({
            "name": f"t{i}", "local": "172.19.1.1", "remote": f"172.19.2.{i + 1}", "enabled": spec["enabled"],
            "mss": {"clamp": spec["clamp"]}, "nat": {"into_tunnel": spec["into"], "from_tunnel": spec["from"]},
        })
        for i, spec in enumerate(specs)
    )
    ruleset = render_ruleset(Config(DaemonConfig(nft_table=table), tunnels))

    for tunnel in tunnels:
        mine = [r for r in ruleset.rules if r.tunnel == tunnel.name]
        expected = 0 if not tunnel.enabled else (
            (tunnel.mss.clamp != "off") * 2 + 2 * len(tunnel.nat.into_tunnel) + 2 * len(tunnel.nat.from_tunnel))
        assert len(mine) == expected
        assert all(r.comment.startswith(f"{tunnel.name}: ") for r in mine)
    assert ruleset.wanted == bool(ruleset.rules)
    assert {r.chain for r in ruleset.rules} == {c.name for c in ruleset.chains}
    order = [c.name for c in ruleset.chains]
    assert [r.chain for r in ruleset.rules] == sorted((r.chain for r in ruleset.rules), key=order.index)
    commands = ruleset.commands()
    assert json.loads(json.dumps(commands)) == commands
    assert len(commands) == (2 + 1 + len(ruleset.chains) + len(ruleset.rules) if ruleset.wanted else 2)
    described = describe_ruleset(ruleset)
    assert described.count("\n\t\t") == (len(ruleset.chains) + len(ruleset.rules))
    assert ruleset == render_ruleset(Config(DaemonConfig(nft_table=table), tunnels))  # a value: same in, same out


# --- the watcher's reading of nftables notifications (pure) -------------------------------------------------


def _attr(kind: int, payload: bytes) -> bytes:
    data = struct.pack("=HH", 4 + len(payload), kind) + payload
    return data + b"\0" * (-len(data) % 4)


def _message(msg: int, family: int, attrs: bytes) -> bytes:
    body = struct.pack("=BBH", family, 0, 0) + attrs
    return struct.pack("=IHHII", 16 + len(body), NFNL_SUBSYS_NFTABLES << 8 | msg, 0, 0, 0) + body


def _object(msg: int, table: str, family: int = NFPROTO_INET) -> bytes:
    return _message(msg, family, _attr(1, table.encode() + b"\0") + _attr(3, b"\0" * 8))


def _newgen(pid: int) -> bytes:
    return _message(NFT_MSG_NEWGEN, 0, _attr(1, struct.pack(">I", 7)) + _attr(2, struct.pack(">I", pid))
                    + _attr(3, b"nft\0"))


def test_parse_events_reads_tables_and_the_committing_pid() -> None:
    datagram = _object(2, "greupd") + _object(8, "filter", family=2) + _newgen(4242)

    assert parse_events(datagram) == [
        NftEvent(2, NFPROTO_INET, "greupd", None),
        NftEvent(8, 2, "filter", None),
        NftEvent(NFT_MSG_NEWGEN, 0, None, 4242),
    ]
    assert parse_events(b"") == [] and parse_events(b"\0" * 7) == []


def test_a_transaction_is_worth_a_look_when_someone_else_touched_our_table() -> None:
    def worth(watched: str | None, *datagrams: bytes) -> list[bool]:
        feed = TransactionFilter(watched, own_pid=100)
        verdicts = [(e.kind, feed.feed(e)) for d in datagrams for e in parse_events(d)]
        return [verdict for kind, verdict in verdicts if kind == NFT_MSG_NEWGEN]

    # `nft flush ruleset` by another process: our table is deleted
    assert worth("greupd", _object(2, "greupd") + _object(2, "filter"), _newgen(555)) == [True]
    # our own apply: not reported
    assert worth("greupd", _object(2, "greupd") + _object(0, "greupd"), _newgen(100)) == [False]
    # someone else's rules only (kube-proxy's iptables-nft churn): no look
    assert worth("greupd", _object(6, "filter"), _newgen(555)) == [False]
    assert worth(None, _object(6, "filter"), _newgen(555)) == [True]
    # someone else's ip, ip6 or inet table or chain (a forward chain's policy may now drop what we accept, M9)
    assert worth("greupd", _object(0, "filter"), _newgen(555)) == [True]
    assert worth("greupd", _object(3, "filter", family=2), _newgen(555)) == [True]
    assert worth("greupd", _object(5, "filter", family=10), _newgen(555)) == [True]
    # ... but not a bridge table (bridged frames, not routed packets), nor a rule in a table of our name in
    # another family
    assert worth("greupd", _object(0, "filter", family=7), _newgen(555)) == [False]
    assert worth("greupd", _object(6, "greupd", family=2), _newgen(555)) == [False]
    # each transaction is judged on its own
    assert worth("greupd", _object(6, "greupd") + _newgen(555) + _object(6, "filter") + _newgen(555)) == [True, False]
