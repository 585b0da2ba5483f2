"""The `greupd` command: run, check, plan, status, metrics, reload, schema, import, doctor."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import NoReturn, TypeVar, cast

from greupd import __version__
from greupd.config import (
    DEFAULT_CONFIG,
    DEFAULT_CONTROL_SOCKET,
    Config,
    ConfigError,
    ConfigProblem,
    NetnsInstance,
    json_schema,
    load_config,
    netns_instance,
    unvalidated_path,
)
from greupd.status import DaemonStatus

Answer = TypeVar("Answer")

# Exit statuses: greupd(8)'s EXIT STATUS table, per command (tests/test_exit_statuses.py holds the two together).
# 0-3 are spec.md's; the rest are sysexits(3)'s where one fits, so that no status means two things to a script.
EXIT_OK = 0
EXIT_INVALID = 1  # the config is invalid (check, plan, run, reload), a name unknown (status, import), a plan error
EXIT_FINDINGS = 1  # doctor found something (spec.md: "0 nothing found, 1 findings")
EXIT_CHANGES = 2  # plan --detailed-exitcode: there is something to change
EXIT_NO_DAEMON = 3  # nothing answers on the control socket
EXIT_TUNNELS_DOWN = 4  # status --check: a tunnel is down or in error
EXIT_USAGE = 64  # EX_USAGE: a command line argparse refuses (was 2, which plan --detailed-exitcode means "changes")
EXIT_CRASH = 70  # EX_SOFTWARE: a bug (traceback), or a daemon that failed to answer; never 1, which stops restarts
EXIT_NO_PERMISSION = 77  # EX_NOPERM: the control socket or the daemon refused us; run without its capabilities
EXIT_INTERRUPTED = 130  # 128 + SIGINT: Ctrl-C
EXIT_PIPE_CLOSED = 141  # 128 + SIGPIPE: whoever read our output stopped reading (`greupd plan | head -1`)


def _instance(args: argparse.Namespace) -> NetnsInstance | None:
    """greupd@NETNS's paths with `-n NETNS` (checked in main), else None."""
    netns: str | None = getattr(args, "netns", None)
    return netns_instance(netns) if netns else None


def _config_path(args: argparse.Namespace) -> Path:
    """-c / PATH, else greupd@NETNS's with -n, else $GREUPD_CONFIG, else /etc/greupd/tunnels.toml."""
    given: str | None = args.config or getattr(args, "path", None)
    instance = _instance(args)
    if not given and instance is not None:
        return instance.config
    return Path(given or os.environ.get("GREUPD_CONFIG") or DEFAULT_CONFIG)


def _socket_path(args: argparse.Namespace) -> Path:
    from greupd.control import control_socket

    instance = _instance(args)
    given = getattr(args, "socket", None)
    if not given and instance is not None:
        # greupd@NETNS.service sets GREUPD_CONTROL_SOCKET, which wins over the config's key: no need to read it.
        return instance.control_socket
    # Read without validating (review M10): a half-edited config must not hide the daemon from `reload`/`status`.
    return control_socket(lambda: unvalidated_path(_config_path(args), "control_socket", DEFAULT_CONTROL_SOCKET),
                          given)


_CLONE_NEWNET = 0x40000000


