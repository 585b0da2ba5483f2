"""`greupd install-units`: greupd's systemd units for an install by pip or pipx, pointing at this interpreter.

The Debian and RPM packages ship the units with ExecStart=/usr/bin/greupd. A pip or pipx install has its
greupd somewhere else (a venv's bin/), so the same units are written with ExecStart= and ExecReload= naming the
greupd command of the interpreter running this, plus the sysusers.d file for the user greupd that the units
run as. Nothing is started or reloaded here: the command prints what to run next.

The units come from the checkout (an editable install) or from the wheel's data files
(<prefix>/share/greupd/systemd, pyproject.toml's [tool.setuptools.data-files]).
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

UNITS = ("greupd.service", "greupd@.service")
SYSUSERS = "greupd.sysusers"
PACKAGED_COMMAND = "/usr/bin/greupd"
# ProtectHome=yes in the units: the daemon cannot see an interpreter under these.
HIDDEN_FROM_THE_UNIT = (Path("/home"), Path("/root"), Path("/run/user"))


class InstallUnitsError(Exception):
    """Why the units cannot be written (no unit files found, a command the unit could not run)."""


@dataclass(frozen=True)
class UnitFile:
    path: Path  # where it goes, under --root
    text: str


def unit_sources(prefix: Path | None = None) -> Path:
    """The folder holding greupd.service and friends: the checkout's systemd/, else the wheel's data files."""
    prefix = Path(sys.prefix) if prefix is None else prefix
    candidates = [Path(__file__).resolve().parent.parent / "systemd", prefix / "share/greupd/systemd"]
    for folder in candidates:
        if all((folder / name).is_file() for name in (*UNITS, SYSUSERS)):
            return folder
    raise InstallUnitsError("greupd's unit files are in none of " + ", ".join(map(str, candidates))
                            + " (install greupd with pip from its source or wheel)")


def greupd_command(executable: Path | None = None) -> str:
    """What ExecStart= runs: the greupd script beside this interpreter, else `<interpreter> -m greupd`.

    Not resolved through symlinks: a venv's bin/python is the venv, its target is the bare interpreter.
    """
    python = Path(sys.executable) if executable is None else executable
    if not python.is_absolute():
        raise InstallUnitsError(f"the interpreter's path {python} is not absolute")
    script = python.parent / "greupd"
    return str(script) if script.is_file() else f"{python} -m greupd"


def render_unit(text: str, command: str) -> str:
    """The packaged unit with every /usr/bin/greupd in Exec*= lines replaced by ``command``."""
    if not re.search(rf"^ExecStart={re.escape(PACKAGED_COMMAND)} ", text, re.M):
        raise InstallUnitsError(f"the unit has no ExecStart={PACKAGED_COMMAND} line to point elsewhere")
    header = (f"# Written by `greupd install-units` from greupd's packaged unit: Exec*= run {command}\n"
              "# (the interpreter greupd was installed for). Run it again after moving that install.\n")
    return header + re.sub(rf"^(Exec\w+=){re.escape(PACKAGED_COMMAND)}(?= |$)",
                           lambda m: m.group(1) + command, text, flags=re.M)


def check_command(command: str) -> None:
    """Refuse a command the unit could not run: under /home or /root (ProtectHome=yes hides them)."""
    program = Path(command.split()[0])
    for hidden in HIDDEN_FROM_THE_UNIT:
        if program.is_relative_to(hidden):
            raise InstallUnitsError(
                f"{program} is under {hidden}, which the unit's ProtectHome=yes hides from the daemon: install "
                "greupd into a venv outside it (python3 -m venv /opt/greupd), or with pipx as "
                "PIPX_HOME=/opt/pipx PIPX_BIN_DIR=/usr/local/bin pipx install greupd")


def plan_files(root: Path, command: str, sources: Path) -> list[UnitFile]:
    """The files install-units writes under ``root``: the units, then the sysusers.d entry."""
    units = root / "etc/systemd/system"
    files = [UnitFile(units / name, render_unit((sources / name).read_text(), command)) for name in UNITS]
    files.append(UnitFile(root / "etc/sysusers.d/greupd.conf", (sources / SYSUSERS).read_text()))
    return files


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", metavar="DIR", default="/",
                        help="write under DIR (DIR/etc/systemd/system, DIR/etc/sysusers.d); default: /")
    parser.add_argument("--dry-run", action="store_true", help="print the files instead of writing them")


def run(args: argparse.Namespace) -> int:
    """The `greupd install-units` command; 0 when written, 1 with a message when not."""
    try:
        command = greupd_command()
        check_command(command)
        files = plan_files(Path(args.root), command, unit_sources())
    except InstallUnitsError as exc:
        print(f"greupd: install-units: {exc}", file=sys.stderr)
        return 1
    for unit in files:
        if args.dry_run:
            print(f"# --- {unit.path}\n{unit.text}")
            continue
        try:
            unit.path.parent.mkdir(parents=True, exist_ok=True)
            unit.path.write_text(unit.text)
        except OSError as exc:
            print(f"greupd: install-units: cannot write {unit.path}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        print(f"wrote {unit.path}")
    if not args.dry_run:
        print(f"Exec*= run {command}. Next, as root:\n"
              "  systemd-sysusers                 # the user greupd\n"
              "  systemctl daemon-reload\n"
              "  systemctl enable --now greupd    # once /etc/greupd/tunnels.toml holds your tunnels")
    return 0
