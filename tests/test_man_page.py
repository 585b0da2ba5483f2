"""greupd(8) against the program: every command, option and environment variable the code has is in the manual,
and the manual names none the code does not have (#25 item 5, newcomer-3 N9).

The argument parser is walked (`build_parser()`: a command added there is found here), the environment
variables are the names greupd's sources read from the environment; the manual is read from its roff source
(sections, .TP tags, the exit status table) and, for the synopsis, as `groff` renders it.
tests/test_exit_statuses.py holds the exit status table against what the commands do.
"""

from __future__ import annotations

import argparse
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from greupd.cli import build_parser

REPO = Path(__file__).resolve().parent.parent
PAGE = REPO / "docs" / "greupd.8"
OPTION = re.compile(r"(?<![\w-])(--?[a-z][a-z-]*)")
# Before the command: the program's own options, which no command's synopsis line has to list.
GLOBAL_ONLY = {"-h", "--help", "--version"}


def commands() -> dict[str, argparse.ArgumentParser]:
    """Every subcommand's parser, as argparse has them."""
    [sub] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def options_of(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]


def deroff(line: str) -> str:
    """A roff source line as text: without its font macro, quotes and escapes (`\\-` is -)."""
    line = re.sub(r"^\.(?:B|I|BR|RB|BI|IB|IR|RI)\s+", "", line)
    line = re.sub(r"\\f[BIRP]", "", line).replace("\\-", "-").replace("\\(dq", '"')
    return line.replace('"', "")


def sections(source: str) -> dict[str, list[str]]:
    """The roff source's lines per .SH section."""
    found: dict[str, list[str]] = {}
    name = ""
    for line in source.splitlines():
        if line.startswith(".SH "):
            name = line[4:].strip().strip('"')
            found[name] = []
        elif name:
            found[name].append(line)
    return found


def tags(lines: list[str]) -> list[str]:
    """The tag line of every .TP paragraph, as text."""
    return [deroff(lines[i + 1]) for i, line in enumerate(lines[:-1]) if line == ".TP"]


@dataclass(frozen=True)
class ExitRow:
    status: int
    commands: frozenset[str]  # expanded: "every command" is each of the parser's commands
    meaning: str


def exit_table(source: str) -> list[ExitRow]:
    """The rows of EXIT STATUS's table (tbl source: `status|commands|T{ meaning T}`)."""
    lines = sections(source)["EXIT STATUS"]
    table = lines[lines.index(".TS") + 1: lines.index(".TE")]
    every = set(commands())
    rows: list[ExitRow] = []
    body = "\n".join(table[next(i for i, line in enumerate(table) if line.endswith(".")) + 2:])  # after the header
    for status, who, meaning in re.findall(r"^(\d+)\|([^|]+)\|T\{\n(.*?)\nT\}$", body, re.M | re.S):
        if who == "every command":
            named = every
        elif who.startswith("every command but "):
            named = every - set(who.removeprefix("every command but ").split(", "))
        else:
            named = set(who.split(", "))
        rows.append(ExitRow(int(status), frozenset(named), " ".join(deroff(m) for m in meaning.splitlines())))
    return rows


def synopsis() -> list[str]:
    """SYNOPSIS as groff renders it, one line per form of the command."""
    text = subprocess.run(["groff", "-man", "-Tascii", "-rLL=250n", "-P-cbou", str(PAGE)], capture_output=True,
                          text=True, check=True, timeout=60).stdout
    lines = text.split("\nSYNOPSIS\n", 1)[1].split("\n\n", 1)[0].splitlines()
    return [line.strip() for line in lines]


def environment_read_by_greupd() -> set[str]:
    """The variables greupd's sources read: environ.get("X"), environ["X"], env.get("X") (systemd.py's copy)."""
    names: set[str] = set()
    for path in (REPO / "greupd").rglob("*.py"):
        names |= set(re.findall(r"\b(?:environ|env)(?:\.get\(|\[)\s*\"([A-Z][A-Z0-9_]+)\"", path.read_text()))
    return names


SOURCE = PAGE.read_text()


def test_the_page_is_read_with_tbl() -> None:
    # man(1) runs tbl for a page whose first line says so; without it the exit status table is text soup.
    assert SOURCE.startswith("'\\\" t\n")


