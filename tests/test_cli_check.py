"""`greupd check` and `greupd schema` as an operator runs them: a process, its exit status, what it prints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_config import CONFIGS, EXAMPLE, REPO, expected_of

EXIT_OK, EXIT_INVALID = 0, 1


def greupd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "greupd", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})}, check=False)


def line_of(text: str, start: str) -> int:
    """The number of the one line of `text` that starts with `start`."""
    [number] = [n for n, line in enumerate(text.split("\n"), start=1) if line.startswith(start)]
    return number


def test_check_of_the_shipped_config_exits_0_and_summarizes_it() -> None:
    result = greupd("check", "-c", str(EXAMPLE))

    assert result.returncode == EXIT_OK, result.stderr
    valid, files, tunnel = result.stdout.splitlines()
    assert (valid, files) == (f"{EXAMPLE}: valid", f"1 tunnel from {EXAMPLE}")
    assert tunnel.startswith("  My_Tunnel: gre 172.19.1.1 -> 172.19.1.2 192.168.8.1 peer 192.168.8.11")
    assert "routes 20.10.1.0/24" in tunnel and "keepalive 1s x3" in tunnel


def test_check_reads_greupd_config_from_the_environment() -> None:
    result = greupd("check", env={"GREUPD_CONFIG": str(EXAMPLE)})
    assert result.returncode == EXIT_OK, result.stderr
    assert result.stdout.startswith(f"{EXAMPLE}: valid\n")


def test_check_summarizes_every_file_and_tunnel_of_a_config_with_dropins() -> None:
    main = CONFIGS / "dropins" / "tunnels.toml"
    result = greupd("check", "-c", str(main))

    assert result.returncode == EXIT_OK, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1].startswith(f"2 tunnels from {main}, {main.parent / 'tunnels.d' / '10-backup.toml'}, ")
    assert lines[2].startswith("  My_Tunnel: gre 172.19.1.1 -> 172.19.1.2")
    assert lines[3].startswith("  Backup: gre 172.19.2.1 -> 172.19.2.2")


@pytest.mark.parametrize(("section", "typo", "field"), [
    ("[tunnel.keepalive]", 'intervall = "1s"', "tunnel[0].keepalive.intervall"),
    ("[[tunnel]]", 'remtoe = "172.19.1.3"', "tunnel[0].remtoe"),
    ("[daemon]", "ip_fowrard = true", "daemon.ip_fowrard"),
])
def test_a_typo_in_the_shipped_config_exits_1_naming_key_file_and_line(
        tmp_path: Path, section: str, typo: str, field: str) -> None:
    # The operator adds one misspelt key right under a section header of the shipped example.
    lines = EXAMPLE.read_text().split("\n")
    line = line_of(EXAMPLE.read_text(), section) + 1
    lines.insert(line - 1, typo)
    config = tmp_path / "tunnels.toml"
    config.write_text("\n".join(lines))

    result = greupd("check", "-c", str(config))

    assert result.returncode == EXIT_INVALID
    assert result.stdout == ""
    key = typo.split(" =")[0]
    assert result.stderr.splitlines() == [
        f"greupd: {config}: 1 problem",
        f"  {config}:{line}: {field}: unknown key {key!r}",
    ]


@pytest.mark.parametrize("name", ["ttl-out-of-range", "toml-syntax", "defaults-invalid-ttl",
                                  "duplicate-endpoints", "keepalive-interval-bad-unit"])
def test_check_of_a_broken_config_exits_1_with_file_line_field(name: str) -> None:
    path = CONFIGS / "broken" / f"{name}.toml"
    expected = expected_of(path)

    result = greupd("check", "-c", str(path))

    assert result.returncode == EXIT_INVALID
    where = f"{path}:{expected.line}: " + (f"{expected.field}: " if expected.field else "")
    [reported] = [line for line in result.stderr.splitlines() if line.startswith(f"  {where}")]
    assert expected.error in reported


def test_check_of_a_broken_dropin_names_the_dropin() -> None:
    main = CONFIGS / "broken-dropin" / "tunnels.toml"
    result = greupd("check", "-c", str(main))

    assert result.returncode == EXIT_INVALID
    assert f"  {main.parent / 'tunnels.d' / '50-backup.toml'}:8: tunnel[0].keepalive.interval: " in result.stderr


def test_check_reports_several_problems_at_once(tmp_path: Path) -> None:
    config = tmp_path / "tunnels.toml"
    text = EXAMPLE.read_text().replace("ttl = 64", "ttl = 300").replace('"eth1"', '"eth 1"')
    config.write_text(text)

    result = greupd("check", "-c", str(config))

    assert result.returncode == EXIT_INVALID
    lines = result.stderr.splitlines()
    assert lines[0] == f"greupd: {config}: 2 problems"
    assert lines[1].startswith(f"  {config}:{line_of(text, 'ttl = 300')}: defaults.ttl: ttl must be 1..255")
    assert lines[2].startswith(f"  {config}:{line_of(text, 'from_tunnel')}: tunnel[0].nat.from_tunnel[0]:"
                               " 'eth 1' is not an interface name")


def test_check_of_a_missing_file_exits_1(tmp_path: Path) -> None:
    result = greupd("check", "-c", str(tmp_path / "absent.toml"))
    assert result.returncode == EXIT_INVALID
    assert f"{tmp_path / 'absent.toml'}: cannot read" in result.stderr


def test_schema_is_json_schema_of_the_tunnel_fields() -> None:
    result = greupd("schema")

    assert result.returncode == EXIT_OK, result.stderr
    schema = json.loads(result.stdout)
    assert schema["type"] == "object"
    assert set(schema["properties"]) == {"daemon", "defaults", "tunnel"}
    assert schema["properties"]["tunnel"]["type"] == "array"
    tunnel = schema["$defs"]["TunnelConfig"]
    assert tunnel["additionalProperties"] is False  # unknown keys are errors for editors too
    assert set(tunnel["required"]) == {"name", "local", "remote"}
    assert {"name", "mode", "local", "remote", "key", "ikey", "okey", "ttl", "tos", "pmtudisc", "encap_limit", "mtu",
            "address", "peer", "routes", "metric", "table", "enabled", "adopt", "keepalive", "mss", "nat",
            "ipsec", "bfd", "dampening", "mtu_probe"} == set(
        tunnel["properties"])
    assert set(schema["$defs"]["MtuProbeConfig"]["properties"]) == {"every", "floor", "timeout"}
    assert '"probe"' in json.dumps(tunnel["properties"]["mtu"])
    assert set(schema["$defs"]["KeepaliveConfig"]["properties"]) == {
        "interval", "retries", "up_after", "action", "answer", "hold", "format"}
    assert set(schema["$defs"]["BfdConfig"]["properties"]) == {"interval", "multiplier", "passive", "auth_file"}
    assert set(schema["$defs"]["DampeningConfig"]["properties"]) == {"half_life", "suppress", "reuse", "max_hold"}
    assert set(schema["$defs"]["DaemonConfig"]["properties"]) == {
        "ip_forward", "control_socket", "state_dir", "nft_table", "on_exit", "vici_socket",
        "metrics_textfile", "metrics_listen"}


def test_schema_accepts_the_spellings_the_example_uses() -> None:
    # Editors check tunnels.toml against the schema: "1s", "0.0.0.42" and "main" must be allowed there.
    schema = json.loads(greupd("schema").stdout)
    interval = schema["$defs"]["KeepaliveConfig"]["properties"]["interval"]
    assert {"type": "string"}.items() <= next(a for a in interval["anyOf"] if a["type"] == "string").items()
    key_types = {a.get("type") for a in schema["$defs"]["TunnelConfig"]["properties"]["key"]["anyOf"]}
    assert {"integer", "string"} <= key_types
    table = schema["$defs"]["TunnelConfig"]["properties"]["table"]
    assert {"enum": ["main"]} in table["anyOf"]


def test_check_takes_the_config_as_a_plain_argument_too() -> None:
    result = greupd("check", "etc/greupd/tunnels.toml")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("etc/greupd/tunnels.toml: valid\n")


def test_check_with_both_a_path_and_dash_c_is_a_usage_error() -> None:
    result = greupd("check", "-c", str(EXAMPLE), str(EXAMPLE))
    assert result.returncode == 64  # EX_USAGE
    assert "either as PATH or with -c" in result.stderr


# --- a half-edited config: the CLI still reaches the daemon (review M10), run starts only from a good one --------


HALF_EDITED = """[daemon]
control_socket = "{socket}"

