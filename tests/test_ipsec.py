"""GRE over IPsec, decided without a kernel or a charon: the config, the connections greupd would load into
strongSwan, the nftables drops of cleartext GRE, the MTU left for ESP, and the state read from charon's SAs.

The seed's two routers: A = 172.19.1.1, B = 172.19.1.2, a pre-shared key in a root-only file on each.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from greupd.config import (
    DEFAULT_ESP_PROPOSALS,
    DEFAULT_IKE_PROPOSALS,
    DEFAULT_VICI_SOCKET,
    Config,
    ConfigError,
    load_config_text,
)
from greupd.events import MESSAGE_IDS, EventKind, IpsecChanged, journal_fields, message_of
from greupd.ipsec.connections import (
    CONNECTION_PREFIX,
    ESP_OVERHEAD,
    connection_name,
    default_ipsec_mtu,
    desired_connections,
    tunnel_of,
)
from greupd.ipsec.supervisor import change_message, tunnel_states
from greupd.model import Observed, ObservedLink, action_tunnel, desired_state
from greupd.nft import NftError, NftTable, Rule, describe_ruleset, render_ruleset
from greupd.nft.ipsec import render_ipsec_ruleset
from greupd.nft.render import MAX_COMMENT, names_comment


@pytest.fixture
def psk(tmp_path: Path) -> Path:
    path = tmp_path / "My_Tunnel.psk"
    path.write_text("correct horse battery staple\n")
    path.chmod(0o600)
    return path


def seed_a(ipsec: str, extra: str = "", mode: str = "gre") -> str:
    local, remote = ("172.19.1.1", "172.19.1.2") if mode in ("gre", "gretap") else ("2001:db8::1", "2001:db8::2")
    return (f'[[tunnel]]\nname = "My_Tunnel"\nmode = "{mode}"\nlocal = "{local}"\nremote = "{remote}"\n'
            f'address = "192.168.8.1"\npeer = "192.168.8.11"\nroutes = ["20.10.1.0/24"]\n{extra}\n'
            f"[tunnel.ipsec]\n{ipsec}\n")


def load(text: str) -> Config:
    return load_config_text(text, Path("/etc/greupd/tunnels.toml"))


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(text)
    return [str(p) for p in caught.value.problems]


# --- config ---------------------------------------------------------------------------------------------


def test_a_psk_file_is_all_a_tunnel_needs(psk: Path) -> None:
    tunnel = load(seed_a(f'psk_file = "{psk}"')).tunnels[0]
    assert tunnel.ipsec is not None
    assert tunnel.ipsec.psk_file == psk
    assert tunnel.ipsec.require is True
    assert tunnel.ipsec.proposals == DEFAULT_IKE_PROPOSALS == "aes256gcm16-prfsha384-ecp384"
    assert tunnel.ipsec.esp_proposals == DEFAULT_ESP_PROPOSALS == "aes256gcm16-ecp384"
    assert load(seed_a(f'psk_file = "{psk}"')).daemon.vici_socket == DEFAULT_VICI_SOCKET


def test_a_psk_others_can_read_is_refused_with_file_line_and_field(psk: Path) -> None:
    psk.chmod(0o644)
    assert problems(seed_a(f'psk_file = "{psk}"')) == [
        f"/etc/greupd/tunnels.toml:11: tunnel[0].ipsec.psk_file: {psk} is readable or writable by others"
        f" (mode 0644): chmod 600 {psk}"]


def test_a_missing_or_empty_psk_file_is_refused(tmp_path: Path, psk: Path) -> None:
    missing = tmp_path / "nope"
    assert problems(seed_a(f'psk_file = "{missing}"')) == [
        f"/etc/greupd/tunnels.toml:11: tunnel[0].ipsec.psk_file: cannot read {missing}: No such file or directory"]
    psk.write_text("\n")
    assert problems(seed_a(f'psk_file = "{psk}"'))[0].endswith(f"{psk} is empty: write the key into it")


def test_authentication_is_a_psk_or_certificates_not_both_nor_neither(psk: Path) -> None:
    assert problems(seed_a("require = true")) == [
        "/etc/greupd/tunnels.toml:10: tunnel[0].ipsec.psk_file: [tunnel.ipsec] needs psk_file, or cert, key and ca"]
    both = problems(seed_a(f'psk_file = "{psk}"\ncert = "{psk}"'))
    assert both == ["/etc/greupd/tunnels.toml:12: tunnel[0].ipsec.cert: give either psk_file, or cert, key and"
                    " ca, not both"]
    half = problems(seed_a(f'cert = "{psk}"\nkey = "{psk}"'))
    assert half == ["/etc/greupd/tunnels.toml:10: tunnel[0].ipsec.ca: certificate authentication needs cert, key"
                    " and ca; ca is missing"]


def test_a_relative_path_or_a_bad_proposal_is_refused(psk: Path) -> None:
    assert problems(seed_a('psk_file = "psk/My_Tunnel"'))[0].endswith(
        "tunnel[0].ipsec.psk_file: 'psk/My_Tunnel' is a relative path: write it from /, e.g."
        " \"/etc/greupd/psk/My_Tunnel\"")
    bad = problems(seed_a(f'psk_file = "{psk}"\nproposals = "aes256 gcm"'))
    assert bad[0].startswith("/etc/greupd/tunnels.toml:12: tunnel[0].ipsec.proposals: 'aes256 gcm' is not a"
                             " strongSwan proposal list")
    assert problems(seed_a(f'psk_file = "{psk}"\nrequire = "yes"'))[0].endswith(
        "tunnel[0].ipsec.require: ipsec.require must be true or false")


# --- the connection charon gets ---------------------------------------------------------------------------


def test_one_connection_per_tunnel_esp_transport_for_gre_only(psk: Path) -> None:
    connections = desired_connections(load(seed_a(f'psk_file = "{psk}"')))
    assert list(connections) == ["greupd-My_Tunnel"]
    connection = connections["greupd-My_Tunnel"]
    assert connection.tunnel == "My_Tunnel" and connection.auth == "psk" and connection.psk_file == psk
    assert connection.message == {
        "version": "2",
        "local_addrs": ["172.19.1.1"],
        "remote_addrs": ["172.19.1.2"],
        "proposals": ["aes256gcm16-prfsha384-ecp384"],
        "mobike": "no",
        "dpd_delay": "10s",
        "local-1": {"auth": "psk", "id": "172.19.1.1"},
        "remote-1": {"auth": "psk", "id": "172.19.1.2"},
        "children": {"gre": {
            "mode": "transport",
            "local_ts": ["dynamic[gre]"],
            "remote_ts": ["dynamic[gre]"],
            "esp_proposals": ["aes256gcm16-ecp384"],
            "start_action": "trap",
            "dpd_action": "trap",
            "close_action": "trap",
        }},
    }
    # The secret is never part of what is compared, logged or shown: only its file's path is.
    assert "correct horse" not in connection.message_text


def test_connection_names_say_whose_they_are(psk: Path) -> None:
    assert connection_name("My_Tunnel") == f"{CONNECTION_PREFIX}My_Tunnel" == "greupd-My_Tunnel"
    assert tunnel_of("greupd-My_Tunnel") == "My_Tunnel"
    assert tunnel_of("office-vpn") is None  # an operator's own connection: never touched


def test_disabled_tunnels_and_tunnels_without_ipsec_load_nothing(psk: Path) -> None:
    assert desired_connections(load(seed_a(f'psk_file = "{psk}"', extra="enabled = false"))) == {}
    plain = load('[[tunnel]]\nname = "t"\nlocal = "172.19.1.1"\nremote = "172.19.1.2"\n')
    assert desired_connections(plain) == {}


def test_operator_choices_reach_the_connection(psk: Path) -> None:
    text = seed_a(f'psk_file = "{psk}"\nproposals = "aes128gcm16-prfsha256-x25519, aes256-sha256-modp2048"\n'
                  'esp_proposals = "aes128gcm16"\nstart_action = "start"\ndpd_delay = "30s"\n'
                  'remote_id = "b.example.net"')
    connection = desired_connections(load(text))["greupd-My_Tunnel"]
    message = connection.message
    assert message["proposals"] == ["aes128gcm16-prfsha256-x25519", "aes256-sha256-modp2048"]
    assert message["dpd_delay"] == "30s"
    assert message["remote-1"] == {"auth": "psk", "id": "b.example.net"}
    child: Any = message["children"]
    assert child["gre"]["esp_proposals"] == ["aes128gcm16"]
    assert (child["gre"]["start_action"], child["gre"]["dpd_action"], child["gre"]["close_action"]) == (
        "start", "restart", "restart")
    assert connection.remote_id == "b.example.net"


def test_certificates_authenticate_by_public_key(tmp_path: Path) -> None:
    cert, ca, key = tmp_path / "a.pem", tmp_path / "ca.pem", tmp_path / "a.key"
    for path in (cert, ca, key):
        path.write_text("-----BEGIN ...-----\n")
    key.chmod(0o600)
    text = seed_a(f'cert = "{cert}"\nkey = "{key}"\nca = "{ca}"\nremote_id = "CN=router-b"')
    connection = desired_connections(load(text))["greupd-My_Tunnel"]
    assert connection.auth == "pubkey" and (connection.cert, connection.key, connection.ca) == (cert, key, ca)
    assert connection.message["local-1"] == {"auth": "pubkey"}
    assert connection.message["remote-1"] == {"auth": "pubkey", "id": "CN=router-b"}


# --- MTU ----------------------------------------------------------------------------------------------------


def test_the_tunnel_mtu_leaves_room_for_esp(psk: Path) -> None:
    tunnel = load(seed_a(f'psk_file = "{psk}"')).tunnels[0]
    # 1500 - 20 (outer IPv4) - 4 (GRE) - ESP's worst case: Cisco's usual GRE/IPsec tunnel MTU is 1400.
    assert default_ipsec_mtu(tunnel) == 1500 - 24 - ESP_OVERHEAD == 1395
    assert desired_state(load(seed_a(f'psk_file = "{psk}"'))).tunnels["My_Tunnel"].link.mtu == 1395
    keyed = load(seed_a(f'psk_file = "{psk}"', extra="key = 42")).tunnels[0]
    assert default_ipsec_mtu(keyed) == 1391
    v6 = load(seed_a(f'psk_file = "{psk}"', mode="ip6gre")).tunnels[0]
    # 40 (outer IPv6) + 8 (the Tunnel Encapsulation Limit option) + 4 (GRE); with encap_limit = "none", no option.
    assert default_ipsec_mtu(v6) == 1500 - 48 - 4 - ESP_OVERHEAD
    v6_no_limit = load(seed_a(f'psk_file = "{psk}"', mode="ip6gre", extra='encap_limit = "none"')).tunnels[0]
    assert default_ipsec_mtu(v6_no_limit) == 1500 - 40 - 4 - ESP_OVERHEAD


def test_an_mtu_the_operator_wrote_is_kept_and_plain_tunnels_keep_the_kernel_default(psk: Path) -> None:
    assert desired_state(load(seed_a(f'psk_file = "{psk}"', extra="mtu = 1300"))).tunnels["My_Tunnel"].link.mtu \
        == 1300
    plain = load('[[tunnel]]\nname = "t"\nlocal = "172.19.1.1"\nremote = "172.19.1.2"\n')
    assert desired_state(plain).tunnels["t"].link.mtu is None


# --- nftables: no cleartext GRE ----------------------------------------------------------------------------


def test_require_drops_gre_to_and_from_the_remote_that_esp_does_not_carry(psk: Path) -> None:
    config = load(seed_a(f'psk_file = "{psk}"'))
    assert not render_ruleset(config).wanted  # the drops are not in greupd's other table (review round 3, M1)
    text = describe_ruleset(render_ipsec_ruleset(config))
    assert text == (
        "table inet greupd_ipsec {\n"
        "\tset ipsec_v4 {\n"
        "\t\ttype ipv4_addr . ipv4_addr\n"
        '\t\telements = { 172.19.1.1 . 172.19.1.2 comment "My_Tunnel" }\n'
        "\t}\n\n"
        "\tchain ipsec_out {\n"
        "\t\ttype filter hook output priority filter; policy accept;\n"
        "\t\tmeta l4proto gre ip saddr . ip daddr @ipsec_v4 rt ipsec missing drop"
        ' comment "ipsec require: no cleartext GRE from these locals to their remotes"\n'
        "\t}\n\n"
        "\tchain ipsec_in {\n"
        "\t\ttype filter hook input priority filter; policy accept;\n"
        "\t\tmeta l4proto gre ip daddr . ip saddr @ipsec_v4 meta ipsec missing drop"
        ' comment "ipsec require: no cleartext GRE from these remotes to their locals"\n'
        "\t}\n"
        "}\n")


def test_the_drop_rules_in_libnftables_json(psk: Path) -> None:
    ruleset = render_ipsec_ruleset(load(seed_a(f'psk_file = "{psk}"', mode="ip6gre")))
    rules: list[Any] = [o["rule"] for o in ruleset.objects() if "rule" in o]
    gre = {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "gre"}}

    def pair(first: str, second: str) -> dict[str, Any]:
        return {"match": {"op": "==", "left": {"concat": [{"payload": {"protocol": "ip6", "field": first}},
                                                          {"payload": {"protocol": "ip6", "field": second}}]},
                          "right": "@ipsec_v6"}}

    assert [r["expr"] for r in rules] == [
        [gre, pair("saddr", "daddr"), {"match": {"op": "==", "left": {"rt": {"key": "ipsec"}}, "right": False}},
         {"drop": None}],
        [gre, pair("daddr", "saddr"), {"match": {"op": "==", "left": {"meta": {"key": "ipsec"}}, "right": False}},
         {"drop": None}],
    ]
    sets: list[Any] = [o["set"] for o in ruleset.objects() if "set" in o]
    assert [(s["name"], s["type"], s["elem"]) for s in sets] == [
        ("ipsec_v6", ["ipv6_addr", "ipv6_addr"],
         [{"elem": {"val": {"concat": ["2001:db8::1", "2001:db8::2"]}, "comment": "My_Tunnel"}}])]
    chains: list[Any] = [o["chain"] for o in ruleset.objects() if "chain" in o]
    assert [(c["name"], c["hook"], c["prio"]) for c in chains] == [
        ("ipsec_out", "output", 0), ("ipsec_in", "input", 0)]


def test_require_false_or_no_ipsec_adds_no_drop(psk: Path) -> None:
    assert not render_ipsec_ruleset(load(seed_a(f'psk_file = "{psk}"\nrequire = false'))).wanted
    assert not render_ipsec_ruleset(load(seed_a(f'psk_file = "{psk}"', extra="enabled = false"))).wanted


def test_the_drops_are_keyed_on_local_and_remote_so_a_plain_tunnel_from_another_local_passes(psk: Path) -> None:
    """Review round 3, L7: `sec` (172.19.1.1, ipsec) and `plain` (172.19.9.1, no ipsec), both to 172.19.1.2.
    On dac2a7b the set held the remote alone, so plain's GRE was dropped too."""
    text = (seed_a(f'psk_file = "{psk}"')
            + '[[tunnel]]\nname = "plain"\nlocal = "172.19.9.1"\nremote = "172.19.1.2"\nkey = 7\n')
    drops = render_ipsec_ruleset(load(text))
    [named] = drops.sets
    assert [e.json for e in named.elements] == [
        {"elem": {"val": {"concat": ["172.19.1.1", "172.19.1.2"]}, "comment": "My_Tunnel"}}]


