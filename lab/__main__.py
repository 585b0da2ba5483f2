"""python -m lab run --guest uml [--timeout S] [--keep] -- CMD...   |   python -m lab caps"""

from __future__ import annotations

import argparse
import sys

from lab import guest, hosts, kernel


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lab", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="boot a guest, run CMD in it (in the current dir), print its output")
    r.add_argument("--guest", choices=guest.KINDS, default="uml")
    r.add_argument("--timeout", type=float, default=None)
    r.add_argument("--keep", action="store_true", help="keep the run dir under .lab/")
    r.add_argument("--console", action="store_true", help="print the guest console afterwards")
    r.add_argument("command", nargs=argparse.REMAINDER)
    sub.add_parser("caps", help="what the running kernel offers, and which guests can boot")
    sub.add_parser("cleanup", help="remove netns left by killed lab runs")
    a = p.parse_args(argv)

    if a.cmd == "caps":
        print("kernel:", " ".join(sorted(kernel.capabilities())) or "(nothing)")
        for kind in guest.KINDS:
            print(f"{kind}:", guest.unavailable(kind) or "available")
        return 0
    if a.cmd == "cleanup":
        print("\n".join(hosts.remove_leftovers()))
        return 0
    command = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not command:
        p.error("run: no command given")
    res = guest.run(a.guest, command, timeout=a.timeout, stream=sys.stdout, keep=a.keep or None)
    if a.console:
        print(res.console, file=sys.stderr)
    if res.error:
        print(res.describe(), file=sys.stderr)
    cpu = f", CPU {res.cpu_seconds:.1f} s" if res.cpu_seconds is not None else ""
    what = res.error or f"exit status {res.status}"
    print(f"lab: {a.guest} guest: {what} ({res.seconds:.1f} s{cpu})", file=sys.stderr)
    # 125, like `git bisect run`'s "cannot test": the command never ran to completion.
    return res.status if res.status is not None else 125


if __name__ == "__main__":
    sys.exit(main())
