"""What `greupd check` says about values that are almost right (newcomer-3 N16, N17): an hour written "1h", and two
tunnels that share an inner peer or subnet, which the kernel takes but cannot route as meant."""

from __future__ import annotations

from pathlib import Path

import pytest

from greupd.cli import main
from greupd.config import ConfigError, load_config_text

SEED_A = """[[tunnel]]
name = "My_Tunnel"
local = "172.19.1.1"
remote = "172.19.1.2"
address = "192.168.8.1"
peer = "192.168.8.11"
routes = ["20.10.1.0/24"]
"""
# A second tunnel to C, made from A's by a copy and an edit that forgot the inner addresses.
TO_C = SEED_A.replace("My_Tunnel", "To_C").replace('remote = "172.19.1.2"', 'remote = "172.19.1.3"').replace(
    "20.10.1.0/24", "20.10.2.0/24")


def only_problem(text: str) -> str:
    with pytest.raises(ConfigError) as raised:
        load_config_text(text)
    [problem] = raised.value.problems
    return f"{problem.field}: {problem.message}"


@pytest.mark.parametrize(("written", "seconds"), [('"1h"', 3600.0), ('"0.5h"', 1800.0), ('"60m"', 3600.0)])
def test_an_interval_in_hours_within_the_maximum_is_accepted(written: str, seconds: float) -> None:
    [tunnel] = load_config_text(SEED_A + f"[tunnel.keepalive]\ninterval = {written}\n").tunnels
    assert tunnel.keepalive is not None and tunnel.keepalive.interval == seconds


def test_an_interval_over_the_maximum_names_it_in_hours() -> None:
    assert only_problem(SEED_A + '[tunnel.keepalive]\ninterval = "2h"\n') == (
        "tunnel[0].keepalive.interval: interval must be 0.05..3600 seconds (\"50ms\"..\"1h\"), not '2h'")


def test_a_dpd_delay_over_the_maximum_names_it_in_hours(tmp_path: Path) -> None:
    psk = tmp_path / "psk"
    psk.write_text("a-pre-shared-key\n")
    psk.chmod(0o600)
    assert only_problem(SEED_A + f'[tunnel.ipsec]\npsk_file = "{psk}"\ndpd_delay = "2h"\n') == (
        "tunnel[0].ipsec.dpd_delay: dpd_delay must be 1..3600 seconds (\"1s\"..\"1h\"), not '2h'")


def test_a_word_that_is_no_duration_lists_the_units() -> None:
    assert only_problem(SEED_A + '[tunnel.keepalive]\ninterval = "1 day"\n').endswith(
        "not a duration: seconds, or a string such as \"300ms\", \"2s\", \"1m\", \"1h\"")


def test_two_tunnels_with_the_same_peer_validate_with_a_warning_on_the_second() -> None:
    config = load_config_text(SEED_A + TO_C)
    assert [t.name for t in config.tunnels] == ["My_Tunnel", "To_C"]
    [warning] = config.warnings
    assert (warning.line, warning.field) == (13, "tunnel[1].peer")
    assert warning.message.startswith("peer 192.168.8.11 is also tunnel 'My_Tunnel''s: the kernel accepts both,"
                                      " but reaches it through one of the two devices only")


def test_two_tunnels_in_the_same_inner_subnet_get_a_warning() -> None:
    subnet = SEED_A.replace('address = "192.168.8.1"\npeer = "192.168.8.11"\n', 'address = "192.168.8.1/30"\n')
    config = load_config_text(subnet + subnet.replace("My_Tunnel", "To_C").replace(".1.2", ".1.3").replace(
        "20.10.1.0", "20.10.2.0").replace("192.168.8.1/30", "192.168.8.2/30"))
    assert [(w.field, w.message.split(":")[0]) for w in config.warnings] == [
        ("tunnel[1].address", "inner network 192.168.8.0/30 (address 192.168.8.2/30) is also tunnel 'My_Tunnel''s")]


def test_the_same_local_address_with_other_peers_is_unnumbered_and_fine() -> None:
    other_peer = TO_C.replace("192.168.8.11", "192.168.8.12")
    assert load_config_text(SEED_A + other_peer).warnings == ()
    assert load_config_text(SEED_A + TO_C.replace("[[tunnel]]", "[[tunnel]]\nenabled = false")).warnings == ()


def test_greupd_check_prints_the_warning_and_still_says_valid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) \
        -> None:
    config = tmp_path / "tunnels.toml"
    config.write_text(SEED_A + TO_C)
    assert main(["check", str(config)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"{config}: valid\n")
    assert err.startswith(f"warning: {config}:13: tunnel[1].peer: peer 192.168.8.11 is also tunnel 'My_Tunnel''s")