# --- the comments libnftables takes (review round 3, H1) --------------------------------------------------


def hub(psk: Path, count: int, dpd: str = "10s") -> str:
    """`count` tunnels with 15-character names (the limit), one local, one remote, keys 1..count."""
    return "".join(f'[[tunnel]]\nname = "hub_tunnel_{i:04d}"\nlocal = "172.19.1.1"\nremote = "172.19.1.2"\n'
                   f'key = {i + 1}\n[tunnel.ipsec]\npsk_file = "{psk}"\ndpd_delay = "{dpd}"\n'
                   for i in range(count))


def every_comment(objects: list[Any]) -> list[str]:
    found: list[str] = []

    def walk(value: object) -> None:
        if isinstance(value, dict):
            if isinstance(value.get("comment"), str):
                found.append(value["comment"])
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(objects)
    return found


def test_no_comment_greupd_renders_is_longer_than_128_characters(psk: Path) -> None:
    """On dac2a7b the element comment of 16 such tunnels was 270 characters, and libnftables 1.0.6 exit()ed the
    daemon (2 with 254+ characters); a reload that changes them all puts old and new in one transitional table."""
    from greupd.queue import reload_scope

    old, new = load(hub(psk, 16)), load(hub(psk, 16, dpd="20s"))
    _, both = reload_scope(old, new, ())
    assert len(both.tunnels) == 32  # each tunnel twice, as a reload's transitional table holds them
    for config in (old, both, load(hub(psk, 200))):
        for ruleset in (render_ipsec_ruleset(config), render_ruleset(config)):
            comments = every_comment(ruleset.commands())
            assert all(len(c) <= MAX_COMMENT for c in comments), max(comments, key=len)
    [named] = render_ipsec_ruleset(both).sets
    [element] = named.elements
    comment = str(json.loads(element.json_text)["elem"]["comment"])
    assert comment.startswith("hub_tunnel_0000, hub_tunnel_0001, ") and comment.endswith(" more")
    shown = comment.split(" +")[0].split(", ")
    assert len(shown) == len(set(shown))  # each name once, though the transitional config holds it twice
    assert len(shown) + int(comment.split(" +")[1].split()[0]) == 16


