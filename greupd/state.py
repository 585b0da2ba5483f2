"""state_dir: what greupd keeps across its own restarts.

- `last-good.json`: the config that last applied cleanly, as the text of each file under its own name, so that
  `greupd run` with a config on disk that does not validate (a half-edited file, then a package upgrade that
  restarts the daemon) starts with it instead of leaving the tunnels unmanaged, and its errors still name
  tunnels.toml and the drop-ins. One JSON file, replaced with rename(2): a crash mid-write leaves the old copy.
  Read it with `jq -r '.files[] | .path, .text' /var/lib/greupd/last-good.json`.
- `keepalive.json`: keepalive verdicts (tunnel -> up/down and since when), so that a restart can keep a tunnel
  whose peer is dead down instead of re-installing its routes (review H3). The daemon saves it at every
  verdict flip and seeds the keepalive engine from it at start (greupd/keepalive/restart.py).

Where: $GREUPD_STATE_DIR, else $STATE_DIRECTORY (systemd's StateDirectory=), else `[daemon] state_dir` as the
config on disk writes it (read without validating: the config may be the broken one), else /var/lib/greupd.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from greupd.config import (
    DEFAULT_STATE_DIR,
    Config,
    ConfigError,
    ConfigProblem,
    load_config,
    load_config_sources,
    unvalidated_path,
)

LAST_GOOD = "last-good.json"
KEEPALIVE = "keepalive.json"
_FORMAT = 1
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


class StateError(Exception):
    """state_dir cannot be read or written; the message says which file and why."""


def state_dir_for(config_path: Path, environ: Mapping[str, str] = os.environ) -> Path:
    given = environ.get("GREUPD_STATE_DIR")
    if given:
        return Path(given)
    # systemd joins several StateDirectory= entries with ':'; greupd's unit has one.
    systemd = environ.get("STATE_DIRECTORY", "").split(":")[0]
    if systemd:
        return Path(systemd)
    return unvalidated_path(config_path, "state_dir", DEFAULT_STATE_DIR)


def _now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _boot_id() -> str | None:
    try:
        return _BOOT_ID.read_text().strip()
    except OSError:
        return None


@dataclass(frozen=True)
class LastGood:
    """A config kept as text: where it was read from, when it was saved, and each file's text."""

    config_path: Path
    saved: str
    files: tuple[tuple[Path, str], ...]

    def load(self) -> Config:
        return load_config_sources(self.files)


@dataclass(frozen=True)
class KeepaliveVerdict:
    """What a tunnel's keepalive last concluded, and for which endpoints (a changed remote voids it)."""

    up: bool
    since: str  # ISO 8601 UTC
    endpoints: str  # "local>remote key K": compare with endpoints_of(tunnel) before trusting the verdict


def endpoints_of(local: object, remote: object, key: int | None, ikey: int | None = None) -> str:
    """`key`: the output key (the one the peer checks); `ikey` is named too when it differs."""
    text = f"{local}>{remote} key {key if key is not None else '-'}"
    return text + (f" ikey {ikey}" if ikey is not None and ikey != key else "")


@dataclass(frozen=True)
class StateDir:
    path: Path

    # --- the last good config ---------------------------------------------------------------------------

    def save_last_good(self, config_path: Path, config: Config) -> None:
        """Keep `config` (as the texts it was validated from) as the one to start with if the file breaks."""
        if not config.sources:
            return  # built in code, not read from files: nothing to keep
        document = {"format": _FORMAT, "config": str(config_path.absolute()), "saved": _now_iso(),
                    "files": [{"path": str(file), "text": text} for file, text in config.sources]}
        self._write(LAST_GOOD, json.dumps(document, indent=1, ensure_ascii=False) + "\n")

    def last_good(self) -> LastGood | None:
        """The kept config, or None when there is none; StateError when the file is there but unusable."""
        document = self._read(LAST_GOOD)
        if document is None:
            return None
        try:
            files = tuple((Path(entry["path"]), entry["text"]) for entry in document["files"])
            if not files or not all(isinstance(text, str) for _, text in files):
                raise ValueError("no files")
            return LastGood(Path(document["config"]), str(document["saved"]), files)
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"{self.path / LAST_GOOD}: not a config kept by greupd ({exc})") from None

    # --- keepalive verdicts (H3) -------------------------------------------------------------------------

    def save_verdicts(self, verdicts: Mapping[str, KeepaliveVerdict]) -> None:
        document = {"format": _FORMAT, "boot_id": _boot_id(), "tunnels": {
            name: {"up": v.up, "since": v.since, "endpoints": v.endpoints} for name, v in sorted(verdicts.items())}}
        # One line: json's C encoder takes no indent, and a hub's ten thousand verdicts through the Python one
        # cost seconds of the loop in the lab's UML (#26).
        self._write(KEEPALIVE, json.dumps(document) + "\n")

    def verdicts(self, this_boot_only: bool = True) -> dict[str, KeepaliveVerdict]:
        """The saved verdicts; by default none from an earlier boot (the kernel's tunnels did not survive it)."""
        document = self._read(KEEPALIVE)
        if document is None or (this_boot_only and document.get("boot_id") != _boot_id()):
            return {}
        try:
            return {str(name): KeepaliveVerdict(bool(v["up"]), str(v["since"]), str(v["endpoints"]))
                    for name, v in document["tunnels"].items()}
        except (KeyError, TypeError, AttributeError) as exc:
            raise StateError(f"{self.path / KEEPALIVE}: not keepalive verdicts kept by greupd ({exc})") from None

    # --- files ---------------------------------------------------------------------------------------

    def _read(self, name: str) -> dict[str, Any] | None:
        file = self.path / name
        try:
            document = json.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(f"cannot read {file}: {exc.strerror or exc}") from None
        except ValueError as exc:  # also UnicodeDecodeError
            raise StateError(f"{file}: not JSON ({exc})") from None
        if not isinstance(document, dict) or document.get("format") != _FORMAT:
            raise StateError(f"{file}: not a state file of this greupd (format {_FORMAT})")
        return document

    def _write(self, name: str, text: str) -> None:
        """Replace `name` atomically: a temporary file beside it, fsync, rename over, fsync the directory."""
        file = self.path / name
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            descriptor, temporary = tempfile.mkstemp(prefix=f".{name}.", dir=self.path)  # mode 0600
            try:
                with os.fdopen(descriptor, "w", encoding="utf-8") as out:
                    out.write(text)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(temporary, file)
            except BaseException:
                Path(temporary).unlink(missing_ok=True)
                raise
            directory = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        except OSError as exc:
            raise StateError(f"cannot write {file}: {exc.strerror or exc}") from None


