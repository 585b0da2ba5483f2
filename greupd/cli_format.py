"""What the CLI prints for people: the `greupd status` table and the `greupd plan` report.

The daemon speaks JSON (greupd/status.py) and journal events (greupd/events.py); turning its answers into
tables and paragraphs is the CLI's business, so it lives here, beside cli.py, and nothing in the daemon
imports it.
"""

from __future__ import annotations

from datetime import UTC, datetime

from greupd.config import Config, format_duration
from greupd.status import DaemonStatus, TunnelStatus

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

def describe_plan(config: Config) -> str:
    """What `greupd run` (or a reload) would change right now: kernel actions, then the nftables table."""
    # Imported here: `greupd status` prints through this module and needs neither netlink nor libnftables.
    from greupd.ipsec.connections import describe_connections, desired_connections
    from greupd.model import desired_state
    from greupd.netlink.kernel import Kernel
    from greupd.nft.render import describe_ruleset, render_ruleset
    from greupd.nft.table import NftError, NftTable
    from greupd.plan import describe, plan_changes

    kernel = Kernel()
    try:
        desired = desired_state(config)
        plan = plan_changes(desired, kernel.observe(desired))
    finally:
        kernel.close()
    ruleset = render_ruleset(config)
    table = NftTable(config.daemon.nft_table)
    try:
        if table.matches(ruleset):
            nft_state = "unchanged"
        else:
            nft_state = "to be replaced" if table.present() else "to be created"
    except NftError as exc:
        nft_state = f"unknown ({exc})"
    text = (f"# kernel\n{describe(plan)}\n\n# nftables table inet {config.daemon.nft_table} ({nft_state})\n"
            f"{describe_ruleset(ruleset)}")
    connections = desired_connections(config)
    if connections:
        text += (f"\n# strongSwan connections greupd keeps loaded in charon ({config.daemon.vici_socket})\n"
                 f"{describe_connections(connections)}")
    return text
