"""mtu = "probe" and [tunnel.mtu_probe] (issue #23): defaults, ranges, and what it needs."""

from __future__ import annotations

import pytest

from greupd.config import ConfigError, load_config_text

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


def test_probe_on_ip6gre_is_refused_for_now() -> None:
    text = SEED.replace('"172.19.1.1"', '"2001:db8::1"').replace('"172.19.1.2"', '"2001:db8::2"')
    field, message = problem(text + 'mode = "ip6gre"\nmtu = "probe"\n')
    assert field == "tunnel[0].mtu" and "mode gre only" in message


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
