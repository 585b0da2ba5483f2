"""doctor's run-time checks in the daemon (#24 item 4): what keeps a tunnel from being made, in its own words.

After a pass, the daemon hands its errors here. The checks that apply at run time (checks.RUNTIME_CHECKS: a
kernel without ip_gre, a `local` on no interface, a `from_tunnel` interface that does not exist, a clashing
link) are run on a fresh, cheap read of the host (read.runtime_facts: links, addresses, modules) when it can
have changed something: the first pass of a config whose tunnels differ in what the checks read (start, most
reloads), a pass the kernel refused something of, and a pass about a tunnel while a finding on it stands, so
that it goes once fixed. Otherwise a pass costs nothing here (a look reads every link and address).

A new finding is journalled once (a warning), as `greupd plan` prints it, so the journal says "the kernel has
no ip_gre" and what to do beside errno 95; while it stands it is one of `greupd status`'s warnings; when it goes,
an info line says so. Retrying what the kernel refused is the queue's business (queue.py backs off to 60 s).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Protocol

from greupd.config import Config
from greupd.doctor.checks import runtime_findings
from greupd.doctor.facts import HostFacts
from greupd.doctor.findings import Finding
from greupd.doctor.read import runtime_facts
from greupd.netlink.kernel import ApplyError

log = logging.getLogger("greupd")


class HasWarnings(Protocol):
    @property
    def warnings(self) -> Sequence[str]: ...


class HostWarnings:
    def __init__(self, on_error: Callable[[str], None],
                 read: Callable[[Config], HostFacts] = runtime_facts) -> None:
        self._on_error, self._read = on_error, read  # `read`: the host, or made-up facts in the unit tests
        self._looked_at: object = None  # what the checks read of the config at the last look (read_by_checks)
        self.findings: list[Finding] = []

    def after_pass(self, config: Config, names: frozenset[str] | None, errors: Sequence[ApplyError]) -> None:
        """Journal the errors that are no tunnel's (a tunnel's is its state change), then look if it may matter.
        `names`: the tunnels the pass was for (None: all of them)."""
        for error in errors:
            if error.tunnel is None:
                self._on_error(str(error))
        if not self._worth_a_look(config, names, errors):
            return
        self._looked_at = read_by_checks(config)
        try:
            found = runtime_findings(config, self._read(config))
        except Exception as exc:  # never the end of the daemon: these are hints, not its work
            log.info("doctor's run-time checks could not read the host: %s", exc)
            return
        lines = {f.one_line() for f in self.findings}
        for finding in found:
            if finding.one_line() not in lines:
                log.warning("%s", finding.one_line())  # a warning, not last_error: the pass itself may have worked
        now = {f.one_line() for f in found}
        for line in sorted(lines - now):
            log.info("no longer: %s", line)
        self.findings = found

    def _worth_a_look(self, config: Config, names: frozenset[str] | None, errors: Sequence[ApplyError]) -> bool:
        """A look reads every link and address (~0.1 s with 2,000 links): not for a pass that cannot change what it
        would find. Yes for the kernel refusing something (the queue backs those off), for a config whose tunnels
        differ in what the checks read (start, most reloads), and for a pass about a tunnel with a finding."""
        if errors or read_by_checks(config) != self._looked_at:
            return True
        standing = {f.tunnel for f in self.findings}
        return bool(standing) and (names is None or bool(standing & names))

    def lines(self, *others: HasWarnings) -> list[str]:
        """`greupd status`'s warnings: the others' (nftables') first, then the standing findings."""
        return [*(line for other in others for line in other.warnings), *(f.one_line() for f in self.findings)]


def read_by_checks(config: Config) -> object:
    """What of the config the run-time checks read: a reload that changes none of it needs no new look."""
    return tuple((t.name, t.mode, t.local, t.remote, t.key, t.ikey, tuple(t.nat.from_tunnel))
                 for t in config.tunnels if t.enabled)