# --- start-up: the config on disk, or the last good one -----------------------------------------------------


@dataclass(frozen=True)
class StartConfig:
    """The config `greupd run` starts with, and why."""

    config: Config
    state: StateDir
    rejected: ConfigError | None = None  # the config on disk, when it did not validate
    kept: LastGood | None = None  # the last good config running instead

    def rejection(self) -> str | None:
        """What status' last_error says while the last good config runs instead of the file on disk."""
        if self.rejected is None or self.kept is None:
            return None
        files = ", ".join(str(f) for f, _ in self.kept.files)
        return (f"config rejected at start, running the last good config (saved {self.kept.saved}, from {files},"
                f" kept in {self.state.path / LAST_GOOD}):\n{self.rejected}")


    def keep(self, config_path: Path, config: Config) -> str | None:
        """Save `config` as the last good one; the problem, if it could not be saved."""
        try:
            self.state.save_last_good(config_path, config)
        except StateError as exc:
            return f"{exc}; a restart with an invalid config on disk will not be able to fall back to this one"
        return None


def last_good_saved(start: StartConfig | None) -> str | None:
    """When the last good config that runs instead of the file on disk was saved; None when the file runs."""
    return start.kept.saved if start is not None and start.rejected is not None and start.kept is not None else None


class StartRefused(Exception):
    """Neither the config on disk nor a last good one can be run; the message lists every problem."""

    def __init__(self, rejected: ConfigError, why: str) -> None:
        super().__init__(f"{rejected}\n{why}")
        self.rejected = rejected
        self.why = why


def start_config(config_path: Path, environ: Mapping[str, str] = os.environ) -> StartConfig:
    """The config on disk if it validates, else the last config that applied cleanly from the same path."""
    state = StateDir(state_dir_for(config_path, environ))
    try:
        return StartConfig(load_config(config_path), state)
    except ConfigError as exc:
        rejected = exc
    except (OSError, RecursionError) as exc:
        # load_config makes every reading problem a ConfigError naming the file; should one still slip through,
        # it is a config that cannot be read, and the last good one runs (review H2: a crash here loops the unit).
        rejected = ConfigError([ConfigProblem(config_path, None, "", f"cannot load: {exc}")])
    try:
        kept = state.last_good()
    except StateError as exc:
        raise StartRefused(rejected, f"and the last good config cannot be used: {exc}") from None
    if kept is None:
        raise StartRefused(rejected, f"no last good config to start with instead ({state.path / LAST_GOOD})")
    if kept.config_path != config_path.absolute():
        # Another config's (a `greupd run -c` test beside the real one): starting it would manage other tunnels.
        raise StartRefused(rejected, f"the last good config in {state.path / LAST_GOOD} is {kept.config_path}'s,"
                                     f" not {config_path}'s")
    try:
        config = kept.load()
    except ConfigError as exc:
        # This greupd checks more than the one that saved it (an upgrade): say both.
        raise StartRefused(rejected, f"and the last good config (saved {kept.saved}) does not validate either:"
                                     f"\n{exc}") from None
    return StartConfig(config, state, rejected, kept)
