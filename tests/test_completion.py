"""The bash completion file, run by bash as it runs on Tab (bash-completion's helpers stubbed: not installed here)."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

COMPLETION = Path(__file__).resolve().parent.parent / "packaging" / "bash-completion" / "greupd"

# The two bash-completion functions the file uses, reduced to what a test needs.
STUBS = """
_init_completion() { cur=${COMP_WORDS[COMP_CWORD]}; prev=${COMP_WORDS[COMP_CWORD-1]}; words=("${COMP_WORDS[@]}");
                     cword=$COMP_CWORD; }
_filedir() { COMPREPLY=(FILE); }
"""


def complete(line: str) -> list[str]:
    """What Tab offers after `line` (a trailing space means a new, empty word)."""
    words = shlex.split(line) + ([""] if line.endswith(" ") else [])
    script = (STUBS + f"source {shlex.quote(str(COMPLETION))}\n"
              f"COMP_WORDS=({' '.join(shlex.quote(w) for w in words)}); COMP_CWORD={len(words) - 1}\n"
              "_greupd; printf '%s\\n' \"${COMPREPLY[@]}\"\n")
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30, check=True)
    return [w for w in result.stdout.splitlines() if w]


def test_commands_then_their_options() -> None:
    assert "import" in complete("greupd ") and "--version" in complete("greupd --")
    assert complete("greupd pl") == ["plan"]
    assert set(complete("greupd plan --")) >= {"--json", "--detailed-exitcode", "--config"}
    assert complete("greupd check --j") == ["--json"]


def test_dash_n_comes_before_the_command_and_is_not_one() -> None:
    assert "-n" in complete("greupd -") and "--netns" in complete("greupd --")
    assert complete("greupd -n ns1 st") == ["status"]
    assert complete("greupd --netns ns1 status --j") == ["--json"]


def test_import_sources_and_config_files() -> None:
    assert complete("greupd import --from n") == ["netplan", "networkd"]
    assert complete("greupd import --from ifupdown ") == ["FILE"]
    assert complete("greupd plan -c ") == ["FILE"]


def test_every_command_and_option_of_the_parser_is_offered() -> None:
    """The file follows `build_parser()`: a command or option added there and not here fails this test."""
    from tests.test_man_page import commands, options_of

    offered = complete("greupd ")
    for name, parser in commands().items():
        assert name in offered
        wanted = {o for action in options_of(parser) for o in action.option_strings}
        assert set(complete(f"greupd {name} -")) >= wanted, name


def test_doctor_takes_the_options_and_tunnel_names() -> None:
    assert complete("greupd doctor --j") == ["--json"]
    assert complete("greupd doctor -c ") == ["FILE"]