def enter_netns(instance: NetnsInstance) -> None:
    """Read the kernel inside /run/netns/NETNS from now on (`ip -n`): for plan and import, before any socket opens.

    setns(2) through libc: os.setns is Python 3.12+. Raises OSError naming the namespace (missing, not root).
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    try:
        fd = os.open(instance.netns_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot open network namespace {instance.netns!r}: {exc.strerror}") from None
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"cannot enter network namespace {instance.netns!r}: {os.strerror(err)}")
    finally:
        os.close(fd)


def _load_or_report(path: Path) -> Config | None:
    try:
        return load_config(path)
    except ConfigError as exc:
        _report(path, exc)
        return None


def _report(path: Path, exc: ConfigError) -> None:
    count = len(exc.problems)
    print(f"greupd: {path}: {count} problem{'s' if count != 1 else ''}", file=sys.stderr)
    for problem in exc.problems:
        print(f"  {problem}", file=sys.stderr)


def summarize(config: Config) -> str:
    lines = [f"{len(config.tunnels)} tunnel{'s' if len(config.tunnels) != 1 else ''}"
             f" from {', '.join(str(f) for f in config.files)}"]
    for t in config.tunnels:
        inner = f" {t.address.ip if t.address else ''}{f' peer {t.peer}' if t.peer else ''}".rstrip()
        keepalive = (f", keepalive {t.keepalive.interval:g}s x{t.keepalive.retries}" if t.keepalive else "")
        routes = f", routes {' '.join(str(r) for r in t.routes)}" if t.routes else ""
        ipsec = ""
        if t.ipsec is not None:
            auth = "psk" if t.ipsec.psk_file is not None else "certificates"
            ipsec = f", ipsec ({auth}{', cleartext GRE dropped' if t.ipsec.require else ''})"
        state = "" if t.enabled else " (disabled)"
        lines.append(f"  {t.name}: {t.mode} {t.local} -> {t.remote}{inner}{routes}{keepalive}{ipsec}{state}")
    return "\n".join(lines)


def cmd_check(args: argparse.Namespace) -> int:
    path = _config_path(args)
    if getattr(args, "json", False):
        return _check_json(path)
    config = _load_or_report(path)
    if config is None:
        return EXIT_INVALID
    print(f"{path}: valid")
    print(summarize(config))
    for warning in config.warnings:  # valid, but not what it seems to mean (config/validate.py)
        print(f"warning: {warning}", file=sys.stderr)
    return EXIT_OK


def cmd_schema(args: argparse.Namespace) -> int:
    print(json.dumps(json_schema(), indent=2))
    return EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:
    path = _config_path(args)
    if args.json:
        # --json prints JSON whatever happens (N10): a tool parses stdout before it looks at the exit status.
        try:
            config = load_config(path)
        except ConfigError as exc:
            return _plan_failed_json(EXIT_INVALID, [_problem_json(p) for p in exc.problems], files=[str(path)])
    else:
        loaded = _load_or_report(path)
        if loaded is None:
            return EXIT_INVALID
        config = loaded
    entered = _enter(args)
    if entered is not None:
        status, why = entered
        if args.json:
            return _plan_failed_json(status, [_error_json(why)], files=[str(f) for f in config.files])
        print(f"greupd: {why}", file=sys.stderr)
        return status
    return _plan_for_tools(config, args.json, args.detailed_exitcode)


def _entered(args: argparse.Namespace) -> int | None:
    """With -n NETNS: into that namespace (plan and import read its kernel); else the status after saying why."""
    entered = _enter(args)
    if entered is None:
        return None
    status, why = entered
    print(f"greupd: {why}", file=sys.stderr)
    return status


def _enter(args: argparse.Namespace) -> tuple[int, str] | None:
    """With -n NETNS: into that namespace; None when done (or no -n), else the exit status and why not."""
    instance = _instance(args)
    if instance is None:
        return None
    try:
        enter_netns(instance)
    except OSError as exc:
        # setns(2) needs CAP_SYS_ADMIN: EPERM/EACCES is a missing privilege, ENOENT a namespace that is not there.
        return (EXIT_NO_PERMISSION if exc.errno in (errno.EPERM, errno.EACCES) else EXIT_INVALID), str(exc.strerror)
    return None


# linux/capability.h: what `greupd run` cannot do without (links, routes, nftables; the keepalives' raw sockets).
_CAP_NET_ADMIN, _CAP_NET_RAW = 12, 13


def missing_capabilities(status: str) -> list[str]:
    """The capabilities `greupd run` needs that a /proc/PID/status text's CapEff lacks."""
    effective = next((int(line.split()[1], 16) for line in status.splitlines() if line.startswith("CapEff:")), 0)
    return [name for name, bit in (("CAP_NET_ADMIN", _CAP_NET_ADMIN), ("CAP_NET_RAW", _CAP_NET_RAW))
            if not effective >> bit & 1]


