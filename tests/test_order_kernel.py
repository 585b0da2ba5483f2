"""The nftables table (MSS clamp, NAT, forward accepts) is in place before any route sends traffic into the
tunnel, and leaves only after the routes (#11, first bullet of "Build").

Seen before the fix, in the qemu guest: the route went in first and the table a second later, so the
connections opened in that window kept MSS 1460 and their LAN sources went out un-NATed.

How it is checked: `ip monitor route` and `nft monitor` run in router A beside greupd. The moment greupd's
route appears (or its table is deleted), the test freezes greupd with SIGSTOP and looks at the kernel: the
table must already be there (the routes must already be gone). What this proves: at the instant the kernel
announced the route, greupd had already committed the table; it does not depend on timing when the order is
right. When the order is wrong it catches it only if the SIGSTOP lands before greupd gets to the table,
which in this slow guest (the table's render and transaction take far longer than the test's reaction) it
does. Runs where the kernel has both ip_gre and inet nftables (the vng guest).
"""

from __future__ import annotations

import queue
import signal
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from lab.greupd_process import GreupdProcess
from lab.hosts import Host, Lab, seed_topology
from lab.waiting import wait_until

pytestmark = pytest.mark.needs_nft_gre

SHIPPED = (Path(__file__).resolve().parents[1] / "etc" / "greupd" / "tunnels.toml").read_text()
# Without the keepalive: B runs no greupd here, and its verdict would withdraw the route mid-test.
CONFIG = (SHIPPED[:SHIPPED.index("[tunnel.keepalive]")] + SHIPPED[SHIPPED.index("[tunnel.mss]"):]).replace(
    'on_exit = "keep"', 'on_exit = "remove"')
NO_TUNNELS = CONFIG[:CONFIG.index("[[tunnel]]")]
ROUTE = "20.10.1.0/24 dev My_Tunnel proto 222"
TIMEOUT = 600.0  # the guest emulates its CPU, niced, beside the UML batches


class Monitor:
    """A monitor command's output lines, read in a thread as they come."""

    def __init__(self, host: Host, *argv: str) -> None:
        self._lines: queue.Queue[str] = queue.Queue()
        self.proc = host.popen(*argv, stdout=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)

    def drain(self) -> None:
        """Forget what was reported so far (a table replaced at start also reports a `delete table`)."""
        while not self._lines.empty():
            self._lines.get_nowait()

    def wait_for(self, wanted: Callable[[str], bool], what: str, detail: Callable[[], str]) -> str:
        while True:
            try:
                line = self._lines.get(timeout=TIMEOUT)
            except queue.Empty:
                raise AssertionError(f"no {what} in {TIMEOUT:.0f} s:\n{detail()}") from None
            if wanted(line):
                return line


def frozen_look(daemon: GreupdProcess, look: Callable[[], str]) -> str:
    """What `look` sees while greupd is stopped where it stands."""
    daemon.signal(signal.SIGSTOP)
    try:
        return look()
    finally:
        daemon.signal(signal.SIGCONT)


def wait_for_table_gone(daemon: GreupdProcess, tables: Monitor, table: Callable[[], str],
                        our_routes: Callable[[], str], what: str, detail: Callable[[], str]) -> None:
    """Each `delete table` greupd commits: replacing the table (add, delete, add in one transaction) reports one
    too, so look each time, and once the table is really gone, greupd's routes must be gone already."""
    while True:
        tables.wait_for(lambda line: line.startswith("delete table inet greupd"), what, detail)
        seen = frozen_look(daemon, lambda: table() + "\n---\n" + our_routes())
        present, left = seen.split("\n---\n")
        if "table inet greupd" not in present:
            assert left.strip() == "", f"the table went before the route:\n{left}"
            return


def test_the_table_goes_in_before_the_route_and_out_after_it() -> None:
    with Lab() as lab:
        a = seed_topology(lab).a

        def table() -> str:
            return a.run("nft", "list", "table", "inet", "greupd", check=False).stdout

        def our_routes() -> str:
            return a.ip("route", "show", "table", "all", "proto", "222").stdout

        def route_added(line: str) -> bool:
            return line.startswith(ROUTE)

        routes = Monitor(a, "ip", "monitor", "route")
        tables = Monitor(a, "nft", "monitor", "tables")
        daemon = GreupdProcess(a, CONFIG).start(wait=False)

        def detail() -> str:
            running = daemon.proc is not None and daemon.proc.poll() is None
            return (f"greupd {'running' if running else 'exited'}:\n{daemon.output()}\n"
                    f"{a.ip('-d', 'link').stdout}\n{a.ip('route', 'show', 'table', 'all').stdout}")

        # Start: the table before the route.
        routes.wait_for(route_added, "route at start", detail)
        seen = frozen_look(daemon, table)
        assert "maxseg size set" in seen and "masquerade" in seen, f"the route came before the table:\n{seen!r}"
        daemon.wait_ready(TIMEOUT)

        # A reload that drops the tunnel: the route goes before the table.
        tables.drain()
        daemon.config_path.write_text(NO_TUNNELS)
        daemon.signal(signal.SIGHUP)
        wait_for_table_gone(daemon, tables, table, our_routes, "table deletion on reload", detail)

        # A reload that brings it back: the table before the route again.
        assert wait_until(lambda: (daemon.status() or {}).get("generation") == 2, TIMEOUT), detail()
        routes.drain()
        daemon.config_path.write_text(CONFIG)
        daemon.signal(signal.SIGHUP)
        routes.wait_for(route_added, "route on reload", detail)
        seen = frozen_look(daemon, table)
        assert "maxseg size set" in seen and "masquerade" in seen, f"the route came before the table:\n{seen!r}"

        # Stop with on_exit = "remove": the routes go, then the table.
        daemon.wait_for("My_Tunnel", "up", timeout=TIMEOUT)
        tables.drain()
        daemon.signal(signal.SIGTERM)
        wait_for_table_gone(daemon, tables, table, our_routes, "table deletion at stop", detail)
        assert daemon.proc is not None and daemon.proc.wait(TIMEOUT) == 0
