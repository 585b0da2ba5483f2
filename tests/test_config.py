"""tunnels.toml as the seed's machine A writes it: what loads, what it means, and how a mistake is reported.

Each broken config is a file in tests/configs/broken/ that says, in its header, the field path and the
error it must produce; the line the error must name is marked `# <- here` in the file itself.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from greupd.config import (
    Config,
    ConfigError,
    ConfigProblem,
    DaemonConfig,
    KeepaliveConfig,
    TunnelConfig,
    config_files,
    load_config,
    load_config_sources,
    load_config_text,
    read_daemon_table,
    unvalidated_path,
)

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "etc" / "greupd" / "tunnels.toml"
CONFIGS = Path(__file__).resolve().parent / "configs"
BROKEN = sorted((CONFIGS / "broken").glob("*.toml"))

SEED_A = """
[[tunnel]]
name = "My_Tunnel"
local = "172.19.1.1"
remote = "172.19.1.2"
"""


@dataclass(frozen=True)
class Expected:
    """What a broken fixture says about itself: the problem greupd check must report."""

    field: str
    error: str
    line: int
    problems: int


def expected_of(path: Path) -> Expected:
    text = path.read_text()
    header = dict(re.findall(r"^# (field|error|problems): (.*)$", text, flags=re.MULTILINE))
    marked = [n for n, line in enumerate(text.split("\n"), start=1) if line.endswith("# <- here")]
    assert len(marked) == 1, f"{path.name}: mark exactly one line with '# <- here'"
    field = "" if header["field"] == "(none)" else header["field"]
    count = int(header.get("problems", "1").split()[0])
    return Expected(field, header["error"], marked[0], count)


def problems_of(path: Path) -> tuple[ConfigProblem, ...]:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return caught.value.problems


def only_problem(text: str) -> ConfigProblem:
    with pytest.raises(ConfigError) as caught:
        load_config_text(text)
    assert len(caught.value.problems) == 1, caught.value
    return caught.value.problems[0]


# --- the shipped example: machine A of the seed --------------------------------------------------------


def test_example_config_is_machine_a_of_the_seed() -> None:
    config = load_config(EXAMPLE)

    assert config.files == (EXAMPLE,)
    assert config.daemon == DaemonConfig(ip_forward=True, on_exit="keep")
    [tunnel] = config.tunnels
    assert config.tunnel("My_Tunnel") is tunnel
    assert (tunnel.name, tunnel.mode) == ("My_Tunnel", "gre")
    assert (tunnel.local, tunnel.remote) == (ipaddress.ip_address("172.19.1.1"), ipaddress.ip_address("172.19.1.2"))
    assert tunnel.address == ipaddress.ip_interface("192.168.8.1/32")
    assert tunnel.peer == ipaddress.ip_address("192.168.8.11")
    assert tunnel.routes == [ipaddress.ip_network("20.10.1.0/24")]
    assert (tunnel.ttl, tunnel.table, tunnel.metric, tunnel.enabled) == (64, 254, 0, True)
    assert tunnel.keepalive == KeepaliveConfig(interval=1.0, retries=3, action="routes", answer="daemon")
    assert tunnel.mss.clamp == 1436
    assert tunnel.nat.into_tunnel == [ipaddress.ip_network("10.10.1.0/24")]
    assert tunnel.nat.from_tunnel == ["eth1"]
    assert (tunnel.input_key, tunnel.output_key) == (None, None)


def test_defaults_of_an_unadorned_tunnel_follow_the_spec() -> None:
    [tunnel] = load_config_text(SEED_A).tunnels

    assert tunnel.mode == "gre"
    assert (tunnel.ttl, tunnel.tos, tunnel.pmtudisc, tunnel.mtu) == (64, "inherit", True, None)
    assert (tunnel.key, tunnel.ikey, tunnel.okey) == (None, None, None)
    assert (tunnel.address, tunnel.peer, tunnel.routes) == (None, None, [])
    assert (tunnel.metric, tunnel.table, tunnel.enabled) == (0, 254, True)
    assert tunnel.keepalive is None  # absent: no probing
    assert tunnel.mss.clamp == "off"
    assert (tunnel.nat.into_tunnel, tunnel.nat.from_tunnel) == ([], [])


def test_an_empty_file_is_a_valid_config_with_no_tunnels() -> None:
    assert load_config_text("") == Config(DaemonConfig(), (), (Path("<string>"),))


# --- spellings that mean the same ----------------------------------------------------------------------


@pytest.mark.parametrize(("written", "seconds"), [
    ('"300ms"', 0.3), ('"51ms"', 0.051), ('"2s"', 2.0), ('"1m"', 60.0), ('" 1.5s "', 1.5),
    ("1", 1.0), ("0.5", 0.5), ("0.05", 0.05), ('"50ms"', 0.05), ("3600", 3600.0),
])
def test_keepalive_interval_is_seconds_or_a_duration_string(written: str, seconds: float) -> None:
    [tunnel] = load_config_text(SEED_A + f"[tunnel.keepalive]\ninterval = {written}\n").tunnels
    assert tunnel.keepalive is not None
    assert tunnel.keepalive.interval == seconds


@pytest.mark.parametrize(("written", "key"), [("42", 42), ('"0.0.0.42"', 42), ('"1.2.3.4"', 0x01020304),
                                              ("0", 0), ('"255.255.255.255"', 0xFFFFFFFF)])
def test_gre_key_as_number_or_dotted_quad(written: str, key: int) -> None:
    [tunnel] = load_config_text(SEED_A + f"key = {written}\n").tunnels
    assert (tunnel.key, tunnel.input_key, tunnel.output_key) == (key, key, key)


def test_ikey_and_okey_set_each_direction() -> None:
    [tunnel] = load_config_text(SEED_A + 'ikey = 1\nokey = "0.0.0.2"\n').tunnels
    assert (tunnel.input_key, tunnel.output_key) == (1, 2)


@pytest.mark.parametrize(("written", "table"), [('"main"', 254), ("254", 254), ("100", 100)])
def test_table_main_is_254(written: str, table: int) -> None:
    [tunnel] = load_config_text(SEED_A + f"table = {written}\n").tunnels
    assert tunnel.table == table


def test_ttl_and_tos_inherit_and_pmtudisc_off() -> None:
    [tunnel] = load_config_text(SEED_A + 'ttl = "inherit"\ntos = 16\npmtudisc = false\n').tunnels
    assert (tunnel.ttl, tunnel.tos, tunnel.pmtudisc) == ("inherit", 16, False)


def test_address_with_prefix_and_no_peer() -> None:
    [tunnel] = load_config_text(SEED_A + 'address = "192.168.8.1/24"\n').tunnels
    assert tunnel.address == ipaddress.ip_interface("192.168.8.1/24")


def test_ip6gre_over_ipv6_carries_ipv4_inside() -> None:
    text = """