def test_names_comment_fits_whole_names_then_says_how_many_more() -> None:
    assert names_comment(["a", "b", "a"]) == "a, b"
    assert names_comment([f"n{i:02d}" for i in range(10)], limit=21) == "n00, n01, n02 +7 more"
    assert len(names_comment(["x" * 200])) <= MAX_COMMENT


def test_a_comment_too_long_for_libnftables_is_refused_before_it_is_sent() -> None:
    """The last line of defence: a rule someone builds with a long comment is bounded, and NftTable refuses to
    hand libnftables any comment over the bound (it would end the process), without loading the bindings."""
    rule = Rule("ipsec_out", None, "x" * 300, ())
    assert len(rule.comment) == MAX_COMMENT
    table = NftTable("greupd")
    with pytest.raises(NftError, match="comment of 300 characters"):
        table._run([{"add": {"rule": {"comment": "x" * 300}}}])
    assert table._nft is None  # never reached libnftables


# --- fail closed: no link, route or probe without the drops in the kernel (review round 3, M1) --------------


def test_a_require_tunnel_is_held_back_until_its_drops_are_seen_in_the_kernel(psk: Path) -> None:
    from greupd.model import IpsecGuard, ipsec_held, probed
    from greupd.plan import plan_changes

    text = seed_a(f'psk_file = "{psk}"', extra="[tunnel.keepalive]\ninterval = 1\n")
    config = load(text)
    refused = IpsecGuard(frozenset(), "Operation not supported")
    held = ipsec_held(config, refused)
    assert list(held) == ["My_Tunnel"] and "Operation not supported" in held["My_Tunnel"]
    desired = desired_state(config, guard=refused)
    assert "My_Tunnel" not in desired.tunnels and desired.held == held
    plan = plan_changes(desired, Observed({}, {}, frozenset(), {}))
    assert not [a for a in plan.actions if action_tunnel(a) == "My_Tunnel"]  # no link, no route
    [problem] = plan.problems
    assert (problem.tunnel, problem.reason) == ("My_Tunnel", "ipsec-unprotected")
    assert probed(config, held).tunnels[0].keepalive is None  # no probe either
    assert config.tunnels[0].keepalive is not None

    # A link of ours that is there when the drops go (or at start, from a previous run): removed.
    link = ObservedLink(7, desired_state(config).tunnels["My_Tunnel"].link, True, True)
    plan = plan_changes(desired, Observed({"My_Tunnel": link}, {"My_Tunnel": frozenset()}, frozenset(), {}))
    assert [str(a) for a in plan.actions if action_tunnel(a) == "My_Tunnel"] == [
        "delete link My_Tunnel (ipsec require: its cleartext GRE drops are not in the kernel)"]

    # Seen in the kernel: the tunnel is planned as always.
    held_by = IpsecGuard(frozenset({(config.tunnels[0].local, config.tunnels[0].remote)}), None)
    assert ipsec_held(config, held_by) == {}
    assert desired_state(config, guard=held_by) == desired_state(config)
    # Before the first look nothing is held by the drops: held back too. require = false is never held back.
    assert list(ipsec_held(config, IpsecGuard())) == ["My_Tunnel"]
    assert ipsec_held(load(seed_a(f'psk_file = "{psk}"\nrequire = false')), IpsecGuard()) == {}