def cmd_run(args: argparse.Namespace) -> int:
    # Before anything is read or created (N13): without these the daemon would die on its first raw socket with a
    # traceback, its control socket left behind.
    missing = missing_capabilities(Path("/proc/self/status").read_text())
    if missing:
        lacks = "has neither" if len(missing) == 2 else f"lacks {missing[0]}"
        print(f"greupd: run needs CAP_NET_ADMIN and CAP_NET_RAW, and this process {lacks} "
              f"(run it as root or under greupd.service)", file=sys.stderr)
        return EXIT_NO_PERMISSION
    path = _config_path(args)
    # trust (#11 H4): a config on disk that does not validate starts the last good one instead, if any.
    from greupd.state import StartRefused, start_config

    try:
        start = start_config(path)
    except StartRefused as exc:
        _report(path, exc.rejected)
        print(f"greupd: not starting: {exc.why}", file=sys.stderr)
        return EXIT_INVALID
    if start.rejected is not None and start.kept is not None:
        _report(path, start.rejected)
        print(f"greupd: starting with the last good config instead (saved {start.kept.saved})", file=sys.stderr)
    from greupd.daemon import run_daemon

    return run_daemon(path, start.config, socket_override=args.socket, start=start)


def _ask_daemon(args: argparse.Namespace, command: str) -> Mapping[str, object] | int:
    """The daemon's answer (within control.DEFAULT_TIMEOUTS), or the exit status to leave with (after saying why)."""
    from greupd.control import request

    return _asked(args, lambda path: request(path, command))


def _ask_daemon_raw(args: argparse.Namespace, command: str) -> bytes | int:
    """The same, the answer's result as the daemon wrote it (JSON, one line), unparsed."""
    from greupd.control import request_raw

    return _asked(args, lambda path: request_raw(path, command))


def _asked(args: argparse.Namespace, ask: Callable[[Path], Answer]) -> Answer | int:
    from greupd.control import ControlError, ControlUnavailable

    path = _socket_path(args)
    try:
        return ask(path)
    except ControlUnavailable as exc:
        if isinstance(exc.__cause__, PermissionError):  # connect(2): EACCES on the socket or a folder above it
            print(f"greupd: permission denied on {path}: {exc.__cause__.strerror} (root and group greupd may "
                  f"ask; reload is for root)", file=sys.stderr)
            return EXIT_NO_PERMISSION
        print(f"greupd: no daemon answers on {path}: {exc}", file=sys.stderr)
        return EXIT_NO_DAEMON
    except ControlError as exc:
        print(f"greupd: the daemon on {path} refused: {exc}", file=sys.stderr)
        # control.py's ControlServer answers "permission denied..." to a peer its credentials do not allow.
        return EXIT_NO_PERMISSION if str(exc).startswith("permission denied") else EXIT_CRASH


def cmd_status(args: argparse.Namespace) -> int:
    if args.json and not getattr(args, "names", None) and not args.check:
        # As the daemon wrote it, one line: 10,000 tunnels are 4 MB of JSON, not worth parsing to print again.
        raw = _ask_daemon_raw(args, "status")
        if isinstance(raw, int):
            return raw
        sys.stdout.buffer.write(raw + b"\n")
        return EXIT_OK
    from greupd.cli_format import format_status

    answer = _ask_daemon(args, "status")
    if isinstance(answer, int):
        return answer
    status = cast(DaemonStatus, answer)
    if getattr(args, "names", None):
        filtered = _only_named(status, args.names)
        if filtered is None:
            return EXIT_INVALID
        status = filtered
    print(json.dumps(status) if args.json else format_status(status))
    if args.check and any(t["state"] in ("down", "error") for t in status["tunnels"]):
        return EXIT_TUNNELS_DOWN
    return EXIT_OK


def cmd_metrics(args: argparse.Namespace) -> int:
    """The running daemon's Prometheus text, as GET /metrics would serve it (greupd/metrics.py)."""
    answer = _ask_daemon(args, "metrics")
    if isinstance(answer, int):
        return answer
    print(answer.get("text", ""), end="")
    return EXIT_OK


