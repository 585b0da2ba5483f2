"""Reading a config from disk: the main file, then tunnels.d/*.toml, each read safely and parsed with tomllib."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from greupd.config.models import Config
from greupd.config.problems import ConfigError, ConfigProblem
from greupd.config.validate import ParsedFile, deep_merge, validate


def config_files(path: Path) -> list[Path]:
    """The main file, then tunnels.d/*.toml beside it in name order."""
    dropins = path.parent / "tunnels.d"
    extra = sorted(p for p in dropins.glob("*.toml") if p.is_file()) if dropins.is_dir() else []
    return [path, *extra]


def _read(file: Path) -> ParsedFile:
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([ConfigProblem(file, None, "", f"cannot read: {exc.strerror or exc}")]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([ConfigProblem(file, None, "", f"not UTF-8 text: {exc.reason}")]) from None
    return _parse(file, text)


_TOML_AT = re.compile(r"\s*\((?:at line (\d+), column \d+|at end of document)\)\s*$")


# `[[tunnel]]` alone on its line (a comment may follow): where a tunnel's table starts.
_TUNNEL_HEADER = re.compile(r"^[ \t]*\[\[tunnel\]\][ \t]*(?:#.*)?$", re.MULTILINE)
# The parsed pieces of the last texts read (see _parse_in_pieces), by their text.
_PIECES: dict[str, dict[str, Any]] = {}


def _parse_in_pieces(text: str) -> dict[str, Any] | None:
    """tomllib.loads(text), from pieces cut at each `[[tunnel]]` line, each piece parsed once and kept.

    A reload that changes one tunnel among thousands then parses that tunnel's table only (tomllib, pure
    Python, takes ~40 us a table natively and several times that in a slow VM). None whenever the cut might
    not give what the whole text gives, and the caller parses the whole text (which also places any error):
    a piece that does not parse (a cut inside a multi-line string or array leaves it unterminated), or a key
    other than `tunnel` in two pieces, or `tunnel` as anything but an array of tables.
    """
    starts = [0, *(m.start() for m in _TUNNEL_HEADER.finditer(text))]
    pieces = [text[a:b] for a, b in zip(starts, [*starts[1:], len(text)], strict=True) if b > a]
    data: dict[str, Any] = {"tunnel": []}
    for number, piece in enumerate(pieces):
        parsed = _PIECES.get(piece)
        if parsed is None:
            try:
                parsed = tomllib.loads(piece)
            except tomllib.TOMLDecodeError:
                return None
        _PIECES[piece] = parsed
        for key, value in parsed.items():
            if key == "tunnel":
                # Only from a piece that starts with its [[tunnel]] line: `tunnel = [...]` before the first
                # one would be an error in the whole text (a static array cannot be appended to).
                if not isinstance(value, list) or (number == 0 and starts[1:2] != [0]):
                    return None
                data["tunnel"] += value
            elif key in data:
                return None
            else:
                data[key] = value
    if not data["tunnel"]:
        del data["tunnel"]
    return data


def _parse(file: Path, text: str) -> ParsedFile:
    if len(_PIECES) > 4 * text.count("[[tunnel]]") + 64:
        _PIECES.clear()  # old pieces, of texts edited since: keep the cache about the size of the config
    data = _parse_in_pieces(text)
    if data is not None:
        return ParsedFile(file, data, text)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # Python 3.11's TOMLDecodeError keeps the position only in its message ("... (at line 5, column 7)").
        position = _TOML_AT.search(str(exc))
        line: int | None = getattr(exc, "lineno", None)
        if line is None and position is not None:
            line = int(position.group(1)) if position.group(1) else text.count("\n") + 1
        message = _TOML_AT.sub("", str(exc))
        raise ConfigError([ConfigProblem(file, line, "", f"TOML syntax: {message}")]) from None
    return ParsedFile(file, data, text)




def load_config(path: Path) -> Config:
    """Read, merge and validate the config at `path` (and its tunnels.d); raise ConfigError listing every problem."""
    return validate([_read(file) for file in config_files(path)])


def load_config_sources(sources: Sequence[tuple[Path, str]]) -> Config:
    """Validate files given as (name, text), main file first: a config kept as text (the last good one)."""
    if not sources:
        raise ConfigError([ConfigProblem(Path("<none>"), None, "", "no config files")])
    return validate([_parse(file, text) for file, text in sources])


def read_daemon_table(path: Path) -> dict[str, object]:
    """[daemon] as the files on disk write it, merged like load_config, with tomllib alone: nothing validated.

    For what must work while the config is half-edited: `greupd reload` and `status` finding the control
    socket, `greupd run` finding state_dir. A file that does not parse adds nothing.
    """
    merged: dict[str, Any] = {}
    for file in config_files(path):
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        try:
            daemon = tomllib.loads(text).get("daemon")
        except tomllib.TOMLDecodeError:
            # The syntax error is usually in the tunnel being edited: try the [daemon] table on its own.
            try:
                daemon = tomllib.loads(_daemon_block(text)).get("daemon")
            except tomllib.TOMLDecodeError:
                continue
        if isinstance(daemon, dict):
            merged = deep_merge(merged, daemon)
    return merged


_DAEMON_HEADER = re.compile(r"^\s*\[\s*daemon\s*\]\s*(#.*)?$")


def _daemon_block(text: str) -> str:
    """The lines of the `[daemon]` table: from its header to the next header."""
    block: list[str] = []
    for line in text.split("\n"):
        if _DAEMON_HEADER.match(line):
            block = [line]
        elif block and line.lstrip().startswith("["):
            break
        elif block:
            block.append(line)
    return "\n".join(block)


def unvalidated_path(path: Path, key: str, default: Path) -> Path:
    """[daemon] `key` of the config at `path` if it is written as an absolute path, else `default`."""
    value = read_daemon_table(path).get(key)
    if isinstance(value, str) and value.startswith("/") and "\0" not in value:
        return Path(value)
    return default


def load_config_text(text: str, file: Path = Path("<string>")) -> Config:
    """Validate TOML text alone, with no drop-ins (tests, `greupd check -`)."""
    return validate([_parse(file, text)])


