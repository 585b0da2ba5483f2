"""[tunnel.bfd], [tunnel.dampening] and keepalive hold: what validates, and the file:line:field errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from greupd.config import ConfigError, load_config_text

BASE = """[[tunnel]]
name = "t1"
local = "192.0.2.1"
remote = "192.0.2.2"
address = "10.0.0.1"
peer = "10.0.0.2"
"""


def error_of(extra: str, base: str = BASE) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config_text(base + extra)
    return str(caught.value)


def test_bfd_defaults_are_frr_s() -> None:
    bfd = load_config_text(BASE + "[tunnel.bfd]\n").tunnels[0].bfd
    assert bfd is not None and (bfd.interval, bfd.multiplier, bfd.passive, bfd.auth_file) == (0.3, 3, False, None)


@pytest.mark.parametrize("mode", ["gre", "ip6gre", "gretap", "ip6gretap"])
def test_bfd_is_allowed_on_every_mode(mode: str) -> None:
    six = mode.startswith("ip6")
    text = (f'[[tunnel]]\nname = "t1"\nmode = "{mode}"\nlocal = "{"2001:db8::1" if six else "192.0.2.1"}"\n'
            f'remote = "{"2001:db8::2" if six else "192.0.2.2"}"\naddress = "fd00::1"\npeer = "fd00::2"\n'
            '[tunnel.bfd]\ninterval = "100ms"\n')
    assert load_config_text(text).tunnels[0].bfd is not None


def test_bfd_needs_address_and_peer() -> None:
    text = '[[tunnel]]\nname = "t1"\nlocal = "192.0.2.1"\nremote = "192.0.2.2"\n[tunnel.bfd]\n'
    assert error_of("", text) == ("<string>:5: tunnel[0].bfd: [tunnel.bfd] runs between the tunnel's address and"
                                  " peer (RFC 5881 single hop, through the tunnel): give both")


@pytest.mark.parametrize(("extra", "line", "field", "words"), [
    ('[tunnel.bfd]\ninterval = "10ms"\n', 8, "bfd.interval", "50ms..60s"),
    ("[tunnel.bfd]\nmultiplier = 0\n", 8, "bfd.multiplier", "1..255"),
    ('[tunnel.bfd]\nauth_file = "relative"\n', 8, "bfd.auth_file", "relative path"),
    ('[tunnel.bfd]\nauth_file = "/nonexistent/key"\n', 8, "bfd.auth_file", "cannot read"),
    ("[tunnel.bfd]\necho = true\n", 8, "bfd.echo", ""),
    ('[tunnel.keepalive]\naction = "link"\n[tunnel.bfd]\n', 8, "keepalive.action", "cannot go with"),
    ("[tunnel.dampening]\n", 7, "dampening", "[tunnel.keepalive] or [tunnel.bfd]"),
    ("[tunnel.bfd]\n[tunnel.dampening]\nreuse = 2500\n", 9, "dampening.reuse", "below suppress"),
    ('[tunnel.bfd]\n[tunnel.dampening]\nmax_hold = "30s"\n', 9, "dampening.max_hold", "never reached"),
    ('[tunnel.keepalive]\ninterval = "1s"\nhold = "5s"\nretries = 5\n', 9, "keepalive.hold", "not both"),
    ('[tunnel.keepalive]\ninterval = "10s"\nhold = "5s"\n', 9, "keepalive.hold", "shorter than the interval"),
    ('[tunnel.keepalive]\ninterval = "50ms"\nhold = "1h"\n', 9, "keepalive.hold", "256 intervals"),
])
def test_errors_name_file_line_and_field(extra: str, line: int, field: str, words: str) -> None:
    message = error_of(extra)
    assert message.startswith(f"<string>:{line}: tunnel[0].{field}"), message
    assert words in message


def test_hold_is_counted_in_probes() -> None:
    keepalive = load_config_text(BASE + '[tunnel.keepalive]\ninterval = "1s"\nhold = "5s"\n').tunnels[0].keepalive
    # down 5 intervals after the last reply: the 4th probe after the one it answered is missed then
    assert keepalive is not None and (keepalive.hold, keepalive.retries) == (5.0, 4)
    keepalive = load_config_text(BASE + '[tunnel.keepalive]\ninterval = "2s"\nhold = "5s"\n').tunnels[0].keepalive
    assert keepalive is not None and keepalive.retries == 2  # down 6 s after the last reply
    keepalive = load_config_text(BASE + '[tunnel.keepalive]\ninterval = "2s"\nhold = "2s"\n').tunnels[0].keepalive
    assert keepalive is not None and keepalive.retries == 1  # the least: down 4 s after the last reply


def test_bfd_auth_file_is_a_key_file(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_bytes(b"0123456789abcdefghij\n")  # 20 bytes and the editor's line end
    key.chmod(0o600)
    bfd = load_config_text(BASE + f'[tunnel.bfd]\nauth_file = "{key}"\n').tunnels[0].bfd
    assert bfd is not None and bfd.auth_file == key
    key.write_bytes(b"0123456789abcdefghijk")
    assert "more than 20 bytes" in error_of(f'[tunnel.bfd]\nauth_file = "{key}"\n')
    key.chmod(0o644)
    assert "chmod 600" in error_of(f'[tunnel.bfd]\nauth_file = "{key}"\n')


def test_a_dumped_keepalive_with_hold_validates_again() -> None:
    from greupd.config.models import KeepaliveConfig
    keepalive = load_config_text(BASE + '[tunnel.keepalive]\ninterval = "1s"\nhold = "5s"\n').tunnels[0].keepalive
    assert keepalive is not None
    assert KeepaliveConfig.model_validate(keepalive.model_dump()) == keepalive