# --- state from charon's SAs (list-sas answers as the VICI session decodes them) ---------------------------


def _sa(name: str, ike: str, child: str | None) -> dict[str, object]:
    children = {} if child is None else {"gre-7": {"name": "gre", "state": child, "mode": "TRANSPORT"}}
    return {name: {"state": ike, "child-sas": children}}


def test_established_needs_an_installed_esp_sa(psk: Path) -> None:
    connections = desired_connections(load(seed_a(f'psk_file = "{psk}"')))
    loaded = {"greupd-My_Tunnel"}
    # Both ends trapped the first packet: two IKE_SAs, one of them carries the CHILD_SA.
    sas = [_sa("greupd-My_Tunnel", "ESTABLISHED", "INSTALLED"), _sa("greupd-My_Tunnel", "ESTABLISHED", None),
           _sa("office-vpn", "ESTABLISHED", "INSTALLED")]
    assert tunnel_states(connections, loaded, sas, {}) == {"My_Tunnel": {
        "state": "established", "connection": "greupd-My_Tunnel", "ike_sa": "ESTABLISHED", "child_sa": "INSTALLED",
        "charon": True, "error": None}}
    connecting = tunnel_states(connections, loaded, [_sa("greupd-My_Tunnel", "CONNECTING", None)], {})
    assert connecting["My_Tunnel"]["state"] == "connecting"
    assert change_message("My_Tunnel", connecting["My_Tunnel"]) == \
        "tunnel My_Tunnel ipsec connecting: IKE SA connecting (greupd-My_Tunnel)"
    assert tunnel_states(connections, loaded, [], {})["My_Tunnel"]["state"] == "connecting"  # trap, no traffic yet