[[tunnel]]
name = "v6"
mode = "ip6gre"
local = "fd00:19::1"
remote = "fd00:19::2"
address = "192.168.8.1"
peer = "192.168.8.11"
routes = ["20.10.1.0/24", "2001:db8::/32"]
"""
    [tunnel] = load_config_text(text).tunnels
    assert tunnel.local == ipaddress.ip_address("fd00:19::1")
    assert tunnel.routes == [ipaddress.ip_network("20.10.1.0/24"), ipaddress.ip_network("2001:db8::/32")]


def test_same_endpoints_with_different_keys_are_two_tunnels() -> None:
    text = SEED_A + "key = 1\n" + SEED_A.replace("My_Tunnel", "Second") + "key = 2\n"
    assert [t.name for t in load_config_text(text).tunnels] == ["My_Tunnel", "Second"]


def test_a_disabled_tunnel_may_share_endpoints_with_an_enabled_one() -> None:
    # A disabled entry creates nothing in the kernel, so it cannot collide.
    text = SEED_A + SEED_A.replace("My_Tunnel", "Old") + "enabled = false\n"
    config = load_config_text(text)
    assert [t.enabled for t in config.tunnels] == [True, False]


def test_defaults_fill_what_a_tunnel_leaves_out_and_the_tunnel_wins() -> None:
    text = """
[defaults]
ttl = 32
mtu = 1400
[defaults.keepalive]
interval = "2s"
retries = 5