def cmd_reload(args: argparse.Namespace) -> int:
    # The daemon answers once the new config is applied; DEFAULT_TIMEOUTS["reload"] allows for thousands of tunnels.
    result = _ask_daemon(args, "reload")
    if isinstance(result, int):
        return result
    if not result.get("ok"):
        print(f"greupd: reload rejected, the running config stays in force:\n{result.get('error')}", file=sys.stderr)
        return EXIT_INVALID
    print(f"greupd: reloaded (generation {result.get('generation')})")
    if result.get("error"):
        # In force, but the kernel refused part of it (review L8); greupd keeps retrying those tunnels.
        print(f"greupd: the new config is in force, but not all of it is applied (retrying):\n{result.get('error')}",
              file=sys.stderr)
    return EXIT_OK


# --- for tools (config management, scripts): check --json, plan --json/--detailed-exitcode, status NAME, import


def _check_json(path: Path) -> int:
    """`greupd check --json`: {"valid": bool, "errors": [{"file", "line", "field", "message"}]}."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        errors = [{"file": str(p.file), "line": p.line, "field": p.field, "message": p.message}
                  for p in exc.problems]
        print(json.dumps({"valid": False, "errors": errors}, indent=2))
        return EXIT_INVALID
    warnings = [{"file": str(p.file), "line": p.line, "field": p.field, "message": p.message} for p in config.warnings]
    print(json.dumps({"valid": True, "errors": [], "warnings": warnings, "files": [str(f) for f in config.files],
                      "tunnels": [t.name for t in config.tunnels]}, indent=2))
    return EXIT_OK


def _plan_for_tools(config: Config, as_json: bool, detailed: bool) -> int:
    from greupd.cli_format import describe_plan, plan_report

    files = [str(f) for f in config.files]
    try:
        report = plan_report(config)
    except OSError as exc:
        why = f"cannot read the kernel's state: {exc}"
        if as_json:
            return _plan_failed_json(EXIT_INVALID, [_error_json(why)], files)
        print(f"greupd: {why}", file=sys.stderr)
        return EXIT_INVALID
    host = _doctor_warnings(config)
    changes, errors = report.changes(), [_error_json(**e) for e in report.errors()]
    if as_json:
        print(json.dumps({"changes": changes, "errors": errors,
                          "nftables": {"table": report.table, "action": report.nft_action,
                                       "ruleset": report.ruleset_text, "warnings": list(report.warnings)},
                          "config": files, "warnings": host}, indent=2))
    else:
        print(describe_plan(replace(report, warnings=report.warnings + tuple(host))))
    if not detailed:
        return EXIT_OK
    return EXIT_INVALID if errors else EXIT_CHANGES if changes else EXIT_OK


def _doctor_warnings(config: Config) -> list[str]:
    """What doctor's run-time checks find on this host (#24 item 4): a kernel without ip_gre, a `local` on no
    interface, a from_tunnel interface that does not exist, a clashing link. `plan --json` has them as "warnings"."""
    from greupd.doctor.checks import runtime_findings
    from greupd.doctor.read import runtime_facts

    return [f.one_line() for f in runtime_findings(config, runtime_facts(config))]


def _plan_failed_json(status: int, errors: list[dict[str, object]], files: list[str]) -> int:
    """`plan --json` when there is no plan to show: changes and nftables null (unknown, not "none"), the errors."""
    print(json.dumps({"changes": None, "errors": errors, "nftables": None, "config": files}, indent=2))
    return status


def _error_json(message: object, tunnel: object = None) -> dict[str, object]:
    """One of plan --json's errors: every one has the same keys, null where they do not apply."""
    return {"tunnel": tunnel, "file": None, "line": None, "field": None, "message": message}


def _problem_json(problem: ConfigProblem) -> dict[str, object]:
    return {"tunnel": None, "file": str(problem.file), "line": problem.line, "field": problem.field,
            "message": problem.message}


