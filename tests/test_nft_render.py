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
from greupd.nft.ipsec import render_ipsec_ruleset
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
        "\tmap clamp {\n"
        "\t\ttype ifname : verdict\n"
        '\t\telements = { "My_Tunnel" : jump clamp_1436 }\n'
        "\t}\n"
        "\n"
        "\tmap forward_into {\n"
        "\t\ttype ifname : verdict\n"
        '\t\telements = { "My_Tunnel" : jump forward_into_My_Tunnel }\n'
        "\t}\n"
        "\n"
        "\tset from_tunnel {\n"
        "\t\ttype ifname . ifname\n"
        '\t\telements = { "My_Tunnel" . "eth1" }\n'
        "\t}\n"
        "\n"
        "\tmap masquerade_into {\n"
        "\t\ttype ifname : verdict\n"
        '\t\telements = { "My_Tunnel" : jump masquerade_into_My_Tunnel }\n'
        "\t}\n"
        "\n"
        "\tset from_tunnel_out {\n"
        "\t\ttype ifname\n"
        '\t\telements = { "eth1" }\n'
        "\t}\n"
        "\n"
        "\tchain mss_clamp {\n"
        "\t\ttype filter hook forward priority mangle; policy accept;\n"
        '\t\ttcp flags syn / syn,rst oifname vmap @clamp comment "clamp the mss of syns leaving by a tunnel"\n'
        '\t\ttcp flags syn / syn,rst iifname vmap @clamp comment "clamp the mss of syns arriving from a tunnel"\n'
        "\t}\n"
        "\n"
        "\tchain clamp_1436 {\n"
        "\t\ttcp option maxseg size set meta nfproto map { ipv4 : 1436, ipv6 : 1416 }"
        ' comment "clamp mss to 1436 (ipv6: 1416)"\n'
        "\t}\n"
        "\n"
        "\tchain forward {\n"
        "\t\ttype filter hook forward priority filter; policy accept;\n"
        '\t\toifname vmap @forward_into comment "into_tunnel: the accepts of the tunnel the packet leaves by"\n'
        "\t\tiifname . oifname @from_tunnel meta mark set meta mark | 0x20000000 accept"
        ' comment "from_tunnel: mark what leaves a tunnel by one of its interfaces"\n'
        "\t}\n"
        "\n"
        "\tchain forward_into_My_Tunnel {\n"
        '\t\tip saddr 10.10.1.0/24 accept comment "My_Tunnel: forward 10.10.1.0/24 into the tunnel"\n'
        "\t}\n"
        "\n"
        "\tchain postrouting {\n"
        "\t\ttype nat hook postrouting priority srcnat; policy accept;\n"
        '\t\toifname vmap @masquerade_into comment "into_tunnel: the masquerades of the tunnel the packet leaves'
        ' by"\n'
        "\t\tmeta mark & 0x20000000 == 0x20000000 oifname @from_tunnel_out masquerade"
        ' comment "from_tunnel: masquerade what was marked"\n'
        "\t}\n"
        "\n"
        "\tchain masquerade_into_My_Tunnel {\n"
        '\t\tip saddr 10.10.1.0/24 masquerade comment "My_Tunnel: masquerade 10.10.1.0/24 into the tunnel"\n'
        "\t}\n"
        "}\n"
    )


def test_seed_ruleset_is_one_transaction_that_replaces_the_table() -> None:
    commands = render_ruleset(load_config(SEED)).commands()
    table = {"family": "inet", "name": "greupd"}

    assert commands[:3] == [{"add": {"table": table}}, {"delete": {"table": table}}, {"add": {"table": table}}]
    kinds = [next(iter(c["add"])) for c in commands[2:]]  # type: ignore[arg-type]
    # Chains before the maps whose elements jump to them, sets before the rules that look them up.
    assert kinds == ["table", *["chain"] * 6, "map", "map", "set", "map", "set", *["rule"] * 9]
    json.dumps(commands)  # what libnftables gets


