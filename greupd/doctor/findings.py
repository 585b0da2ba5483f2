"""What doctor reports: one Finding per problem, as `doctor --json` prints it and as people read it."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Literal

# Every check id doctor has (spec.md, "Added 2026-12-06"), in the order they are reported and documented.
CHECKS = (
    "gre-module-missing",
    "local-address-missing",
    "interface-missing",
    "firewall-drops-gre",
    "forward-drop",
    "rp-filter",
    "ip-forward-off",
    "conntrack-timeout",
    "tunnel-clash",
    "peer-silent",
    "mtu-blackhole",
    "ipsec-no-sa",
    "nat-in-path",
)

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Finding:
    """One problem: what (message), how doctor knows (evidence), and what to do (fix: a command or a config line).

    Evidence that is not a traced packet says so ("inferred from the rule text: ...").
    """

    check: str
    tunnel: str | None
    severity: Severity
    message: str
    evidence: str
    fix: str

    def __post_init__(self) -> None:
        if self.check not in CHECKS:
            raise ValueError(f"unknown check id {self.check!r}")

    def as_json(self) -> dict[str, object]:
        return asdict(self)

    def one_line(self) -> str:
        """As `greupd plan`'s warnings, `greupd status`'s and the daemon's journal show it: the fix's first line."""
        who = f"{self.tunnel}: " if self.tunnel else ""
        return f"{who}{self.message} (greupd doctor: {self.check}; fix: {self.fix.splitlines()[0]})"


def findings_json(findings: Iterable[Finding]) -> dict[str, object]:
    return {"findings": [f.as_json() for f in findings]}


def describe_findings(findings: Iterable[Finding], notes: Iterable[str] = ()) -> str:
    """The text `greupd doctor` prints: one paragraph per finding, then what doctor could not look at."""
    paragraphs = []
    for f in findings:
        who = f" {f.tunnel}" if f.tunnel else ""
        fix = "\n".join(f"      {line}" for line in f.fix.splitlines())
        evidence = "\n".join(f"      {line}" for line in f.evidence.splitlines())
        paragraphs.append(f"{f.severity}{who}: {f.message} [{f.check}]\n  evidence:\n{evidence}\n  fix:\n{fix}")
    if not paragraphs:
        paragraphs.append("doctor: nothing found")
    paragraphs.extend(f"note: {note}" for note in notes)
    return "\n\n".join(paragraphs)