def _only_named(status: DaemonStatus, names: Sequence[str]) -> DaemonStatus | None:
    known = {t["name"] for t in status["tunnels"]}
    unknown = [n for n in names if n not in known]
    if unknown:
        print(f"greupd: no tunnel named {', '.join(unknown)} in the running config", file=sys.stderr)
        return None
    wanted = set(names)
    return {**status, "tunnels": [t for t in status["tunnels"] if t["name"] in wanted]}


def cmd_doctor(args: argparse.Namespace) -> int:
    """`greupd doctor [NAME...] [--json]`: what keeps the tunnels from working on this host (issue #24)."""
    from greupd.doctor.checks import run_checks
    from greupd.doctor.findings import describe_findings, findings_json
    from greupd.doctor.read import daemon_status, gather

    path = _config_path(args)
    config = _load_or_report(path)
    if config is None:
        return EXIT_INVALID
    unknown = [n for n in args.names if n not in {t.name for t in config.tunnels}]
    if unknown:
        print(f"greupd: no tunnel named {', '.join(unknown)} in {path}", file=sys.stderr)
        return EXIT_INVALID
    socket_path = _socket_path(args)  # before entering NETNS: the socket is a path in ours
    if (status := _entered(args)) is not None:
        return status
    # Tracing adds doctor's nftables table and sends raw GRE: root's (CAP_NET_ADMIN, CAP_NET_RAW) only.
    trace = not missing_capabilities(Path("/proc/self/status").read_text())
    facts = gather(config, args.names, trace=trace, daemon=daemon_status(socket_path))
    findings = run_checks(config, facts, args.names)
    notes = list(facts.notes) if trace else [
        "not root: nothing was traced (doctor needs CAP_NET_ADMIN and CAP_NET_RAW for that)", *facts.notes]
    if args.json:
        print(json.dumps(findings_json(findings), indent=2))
    else:
        print(describe_findings(findings, notes))
    return EXIT_FINDINGS if findings else EXIT_OK


def cmd_import(args: argparse.Namespace) -> int:
    from greupd.importer import ImportProblem
    from greupd.importer.sources import import_config

    if args.source == "kernel" and (status := _entered(args)) is not None:
        return status
    words: list[str] = list(args.words)
    path: Path | None = None
    # For the file formats the first word is PATH when it looks like one; tunnel names never contain "/".
    if args.source != "kernel" and words and ("/" in words[0] or Path(words[0]).exists()):
        path = Path(words.pop(0))
    try:
        print(import_config(args.source, path, words), end="")
    except ImportProblem as exc:
        print(f"greupd: import: {exc}", file=sys.stderr)
        return EXIT_INVALID
    return EXIT_OK