[[tunnel]]
name = "My_Tunnel"
local = "172.19.1.1"
remote = "172.19.1.2"
ttl = 200
[tunnel.keepalive]
retries = 2
"""
    [tunnel] = load_config_text(text).tunnels
    assert (tunnel.ttl, tunnel.mtu) == (200, 1400)
    assert tunnel.keepalive == KeepaliveConfig(interval=2.0, retries=2)


# --- keepalive defaults apply where keepalives exist (review M3) ---------------------------------------------

SEED_A6 = """
[[tunnel]]
name = "My_Tunnel6"
mode = "ip6gre"
local = "fd00:19::1"
remote = "fd00:19::2"
"""


def test_a_keepalive_default_applies_to_gre_tunnels_and_leaves_the_others_valid() -> None:
    text = '[defaults]\ntos = 16\n[defaults.keepalive]\ninterval = "2s"\n' + SEED_A + SEED_A6 + \
        SEED_A.replace("My_Tunnel", "My_Tap").replace("1.2", "1.3") + 'mode = "gretap"\n'
    gre, ip6gre, gretap = load_config_text(text).tunnels
    assert gre.keepalive == KeepaliveConfig(interval=2.0)
    assert (ip6gre.keepalive, gretap.keepalive) == (None, None)
    # tos, like keepalive, is a default for the modes that have it (ip6gre has no tos of greupd's).
    assert (gre.tos, gretap.tos, ip6gre.tos) == (16, 16, "inherit")


def test_encap_limit_is_iproute2s_4_unless_written_and_none_drops_the_option() -> None:
    # Unwritten it stays None in the config: model.link_spec turns that into 4, as `ip link add ... type ip6gre`.
    default, = load_config_text(SEED_A6).tunnels
    assert default.encap_limit is None
    for written, expected in (("0", 0), ("255", 255), ('"none"', "none")):
        [tunnel] = load_config_text(SEED_A6 + f"encap_limit = {written}\n").tunnels
        assert tunnel.encap_limit == expected
    [tap] = load_config_text(SEED_A6.replace('"ip6gre"', '"ip6gretap"') + "encap_limit = 7\n").tunnels
    assert tap.encap_limit == 7
    problem = only_problem(SEED_A6 + "encap_limit = 256\n")
    assert (problem.field, problem.line) == ("tunnel[0].encap_limit", 7)
    assert problem.message == "encap_limit must be 0..255 or \"none\", not 256"


def test_an_encap_limit_default_applies_to_the_ip6_tunnels_only() -> None:
    text = '[defaults]\nencap_limit = "none"\n' + SEED_A + SEED_A6
    gre, ip6gre = load_config_text(text).tunnels
    assert (gre.encap_limit, ip6gre.encap_limit) == (None, "none")
    # A bad value in [defaults] is reported there, even with no ip6 tunnel to inherit it.
    problem = only_problem('[defaults]\nencap_limit = -1\n' + SEED_A)
    assert (problem.field, problem.line) == ("defaults.encap_limit", 2)


def test_keepalive_false_opts_one_tunnel_out_of_the_default() -> None:
    text = '[defaults.keepalive]\ninterval = "2s"\n' + SEED_A + \
        SEED_A.replace("My_Tunnel", "Quiet").replace("1.2", "1.3") + "keepalive = false\n"
    probed, quiet = load_config_text(text).tunnels
    assert probed.keepalive == KeepaliveConfig(interval=2.0)
    assert quiet.keepalive is None


def test_keepalive_false_in_defaults_and_a_table_in_one_tunnel() -> None:
    text = "[defaults]\nkeepalive = false\n" + SEED_A + "[tunnel.keepalive]\nretries = 5\n"
    [tunnel] = load_config_text(text).tunnels
    assert tunnel.keepalive == KeepaliveConfig(retries=5)


# --- what the kernel would refuse or misread, accepted where it is fine (review M7) -------------------------


def test_a_backup_tunnel_carries_the_same_routes_with_another_metric() -> None:
    text = SEED_A + 'routes = ["20.10.1.0/24", "2001:db8::/32"]\n' + \
        SEED_A.replace("My_Tunnel", "Backup").replace("1.2", "1.3") + \
        'routes = ["20.10.1.0/24", "2001:db8::/32"]\nmetric = 10\n' + \
        SEED_A.replace("My_Tunnel", "Other_Table").replace("1.2", "1.4") + \
        'routes = ["20.10.1.0/24"]\ntable = 100\n' + \
        SEED_A.replace("My_Tunnel", "Old").replace("1.2", "1.5") + 'routes = ["20.10.1.0/24"]\nenabled = false\n'
    assert [t.name for t in load_config_text(text).tunnels] == ["My_Tunnel", "Backup", "Other_Table", "Old"]


def test_a_default_route_into_the_tunnel_is_fine_in_a_table_of_its_own() -> None:
    # Selected by an `ip rule` for the LAN: the GRE packets themselves still find the underlay in main.
    [tunnel] = load_config_text(SEED_A + 'routes = ["0.0.0.0/0"]\ntable = 100\n').tunnels
    assert tunnel.routes == [ipaddress.ip_network("0.0.0.0/0")]


@pytest.mark.parametrize(("mode", "key", "highest"), [
    ("gre", "", 65511), ("gre", "okey = 1", 65507), ("gre", "ikey = 1", 65511), ("gretap", "", 65497),
    ("ip6gre", "key = 1", 65527), ("ip6gretap", "", 65455)])
def test_mtu_may_reach_what_the_kernel_allows_for_the_mode(mode: str, key: str, highest: int) -> None:
    base = SEED_A6.replace('"ip6gre"', f'"{mode}"') if mode.startswith("ip6") else SEED_A + f'mode = "{mode}"\n'
    [tunnel] = load_config_text(base + f"{key}\nmtu = {highest}\n").tunnels
    assert tunnel.mtu == highest
    problem = only_problem(base + f"{key}\nmtu = {highest + 1}\n")
    assert problem.field == "tunnel[0].mtu" and f"at most {highest}" in problem.message


def test_a_tos_is_a_dscp_times_four() -> None:
    [tunnel] = load_config_text(SEED_A + "tos = 184\n").tunnels  # EF
    assert tunnel.tos == 184
    assert "the nearest: 184" in only_problem(SEED_A + "tos = 186\n").message


@pytest.mark.parametrize("name", ["gre0", "gretap0", "erspan0", "ip6gre0", "ip6tnl0", "tunl0", "sit0", "ip_vti0",
                                  "ip6_vti0", "all", "default"])
def test_names_the_kernel_uses_itself_are_refused(name: str) -> None:
    problem = only_problem(SEED_A.replace("My_Tunnel", name))
    assert problem.field == "tunnel[0].name" and "another name" in problem.message


def test_answer_kernel_from_defaults_without_forwarding_points_at_the_default() -> None:
    text = '[daemon]\nip_forward = false\n[defaults.keepalive]\nanswer = "kernel"\n' + SEED_A
    problem = only_problem(text)
    assert (problem.line, problem.field) == (4, "defaults.keepalive.answer")


# --- read without validating: the CLI's way to the daemon while the config is half-edited (review M10) -----


def test_daemon_paths_are_read_from_a_config_that_does_not_validate(tmp_path: Path) -> None:
    main = tmp_path / "tunnels.toml"
    main.write_text('[daemon]\ncontrol_socket = "/run/a.sock"\nstate_dir = "/srv/greupd"\n[[tunnel]]\nname = 1\n')
    (tmp_path / "tunnels.d").mkdir()
    (tmp_path / "tunnels.d" / "b.toml").write_text('[daemon]\ncontrol_socket = "/run/b.sock"\n')
    (tmp_path / "tunnels.d" / "c.toml").write_text('[daemon\ncontrol_socket = "/run/c.sock"\n')  # no TOML

    assert read_daemon_table(main) == {"control_socket": "/run/b.sock", "state_dir": "/srv/greupd"}
    assert unvalidated_path(main, "control_socket", Path("/x")) == Path("/run/b.sock")
    assert unvalidated_path(main, "state_dir", Path("/x")) == Path("/srv/greupd")
    assert unvalidated_path(main, "nft_table", Path("/x")) == Path("/x")  # not a path: the default
    assert unvalidated_path(tmp_path / "nowhere" / "tunnels.toml", "control_socket", Path("/x")) == Path("/x")


def test_a_config_kept_as_text_loads_under_its_own_file_names(tmp_path: Path) -> None:
    config = load_config(CONFIGS / "dropins" / "tunnels.toml")
    assert [file for file, _ in config.sources] == list(config.files)
    assert load_config_sources(config.sources) == config
    with pytest.raises(ConfigError) as caught:
        load_config_sources([(Path("/etc/greupd/tunnels.toml"), SEED_A + "ttl = 0\n")])
    assert str(caught.value).startswith("/etc/greupd/tunnels.toml:6: tunnel[0].ttl: ")


# --- drop-ins ------------------------------------------------------------------------------------------


def test_dropins_are_read_in_name_order_and_only_toml_files() -> None:
    main = CONFIGS / "dropins" / "tunnels.toml"
    dropins = main.parent / "tunnels.d"

    assert config_files(main) == [main, dropins / "10-backup.toml", dropins / "20-stop.toml"]
    assert load_config(main).files == tuple(config_files(main))


def test_dropins_merge_daemon_and_defaults_key_by_key_and_append_tunnels() -> None:
    config = load_config(CONFIGS / "dropins" / "tunnels.toml")

    # [daemon]: on_exit from 20-stop.toml overrides the main file; ip_forward stays from the main file.
    assert config.daemon == DaemonConfig(ip_forward=True, on_exit="remove")
    # [[tunnel]]: appended, main file first.
    assert [t.name for t in config.tunnels] == ["My_Tunnel", "Backup"]
    primary, backup = config.tunnels
    # [defaults.keepalive]: retries from 10-backup.toml, interval from the main file, for every tunnel.
    assert primary.keepalive == backup.keepalive == KeepaliveConfig(interval=1.0, retries=5)
    assert backup.key == 42
    assert (primary.routes, primary.metric, backup.metric) == (backup.routes, 0, 10)


def test_no_tunnels_d_directory_means_just_the_main_file(tmp_path: Path) -> None:
    main = tmp_path / "tunnels.toml"
    main.write_text(SEED_A)
    assert config_files(main) == [main]
    assert load_config(main).files == (main,)


def test_an_error_in_a_dropin_names_that_file_and_its_line() -> None:
    broken = CONFIGS / "broken-dropin" / "tunnels.d" / "50-backup.toml"
    [problem] = problems_of(CONFIGS / "broken-dropin" / "tunnels.toml")
    assert problem.file == broken
    assert problem.line == expected_of_dropin(broken)
    assert problem.field == "tunnel[0].keepalive.interval"
    assert "'5 parsecs' is not a duration" in problem.message


def expected_of_dropin(path: Path) -> int:
    return next(n for n, line in enumerate(path.read_text().split("\n"), start=1) if line.endswith("# <- here"))


def test_duplicate_names_across_files_name_both(tmp_path: Path) -> None:
    (tmp_path / "tunnels.d").mkdir()
    (tmp_path / "tunnels.toml").write_text(SEED_A)
    (tmp_path / "tunnels.d" / "b.toml").write_text(SEED_A.replace("172.19.1.2", "172.19.1.3"))
    [problem] = problems_of(tmp_path / "tunnels.toml")
    assert (problem.file, problem.line, problem.field) == (tmp_path / "tunnels.d" / "b.toml", 3, "tunnel[0].name")
    assert f"already used by tunnel[0] ({tmp_path / 'tunnels.toml'})" in problem.message


def test_a_bad_default_in_a_dropin_points_at_the_dropin(tmp_path: Path) -> None:
    (tmp_path / "tunnels.d").mkdir()
    (tmp_path / "tunnels.toml").write_text("[defaults]\nttl = 64\n" + SEED_A)
    (tmp_path / "tunnels.d" / "ttl.toml").write_text("\n[defaults]\nttl = 0\n")
    [problem] = problems_of(tmp_path / "tunnels.toml")
    assert (problem.file, problem.line, problem.field) == (tmp_path / "tunnels.d" / "ttl.toml", 3, "defaults.ttl")


def test_a_daemon_error_points_at_the_file_that_set_the_key(tmp_path: Path) -> None:
    (tmp_path / "tunnels.d").mkdir()
    (tmp_path / "tunnels.toml").write_text('[daemon]\non_exit = "nuke"\n')
    (tmp_path / "tunnels.d" / "a.toml").write_text("[daemon]\nip_forward = true\n")
    [problem] = problems_of(tmp_path / "tunnels.toml")
    assert (problem.file, problem.line, problem.field) == (tmp_path / "tunnels.toml", 2, "daemon.on_exit")


def test_an_unreadable_or_missing_file_is_a_config_error(tmp_path: Path) -> None:
    [problem] = problems_of(tmp_path / "nope.toml")
    assert problem.file == tmp_path / "nope.toml"
    assert "cannot read" in problem.message


def test_a_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "tunnels.toml").write_bytes(b"# caf\xe9\n")
    [problem] = problems_of(tmp_path / "tunnels.toml")
    assert "not UTF-8" in problem.message


# --- broken configs: each names file, line and field ---------------------------------------------------


def test_there_are_enough_broken_configs() -> None:
    assert len(BROKEN) >= 20


@pytest.mark.parametrize("path", BROKEN, ids=[p.stem for p in BROKEN])
def test_broken_config_reports_file_line_field_and_message(path: Path) -> None:
    expected = expected_of(path)
    problems = problems_of(path)

    assert len(problems) == expected.problems, "\n".join(map(str, problems))
    [problem] = [p for p in problems if p.field == expected.field]
    assert problem.file == path
    assert problem.line == expected.line, str(problem)
    assert expected.error in problem.message
    assert str(problem).startswith(f"{path}:{expected.line}: ")
    for other in problems:
        assert other.file == path and other.line is not None and other.message


def test_several_errors_in_one_file_are_reported_together_in_reading_order() -> None:
    text = """[daemon]