def test_every_command_has_a_synopsis_line_with_exactly_its_options() -> None:
    lines = synopsis()
    parsers = commands()
    for name, parser in parsers.items():
        forms = [line for line in lines if re.match(rf"greupd (\[-n netns\] )?{re.escape(name)}(\s|$)", line)]
        assert len(forms) == 1, f"greupd(8)'s SYNOPSIS has {len(forms)} lines for `greupd {name}`: {lines}"
        [line] = forms
        written = set(OPTION.findall(line.split(f" {name}", 1)[1]))
        known: set[str] = set()
        for action in options_of(parser):
            known |= set(action.option_strings)
            if action.option_strings:
                assert written & set(action.option_strings), f"SYNOPSIS of {name} lacks {action.option_strings}"
            else:  # a positional: its metavar's words, lower case, as the page writes them in italics
                for word in re.findall(r"[A-Z]+", str(action.metavar or action.dest.upper())):
                    assert word.lower() in line, f"SYNOPSIS of {name} lacks {action.metavar}"
            for choice in action.choices or ():
                assert str(choice) in line, f"SYNOPSIS of {name} lacks {choice} of {action.option_strings}"
        assert written <= known, f"SYNOPSIS of {name} has {written - known}, which `greupd {name}` does not take"
        if name == "run":  # the parser refuses -n for run (start greupd@NETNS instead)
            assert "[-n netns]" not in line
    other = [line for line in lines
             if not any(re.match(rf"greupd (\[-n netns\] )?{re.escape(n)}(\s|$)", line) for n in parsers)]
    assert other == ["greupd --version"], f"SYNOPSIS lines that name no command: {other}"


def test_every_command_is_described_and_no_other() -> None:
    described = tags(sections(SOURCE)["COMMANDS"])
    assert sorted(described) == sorted(commands()), "greupd(8)'s COMMANDS and the parser's commands differ"


def all_options() -> set[str]:
    found = {o for a in options_of(build_parser()) for o in a.option_strings}
    for parser in commands().values():
        found |= {o for a in parser._actions for o in a.option_strings}
    return found


def test_every_option_is_described_and_no_other() -> None:
    described = {o for tag in tags(sections(SOURCE)["OPTIONS"]) for o in OPTION.findall(tag)}
    assert described == all_options(), (f"OPTIONS lacks {sorted(all_options() - described)}, "
                                        f"describes {sorted(described - all_options())} that no command takes")


# Other programs' options the page quotes: systemctl enable --now, groupadd --system, usermod -aG, journalctl -u/-x,
# and doctor's fixes: iptables -I/-i/-o/-j, sysctl -w, swanctl --terminate --force --initiate --ike --child,
# conntrack -D -p.
QUOTED = {"--now", "--system", "-a", "-u", "-x", "-i", "-o", "-j", "-w",
          "--terminate", "--force", "--initiate", "--ike", "--child", "-p"}


def test_every_option_the_page_mentions_exists() -> None:
    # Anywhere on the page: `greupd plan --detailed-exitcode` in a paragraph must not outlive the option.
    mentioned = {o for line in SOURCE.splitlines() if not line.startswith(".\\\"")
                 for o in OPTION.findall(deroff(line))}
    assert mentioned - all_options() <= QUOTED, f"greupd(8) mentions {sorted(mentioned - all_options() - QUOTED)}"


def test_every_environment_variable_greupd_reads_is_described_and_no_other() -> None:
    described = {name for tag in tags(sections(SOURCE)["ENVIRONMENT"]) for name in re.findall(r"[A-Z][A-Z0-9_]+", tag)}
    read = environment_read_by_greupd()
    assert "GREUPD_STATE_DIR" in read  # the scan itself works
    assert described == read, f"ENVIRONMENT lacks {sorted(read - described)}, has {sorted(described - read)}"


def test_the_exit_status_table_has_every_status_the_cli_defines() -> None:
    import greupd.cli as cli

    defined = {value for name, value in vars(cli).items() if name.startswith("EXIT_") and isinstance(value, int)}
    assert {row.status for row in exit_table(SOURCE)} == defined


def iter_rows() -> Iterator[tuple[str, int]]:
    for row in exit_table(SOURCE):
        for command in row.commands:
            yield command, row.status


def test_the_exit_status_table_names_only_commands_that_exist() -> None:
    assert {command for command, _ in iter_rows()} <= set(commands())


@pytest.mark.parametrize("command", sorted(commands()))
def test_every_command_documents_success_usage_and_crash(command: str) -> None:
    documented = {status for name, status in iter_rows() if name == command}
    assert {0, 64, 70, 130} <= documented
