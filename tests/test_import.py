"""`greupd import` from files, without a kernel: the seed's router A as netplan, networkd and ifupdown keep it.

What each prints must pass `greupd check` as printed; what it could not carry is a comment that says so.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest

from greupd.config import load_config_text
from greupd.importer import FoundTunnel, ImportProblem
from greupd.importer.iptables import parse_rule, rules_from_save, suggest
from greupd.importer.sources import import_config
from greupd.importer.write import render

IMPORTS = Path(__file__).parent / "configs" / "import"
REPO = Path(__file__).resolve().parent.parent


def entry(text: str, name: str) -> str:
    """The lines of one imported entry, from its [[tunnel]] to the next blank line."""
    start = text.index(f'[[tunnel]]\nname = "{name}"')
    end = text.find("\n\n", start)
    return text[start:end if end >= 0 else None]


@pytest.mark.parametrize("source", ["netplan", "networkd", "ifupdown"])
def test_every_file_format_imports_to_a_valid_config_of_adopted_tunnels(source: str) -> None:
    text = import_config(source, IMPORTS / source, [])  # type: ignore[arg-type]
    config = load_config_text(text)
    assert config.tunnels and all(t.adopt for t in config.tunnels)
    assert config.tunnel("My_Tunnel") is not None


def test_ifupdown_seed_router_a_with_step_3_iptables_rules() -> None:
    text = import_config("ifupdown", IMPORTS / "ifupdown" / "interfaces", ["My_Tunnel"])
    assert entry(text, "My_Tunnel").splitlines() == [
        "[[tunnel]]",
        'name = "My_Tunnel"',
        'mode = "gre"',
        'local = "172.19.1.1"',
        'remote = "172.19.1.2"',
        'ttl = "inherit"',
        "tos = 0",
        "pmtudisc = true",
        'address = "192.168.8.1"',
        'peer = "192.168.8.11"',
        'routes = ["20.10.1.0/24"]',
        "adopt = true",
        '# not carried over: up logger "My_Tunnel is up"',
        "# not carried over: iptables -t nat -A POSTROUTING -o eth1 -s 192.168.8.11 -j MASQUERADE",
        "# not carried over: iptables -A FORWARD -s 192.168.8.11 -o eth1 -j ACCEPT",
        "# not carried over: iptables -t nat -A POSTROUTING -o My_Tunnel -s 10.10.1.0/24 -j MASQUERADE",
        "# not carried over: iptables -A FORWARD -s 10.10.1.0/24 -o My_Tunnel -j ACCEPT",
        "# not carried over: iptables -t mangle -A FORWARD -o My_Tunnel -p tcp --tcp-flags SYN,RST SYN -j TCPMSS"
        " --set-mss 1436",
        "# greupd's nftables table does the same; uncomment and delete the iptables rules together:",
        "# [tunnel.nat]",
        '# into_tunnel = ["10.10.1.0/24"]',
        '# from_tunnel = ["eth1"]',
        "# [tunnel.mss]",
        "# clamp = 1436",
    ]


def test_uncommenting_the_suggestion_is_a_valid_config_with_the_seeds_nat() -> None:
    text = import_config("ifupdown", IMPORTS / "ifupdown" / "interfaces", ["My_Tunnel"])
    live = text.replace("# [tunnel.", "[tunnel.").replace("# into_tunnel", "into_tunnel").replace(
        "# from_tunnel", "from_tunnel").replace("# clamp", "clamp")
    tunnel = load_config_text(live).tunnels[0]
    assert [str(p) for p in tunnel.nat.into_tunnel] == ["10.10.1.0/24"]
    assert tunnel.nat.from_tunnel == ["eth1"] and tunnel.mss.clamp == 1436


def test_routes_of_another_metric_are_a_note_not_a_silent_loss() -> None:
    text = import_config("netplan", IMPORTS / "netplan", [])
    assert "metric = 10" in entry(text, "My_Tunnel")
    assert 'routes = ["2001:db8:20::/64"]' in entry(text, "Backup_v6")
    assert "vti_not_gre" not in text


def test_networkd_peer_keys_and_a_netdev_without_routes() -> None:
    text = import_config("networkd", IMPORTS / "networkd", [])
    mine = entry(text, "My_Tunnel")
    assert 'address = "192.168.8.1"\npeer = "192.168.8.11"' in mine and "key = 42" in mine and "ttl = 64" in mine
    tap = entry(text, "Tap")
    assert "ikey = 7\nokey = 8" in tap and 'mode = "gretap"' in tap


def test_an_entry_greupd_would_refuse_is_printed_commented_with_the_reason() -> None:
    bad = FoundTunnel(name="a-name-far-too-long", mode="gre", local="172.19.1.1", remote="172.19.1.2",
                      origin="test")
    twin = FoundTunnel(name="twin", mode="gre", local="172.19.1.1", remote="172.19.1.5", origin="test")
    text = render([bad, twin, twin], "kernel")
    assert '# name = "a-name-far-too-long"' in text and "not an interface name" in text
    assert "already used by tunnel[0]" in text
    assert [t.name for t in load_config_text(text).tunnels] == ["twin"]


def test_an_encap_limit_found_is_written_after_pmtudisc_and_loads_as_found() -> None:
    limits: list[tuple[str, int | Literal["none"] | None]] = [("NoLimit6", "none"), ("Zero6", 0), ("Plain6", None)]
    found = [FoundTunnel(name=name, mode="ip6gre", local="2001:db8:1::1", remote=f"2001:db8:1::{n}", origin="test",
                         ttl=64, encap_limit=limit) for n, (name, limit) in enumerate(limits, start=2)]
    text = render(found, "kernel")
    assert 'ttl = 64\nencap_limit = "none"\nadopt = true' in entry(text, "NoLimit6")
    assert "encap_limit = 0\n" in entry(text, "Zero6")
    assert "encap_limit" not in entry(text, "Plain6")  # 4, greupd's default, as `ip link add` made it
    assert [t.encap_limit for t in load_config_text(text).tunnels] == ["none", 0, None]


def test_iptables_save_output_is_read_per_table() -> None:
    rules = rules_from_save("*nat\n:POSTROUTING ACCEPT [0:0]\n"
                            "-A POSTROUTING -s 10.10.1.0/24 -o My_Tunnel -j MASQUERADE\nCOMMIT\n"
                            "*mangle\n-A FORWARD -o My_Tunnel -p tcp -m tcp --tcp-flags SYN,RST SYN"
                            " -j TCPMSS --clamp-mss-to-pmtu\nCOMMIT\n")
    tunnel = FoundTunnel(name="My_Tunnel", mode="gre", local="172.19.1.1", remote="172.19.1.2", origin="test")
    suggest([tunnel], rules)
    assert tunnel.suggestions == ["[tunnel.nat]", 'into_tunnel = ["10.10.1.0/24"]', "[tunnel.mss]", 'clamp = "pmtu"']


def test_a_rule_for_another_interface_is_not_claimed() -> None:
    rule = parse_rule(["-t", "nat", "-A", "POSTROUTING", "-o", "eth0", "-s", "172.16.0.0/12", "-j", "MASQUERADE"])
    assert rule is not None
    tunnel = FoundTunnel(name="My_Tunnel", mode="gre", local="172.19.1.1", remote="172.19.1.2", origin="test",
                         peer="192.168.8.11", routes=["20.10.1.0/24"])
    suggest([tunnel], [rule])
    assert tunnel.suggestions == [] and tunnel.notes == []


def greupd(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "greupd", *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=60, check=False)


def test_import_cli_names_exit_1_for_an_unknown_tunnel() -> None:
    result = greupd("import", "--from", "ifupdown", str(IMPORTS / "ifupdown"), "My_Tunnel", "Nope")
    assert result.returncode == 1 and "no GRE-family tunnel named Nope" in result.stderr
    good = greupd("import", "--from", "ifupdown", str(IMPORTS / "ifupdown"), "Backup")
    assert good.returncode == 0 and 'name = "Backup"' in good.stdout and "My_Tunnel" not in good.stdout


def test_version() -> None:
    result = greupd("--version")
    assert result.returncode == 0 and result.stdout.startswith("greupd ")


# --- sources that are odd, not wrong: each tunnel stands alone, and every comment stays one line (review L2) ----


def test_a_netplan_key_that_is_not_a_key_is_a_comment_for_that_tunnel_not_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "60-tunnels.yaml").write_text(
        "network:\n  tunnels:\n"
        "    Bad:\n      mode: gre\n      local: 172.19.1.1\n      remote: 172.19.1.9\n      key: abc\n"
        "    My_Tunnel:\n      mode: gre\n      local: 172.19.1.1\n      remote: 172.19.1.2\n")
    text = import_config("netplan", tmp_path, [])
    assert (f"# Bad: from {tmp_path / '60-tunnels.yaml'}\n# not carried over, its description cannot be read:"
            " key 'abc' is not a GRE key (a number or a dotted quad)\n") in text
    assert [t.name for t in load_config_text(text).tunnels] == ["My_Tunnel"]


def test_a_networkd_route_in_a_named_table_is_a_note(tmp_path: Path) -> None:
    for name in ("30-My_Tunnel.netdev", "30-My_Tunnel.network"):
        (tmp_path / name).write_text((IMPORTS / "networkd" / name).read_text())
    with (tmp_path / "30-My_Tunnel.network").open("a") as network:
        network.write("\n[Route]\nDestination=20.10.3.0/24\nTable=vpn\n")
    text = import_config("networkd", tmp_path, [])
    assert ("# route not carried over (Table=vpn: write its number from /etc/iproute2/rt_tables as the tunnel's"
            " table): Destination=20.10.3.0/24\n") in text
    [tunnel] = load_config_text(text).tunnels
    assert [str(r) for r in tunnel.routes] == ["20.10.1.0/24", "20.10.2.0/24"]


def test_an_ifupdown_line_the_shell_cannot_split_is_a_note(tmp_path: Path) -> None:
    interfaces = (IMPORTS / "ifupdown" / "interfaces").read_text().replace(
        "    up logger \"My_Tunnel is up\"\n", "    up echo \"it's\n").replace("source interfaces.d/*\n", "")
    (tmp_path / "interfaces").write_text(interfaces)
    text = import_config("ifupdown", tmp_path / "interfaces", [])
    assert "# not carried over (No closing quotation): up echo \"it's\n" in text
    assert load_config_text(text).tunnel("My_Tunnel") is not None


def test_a_multi_line_value_from_the_source_stays_in_its_comment(tmp_path: Path) -> None:
    # netplan's `description: |` became a note whose second line was live TOML: a [daemon] table of its own.
    (tmp_path / "60-tunnels.yaml").write_text(
        "network:\n  tunnels:\n"
        "    My_Tunnel:\n      mode: gre\n      local: 172.19.1.1\n      remote: 172.19.1.2\n"
        "      description: |\n        to B\n        [daemon]\n        control_socket = \"x.sock\"\n"
        '    "two\\nlines":\n      mode: gre\n      local: 172.19.1.1\n      remote: 172.19.1.3\n')
    text = import_config("netplan", tmp_path, [])
    assert "# netplan key not carried over: description: to B [daemon] control_socket = \"x.sock\" \n" in text
    assert '# name = "two\\u000alines"' in text  # refused (not an interface name), and still one line
    assert all(line.startswith("#") or not line or "daemon" not in line for line in text.splitlines())
    config = load_config_text(text)
    assert [t.name for t in config.tunnels] == ["My_Tunnel"]
    assert config.daemon == load_config_text("").daemon


# --- fuzz findings (issue #21, fuzz/crashes/<source>/min-*.bin): each a comment or a note, never a traceback ---
# The inputs are the minimal reproducers' text. What is asserted: no exception, the printed file validates,
# and what could not be read is said where the person looks for it (the tunnel's comment, a note).

IFACE = "iface t inet tunnel\n    mode gre\n    local 172.19.1.1\n    endpoint 172.19.1.2\n"
NETDEV = "[NetDev]\nName=t\nKind=gre\n[Tunnel]\nLocal=172.19.1.1\nRemote=172.19.1.2\n"
NETPLAN = "network:\n  tunnels:\n    t:\n      mode: gre\n      local: 172.19.1.1\n      remote: 172.19.1.2\n"


def imported(tmp_path: Path, source: Literal["netplan", "networkd", "ifupdown"], *files: str) -> str:
    """`greupd import --from SOURCE` of these files (networkd: the .netdev, then the .network), checked to load."""
    if source == "netplan":
        (tmp_path / "60-tunnels.yaml").write_text(files[0])
        path = tmp_path
    elif source == "networkd":
        for text, suffix in zip(files, (".netdev", ".network"), strict=False):
            (tmp_path / f"30-t{suffix}").write_text(text)
        path = tmp_path
    else:
        path = tmp_path / "interfaces"
        path.write_text(files[0])
    text = import_config(source, path, [])
    load_config_text(text)  # importer/write.py's promise: the file always validates
    return text


def unread(text: str, reason: str) -> bool:
    """The tunnel `t` is printed as a comment saying why its description cannot be read."""
    return f"# not carried over, its description cannot be read: {reason}\n" in text and "[[tunnel]]" not in text


def test_ifupdown_a_one_word_up_command_is_a_note_and_the_tunnel_is_carried(tmp_path: Path) -> None:
    # min-one-word-up-command.bin: zip(strict=True) of no words raised ValueError, and the whole tunnel was lost.
    text = imported(tmp_path, "ifupdown", IFACE + "    up /usr/local/bin/tunnel-up\n    post-up true\n")
    assert "# not carried over: up /usr/local/bin/tunnel-up\n# not carried over: post-up true\n" in text
    assert load_config_text(text).tunnel("t") is not None


@pytest.mark.parametrize(("lines", "reason"), [
    ("    key abc\n", "key abc: not a GRE key (a number or a dotted quad)"),  # min-key-not-a-number.bin
    ("    ikey 1\n    okey 1.2.3\n", "okey 1.2.3: not a GRE key (a number or a dotted quad)"),
    ("    address 192.168.8.1\n    netmask 255.255.255.300\n",  # min-netmask-not-a-mask.bin
     "netmask 255.255.255.300: not a netmask (255.255.255.0 or 24)"),
    ("    address 192.168.9.x\n", "address 192.168.9.x: not an address"),  # min-address-not-an-address.bin
    # min-dstaddr-not-an-address-with-iptables.bin: the peer went unchecked into iptables._within, which raised.
    ("    address 192.168.8.1\n    netmask 32\n    dstaddr 384.168.8.11\n"
     "    up iptables -t nat -A POSTROUTING -o eth1 -s 10.0.0.0/8 -j MASQUERADE\n",
     "dstaddr 384.168.8.11: not an address"),
], ids=["key", "okey", "netmask", "address", "dstaddr"])
def test_ifupdown_an_unreadable_value_is_a_comment_for_that_tunnel(tmp_path: Path, lines: str, reason: str) -> None:
    other = "iface u inet tunnel\n    mode gre\n    local 172.19.1.1\n    endpoint 172.19.1.3\n"
    text = imported(tmp_path, "ifupdown", IFACE + lines + other)
    assert f"# t: from {tmp_path / 'interfaces'} (iface t)\n# not carried over, its description cannot be read:" \
           f" {reason}\n" in text
    assert [t.name for t in load_config_text(text).tunnels] == ["u"]


def test_iptables_suggestions_skip_a_peer_that_is_not_an_address() -> None:
    tunnel = FoundTunnel(name="t", mode="gre", local="172.19.1.1", remote="172.19.1.2", origin="x",
                         address="192.168.8.1", peer="384.168.8.11", routes=["20.10.1.x/24"])
    rule = parse_rule(["-t", "nat", "-A", "POSTROUTING", "-o", "eth1", "-s", "10.0.0.0/8", "-j", "MASQUERADE"])
    assert rule is not None
    suggest([tunnel], [rule])  # raised ValueError from ip_network("384.168.8.11")
    assert tunnel.suggestions == []


def test_ifupdown_a_source_line_with_a_nul_byte_is_a_note(tmp_path: Path) -> None:
    # min-source-with-nul.bin: glob.glob raised "embedded null byte".
    text = imported(tmp_path, "ifupdown", "source interfaces\0.d/*\n" + IFACE)
    assert f"# {tmp_path / 'interfaces'}: not read (a NUL byte in the path): source interfaces .d/*\n" in text
    assert load_config_text(text).tunnel("t") is not None


def test_ifupdown_a_control_character_in_a_command_stays_in_its_comment(tmp_path: Path) -> None:
    # min-control-character-in-a-note.bin
    text = imported(tmp_path, "ifupdown", IFACE + "    up logger a\x01b\n    up logger \"c\nd\"\n")
    assert "# not carried over: up logger a b\n" in text
    assert load_config_text(text).tunnel("t") is not None


@pytest.mark.parametrize(("line", "reason"), [
    ("Key=abc", "Key=abc: not a GRE key (a number or a dotted quad)"),  # min-key-not-a-number.bin
    ("InputKey=10.0.0.1/32", "InputKey=10.0.0.1/32: not a GRE key (a number or a dotted quad)"),  # min-key-with-a-slash
    ("OutputKey=²", "OutputKey=²: not a GRE key (a number or a dotted quad)"),
], ids=["key", "input-key-with-a-slash", "output-key-superscript"])
def test_networkd_a_key_that_is_not_a_key_is_a_comment_for_that_tunnel(tmp_path: Path, line: str,
                                                                        reason: str) -> None:
    assert unread(imported(tmp_path, "networkd", NETDEV + line + "\n"), reason)


@pytest.mark.parametrize(("route", "note"), [
    ("Destination=20.10.1.0/24\nMetric=ten",  # min-metric-not-a-number.bin
     "route not carried over (Metric=ten is not a number): Destination=20.10.1.0/24"),
    ("Destination=20.10.1.x/24",  # min-destination-not-a-prefix.bin
     "route not carried over (Destination=20.10.1.x/24 is not a prefix)"),
    ("Destination=20.10.1.0/24\nTable=²",
     "route not carried over (Table=²: write its number from /etc/iproute2/rt_tables as the tunnel's table):"
     " Destination=20.10.1.0/24"),
], ids=["metric", "destination", "table-superscript"])
def test_networkd_an_unreadable_route_is_a_note_and_the_others_are_carried(tmp_path: Path, route: str,
                                                                          note: str) -> None:
    network = f"[Match]\nName=t\n[Route]\n{route}\n[Route]\nDestination=20.10.2.0/24\n"
    text = imported(tmp_path, "networkd", NETDEV, network)
    assert f"# {note}\n" in text
    assert [str(r) for r in load_config_text(text).tunnels[0].routes] == ["20.10.2.0/24"]


def test_networkd_a_control_character_in_a_field_is_escaped(tmp_path: Path) -> None:
    # min-control-character-in-a-field.bin: a \x01 in Local= printed raw made the file invalid TOML.
    text = imported(tmp_path, "networkd", NETDEV.replace("Local=172.19.1.1", "Local=172.19.1.1\x01"))
    assert '# local = "172.19.1.1\\u0001"\n' in text  # refused (not an address), and escaped in its comment


@pytest.mark.parametrize(("yaml_text", "problem"), [
    ("- a\n", "a netplan file is a mapping with a `network` key, not a list"),  # min-top-level-not-a-mapping.bin
    ("network: 5\n", "network must be a mapping (of tunnels, ...), not 5"),  # min-network-not-a-mapping.bin
    ("network: [a]\n", "network must be a mapping (of tunnels, ...), not a list"),
], ids=["top-level", "network", "network-list"])
def test_netplan_a_file_that_is_not_a_mapping_is_an_import_problem(tmp_path: Path, yaml_text: str,
                                                                  problem: str) -> None:
    # These raised AttributeError (list.get, int.get); netplan refuses such a file too.
    (tmp_path / "60-tunnels.yaml").write_text(yaml_text)
    with pytest.raises(ImportProblem) as refused:
        import_config("netplan", tmp_path, [])
    assert str(refused.value) == f"{tmp_path / '60-tunnels.yaml'}: {problem}"


@pytest.mark.parametrize(("route", "note"), [
    ("table: vpn", "route not carried over (table: vpn: write its number from /etc/iproute2/rt_tables as the"
                   " tunnel's table): to 20.10.1.0/24"),  # min-route-table-not-a-number.bin
    ("metric: ten", "route not carried over (metric: ten is not a number): to 20.10.1.0/24"),
], ids=["table", "metric"])
def test_netplan_an_unreadable_route_is_a_note_and_the_others_are_carried(tmp_path: Path, route: str,
                                                                         note: str) -> None:
    routes = f"      routes:\n        - to: 20.10.1.0/24\n          {route}\n        - to: 20.10.2.0/24\n"
    text = imported(tmp_path, "netplan", NETPLAN + routes)
    assert f"# {note}\n" in text
    assert [str(r) for r in load_config_text(text).tunnels[0].routes] == ["20.10.2.0/24"]


def test_netplan_an_address_mapping_without_one_address_is_a_note(tmp_path: Path) -> None:
    text = imported(tmp_path, "netplan", NETPLAN + "      addresses:\n        - {}\n        - 10.9.0.1/30\n")
    assert "# address not carried over (one address with its options): {}\n" in text
    assert load_config_text(text).tunnels[0].address is not None


def test_netplan_a_newline_in_a_value_is_escaped(tmp_path: Path) -> None:
    # min-newline-in-a-value.bin
    text = imported(tmp_path, "netplan", NETPLAN.replace("local: 172.19.1.1", 'local: "172.19.1.1\\n.2"'))
    assert '# local = "172.19.1.1\\u000a.2"\n' in text


def test_digits_that_are_not_ascii_are_not_numbers(tmp_path: Path) -> None:
    # str.isdigit() is true of "²", which int() refuses: the tunnel was lost with "invalid literal for int()".
    # Now such a ttl/mtu is left out as a word would be, and an MSS of "²" is no MSS.
    ifupdown = imported(tmp_path, "ifupdown", IFACE + "    ttl ²\n    mtu ²\n")
    assert load_config_text(ifupdown).tunnel("t") is not None
    networkd = imported(tmp_path, "networkd", NETDEV + "TTL=²\nTOS=²\n[NetDev]\nMTUBytes=²\n")
    assert load_config_text(networkd).tunnel("t") is not None
    rule = parse_rule(["-t", "mangle", "-A", "FORWARD", "-o", "t", "-j", "TCPMSS", "--set-mss", "²"])
    assert rule is not None and rule.mss is None


def test_netplan_routes_that_are_not_a_list_are_a_comment_for_that_tunnel(tmp_path: Path) -> None:
    assert unread(imported(tmp_path, "netplan", NETPLAN + "      routes: 5\n"), "routes: a list of routes, not 5")