on_exit = "delete"

[[tunnel]]
name = "My_Tunnel"
local = "172.19.1.1"
remote = "172.19.1.2"
ttl = 300
tos = 999

[tunnel.keepalive]
intervall = 1

[[tunnel]]
name = "Backup"
local = "172.19.2.1"
remote = "172.19.2.300"
"""
    with pytest.raises(ConfigError) as caught:
        load_config_text(text, Path("/etc/greupd/tunnels.toml"))

    assert [(p.line, p.field) for p in caught.value.problems] == [
        (2, "daemon.on_exit"),
        (8, "tunnel[0].ttl"),
        (9, "tunnel[0].tos"),
        (12, "tunnel[0].keepalive.intervall"),
        (17, "tunnel[1].remote"),
    ]
    assert str(caught.value).splitlines()[1] == (
        '/etc/greupd/tunnels.toml:8: tunnel[0].ttl: ttl must be 1..255 or "inherit", not 300')


def test_a_bad_default_inherited_by_many_tunnels_is_reported_once() -> None:
    text = "[defaults]\nttl = 300\n" + SEED_A + SEED_A.replace("My_Tunnel", "B").replace("1.2", "1.3")
    problem = only_problem(text)
    assert (problem.line, problem.field) == (2, "defaults.ttl")


def test_a_default_that_breaks_a_rule_across_keys_points_at_the_tunnel_key() -> None:
    # mode comes from [defaults] and is fine there; the tunnel's IPv4 local is what does not fit.
    problem = only_problem('[defaults]\nmode = "ip6gre"\n' + SEED_A)
    assert (problem.line, problem.field) == (6, "tunnel[0].local")
    assert "mode ip6gre needs IPv6" in problem.message


def test_a_syntax_error_at_the_end_of_the_document_names_the_last_line() -> None:
    problem = only_problem(SEED_A + 'routes = ["20.10.1.0/24"')
    assert problem.message.startswith("TOML syntax: ")
    assert problem.line == len((SEED_A + "routes").split("\n"))


def test_lines_count_newlines_only_like_toml() -> None:
    # U+2028 inside a string must not shift the line numbers after it.
    problem = only_problem(SEED_A + 'mtu = 1400\n[tunnel.nat]\nfrom_tunnel = ["a\u2028b"]\n')
    assert (problem.line, problem.field) == (8, "tunnel[0].nat.from_tunnel[0]")


def test_huge_numbers_are_config_errors_not_crashes() -> None:
    problem = only_problem(SEED_A + "[tunnel.keepalive]\ninterval = " + "9" * 400 + "\n")
    assert problem.field == "tunnel[0].keepalive.interval"


def test_models_reject_bad_combinations_when_built_in_code_too() -> None:
    with pytest.raises(ValueError, match="same address"):
        TunnelConfig(name="t", local=ipaddress.IPv4Address("10.0.0.1"), remote=ipaddress.IPv4Address("10.0.0.1"))


def test_a_loaded_tunnel_survives_model_dump_and_validate() -> None:
    [tunnel] = load_config(EXAMPLE).tunnels
    assert TunnelConfig.model_validate(tunnel.model_dump()) == tunnel
