"""What the CLI prints for people: the `greupd status` table and the `greupd plan` report.

The daemon speaks JSON (greupd/status.py) and journal events (greupd/events.py); turning its answers into
tables and paragraphs is the CLI's business, so it lives here, beside cli.py, and nothing in the daemon
imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from greupd.config import Config, format_duration
from greupd.status import DaemonStatus, TunnelStatus

if TYPE_CHECKING:
    from greupd.model import Plan

# --- the table of `greupd status` ------------------------------------------------------------------------------

def _age(since: str, now: datetime) -> str:
    try:
        then = datetime.fromisoformat(since.replace("Z", "+00:00"))
    except ValueError:
        return since
    seconds = max(int((now - then).total_seconds()), 0)
    if seconds < 60:
        return f"{seconds}s ago"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s ago"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m ago"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h ago"


def _keepalive_cell(tunnel: TunnelStatus) -> str:
    keepalive = tunnel["keepalive"]
    if keepalive is None:
        return "-"
    rtt = f" rtt {keepalive['last_rtt_ms']:.2f}ms" if keepalive["last_rtt_ms"] is not None else ""
    missed = f" missed {keepalive['missed_in_a_row']}" if keepalive["missed_in_a_row"] else ""
    return (f"{format_duration(keepalive['interval'])}x{keepalive['retries']}"
            f" {keepalive['sent']}/{keepalive['received']}{rtt}{missed}")


def _routes_cell(tunnel: TunnelStatus) -> str:
    if not tunnel["routes"]:
        return "-"
    return " ".join(tunnel["routes"]) + ("" if tunnel["routes_installed"] else " (withdrawn)")


def format_status(status: DaemonStatus, now: datetime | None = None) -> str:
    """The table `greupd status` prints for people; `--json` prints the DaemonStatus itself."""
    now = now or datetime.now(UTC)
    lines = [f"greupd pid {status['pid']}, config {status['config']}, generation {status['generation']}"]
    if status["last_error"]:
        lines.append(f"last error: {status['last_error']}")
    lines.extend(f"warning: {line}" for line in status.get("warnings", []))
    header = ("NAME", "STATE", "SINCE", "REASON", "REMOTE", "KEEPALIVE sent/recv", "ROUTES")
    rows = [header]
    notes: list[str] = []
    for t in status["tunnels"]:
        rows.append((t["name"], t["state"], _age(t["since"], now), t["reason"], t["remote"],
                     _keepalive_cell(t), _routes_cell(t)))
        if t["error"]:
            notes.append(f"{t['name']}: {t['error']}")
    if len(rows) == 1:
        lines.append("no tunnels configured")
    else:
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines.extend("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                     for row in rows)
    lines.extend(notes)
    return "\n".join(lines)


# --- the report of `greupd plan` -------------------------------------------------------------------------------

@dataclass(frozen=True)
class PlanReport:
    """What `greupd run` (or a reload) would change right now, in the kernel and in greupd's nftables table."""

    plan: Plan
    table: str  # the nftables table, `inet <name>`
    ruleset_text: str  # the ruleset in nft syntax
    nft_action: str | None  # create-nft-table, replace-nft-table, remove-nft-table; None: nothing to do
    nft_error: str | None  # nftables could not be asked, and the config needs a table
    ipsec_text: str = ""  # the strongSwan connections greupd keeps loaded ([tunnel.ipsec]), swanctl.conf syntax
    warnings: tuple[str, ...] = ()  # other tables' forward drops that defeat our accepts (nft/foreign.py, M9)

    def changes(self) -> list[dict[str, object]]:
        """One object per change, for `plan --json`: the tunnel, a stable action word, the text `plan` prints."""
        from greupd.model import action_tunnel

        changes: list[dict[str, object]] = [
            {"tunnel": action_tunnel(a), "action": _kebab(type(a).__name__), "description": str(a)}
            for a in self.plan.actions]
        if self.nft_action is not None:
            changes.append({"tunnel": None, "action": self.nft_action,
                            "description": f"nftables table {self.table}: {self.nft_action.split('-')[0]}"})
        return changes

    def errors(self) -> list[dict[str, object]]:
        errors: list[dict[str, object]] = [{"tunnel": p.tunnel, "message": p.message} for p in self.plan.problems]
        if self.nft_error is not None:
            errors.append({"tunnel": None, "message": self.nft_error})
        return errors


def _kebab(name: str) -> str:
    """CreateLink -> create-link."""
    return "".join(f"-{c.lower()}" if c.isupper() and i else c.lower() for i, c in enumerate(name))


def plan_report(config: Config) -> PlanReport:
    """Observe the kernel and nftables once and plan against them; changes nothing."""
    # Imported here: `greupd status` prints through this module and needs neither netlink nor libnftables.
    from greupd.ipsec.connections import describe_connections, desired_connections
    from greupd.model import desired_state
    from greupd.netlink.kernel import Kernel
    from greupd.nft.foreign import observe_forward_drops, tunnels_with_accepts, warnings
    from greupd.nft.ipsec import render_ipsec_ruleset
    from greupd.nft.render import describe_ruleset, render_ruleset
    from greupd.nft.table import NftError, NftTable
    from greupd.plan import plan_changes

    kernel = Kernel()
    try:
        desired = desired_state(config)
        plan = plan_changes(desired, kernel.observe(desired))
    finally:
        kernel.close()
    ruleset = render_ruleset(config)
    table = NftTable(config.daemon.nft_table)
    action: str | None = None
    error: str | None = None
    found: list[str] = []
    try:
        if not table.matches(ruleset):
            action = ("replace-nft-table" if table.present() else "create-nft-table") if ruleset.wanted \
                else "remove-nft-table"
        if tunnels_with_accepts(config):
            found = warnings(config, observe_forward_drops(table.query, config.daemon.nft_table))
    except NftError as exc:
        # With nothing to put in a table, nftables that cannot be asked cannot hold one of ours either.
        error = f"nftables: {exc}" if ruleset.wanted else None
    connections = desired_connections(config)
    ipsec = (f"\n# strongSwan connections greupd keeps loaded in charon ({config.daemon.vici_socket})\n"
             f"{describe_connections(connections)}") if connections else ""
    if (drops := render_ipsec_ruleset(config)).wanted:  # require = true: in a table of their own (nft/ipsec.py)
        ipsec += f"\n# nftables table inet {drops.table}: no cleartext GRE (ipsec require)\n{describe_ruleset(drops)}"
    return PlanReport(plan, f"inet {config.daemon.nft_table}", describe_ruleset(ruleset), action, error, ipsec,
                      tuple(found))


_NFT_STATE = {None: "unchanged", "create-nft-table": "to be created", "replace-nft-table": "to be replaced",
              "remove-nft-table": "to be removed"}


def describe_plan(report: PlanReport) -> str:
    """The plan as `greupd plan` prints it: kernel actions, then the nftables table."""
    from greupd.plan import describe

    state = f"unknown ({report.nft_error})" if report.nft_error else _NFT_STATE[report.nft_action]
    warned = "".join(f"\n# warning: {line}" for line in report.warnings)
    return (f"# kernel\n{describe(report.plan)}\n\n# nftables table {report.table} ({state})\n{report.ruleset_text}"
            f"{warned}{report.ipsec_text}")