[[tunnel]]
name = "My_Tunnel"
local = "172.19.1.1"
remote = "172.19.1.
"""


def test_reload_with_a_half_edited_config_reaches_the_daemon_named_in_it(tmp_path: Path) -> None:
    from greupd.status import ReloadResult
    from tests.test_control import StandInDaemon

    sock = tmp_path / "c.sock"
    config = tmp_path / "tunnels.toml"
    config.write_text(HALF_EDITED.replace("{socket}", str(sock)))

    async def reject() -> ReloadResult:  # what the real daemon answers for this file
        return {"ok": False, "generation": 1, "error": f"{config}:8: TOML syntax: ..."}

    no_socket_env = {k: v for k, v in os.environ.items() if k != "GREUPD_CONTROL_SOCKET"}
    with StandInDaemon(sock, reload=reject):
        reload = subprocess.run([sys.executable, "-m", "greupd", "reload", "-c", str(config)], cwd=REPO,
                                capture_output=True, text=True, timeout=60, env=no_socket_env, check=False)
        status = subprocess.run([sys.executable, "-m", "greupd", "status", "-c", str(config)], cwd=REPO,
                                capture_output=True, text=True, timeout=60, env=no_socket_env, check=False)
    assert reload.returncode == EXIT_INVALID, reload.stderr
    assert "reload rejected, the running config stays in force" in reload.stderr
    assert status.returncode == EXIT_OK, status.stderr


def test_run_with_an_invalid_config_and_no_last_good_one_exits_1_naming_file_line_field(tmp_path: Path) -> None:
    broken = CONFIGS / "broken" / "ttl-out-of-range.toml"
    expected = expected_of(broken)
    result = greupd("run", "-c", str(broken), env={"GREUPD_STATE_DIR": str(tmp_path / "state")})
    assert result.returncode == EXIT_INVALID
    assert f"  {broken}:{expected.line}: {expected.field}: " in result.stderr
    assert f"no last good config to start with instead ({tmp_path / 'state' / 'last-good.json'})" in result.stderr