def test_the_hooked_chains_hold_the_same_rules_for_one_tunnel_and_for_a_thousand(tmp_path: Path) -> None:
    """Review M5: a forwarded packet walks the hooked chains; their length must not grow with the tunnels."""
    psk = tmp_path / "psk"
    psk.write_text("a secret of sorts")
    psk.chmod(0o600)

    def seed_like(count: int) -> Config:
        clamps = ('"pmtu"', "1436")
        tunnels = "".join(
            f'[[tunnel]]\nname = "t{i}"\nlocal = "172.19.1.1"\nremote = "172.20.{i // 250}.{i % 250 + 1}"\n'
            f'[tunnel.mss]\nclamp = {clamps[i % 2]}\n'
            f'[tunnel.nat]\ninto_tunnel = ["10.10.1.0/24"]\nfrom_tunnel = ["eth1"]\n'
            f'[tunnel.ipsec]\npsk_file = "{psk}"\n'
            for i in range(count))
        return load_config_text(tunnels)

    def hooked(ruleset: Ruleset) -> list[str]:
        return [r.text for r in ruleset.rules if any(c.name == r.chain and c.hook for c in ruleset.chains)]

    one, many_config = seed_like(2), seed_like(1000)
    many, drops = render_ruleset(many_config), render_ipsec_ruleset(many_config)

    assert hooked(render_ruleset(one)) == hooked(many)
    assert hooked(render_ipsec_ruleset(one)) == hooked(drops)
    assert len(hooked(many)) == 6  # 2 in mss_clamp, 2 in forward, 2 in postrouting
    assert len(hooked(drops)) == 2  # 1 each in ipsec_out/in, in a table of their own
    sizes = {s.name: len(s.elements) for s in (*many.sets, *drops.sets)}
    assert sizes == {"clamp": 1000, "forward_into": 1000, "from_tunnel": 1000, "masquerade_into": 1000,
                     "from_tunnel_out": 1, "ipsec_v4": 1000}
    # What a packet leaving by one tunnel meets after the lookup: that tunnel's rules, one per prefix.
    assert [r.text.split(" comment")[0] for r in many.rules if r.chain == "forward_into_t999"] == [
        "ip saddr 10.10.1.0/24 accept"]


def test_pmtu_clamps_to_the_route_mtu() -> None:
    ruleset = render_ruleset(config('[tunnel.mss]\nclamp = "pmtu"'))

    assert rule_lines(ruleset)[-1] == 'tcp option maxseg size set rt mtu comment "clamp mss to the route mtu"'
    assert [c.name for c in ruleset.chains] == ["mss_clamp", "clamp_pmtu"]  # no nat chain: no conntrack/NAT
    [clamp] = ruleset.sets
    assert [e.text for e in clamp.elements] == ['"My_Tunnel" : jump clamp_pmtu']


def test_a_fixed_clamp_gives_ipv6_syns_20_bytes_less() -> None:
    # clamp = 1436 fits IPv4 in a 1476-byte GRE tunnel (1476 - 20 - 20); an IPv6 SYN through the same tunnel
    # carries a 40-byte header, so its segments must be 1416 or they are 20 bytes too big (review M6).
    [clamp] = [r for r in render_ruleset(config("[tunnel.mss]\nclamp = 1436")).rules if r.chain == "clamp_1436"]
    [mangle] = [s.json for s in clamp.statements]
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
        f"iifname . oifname @from_tunnel meta mark set meta mark | {mark} accept",
        f"meta mark & {mark} == {mark} oifname @from_tunnel_out masquerade",
    ]
    assert {s.name: [e.text for e in s.elements] for s in ruleset.sets} == {
        "from_tunnel": ['"My_Tunnel" . "eth1"', '"My_Tunnel" . "eth2"'],
        "from_tunnel_out": ['"eth1"', '"eth2"'],
    }


def test_nat_prefixes_of_both_families_and_single_hosts() -> None:
    ruleset = render_ruleset(config('[tunnel.nat]\ninto_tunnel = ["2001:db8::/32", "10.0.0.7/32"]',
                                    daemon='nft_table = "edge"'))

    assert ruleset.table == "edge"
    assert [r.text.split(" comment ")[0] for r in ruleset.rules if r.chain == "masquerade_into_My_Tunnel"] == [
        "ip6 saddr 2001:db8::/32 masquerade",
        "ip saddr 10.0.0.7 masquerade",  # nft lists a /32 as the address
    ]
    assert [r.tunnel for r in ruleset.rules if r.chain.endswith("_into_My_Tunnel")] == ["My_Tunnel"] * 4


