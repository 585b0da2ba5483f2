"""state_dir: router A keeps the config that last applied cleanly, and starts from it when tunnels.toml breaks.

The story: A runs the seed's tunnel; an admin leaves tunnels.toml half-edited; the package upgrade restarts
greupd. It must come back with the tunnel it had, say why, and refuse only when there is nothing good to run.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

import greupd.state as state_module
from greupd.config import DEFAULT_STATE_DIR, load_config
from greupd.state import (
    KEEPALIVE,
    LAST_GOOD,
    KeepaliveVerdict,
    StartRefused,
    StateDir,
    StateError,
    endpoints_of,
    start_config,
    state_dir_for,
)

SEED_A = """[[tunnel]]
name = "My_Tunnel"
local = "172.19.1.1"
remote = "172.19.1.2"
routes = ["20.10.1.0/24"]
"""
BACKUP = """[[tunnel]]
name = "Backup"
local = "172.19.2.1"
remote = "172.19.2.2"
routes = ["20.10.1.0/24"]
metric = 10
"""
HALF_EDITED = SEED_A.replace('remote = "172.19.1.2"', 'remote = "172.19.1.')


@pytest.fixture
def etc(tmp_path: Path) -> Path:
    """/etc/greupd of router A: tunnels.toml and one drop-in."""
    (tmp_path / "etc" / "tunnels.d").mkdir(parents=True)
    (tmp_path / "etc" / "tunnels.toml").write_text(SEED_A)
    (tmp_path / "etc" / "tunnels.d" / "10-backup.toml").write_text(BACKUP)
    return tmp_path / "etc" / "tunnels.toml"


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {"GREUPD_STATE_DIR": str(tmp_path / "state")}


def test_the_state_dir_comes_from_the_environment_then_the_config_then_the_default(etc: Path) -> None:
    assert state_dir_for(etc, {}) == DEFAULT_STATE_DIR
    etc.write_text('[daemon]\nstate_dir = "/srv/greupd"\n' + HALF_EDITED)  # read although it does not validate
    assert state_dir_for(etc, {}) == Path("/srv/greupd")
    assert state_dir_for(etc, {"STATE_DIRECTORY": "/var/lib/greupd:/var/lib/other"}) == Path("/var/lib/greupd")
    assert state_dir_for(etc, {"STATE_DIRECTORY": "/var/lib/greupd", "GREUPD_STATE_DIR": "/lab/a"}) == Path("/lab/a")


def test_a_valid_config_starts_as_it_is(etc: Path, env: dict[str, str]) -> None:
    start = start_config(etc, env)
    assert start.config == load_config(etc)
    assert (start.rejected, start.kept, start.rejection()) == (None, None, None)


def test_a_broken_config_starts_the_last_good_one_and_says_why(etc: Path, env: dict[str, str]) -> None:
    good = start_config(etc, env)
    good.state.save_last_good(etc, good.config)
    etc.write_text(HALF_EDITED)

    start = start_config(etc, env)

    assert start.config == good.config
    assert [t.name for t in start.config.tunnels] == ["My_Tunnel", "Backup"]
    assert start.config.files == good.config.files  # the original names, tunnels.d included
    assert start.rejected is not None and str(start.rejected).startswith(f"{etc}:4: ")
    why = start.rejection()
    assert why is not None and why.startswith("config rejected at start, running the last good config (saved ")
    assert f"{etc}:4: " in why


def test_with_no_last_good_config_the_start_is_refused_with_file_line_field(etc: Path, env: dict[str, str]) -> None:
    etc.write_text(SEED_A + "ttl = 0\n")
    with pytest.raises(StartRefused) as refused:
        start_config(etc, env)
    [problem] = refused.value.rejected.problems
    assert (problem.file, problem.line, problem.field) == (etc, 6, "tunnel[0].ttl")
    assert refused.value.why.startswith("no last good config to start with instead")


def test_another_configs_last_good_is_not_started(etc: Path, env: dict[str, str], tmp_path: Path) -> None:
    # `greupd run -c /tmp/try.toml` beside the real daemon must not start the real daemon's tunnels.
    good = start_config(etc, env)
    good.state.save_last_good(etc, good.config)
    trial = tmp_path / "try.toml"
    trial.write_text(HALF_EDITED)
    with pytest.raises(StartRefused) as refused:
        start_config(trial, env)
    assert f"is {etc}'s, not {trial}'s" in refused.value.why


def test_a_last_good_config_that_this_greupd_rejects_refuses_the_start_naming_both(
        etc: Path, env: dict[str, str]) -> None:
    # Saved by an older greupd that accepted a route covering the remote; this one checks more.
    state = StateDir(Path(env["GREUPD_STATE_DIR"]))
    state.path.mkdir()
    old = SEED_A.replace('["20.10.1.0/24"]', '["0.0.0.0/0"]')
    (state.path / LAST_GOOD).write_text(json.dumps({
        "format": 1, "config": str(etc), "saved": "2026-11-01T00:00:00Z", "files": [{"path": str(etc), "text": old}]}))
    etc.write_text(HALF_EDITED)
    with pytest.raises(StartRefused) as refused:
        start_config(etc, env)
    assert "the last good config (saved 2026-11-01T00:00:00Z) does not validate either" in refused.value.why
    assert f"{etc}:5: tunnel[0].routes[0]: route 0.0.0.0/0 in table main" in refused.value.why


def _break_nested(etc: Path) -> str:
    etc.write_text(SEED_A.replace('routes = ["20.10.1.0/24"]', "routes = " + "[" * 500 + "]" * 500))
    return f"{etc}:5: arrays or tables nested 500 deep"


def _break_fifo(etc: Path) -> str:
    etc.unlink()
    os.mkfifo(etc)  # nobody writes to it: an open() without O_NONBLOCK would block the start forever
    return f"{etc}: is a FIFO (named pipe), not a regular file"


def _break_dangling_dropin(etc: Path) -> str:
    (etc.parent / "tunnels.d" / "10-backup.toml").unlink()
    (etc.parent / "tunnels.d" / "10-backup.toml").symlink_to("/nonexistent")
    return f"{etc.parent / 'tunnels.d' / '10-backup.toml'}: a symlink to /nonexistent, which does not exist"


def _break_dropin_dir(etc: Path) -> str:
    dropins = etc.parent / "tunnels.d"
    (dropins / "10-backup.toml").unlink()
    dropins.rmdir()
    dropins.symlink_to("tunnels.d")  # a loop: ELOOP even for root
    return f"{dropins}: cannot list the drop-in directory: Too many levels of symbolic links"


@pytest.mark.parametrize("breaking", [_break_nested, _break_fifo, _break_dangling_dropin, _break_dropin_dir],
                         ids=["nested-toml", "fifo", "dangling-dropin", "dropin-dir-loop"])
def test_a_config_that_cannot_be_read_starts_the_last_good_one(
        etc: Path, env: dict[str, str], breaking: Callable[[Path], str]) -> None:
    # newcomer-3 N2, N6, N11, review H2: each of these crashed the start, blocked it, or started without Backup.
    good = start_config(etc, env)
    good.state.save_last_good(etc, good.config)
    said = breaking(etc)
    start = start_config(etc, env)
    assert [t.name for t in start.config.tunnels] == ["My_Tunnel", "Backup"]
    assert start.rejected is not None and str(start.rejected).startswith(said)


def test_an_error_load_config_does_not_foresee_still_starts_the_last_good_one(
        etc: Path, env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    good = start_config(etc, env)
    good.state.save_last_good(etc, good.config)

    def unforeseen(path: Path) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(state_module, "load_config", unforeseen)
    start = start_config(etc, env)
    assert start.config == good.config
    assert str(start.rejected) == f"{etc}: cannot load: [Errno 13] Permission denied: '{etc}'"


@pytest.mark.parametrize("content", ["", "{", "[]", '{"format": 1}', '{"format": 1, "config": "/x", "files": []}',
                                     '{"format": 99}'])
def test_a_damaged_last_good_file_is_an_error_not_a_start(etc: Path, env: dict[str, str], content: str) -> None:
    state = Path(env["GREUPD_STATE_DIR"])
    state.mkdir()
    (state / LAST_GOOD).write_text(content)
    etc.write_text(HALF_EDITED)
    with pytest.raises(StartRefused) as refused:
        start_config(etc, env)
    assert refused.value.why.startswith("and the last good config cannot be used: ")
    assert str(state / LAST_GOOD) in refused.value.why


def test_saving_replaces_the_file_whole_and_leaves_nothing_else(etc: Path, tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state" / "deeper")
    config = load_config(etc)
    state.save_last_good(etc, config)
    etc.write_text(SEED_A)  # the backup drop-in stays; a second save replaces the first
    state.save_last_good(etc, load_config(etc))

    assert sorted(p.name for p in state.path.iterdir()) == [LAST_GOOD]  # no temporary files left behind
    assert stat.S_IMODE(os.stat(state.path).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(state.path / LAST_GOOD).st_mode) == 0o600
    kept = state.last_good()
    assert kept is not None and kept.config_path == etc
    assert [text for _, text in kept.files] == [SEED_A, BACKUP]


def test_an_unwritable_state_dir_is_a_state_error(etc: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(StateError, match=r"cannot write .*file/last-good.json: "):
        StateDir(tmp_path / "file").save_last_good(etc, load_config(etc))


# --- keepalive verdicts: kept for a restart (H3 groundwork) ---------------------------------------------------


def test_verdicts_survive_a_restart_of_the_same_boot(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    assert state.verdicts() == {}
    dead = KeepaliveVerdict(False, "2026-11-28T06:00:00Z", endpoints_of("172.19.1.1", "172.19.1.2", None))
    alive = KeepaliveVerdict(True, "2026-11-28T05:00:00Z", endpoints_of("172.19.2.1", "172.19.2.2", 42))
    state.save_verdicts({"My_Tunnel": dead, "Backup": alive})

    assert state.verdicts() == {"My_Tunnel": dead, "Backup": alive}
    assert dead.endpoints == "172.19.1.1>172.19.1.2 key -" and alive.endpoints.endswith("key 42")


def test_verdicts_of_an_earlier_boot_are_not_used(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    state.save_verdicts({"My_Tunnel": KeepaliveVerdict(False, "2026-11-28T06:00:00Z", "a>b key -")})
    document = json.loads((state.path / KEEPALIVE).read_text())
    document["boot_id"] = "an-earlier-boot"
    (state.path / KEEPALIVE).write_text(json.dumps(document))

    assert state.verdicts() == {}
    assert list(state.verdicts(this_boot_only=False)) == ["My_Tunnel"]