def test_a_connection_charon_refused_is_down_with_its_error(psk: Path) -> None:
    connections = desired_connections(load(seed_a(f'psk_file = "{psk}"')))
    down = tunnel_states(connections, set(), [], {"greupd-My_Tunnel": "load-conn: invalid proposal"})
    assert down["My_Tunnel"]["state"] == "down"
    assert change_message("My_Tunnel", down["My_Tunnel"]) == \
        "tunnel My_Tunnel ipsec down: load-conn: invalid proposal (greupd-My_Tunnel)"


def test_the_journal_says_when_an_sa_comes_and_goes() -> None:
    up = IpsecChanged("My_Tunnel", "established", "connecting",
                      "tunnel My_Tunnel ipsec established: ESP SA installed (greupd-My_Tunnel)")
    fields = journal_fields(up)
    assert fields["MESSAGE_ID"] == MESSAGE_IDS[EventKind.IPSEC_UP]
    assert (fields["GREUPD_TUNNEL"], fields["GREUPD_IPSEC_STATE"], fields["GREUPD_IPSEC_PREVIOUS_STATE"]) == (
        "My_Tunnel", "established", "connecting")
    down = IpsecChanged("My_Tunnel", "down", "established", "tunnel My_Tunnel ipsec down: charon gone")
    assert journal_fields(down)["MESSAGE_ID"] == MESSAGE_IDS[EventKind.IPSEC_DOWN]
    assert message_of(down) == "tunnel My_Tunnel ipsec down: charon gone"


