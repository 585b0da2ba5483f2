"""Router A restarts with a half-edited tunnels.toml: greupd comes back with the last config that applied cleanly,
keeps managing it, says why in `greupd status` and the journal, and takes the fixed file on the next reload. With
no config to fall back on, it refuses to start and names file, line and field (review H4, spec "Starting with a
config that does not validate").

Runs the real daemon on the host kernel in a fresh netns: the kernel there has no GRE, so the tunnel itself
ends in state "error", but the nftables table (clamp, NAT) is managed all the same and shows which config runs.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.greupd_process import GreupdProcess
from lab.hosts import Host, Lab
from lab.waiting import wait_until

pytestmark = pytest.mark.needs_root

SHIPPED = (Path(__file__).resolve().parents[1] / "etc" / "greupd" / "tunnels.toml").read_text()
# The admin was halfway through adding a backup tunnel when the package upgrade restarted greupd.
HALF_EDITED = SHIPPED + '\n[[tunnel]]\nname = "Backup"\nlocal = "172.19.2.1"\nremote = "172.19.2.\n'
FIXED = SHIPPED.replace("clamp = 1436", "clamp = 1400")


@pytest.fixture
def router() -> Iterator[Host]:
    with Lab() as lab:
        yield lab.host("a")


def greupd_table(host: Host) -> str:
    return host.run("nft", "list", "table", "inet", "greupd", check=False).stdout


def test_a_restart_into_a_broken_config_runs_the_last_good_one_until_it_is_fixed(router: Host) -> None:
    daemon = GreupdProcess(router, SHIPPED).start()
    assert daemon.status() is not None and daemon.status()["last_error"] is None  # type: ignore[index]
    kept = daemon.dir / "state" / "last-good.json"
    assert [f["text"] for f in json.loads(kept.read_text())["files"]] == [SHIPPED]

    daemon.kill()  # a crash, a watchdog abort or the upgrade's restart: no clean stop either way
    daemon.config_path.write_text(HALF_EDITED)
    error_line = len(HALF_EDITED.split("\n")) - 1
    daemon.start()

    status = daemon.status()
    assert status is not None
    assert status["last_error"].startswith("config rejected at start, running the last good config (saved ")
    assert f"{daemon.config_path}:{error_line}: TOML syntax: " in status["last_error"]
    assert [t["name"] for t in status["tunnels"]] == ["My_Tunnel"]
    assert "config rejected at start, the last good config runs instead: " in daemon.output()
    assert "started with the last good config (saved " in daemon.output()  # newcomer-3 N16: not "started: 1 tunnel"
    # Still managing: the table of the last good config is put back after someone deletes it.
    assert "ipv4 : 1436, ipv6 : 1416" in greupd_table(router)
    router.run("nft", "delete", "table", "inet", "greupd")
    assert wait_until(lambda: "ipv4 : 1436, ipv6 : 1416" in greupd_table(router), 10), daemon.output()

    still_broken = daemon.reload()
    assert still_broken.returncode == 1 and "reload rejected" in still_broken.stderr
    assert daemon.proc is not None and daemon.proc.poll() is None

    assert daemon.reload(FIXED).returncode == 0
    assert wait_until(lambda: "ipv4 : 1400, ipv6 : 1380" in greupd_table(router), 10), daemon.output()
    status = daemon.status()
    assert status is not None and status["last_error"] is None
    assert [f["text"] for f in json.loads(kept.read_text())["files"]] == [FIXED]
    assert daemon.stop() == 0


def test_a_broken_config_with_nothing_to_fall_back_on_is_not_started(router: Host) -> None:
    daemon = GreupdProcess(router, SHIPPED.replace("retries = 3", "retries = 0")).start(wait=False)
    assert daemon.proc is not None and daemon.proc.wait(60) == 1
    line = next(n for n, text in enumerate(SHIPPED.split("\n"), start=1) if text.startswith("retries = 3"))
    assert f"{daemon.config_path}:{line}: tunnel[0].keepalive.retries: " in daemon.output()
    assert "not starting: no last good config to start with instead" in daemon.output()
    assert greupd_table(router) == ""


def test_a_control_socket_that_cannot_be_created_is_a_clear_error(router: Host) -> None:
    # Under greupd.service a path outside /run/greupd is read-only (EROFS); here: a path under a file (ENOTDIR).
    daemon = GreupdProcess(router, SHIPPED)
    daemon.socket = daemon.config_path / "control.sock"
    daemon.start(wait=False)
    assert daemon.proc is not None and daemon.proc.wait(60) == 1
    assert f"greupd error: cannot create the control socket {daemon.socket}: File exists (under greupd.service" \
        in daemon.output()
    assert "Traceback" not in daemon.output()
    assert greupd_table(router) == ""  # stopped before touching anything


# --- files that cannot be read (review H2, newcomer-3 N2, N6, N11) ----------------------------------------------

# Router A's backup tunnel, in a drop-in. Its MSS clamp (1300) shows in the nftables table while greupd manages it.
BACKUP = """[[tunnel]]
name = "Backup"
local = "172.19.2.1"
remote = "172.19.2.2"
routes = ["20.10.1.0/24"]
metric = 10

