"""mtu = "probe" and [tunnel.mtu_probe] (issue #23): defaults, ranges, and what it needs."""

from __future__ import annotations

import pytest

from greupd.config import ConfigError, load_config_text
from greupd.keepalive.engine import targets_from_config

SEED = """
[[tunnel]]
name = "My_Tunnel"
local = "172.19.1.1"
remote = "172.19.1.2"
"""
KEEPALIVE = "\n[tunnel.keepalive]\ninterval = 1\n"


def problem(text: str) -> tuple[str, str]:
    with pytest.raises(ConfigError) as caught:
        load_config_text(text)
    [found] = caught.value.problems
    return found.field or "", found.message


def test_probe_with_defaults() -> None:
    [tunnel] = load_config_text(SEED + 'mtu = "probe"\n' + KEEPALIVE).tunnels
    assert tunnel.mtu == "probe"
    assert (tunnel.mtu_probe_settings.every, tunnel.mtu_probe_settings.floor) == (600.0, 1200)
    assert tunnel.mtu_probe_settings.timeout == 1.0


def test_probe_settings_as_written() -> None:
    text = SEED + 'mtu = "probe"\n' + KEEPALIVE + '\n[tunnel.mtu_probe]\nevery = "30m"\nfloor = 1280\n'
    text += 'timeout = "300ms"\n'
    [tunnel] = load_config_text(text).tunnels
    assert tunnel.mtu_probe is not None and (tunnel.mtu_probe.every, tunnel.mtu_probe.floor) == (1800.0, 1280)
    assert tunnel.mtu_probe.timeout == 0.3


def test_a_number_still_works_and_other_words_name_the_choices() -> None:
    [tunnel] = load_config_text(SEED + "mtu = 1400\n").tunnels
    assert tunnel.mtu == 1400
    field, message = problem(SEED + 'mtu = "measure"\n')
    assert field == "tunnel[0].mtu" and '"probe"' in message and "68..65535" in message


def test_mtu_probe_without_probe_is_refused() -> None:
    field, message = problem(SEED + "mtu = 1400\n[tunnel.mtu_probe]\nfloor = 1300\n")
    assert field == "tunnel[0].mtu_probe" and 'mtu = "probe"' in message


def test_probe_needs_keepalives() -> None:
    field, message = problem(SEED + 'mtu = "probe"\n')
    assert field == "tunnel[0].mtu" and "[tunnel.keepalive]" in message


IP6GRE = SEED.replace('"172.19.1.1"', '"2001:db8::1"').replace('"172.19.1.2"', '"2001:db8::2"') + 'mode = "ip6gre"\n'


@pytest.mark.parametrize(("extra", "encap_option"), [("", True), ('encap_limit = "none"\n', False)])
def test_probe_on_ip6gre_measures_with_gre6_keepalives(extra: str, encap_option: bool) -> None:
    config = load_config_text(IP6GRE + extra + 'mtu = "probe"\n' + KEEPALIVE + "\n[tunnel.mtu_probe]\nfloor = 1280\n")
    [target] = targets_from_config(config)
    assert target.mtu_probe == (1280, 600.0, 1.0)
    assert target.encap_option is encap_option  # the link's 8-byte option counts in the probe's padding


def test_probe_on_ip6gre_needs_keepalives_too() -> None:
    field, message = problem(IP6GRE + 'mtu = "probe"\n')
    assert field == "tunnel[0].mtu" and "[tunnel.keepalive]" in message


@pytest.mark.parametrize("mode", ["gretap", "ip6gretap"])
def test_probe_on_the_ethernet_modes_is_refused(mode: str) -> None:
    text = SEED if mode == "gretap" else IP6GRE.replace('mode = "ip6gre"', "")
    field, message = problem(text + f'mode = "{mode}"\nmtu = "probe"\n')
    assert field == "tunnel[0].mtu" and "modes gre and ip6gre" in message


def test_an_ip6gre_floor_above_what_the_kernel_allows_is_refused() -> None:
    field, message = problem(IP6GRE + 'mtu = "probe"\n' + KEEPALIVE + "\n[tunnel.mtu_probe]\nfloor = 65535\n")
    assert field == "tunnel[0].mtu_probe" and "at most" in message and "ip6gre" in message


@pytest.mark.parametrize(("key", "value", "words"), [
    ("every", '"9s"', "10..86400"), ("every", '"25h"', "10..86400"), ("timeout", '"20ms"', "0.05..10"),
    ("timeout", "11", "0.05..10"), ("floor", "500", "576..65535"),
    ("floor", "65535", "at most 65511"), ("floor", '"low"', "576..65535")])
def test_mtu_probe_ranges(key: str, value: str, words: str) -> None:
    field, message = problem(SEED + 'mtu = "probe"\n' + KEEPALIVE + f"\n[tunnel.mtu_probe]\n{key} = {value}\n")
    assert field.startswith("tunnel[0].mtu_probe") and words in message


def test_unknown_key_in_mtu_probe() -> None:
    field, _ = problem(SEED + 'mtu = "probe"\n' + KEEPALIVE + "\n[tunnel.mtu_probe]\nevry = \"10m\"\n")
    assert field == "tunnel[0].mtu_probe.evry"