class _Parser(argparse.ArgumentParser):
    """argparse with greupd's usage status (its subcommands' parsers are of this class too)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="greupd", description="Declarative, self-healing GRE tunnels.")
    parser.add_argument("--version", action="version", version=f"greupd {__version__}")
    parser.add_argument("-n", "--netns", metavar="NETNS",
                        help="the greupd@NETNS instance, as `ip -n`: its socket (status, metrics, reload), its config "
                             "(/etc/greupd/NETNS/tunnels.toml), and for plan and import the kernel inside NETNS")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser, positional: bool = False) -> argparse.ArgumentParser:
        p.add_argument("-c", "--config", metavar="PATH",
                       help=f"config file (default: $GREUPD_CONFIG or {DEFAULT_CONFIG})")
        if positional:
            p.add_argument("path", nargs="?", metavar="PATH", help="the config file, as an alternative to -c")
        return p

    def with_socket(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--socket", metavar="PATH",
                       help=f"control socket (default: $GREUPD_CONTROL_SOCKET or {DEFAULT_CONTROL_SOCKET})")
        return p

    run = with_socket(with_config(sub.add_parser("run", help="run the daemon in the foreground")))
    run.set_defaults(func=cmd_run)
    check = with_config(sub.add_parser("check", help="validate the config and print a summary"), positional=True)
    check.add_argument("--json", action="store_true", help='print {"valid": ..., "errors": [...]}')
    check.set_defaults(func=cmd_check)
    plan = with_config(sub.add_parser("plan", help="print what run or a reload would change"), positional=True)
    plan.add_argument("--json", action="store_true", help='print {"changes": [...], "errors": [...]}')
    plan.add_argument("--detailed-exitcode", action="store_true",
                      help=f"exit {EXIT_OK} when nothing would change, {EXIT_CHANGES} when something would, "
                           f"{EXIT_INVALID} on an error")
    plan.set_defaults(func=cmd_plan)
    status = with_config(with_socket(sub.add_parser("status", help="ask the running daemon")))
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--check", action="store_true",
                        help=f"exit {EXIT_TUNNELS_DOWN} while a tunnel (of those named) is down or in error")
    status.add_argument("names", nargs="*", metavar="NAME", help="only these tunnels (exit 1 for an unknown name)")
    status.set_defaults(func=cmd_status)
    metrics = with_config(with_socket(sub.add_parser("metrics", help="the running daemon's Prometheus metrics")))
    metrics.set_defaults(func=cmd_metrics)
    from greupd.importer import SOURCES

    importer = sub.add_parser("import", help="print a tunnels.toml describing existing GRE tunnels (adopt = true)")
    importer.add_argument("--from", dest="source", choices=SOURCES, default="kernel",
                          help="where the tunnels are described (default: the running kernel)")
    importer.add_argument("words", nargs="*", metavar="[PATH] [NAME]",
                          help="the file or directory to read (not for kernel), then tunnel names (default: all)")
    importer.set_defaults(func=cmd_import)
    reload = with_config(with_socket(sub.add_parser("reload", help="re-read the config in the running daemon")))
    reload.set_defaults(func=cmd_reload)
    sub.add_parser("schema", help="print the JSON Schema of tunnels.toml").set_defaults(func=cmd_schema)
    doctor = with_config(with_socket(sub.add_parser(
        "doctor", help="name what keeps tunnels from working on this host, with the evidence and the fix")))
    doctor.add_argument("--json", action="store_true",
                        help='print {"findings": [{"check", "tunnel", "severity", "message", "evidence", "fix"}]}')
    doctor.add_argument("names", nargs="*", metavar="NAME", help="only these tunnels (default: all enabled ones)")
    doctor.set_defaults(func=cmd_doctor)
    from greupd import install_units

    units = sub.add_parser("install-units", help="write the systemd units for a pip/pipx install (this interpreter)")
    install_units.add_arguments(units)
    units.set_defaults(func=install_units.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The greupd command; every way it ends is one of greupd(8)'s exit statuses, never a stray traceback."""
    try:
        code = _main(argv)
        sys.stdout.flush()  # here, not at interpreter exit, where a closed pipe could only be reported
        return code
    except BrokenPipeError:
        if _stdout_closed():
            # Our reader went away (`greupd plan | head -1`): stop quietly, as a program killed by SIGPIPE would.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_PIPE_CLOSED
        return _crashed()  # some socket's, not our reader's: a bug like any other
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception:
        return _crashed()


def _crashed() -> int:
    """A bug: its traceback, and EXIT_CRASH. Not 1: greupd.service's RestartPreventExitStatus=1 means "the config
    does not validate", which a restart cannot fix, while a crash is worth a restart."""
    traceback.print_exc()
    return EXIT_CRASH


def _stdout_closed() -> bool:
    """Whether standard output is a pipe or socket whose reading end is gone (poll(2) reports POLLERR)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _fd, events in poller.poll(0))
    except (OSError, ValueError):
        return False


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "path", None) and args.config:
        parser.error("give the config file either as PATH or with -c, not both")
    if args.netns is not None:
        try:
            netns_instance(args.netns)
        except ValueError as exc:
            parser.error(f"-n/--netns: {exc}")
        if args.command == "run":
            parser.error(f"-n/--netns is for asking greupd@{args.netns}, not for running it: "
                         f"systemctl start greupd@{args.netns} (or ip netns exec {args.netns} greupd run)")
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