[tunnel.mss]
clamp = 1300
"""
# Root without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH obeys file modes, as user greupd under greupd.service does: a
# root-owned directory of mode 000 is as closed to it as a 0700 one is to user greupd.
AS_THE_UNITS_USER = ("setpriv", "--bounding-set=-dac_override,-dac_read_search", "--")


def names(daemon: GreupdProcess) -> list[str]:
    status = daemon.status()
    assert status is not None
    return [t["name"] for t in status["tunnels"]]


def test_a_reload_that_cannot_read_a_file_is_rejected_and_deletes_nothing(router: Host) -> None:
    daemon = GreupdProcess(router, SHIPPED)
    dropins = daemon.dir / "tunnels.d"
    dropins.mkdir()
    (dropins / "10-backup.toml").write_text(BACKUP)
    daemon.prefix = AS_THE_UNITS_USER
    daemon.start()
    assert names(daemon) == ["My_Tunnel", "Backup"]
    assert "1300" in greupd_table(router)
    generation = daemon.status()["generation"]  # type: ignore[index]

    # SIGHUP while tunnels.toml is a FIFO nobody writes to: open() used to block the loop (status unanswered).
    daemon.config_path.rename(daemon.dir / "tunnels.toml.bak")
    os.mkfifo(daemon.config_path)
    daemon.signal(signal.SIGHUP)
    assert wait_until(lambda: "is a FIFO" in str((daemon.status(check=False) or {}).get("last_error")), 20), \
        daemon.output()
    status = daemon.status()
    assert status is not None and status["generation"] == generation
    assert [t["name"] for t in status["tunnels"]] == ["My_Tunnel", "Backup"]
    assert f"{daemon.config_path}: is a FIFO (named pipe), not a regular file" in status["last_error"]
    daemon.config_path.unlink()
    (daemon.dir / "tunnels.toml.bak").rename(daemon.config_path)

    # tunnels.d closed to the daemon (umask 077): Path.glob swallowed the EACCES, the reload dropped Backup and
    # deleted its link, routes and table entries.
    dropins.chmod(0o000)
    try:
        refused = daemon.reload()
    finally:
        dropins.chmod(0o755)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert f"{dropins}: cannot list the drop-in directory: Permission denied" in refused.stderr
    assert names(daemon) == ["My_Tunnel", "Backup"]
    assert daemon.status()["generation"] == generation  # type: ignore[index]
    assert "1300" in greupd_table(router)
    assert daemon.proc is not None and daemon.proc.poll() is None
    assert "Traceback" not in daemon.output()

    assert daemon.reload().returncode == 0  # readable again: the same config, taken
    assert names(daemon) == ["My_Tunnel", "Backup"]
    assert daemon.stop() == 0


def test_a_start_with_toml_nested_too_deeply_runs_the_last_good_config(router: Host) -> None:
    # newcomer-3 N2: tomllib's RecursionError crashed `greupd run` before the last-good fallback, every restart.
    daemon = GreupdProcess(router, SHIPPED).start()
    daemon.kill()
    nested = SHIPPED + "nested = " + "[" * 500 + "]" * 500 + "\n"
    daemon.config_path.write_text(nested)
    daemon.start()
    status = daemon.status()
    assert status is not None
    assert status["last_error"].startswith("config rejected at start, running the last good config (saved ")
    line = nested.count("\n")
    assert f"{daemon.config_path}:{line}: arrays or tables nested 500 deep" in status["last_error"]
    assert [t["name"] for t in status["tunnels"]] == ["My_Tunnel"]
    assert "ipv4 : 1436, ipv6 : 1416" in greupd_table(router)
    assert "started with the last good config (saved " in daemon.output()
    assert "Traceback" not in daemon.output()
    assert daemon.stop() == 0
