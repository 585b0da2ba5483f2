"""Where fields stand in TOML text: tomllib keeps no positions, so errors find their line here."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator, Mapping

Path_ = tuple[str | int, ...]
_SIMPLE_KEY = r"""(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|'[^']*')"""
_DOTTED_KEY = rf"{_SIMPLE_KEY}(?:\s*\.\s*{_SIMPLE_KEY})*"
_HEADER = re.compile(rf"^\s*(\[\[?)\s*({_DOTTED_KEY})\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(rf"^\s*({_DOTTED_KEY})\s*=")


def _split_dotted(text: str) -> list[str]:
    """The parts of a dotted key as TOML reads them: `a."b.c"` is ["a", "b.c"], `"\\u0041"` is ["A"]."""
    try:
        nested: object = tomllib.loads(f"{text} = 0")
    except tomllib.TOMLDecodeError:
        return []
    parts = []
    while isinstance(nested, dict) and len(nested) == 1:
        [(part, nested)] = nested.items()
        parts.append(part)
    return parts


def locate_fields(text: str) -> dict[Path_, int]:
    """Map field paths to the line where they are written, e.g. ("tunnel", 1, "keepalive", "interval") -> 23.

    A line-oriented reading of TOML headers and `key =` lines, good enough to point a person at the right
    place; tomllib itself keeps no positions.
    """
    lines: dict[Path_, int] = {}
    counters: dict[tuple[str, ...], int] = {}
    table: Path_ = ()
    for number, raw in _statement_lines(text):
        header = _HEADER.match(raw)
        if header and (parts := _split_dotted(header.group(2))):
            if header.group(1) == "[[":
                base = tuple(parts)
                counters[base] = counters.get(base, -1) + 1
                table = (*parts, counters[base])
            else:
                # [tunnel.keepalive] belongs to the latest [[tunnel]]
                resolved: list[str | int] = []
                for i, part in enumerate(parts):
                    resolved.append(part)
                    array = tuple(parts[: i + 1])
                    if array in counters:
                        resolved.append(counters[array])
                table = tuple(resolved)
            _first_seen(lines, table, number)
            continue
        key = _KEY.match(raw)
        if key:
            _first_seen(lines, (*table, *_split_dotted(key.group(1))), number)
    return lines


def _statement_lines(text: str) -> Iterator[tuple[int, str]]:
    """The lines where a TOML statement (a [header] or `key = ...`) may start, numbered from 1.

    Skipped: lines inside a multi-line string or inside a value spanning lines (an array), where text that
    looks like `[x]` or `k =` is data.
    """
    closing: str | None = None  # the quotes that end the multi-line string we are in
    depth = 0  # brackets of a value left open at the end of a line
    # TOML ends lines at \n only; str.splitlines would also split inside strings (at \u2028, \x0c, ...).
    for number, line in enumerate(text.split("\n"), start=1):
        header = False
        if closing is None and depth == 0:
            yield number, line
            header = line.lstrip().startswith("[")
        i = 0
        while i < len(line):
            if closing is not None:
                if closing == '"""' and line[i] == "\\":
                    i += 2
                elif line.startswith(closing, i):
                    i += 3
                    for _ in range(2):  # up to two quotes right before the closing three are content
                        i += line.startswith(closing[0], i)
                    closing = None
                else:
                    i += 1
            elif line[i] == "#":
                break
            elif line.startswith(('"""', "'''"), i):
                closing, i = line[i:i + 3], i + 3
            elif line[i] in "\"'":
                end = i + 1
                while end < len(line) and line[end] != line[i]:
                    end += 2 if line[i] == '"' and line[end] == "\\" else 1
                i = end + 1
            else:
                if not header and line[i] in "[{":
                    depth += 1
                elif not header and line[i] in "]}":
                    depth = max(0, depth - 1)
                i += 1


def _first_seen(lines: dict[Path_, int], path: Path_, number: int) -> None:
    # Every enclosing table is written here too if not before: `[[tunnels]]` is where the key `tunnels` is.
    for end in range(1, len(path) + 1):
        lines.setdefault(path[:end], number)


def line_of(lines: Mapping[Path_, int], path: Path_) -> int | None:
    for end in range(len(path), 0, -1):
        if path[:end] in lines:
            return lines[path[:end]]
    return None


def field_text(path: Path_) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