def test_psk_fixture_is_root_only(psk: Path) -> None:
    assert psk.stat().st_mode & 0o777 == 0o600 and psk.stat().st_uid == os.geteuid()


def test_check_summary_names_the_protection(psk: Path) -> None:
    from greupd.cli import summarize

    assert summarize(load(seed_a(f'psk_file = "{psk}"'))).splitlines()[1] == (
        "  My_Tunnel: gre 172.19.1.1 -> 172.19.1.2 192.168.8.1 peer 192.168.8.11, routes 20.10.1.0/24,"
        " ipsec (psk, cleartext GRE dropped)")


def test_plan_shows_the_connections_as_swanctl_conf_without_the_secret(psk: Path) -> None:
    from greupd.ipsec.connections import describe_connections

    text = describe_connections(desired_connections(load(seed_a(f'psk_file = "{psk}"'))))
    assert text.splitlines()[:5] == ["greupd-My_Tunnel {", "  version = 2", "  local_addrs = 172.19.1.1",
                                     "  remote_addrs = 172.19.1.2", "  proposals = aes256gcm16-prfsha384-ecp384"]
    assert "    gre {" in text and "      local_ts = dynamic[gre]" in text and "      mode = transport" in text
    assert text.endswith(f"# greupd-My_Tunnel: psk from {psk}\n")
    assert "correct horse" not in text


# --- SAs and policies lost behind charon's back (issue #21, I2) -------------------------------------------