def test_two_tunnels_keep_config_order_in_the_map_and_share_a_clamp_chain() -> None:
    backup = '[[tunnel]]\nname = "Backup"\nlocal = "172.19.1.1"\nremote = "172.19.1.{}"\n[tunnel.mss]\nclamp = {}\n'
    text = f"{TUNNEL}\n[tunnel.mss]\nclamp = 1436\n" + backup.format(3, 1400) + backup.replace("Backup", "Third")\
        .format(4, 1436)
    ruleset = render_ruleset(load_config_text(text))

    [clamp] = ruleset.sets
    assert [e.text for e in clamp.elements] == [
        '"My_Tunnel" : jump clamp_1436', '"Backup" : jump clamp_1400', '"Third" : jump clamp_1436']
    assert [c.name for c in ruleset.chains] == ["mss_clamp", "clamp_1436", "clamp_1400"]


def test_what_several_tunnels_share_is_one_element() -> None:
    text = (f'{TUNNEL}\n[tunnel.nat]\nfrom_tunnel = ["eth1", "eth1"]\n'
            '[[tunnel]]\nname = "Backup"\nlocal = "172.19.1.1"\nremote = "172.19.1.3"\n'
            '[tunnel.nat]\nfrom_tunnel = ["eth1"]\n')
    ruleset = render_ruleset(load_config_text(text))

    assert {s.name: [e.text for e in s.elements] for s in ruleset.sets} == {
        "from_tunnel": ['"My_Tunnel" . "eth1"', '"Backup" . "eth1"'],
        "from_tunnel_out": ['"eth1"'],  # a duplicate would be refused by the kernel, or merged and look like drift
    }


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


def test_normalized_listing_ignores_the_order_of_a_sets_elements() -> None:
    ruleset = render_ruleset(load_config_text(f'{TUNNEL}\n[tunnel.nat]\nfrom_tunnel = ["eth1", "eth2", "eth3"]'))
    shuffled: list[Json] = []
    fewer: list[Json] = []
    for obj in ruleset.objects():
        body = obj.get("set")
        if isinstance(body, dict) and isinstance(body.get("elem"), list):
            obj = {"set": {**body, "elem": list(reversed(body["elem"]))}}  # type: ignore[arg-type]
        shuffled.append(obj)
        if not (isinstance(body, dict) and body.get("name") == "from_tunnel_out"):
            fewer.append(obj)

    assert shuffled != ruleset.objects()
    assert normalize_listing(shuffled) == normalize_listing(ruleset.objects())
    assert normalize_listing(fewer) != normalize_listing(ruleset.objects())


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
    elements = {s.name: [e.text for e in s.elements] for s in ruleset.sets}
    enabled = [t for t in tunnels if t.enabled]

    for tunnel in tunnels:
        name = tunnel.name
        clamp = tunnel.mss.clamp if tunnel.enabled else "off"
        into = tunnel.nat.into_tunnel if tunnel.enabled else []
        assert (f'"{name}" : jump clamp_{clamp}' in elements.get("clamp", [])) == (clamp != "off")
        assert (f'"{name}" : jump forward_into_{name}' in elements.get("forward_into", [])) == bool(into)
        assert (f'"{name}" : jump masquerade_into_{name}' in elements.get("masquerade_into", [])) == bool(into)
        for chain in (f"forward_into_{name}", f"masquerade_into_{name}"):
            mine = [r for r in ruleset.rules if r.chain == chain]
            assert len(mine) == len(into)
            assert all(r.tunnel == name and r.comment.startswith(f"{name}: ") for r in mine)
    assert elements.get("from_tunnel", []) == list(dict.fromkeys(
        f'"{t.name}" . "{i}"' for t in enabled for i in t.nat.from_tunnel))
    assert elements.get("from_tunnel_out", []) == list(dict.fromkeys(
        f'"{i}"' for t in enabled for i in t.nat.from_tunnel))
    # The chains a packet walks hold one lookup per purpose, however many tunnels ask.
    assert len([r for r in ruleset.rules if r.chain in ("mss_clamp", "forward", "postrouting")]) <= 6
    assert ruleset.wanted == bool(ruleset.rules)
    assert {r.chain for r in ruleset.rules} == {c.name for c in ruleset.chains}
    order = [c.name for c in ruleset.chains]
    assert [r.chain for r in ruleset.rules] == sorted((r.chain for r in ruleset.rules), key=order.index)
    looked_up = {t.split("@")[1].split()[0] for r in ruleset.rules for t in [r.text] if "@" in t}
    assert looked_up == set(elements) and all(elements.values())  # no set without its rule, none empty
    jumps = {e.split("jump ")[1] for texts in elements.values() for e in texts if "jump " in e}
    assert jumps == {c.name for c in ruleset.chains if c.hook is None}  # and no chain left unreachable
    commands = ruleset.commands()
    assert json.loads(json.dumps(commands)) == commands
    assert len(commands) == (2 + 1 + len(ruleset.chains) + len(ruleset.sets) + len(ruleset.rules)
                             if ruleset.wanted else 2)
    described = describe_ruleset(ruleset)
    assert described.count("\n\tchain ") == len(ruleset.chains)
    assert described.count(" comment ") == len(ruleset.rules)
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


