"""What greupd tells the journal (and stderr) when router A's tunnel to B goes down and comes back.

journald itself is exercised by the systemd lab tests (tests/test_systemd_lab.py); here the fields are checked
as values, and the stderr path runs for real.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from greupd.events import (
    MESSAGE_IDS,
    ConfigRejected,
    ConfigReloaded,
    DaemonError,
    DaemonStarted,
    DaemonStopping,
    EventKind,
    EventLog,
    TunnelChanged,
    journal_fields,
    journald_attached,
    kind_of,
    message_of,
    stderr_line,
    tunnel_change_message,
)

REPO = Path(__file__).resolve().parent.parent
A_DOWN = TunnelChanged("My_Tunnel", "down", "up", "keepalive-timeout",
                       "tunnel My_Tunnel down: 3 keepalives missed (interval 1s), routes 20.10.1.0/24 withdrawn")


def test_tunnel_down_entry_has_every_spec_field() -> None:
    assert journal_fields(A_DOWN) == {
        "MESSAGE": "tunnel My_Tunnel down: 3 keepalives missed (interval 1s), routes 20.10.1.0/24 withdrawn",
        "MESSAGE_ID": MESSAGE_IDS[EventKind.TUNNEL_DOWN],
        "PRIORITY": "4",
        "SYSLOG_IDENTIFIER": "greupd",
        "GREUPD_EVENT": "tunnel-down",
        "GREUPD_TUNNEL": "My_Tunnel",
        "INTERFACE": "My_Tunnel",
        "GREUPD_STATE": "down",
        "GREUPD_PREVIOUS_STATE": "up",
        "GREUPD_REASON": "keepalive-timeout",
    }


def test_tunnel_up_is_a_notice_with_its_own_id() -> None:
    fields = journal_fields(TunnelChanged("My_Tunnel", "up", "down", "keepalive-restored", ""))
    assert fields["PRIORITY"] == "5"
    assert fields["MESSAGE_ID"] == MESSAGE_IDS[EventKind.TUNNEL_UP] != MESSAGE_IDS[EventKind.TUNNEL_DOWN]
    assert fields["MESSAGE"] == "tunnel My_Tunnel up: keepalive restored"


def test_first_state_has_no_previous_state_field() -> None:
    assert "GREUPD_PREVIOUS_STATE" not in journal_fields(TunnelChanged("My_Tunnel", "up", None, "config", ""))


def test_tunnel_events_name_the_interface_as_networkd_does_and_daemon_events_do_not() -> None:
    # `networkctl status My_Tunnel` shows journal entries with INTERFACE=My_Tunnel (networkd's own field).
    assert journal_fields(DaemonError("route refused", "My_Tunnel"))["INTERFACE"] == "My_Tunnel"
    assert "INTERFACE" not in journal_fields(DaemonError("cannot read the kernel's state"))
    assert "INTERFACE" not in journal_fields(ConfigReloaded(2, ("/etc/greupd/tunnels.toml",)))


def test_message_ids_are_distinct_128_bit_hex() -> None:
    ids = list(MESSAGE_IDS.values())
    assert len(set(ids)) == len(ids) == len(EventKind)
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)


def test_rejected_config_is_an_error_with_a_one_line_message() -> None:
    error = ("/etc/greupd/tunnels.toml:31: tunnel[0].keepalive.interval: must be at least 0.05\n"
             "/etc/greupd/tunnels.toml:40: tunnel[1].remote: not an IP address")
    fields = journal_fields(ConfigRejected(error, generation=3))
    assert fields["PRIORITY"] == "3"
    assert fields["MESSAGE"] == ("config rejected, generation 3 stays in force: /etc/greupd/tunnels.toml:31:"
                                 " tunnel[0].keepalive.interval: must be at least 0.05 (and 1 more problem)")
    assert fields["GREUPD_ERROR"] == error
    assert fields["GREUPD_GENERATION"] == "3"


def test_reloaded_and_lifecycle_messages() -> None:
    files = ("/etc/greupd/tunnels.toml", "/etc/greupd/tunnels.d/10-backup.toml")
    assert message_of(ConfigReloaded(4, files)) == (
        "config reloaded: generation 4 from /etc/greupd/tunnels.toml /etc/greupd/tunnels.d/10-backup.toml")
    assert journal_fields(ConfigReloaded(4, files))["GREUPD_GENERATION"] == "4"
    assert message_of(DaemonStarted(1, files[:1], 1)) == (
        "started: 1 tunnel from /etc/greupd/tunnels.toml (generation 1)")
    assert message_of(DaemonStopping("keep")) == "stopping: leaving tunnels and routes in place (on_exit = keep)"
    assert journal_fields(DaemonStopping("remove"))["GREUPD_ON_EXIT"] == "remove"


def test_a_multiline_message_is_folded_to_one_line() -> None:
    event = TunnelChanged("My_Tunnel", "error", "up", "apply-failed", "tunnel My_Tunnel error:\nFile exists")
    assert message_of(event) == "tunnel My_Tunnel error: File exists"
    assert kind_of(event) is EventKind.TUNNEL_ERROR
    assert journal_fields(DaemonError("nft: boom\ndetails", "My_Tunnel"))["MESSAGE"] == "tunnel My_Tunnel: nft: boom"


@pytest.mark.parametrize(("state", "reason", "kwargs", "expected"), [
    ("down", "keepalive-timeout", {"keepalive_interval": 1.0, "retries": 3},
     "tunnel My_Tunnel down: 3 keepalives missed (interval 1s), routes 20.10.1.0/24 withdrawn"),
    ("down", "keepalive-timeout", {"keepalive_interval": 0.3, "retries": 5},
     "tunnel My_Tunnel down: 5 keepalives missed (interval 300ms), routes 20.10.1.0/24 withdrawn"),
    ("up", "keepalive-restored", {"keepalive_interval": 1.0, "replies": 1},
     "tunnel My_Tunnel up: 1 keepalive reply received (interval 1s), routes 20.10.1.0/24 installed"),
    ("down", "link-removed", {},
     "tunnel My_Tunnel down: link removed, routes 20.10.1.0/24 withdrawn"),
])
def test_tunnel_change_message(state: str, reason: str, kwargs: dict[str, float], expected: str) -> None:
    message = tunnel_change_message("My_Tunnel", state, reason, routes=["20.10.1.0/24"], **kwargs)  # type: ignore[arg-type]
    assert message == expected


def test_stderr_line_carries_time_level_and_message() -> None:
    when = datetime(2026, 11, 24, 20, 15, 2, 120_000, tzinfo=UTC)
    assert stderr_line(A_DOWN, when) == ("2026-11-24T20:15:02.120Z greupd warning: tunnel My_Tunnel down:"
                                         " 3 keepalives missed (interval 1s), routes 20.10.1.0/24 withdrawn")


def test_outside_systemd_events_are_plain_stderr_lines() -> None:
    stream = io.StringIO()
    log = EventLog(journal=False, stream=stream)
    log.tunnel_changed("My_Tunnel", "down", "up", "keepalive-timeout", A_DOWN.message)
    log.config_rejected("tunnels.toml:3: tunnel[0].remote: not an IP address")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("greupd warning: " + A_DOWN.message)
    assert lines[1].endswith("greupd error: config rejected, the running config stays in force:"
                             " tunnels.toml:3: tunnel[0].remote: not an IP address")


def test_journal_forced_without_journald_falls_back_to_stderr() -> None:
    if Path("/run/systemd/journal/socket").exists():
        pytest.skip("a journald runs here; the fallback path is for machines without one")
    stream = io.StringIO()
    log = EventLog(journal=True, stream=stream)
    log.emit(A_DOWN)
    assert not log.to_journal
    assert stream.getvalue().splitlines()[0].endswith(A_DOWN.message)


def test_journal_stream_must_match_stderr(tmp_path: Path) -> None:
    with open(tmp_path / "stderr", "w") as err:
        st = os.fstat(err.fileno())
        assert journald_attached({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, err.fileno())
        assert not journald_attached({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}, err.fileno())
        assert not journald_attached({"JOURNAL_STREAM": "garbage"}, err.fileno())
        assert not journald_attached({}, err.fileno())


def test_eventlog_picks_stderr_when_journal_stream_is_someone_elses(tmp_path: Path) -> None:
    # A child of the service that inherited JOURNAL_STREAM but writes to a file: stderr, not the journal.
    code = ("from greupd.events import EventLog; log = EventLog(); print(log.to_journal);"
            " log.error('nft: Operation not supported')")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "JOURNAL_STREAM": "1:1"})
    assert result.stdout.strip() == "False"
    assert result.stderr.strip().endswith("greupd error: nft: Operation not supported")


def test_catalog_has_an_entry_per_message_id() -> None:
    catalog = (REPO / "systemd" / "greupd.catalog").read_text()
    headers = re.findall(r"^-- ([0-9a-f]{32})$", catalog, flags=re.M)
    assert sorted(headers) == sorted(MESSAGE_IDS.values())


def test_journalctl_indexes_the_catalog(tmp_path: Path) -> None:
    if shutil.which("journalctl") is None:
        pytest.skip("journalctl is not installed")
    catalog_dir = tmp_path / "usr/lib/systemd/catalog"
    catalog_dir.mkdir(parents=True)
    shutil.copy(REPO / "systemd" / "greupd.catalog", catalog_dir)
    # --root keeps the host's catalog database untouched.
    subprocess.run(["journalctl", f"--root={tmp_path}", "--update-catalog"], check=True, timeout=60)
    listed = subprocess.run(["journalctl", f"--root={tmp_path}", "--list-catalog"], check=True, timeout=60,
                            capture_output=True, text=True).stdout
    assert {line.split()[0] for line in listed.splitlines()} == set(MESSAGE_IDS.values())
    assert f"{MESSAGE_IDS[EventKind.TUNNEL_DOWN]} greupd: GRE tunnel @GREUPD_TUNNEL@ is down" in listed