def test_what_the_kernel_should_hold_follows_charons_installed_child_sas(psk: Path) -> None:
    import ipaddress

    from greupd.ipsec.lost import Expected, expected, lost

    connections = desired_connections(load(seed_a(f'psk_file = "{psk}"')))
    a, b = ipaddress.ip_address("172.19.1.1"), ipaddress.ip_address("172.19.1.2")
    children = {"gre-1": {"name": "gre", "state": "INSTALLED", "spi-in": "c0ffee01", "spi-out": "0badcafe"},
                # a rekeyed one that charon is deleting itself: not expected
                "gre-0": {"name": "gre", "state": "REKEYED", "spi-in": "11111111", "spi-out": "22222222"}}
    sas: list[dict[str, Any]] = [{"greupd-My_Tunnel": {"state": "ESTABLISHED", "child-sas": children}}]
    want = expected(connections, ["greupd-My_Tunnel"], sas)
    assert want == {"greupd-My_Tunnel": Expected(a, b, ((a, 0xC0FFEE01), (b, 0x0BADCAFE)))}
    # A trap without an SA: its policies only.
    assert expected(connections, ["greupd-My_Tunnel"], []) == {"greupd-My_Tunnel": Expected(a, b, ())}

    class Kernel:
        def __init__(self, sas: set[int], policies: set[int]) -> None:
            self.sas, self.policies = sas, policies

        def has_sa(self, daddr: object, spi: int) -> bool:
            return spi in self.sas

        def has_policy(self, src: object, dst: object, direction: int) -> bool:
            return direction in self.policies

    assert lost(Kernel({0xC0FFEE01, 0x0BADCAFE}, {0, 1}), want) == {}
    assert lost(Kernel(set(), set()), want) == {
        "greupd-My_Tunnel": "outbound policy, inbound policy, SA c0ffee01, SA 0badcafe"}


# --- VICI messages nested too deep (fuzz/crashes/vici/min-sections-600-deep.bin) -------------------------------

def _nested_sections(depth: int) -> bytes:
    """A VICI message of `depth` sections one inside the other, each named "a": SECTION_START (1), the name's
    length and the name, ..., then as many SECTION_END (2); the innermost holds key "k" = "v" (KEY_VALUE, 3)."""
    return b"\x01\x01a" * depth + b"\x03\x01k\x00\x01v" + b"\x02" * depth


def test_a_message_nested_deeper_than_64_is_a_vici_error_not_a_recursion_error() -> None:
    from vici.protocol import FiniteStream

    from greupd.ipsec.vici import MAX_DEPTH, ViciError, _decode

    # As Packet.parse hands payloads on. list-sas answers nest ~5 deep: 64 is far from them.
    inner: Any = _decode(FiniteStream(_nested_sections(MAX_DEPTH)))
    for _ in range(MAX_DEPTH):
        inner = inner["a"]
    assert inner == {"k": "v"}
    for depth in (MAX_DEPTH + 1, 600):  # 600 raised RecursionError in _text
        with pytest.raises(ViciError) as refused:
            _decode(FiniteStream(_nested_sections(depth)))
        assert str(refused.value) == "unreadable VICI message from charon: sections or lists nested deeper than 64"


def test_the_event_reader_survives_a_message_nested_600_deep(caplog: pytest.LogCaptureFixture) -> None:
    """The event-reader task (supervisor._read_events) died of the RecursionError. A ViciError would end it too,
    as if charon had gone away: the event comes with an empty message and a warning, and the next one is read."""
    import asyncio

    from greupd.ipsec.vici import ViciSession

    def event(name: bytes, message: bytes) -> bytes:
        packet = b"\x07" + bytes([len(name)]) + name + message  # EVENT (7), its name, the message
        return len(packet).to_bytes(4, "big") + packet

    async def read() -> tuple[str, object]:
        session = ViciSession(Path("/nonexistent/charon.vici"))
        session._reader = asyncio.StreamReader()
        session._reader.feed_data(event(b"ike-updown", _nested_sections(600))
                                  + event(b"child-updown", b"\x03\x01k\x00\x01v"))
        assert await session.next_event() == ("ike-updown", {})
        return await session.next_event()

    assert asyncio.run(read()) == ("child-updown", {"k": "v"})
    assert "ipsec: charon's ike-updown event: unreadable VICI message from charon: sections or lists nested deeper" \
           " than 64" in caplog.text