# --- the delta: a tunnel more or less is a few elements and chains, not a new table ------------------------


def test_a_tunnel_added_is_its_elements_and_chains_and_removed_again_in_reverse() -> None:
    from greupd.nft.delta import delta_commands

    seed = load_config(SEED)
    backup = ('[[tunnel]]\nname = "Backup"\nlocal = "172.19.1.1"\nremote = "172.19.1.3"\n[tunnel.mss]\nclamp = 1436\n'
              '[tunnel.nat]\ninto_tunnel = ["10.10.2.0/24"]\nfrom_tunnel = ["eth1"]\n')
    one = render_ruleset(seed)
    two = render_ruleset(load_config_text(SEED.read_text() + backup))

    def summary(commands: list[dict[str, Json]] | None) -> list[str]:
        assert commands is not None
        out = []
        for command in commands:
            ((verb, obj),) = command.items()
            assert isinstance(obj, dict)
            ((kind, body),) = obj.items()
            assert isinstance(body, dict)
            name = body.get("name", body.get("chain"))
            out.append(f"{verb} {kind} {name}" + (f" {body['elem']}" if "elem" in body else ""))
        return out

    assert summary(delta_commands(one, two)) == [
        "add chain forward_into_Backup", "add rule forward_into_Backup",
        "add chain masquerade_into_Backup", "add rule masquerade_into_Backup",
        "add element clamp [['Backup', {'jump': {'target': 'clamp_1436'}}]]",
        "add element forward_into [['Backup', {'jump': {'target': 'forward_into_Backup'}}]]",
        "add element from_tunnel [{'concat': ['Backup', 'eth1']}]",
        "add element masquerade_into [['Backup', {'jump': {'target': 'masquerade_into_Backup'}}]]",
    ]  # eth1 is in from_tunnel_out already
    assert summary(delta_commands(two, one)) == [
        "delete element clamp ['Backup']", "delete element forward_into ['Backup']",
        "delete element from_tunnel [{'concat': ['Backup', 'eth1']}]", "delete element masquerade_into ['Backup']",
        "flush chain forward_into_Backup", "delete chain forward_into_Backup",
        "flush chain masquerade_into_Backup", "delete chain masquerade_into_Backup",
    ]
    pmtu = render_ruleset(load_config_text(SEED.read_text().replace("clamp = 1436", 'clamp = "pmtu"')))
    assert summary(delta_commands(one, pmtu)) == [
        "add chain clamp_pmtu", "add rule clamp_pmtu",
        "delete element clamp ['My_Tunnel']", "add element clamp [['My_Tunnel', {'jump': {'target': 'clamp_pmtu'}}]]",
        "flush chain clamp_1436", "delete chain clamp_1436",
    ]
    # A set that comes or goes changes the hooked chains' rules: only a new table will do.
    no_nat = render_ruleset(load_config_text(SEED.read_text().replace('from_tunnel = ["eth1"]', "")))
    assert delta_commands(one, no_nat) is None
    assert delta_commands(one, Ruleset("greupd")) is None


def test_a_reloads_transitional_table_holds_a_changed_tunnel_once_in_its_new_version() -> None:
    """Reload first installs a table for the old and the new config together (routes of either find their
    clamp and NAT); a tunnel whose clamp changed is in it twice. Two map elements with one key would make
    the kernel refuse the whole transaction (EEXIST), so the new version's element is the one kept."""
    from greupd.queue import reload_scope

    shipped = (Path(__file__).resolve().parents[1] / "etc" / "greupd" / "tunnels.toml").read_text()
    old = load_config_text(shipped)
    new = load_config_text(shipped.replace("clamp = 1436", "clamp = 1400"))
    scope, both = reload_scope(old, new, ())
    assert scope == {"My_Tunnel"} and [t.name for t in both.tunnels] == ["My_Tunnel", "My_Tunnel"]
    clamp = next(s for s in render_ruleset(both).sets if s.name == "clamp")
    assert [e.text for e in clamp.elements] == ['"My_Tunnel" : jump clamp_1400']
