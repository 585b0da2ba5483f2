"""One target under atheris: `python -m fuzz.worker TARGET [libFuzzer options] CORPUS_DIR SEED_DIR`.

greupd (and the parser the target drives, e.g. tomllib) is imported under atheris's instrumentation, so
libFuzzer sees which branches an input reaches and keeps the inputs that reach new ones (`cov:` counts
edges, `ft:` features). A crash is recorded (fuzz/findings.py) and the campaign goes on: one run collects
every distinct bug of a target rather than stopping at the first, and prints `FINDING <signature> new|known`
per signature the first time this run hits it.
"""

from __future__ import annotations

import sys

import atheris

from fuzz import findings
from fuzz.targets import TARGETS


def main() -> None:
    target = TARGETS[sys.argv[1]]
    with atheris.instrument_imports(include=list(target.instrument)):
        import greupd.config
        import greupd.control
        import greupd.importer.sources
        import greupd.importer.write
        import greupd.ipsec.supervisor
        import greupd.ipsec.vici
        import greupd.keepalive.codec
        import greupd.metrics
        import greupd.netlink.rtnl
        if "tomllib" in target.instrument:
            import tomllib  # noqa: F401
        if "yaml" in target.instrument:
            import yaml  # noqa: F401
        if "vici" in target.instrument:
            import vici.protocol  # noqa: F401
    # The importers import their readers lazily: bring them in now, instrumented.
    with atheris.instrument_imports(include=["greupd"]):
        import greupd.importer.ifupdown
        import greupd.importer.netplan
        import greupd.importer.networkd  # noqa: F401
    seen: set[str] = set()

    def one_input(data: bytes) -> None:
        try:
            target.run(data)
        except Exception as exc:
            name, new = findings.record(target.name, data, exc)
            if name not in seen:
                seen.add(name)
                print(f"FINDING {name} {'new' if new else 'known'}: {type(exc).__name__}: {str(exc)[:200]}",
                      file=sys.stderr, flush=True)

    atheris.Setup([sys.argv[0], *sys.argv[2:]], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
