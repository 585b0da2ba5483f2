"""Reading a config from disk: the main file, then tunnels.d/*.toml, each read safely and parsed with tomllib."""

from __future__ import annotations

import os
import re
import stat
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from greupd.config.models import Config
from greupd.config.problems import ConfigError, ConfigProblem
from greupd.config.validate import ParsedFile, deep_merge, validate

# The largest config file read: 16 MiB. A config of 20,000 tunnels is about 2 MB; a bound keeps a file that is
# not a config (a log, an image, a sparse file) from filling the daemon's memory.
MAX_FILE_BYTES = 16 * 1024 * 1024
DROPINS = "tunnels.d"
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def config_files(path: Path) -> list[Path]:
    """The main file, then tunnels.d/*.toml beside it in name order (names starting with "." left out: editors'
    lock and backup files). ConfigError when tunnels.d is there but cannot be listed: a config without its
    drop-ins would delete their tunnels."""
    dropins = path.parent / DROPINS
    try:
        # os.scandir, not Path.glob: on Python 3.11 glob swallows a PermissionError and yields nothing.
        with os.scandir(dropins) as entries:
            names = sorted(e.name for e in entries if e.name.endswith(".toml") and not e.name.startswith("."))
    except FileNotFoundError:
        return [path]
    except OSError as exc:
        raise ConfigError([ConfigProblem(dropins, None, "", f"cannot list the drop-in directory: {_why(exc)};"
                                         " the tunnels its files define would be missing, so nothing is loaded")]) \
            from None
    return [path, *(dropins / name for name in names)]


def _why(exc: OSError) -> str:
    """The errno's text; for a permission, also whose (the daemon runs as user greupd, `greupd check` as root)."""
    text = exc.strerror or str(exc)
    return f"{text} (as uid {os.geteuid()})" if isinstance(exc, PermissionError) else text


def _link_target(file: Path) -> str | None:
    try:
        return os.readlink(file)
    except OSError:  # not a symlink (EINVAL), or gone meanwhile
        return None


def read_config_text(file: Path) -> str:
    """The text of one config file; ConfigError naming the file for anything that is not a readable regular
    file of UTF-8 text of at most MAX_FILE_BYTES.

    Opened with O_NONBLOCK and checked with fstat before reading: a FIFO would block the daemon's loop in
    open() until a writer came, and /dev/zero would be read forever.
    """
    def problem(message: str, line: int | None = None) -> ConfigError:
        return ConfigError([ConfigProblem(file, line, "", message)])

    try:
        descriptor = os.open(file, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        if (target := _link_target(file)) is not None:
            raise problem(f"a symlink to {target}, which does not exist") from None
        raise problem(f"cannot read: {_why(exc)}") from None
    except OSError as exc:
        raise problem(f"cannot read: {_why(exc)}") from None
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            kind = next((name for test, name in _KINDS if test(info.st_mode)), "a special file")
            target = _link_target(file)
            via = f" (through the symlink to {target})" if target is not None else ""
            raise problem(f"is {kind}{via}, not a regular file: a config is a text file")
        if info.st_size > MAX_FILE_BYTES:
            raise problem(f"is {info.st_size} bytes, more than a config file may have ({MAX_FILE_BYTES} bytes)")
        chunks, size = [], 0
        while chunk := os.read(descriptor, 1 << 20):  # a file that grows while read stops at the bound too
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_FILE_BYTES:
                raise problem(f"is more than a config file may have ({MAX_FILE_BYTES} bytes)")
    except OSError as exc:
        raise problem(f"cannot read: {_why(exc)}") from None
    finally:
        os.close(descriptor)
    data = b"".join(chunks)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise problem(f"not UTF-8 text: {exc.reason} (byte {exc.start})", data[:exc.start].count(b"\n") + 1) \
            from None
    # What text mode reads (universal newlines), as the loader always did: CRLF files are valid.
    return text.replace("\r\n", "\n").replace("\r", "\n")


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
            except (tomllib.TOMLDecodeError, RecursionError):
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
    if text.startswith("\ufeff"):
        # Some Windows editors write one; TOML forbids it, and tomllib would only say "Invalid statement".
        raise ConfigError([ConfigProblem(file, 1, "", "the file starts with a UTF-8 byte order mark (BOM, bytes"
                                         " EF BB BF), which TOML does not allow: save it as UTF-8 without BOM")])
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
    except RecursionError:
        # tomllib parses nested arrays and inline tables recursively: a few hundred levels exhaust Python's stack.
        depth, line = _deepest(text)
        raise ConfigError([ConfigProblem(file, line, "", f"arrays or tables nested {depth} deep, more than the TOML"
                                         " parser can read (a config nests them 2 or 3 deep)")]) from None
    return ParsedFile(file, data, text)


def _deepest(text: str) -> tuple[int, int]:
    """How deep brackets nest in `text`, and the line where they are deepest (strings and comments skipped)."""
    depth = deepest = 0
    line = where = 1
    quote: str | None = None
    comment = False
    for char in text:
        if char == "\n":
            line, comment, quote = line + 1, False, None  # a hint only: multi-line strings count as code
        elif comment:
            continue
        elif quote is not None:
            quote = None if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char == "#":
            comment = True
        elif char in "[{":
            depth += 1
            if depth > deepest:
                deepest, where = depth, line
        elif char in "]}":
            depth = max(0, depth - 1)
    return deepest, where


def load_config(path: Path) -> Config:
    """Read, merge and validate the config at `path` (and its tunnels.d); raise ConfigError listing every problem.

    Whatever stands in the way of reading a file is a ConfigError naming it: a reload keeps the running config
    and a start falls back to the last good one, never runs with a file left out.
    """
    parsed: list[ParsedFile] = []
    problems: list[ConfigProblem] = []
    for file in config_files(path):
        try:
            parsed.append(_parse(file, read_config_text(file)))
        except ConfigError as exc:
            problems += exc.problems
    if problems:
        raise ConfigError(problems)
    return _validate_parsed(parsed)


def _validate_parsed(parsed: list[ParsedFile]) -> Config:
    try:
        return validate(parsed)
    except RecursionError:
        raise ConfigError([ConfigProblem(parsed[0].file, None, "", "nested too deeply to validate")]) from None


def load_config_sources(sources: Sequence[tuple[Path, str]]) -> Config:
    """Validate files given as (name, text), main file first: a config kept as text (the last good one)."""
    if not sources:
        raise ConfigError([ConfigProblem(Path("<none>"), None, "", "no config files")])
    return _validate_parsed([_parse(file, text) for file, text in sources])


def read_daemon_table(path: Path) -> dict[str, object]:
    """[daemon] as the files on disk write it, merged like load_config, with tomllib alone: nothing validated.

    For what must work while the config is half-edited: `greupd reload` and `status` finding the control
    socket, `greupd run` finding state_dir. A file that does not parse adds nothing.
    """
    merged: dict[str, Any] = {}
    try:
        files = config_files(path)
    except ConfigError:
        files = [path]
    for file in files:
        try:
            text = read_config_text(file)
        except ConfigError:
            continue
        try:
            daemon = tomllib.loads(text).get("daemon")
        except (tomllib.TOMLDecodeError, RecursionError):
            # The syntax error is usually in the tunnel being edited: try the [daemon] table on its own.
            try:
                daemon = tomllib.loads(_daemon_block(text)).get("daemon")
            except (tomllib.TOMLDecodeError, RecursionError):
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
    return _validate_parsed([_parse(file, text)])


