"""Router A's IPsec key file: one owner that the daemon under greupd.service (user greupd) and root's `greupd check`
both accept (review M5, newcomer-3 High 1), and a reload that checks it again (review L4).

uid 65534 (nobody) stands in for the user greupd: the test host has no such user, so DAEMON_USER is pointed at
`nobody`, and the files are real files with real owners, read as root and as uid 65534 (setpriv).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from greupd.config import ConfigError, keyfiles, load_config, load_config_text
from tests.test_config_files import NOBODY, run_as

CONFIG = """[[tunnel]]
name = "My_Tunnel"
local = "172.19.1.1"
remote = "172.19.1.2"
routes = ["20.10.1.0/24"]

[tunnel.ipsec]
psk_file = "{psk}"
"""


@pytest.fixture
def unit_user_is_nobody(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keyfiles, "DAEMON_USER", "nobody")


@pytest.fixture
def psk_dir() -> Iterator[Path]:
    """/etc/greupd/psk: a folder uid 65534 can reach (pytest's tmp_path is under a 0700 folder of root's)."""
    folder = Path(tempfile.mkdtemp(prefix="greupd-psk-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder)


def key(folder: Path, owner: int, mode: int = 0o600) -> Path:
    path = folder / f"My_Tunnel.{owner}"
    path.write_text("a-pre-shared-key-of-32-characters\n")
    os.chown(path, owner, owner)
    path.chmod(mode)
    return path


def problems(psk: Path) -> list[str]:
    try:
        load_config_text(CONFIG.format(psk=psk))
    except ConfigError as exc:
        return [p.message for p in exc.problems]
    return []


@pytest.mark.needs_root
@pytest.mark.usefixtures("unit_user_is_nobody")
def test_root_accepts_the_key_the_unit_user_owns(psk_dir: Path) -> None:
    # What greupd.service needs, and what the package's postinst (`greupd check` as root) used to refuse with
    # "owned by uid 65534, not root: chown root".
    assert problems(key(psk_dir, NOBODY)) == []
    assert problems(key(psk_dir, 0)) == []  # a daemon run as root keeps its key as root's


@pytest.mark.needs_root
@pytest.mark.usefixtures("unit_user_is_nobody")
def test_a_key_of_another_user_is_refused_naming_both_owners(psk_dir: Path) -> None:
    psk = key(psk_dir, 1234)
    assert problems(psk) == [f"{psk} is owned by uid 1234: a key is root's or nobody's (the user greupd.service runs"
                             f" as): chown nobody {psk}"]


@pytest.mark.needs_root
@pytest.mark.usefixtures("unit_user_is_nobody")
def test_the_mode_is_checked_whoever_owns_the_key(psk_dir: Path) -> None:
    psk = key(psk_dir, NOBODY, 0o640)
    assert problems(psk) == [f"{psk} is readable or writable by others (mode 0640): chmod 600 {psk}"]


CHECK = """
import sys
from greupd.config import ConfigError, load_config_text
try:
    load_config_text(sys.argv[1])
    print("valid")
except ConfigError as exc:
    print(exc)
"""


@pytest.mark.needs_root
def test_the_unit_user_accepts_its_own_key_and_says_what_to_do_with_roots(psk_dir: Path) -> None:
    # As the daemon under greupd.service: uid 65534 here, with no user greupd on this host (DAEMON_USER stays).
    own = key(psk_dir, NOBODY)
    done = run_as(NOBODY, CHECK, CONFIG.format(psk=own))
    assert done.stdout == "valid\n", done.stderr
    roots = key(psk_dir, 0)
    done = run_as(NOBODY, CHECK, CONFIG.format(psk=roots))
    assert done.stdout == (f"<string>:8: tunnel[0].ipsec.psk_file: cannot read {roots} as uid {NOBODY}:"
                           f" greupd.service runs as user greupd, which must own the key: chown greupd {roots};"
                           f" chmod 600 {roots}\n"), done.stderr


def test_a_reload_checks_the_key_file_again(tmp_path: Path) -> None:
    # review L4: tunnels are cached by their text, so a key chmod'ed 644 after the start was loaded until a restart.
    psk = tmp_path / "My_Tunnel.psk"
    psk.write_text("a-pre-shared-key-of-32-characters\n")
    psk.chmod(0o600)
    config = tmp_path / "tunnels.toml"
    config.write_text(CONFIG.format(psk=psk))
    first = load_config(config)
    psk.chmod(0o644)
    with pytest.raises(ConfigError) as raised:
        load_config(config)
    [problem] = raised.value.problems
    assert (problem.file, problem.line, problem.field) == (config, 8, "tunnel[0].ipsec.psk_file")
    assert problem.message == f"{psk} is readable or writable by others (mode 0644): chmod 600 {psk}"
    psk.chmod(0o600)
    assert load_config(config) == first
