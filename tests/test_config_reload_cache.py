"""A reload of one tunnel among many: only the edited [[tunnel]] table is parsed and validated again.

config/loader.py keeps the pieces of the text it parsed (cut at each `[[tunnel]]` line) and the tunnels it validated;
what it gives must be exactly what parsing and validating the whole text gives, whatever the text.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from greupd.config import ConfigError, load_config, load_config_text
from greupd.config import loader as config

TWO_TUNNELS = """
[daemon]
ip_forward = false

[[tunnel]]
name = "to_b"
local = "172.19.1.1"
remote = "172.19.1.2"
routes = ["20.10.1.0/24"]

[tunnel.keepalive]
interval = 1.0

[[tunnel]]  # B's backup
name = "to_c"
local = "172.19.1.1"
remote = "172.19.1.3"
ttl = 64
"""

# Texts the cut must not change the meaning of: each is parsed in pieces and as a whole, and compared.
TRICKY = [
    TWO_TUNNELS,
    'description = """\n[[tunnel]]\nname = "x"\n"""\n',  # a cut inside a multi-line string
    'a = [\n1,\n]\n[[tunnel]]\nname = "x"\n[daemon]\nip_forward = false\n',  # a table after the tunnels
    '[daemon]\nx = 1\n[[tunnel]]\nname = "x"\n[daemon]\ny = 2\n',  # [daemon] twice: a TOML error as a whole
    'tunnel = []\n[[tunnel]]\nname = "x"\n',  # a static array appended to: a TOML error as a whole
    '[[tunnel]]\nname = "x"\n[tunnel.keepalive]\ninterval = 1\n[[tunnel]]\nname = "y"\n',
]


@pytest.mark.parametrize("text", TRICKY, ids=range(len(TRICKY)))
def test_pieces_parse_as_the_whole_text_does(text: str) -> None:
    try:
        whole = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        assert config._parse_in_pieces(text) is None  # the caller parses the whole and reports the error
        return
    assert config._parse_in_pieces(text) in (None, whole)


def test_a_reload_that_changes_one_ttl_revalidates_that_tunnel_only(tmp_path: Path) -> None:
    path = tmp_path / "tunnels.toml"
    path.write_text(TWO_TUNNELS)
    first = load_config(path)
    path.write_text(TWO_TUNNELS.replace("ttl = 64", "ttl = 100"))
    second = load_config(path)
    assert first.tunnels[0] is second.tunnels[0]  # to_b: the same validated object, not validated again
    assert (first.tunnels[1].ttl, second.tunnels[1].ttl) == (64, 100)
    assert second == load_config_text(path.read_text(), path)


def test_an_error_in_a_cached_config_still_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "tunnels.toml"
    path.write_text(TWO_TUNNELS)
    load_config(path)
    path.write_text(TWO_TUNNELS.replace("ttl = 64", "ttl = 300"))
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    (problem,) = raised.value.problems
    assert (problem.line, problem.field) == (TWO_TUNNELS.splitlines().index("ttl = 64") + 1, "tunnel[1].ttl")
