"""greupd's nftables table in a real kernel (a fresh netns of the running one): applied, kept, and alone.

libnftables acts in the netns of the process that calls it, so every step runs this module as a small
driver inside router A's netns (`ip netns exec ... python -m tests.test_nft_kernel ACTION CONFIG`), and the
test checks what a person would check there: `nft list table ...`.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import pytest

from greupd.config import load_config
from greupd.nft.render import Rule, Ruleset, describe_ruleset, render_ruleset
from greupd.nft.table import NftError, NftTable
from greupd.nft.watch import NftWatch
from lab.hosts import Host, Lab

REPO = Path(__file__).resolve().parents[1]
SEED = REPO / "etc" / "greupd" / "tunnels.toml"
pytestmark = pytest.mark.needs_root

FOREIGN = """
table inet filter {
    set blocked { type ipv4_addr; elements = { 198.51.100.7 } }
    chain input { type filter hook input priority filter; policy accept;
        ip saddr @blocked drop
        tcp dport 22 accept comment "ssh"
    }
    chain forward { type filter hook forward priority filter; policy accept;
        ct state established,related accept
        iifname "eth1" oifname "wan0" tcp flags syn / syn,rst tcp option maxseg size set 1300
    }
}
"""

PMTU_V6 = """
[daemon]
nft_table = "edge"
[[tunnel]]
name = "v6"
mode = "ip6gre"
local = "2001:db8::1"
remote = "2001:db8::2"
[tunnel.mss]
clamp = "pmtu"
[tunnel.nat]
into_tunnel = ["2001:db8:10::/48", "10.10.1.0/24", "10.0.0.7/32", "0.0.0.0/0"]
from_tunnel = ["eth1"]
"""

NO_NFT = """
[[tunnel]]
name = "My_Tunnel"
local = "172.19.1.1"
remote = "172.19.1.2"
"""


# Changes made with `nft` while greupd's table is kept: another table's (the fingerprint must let them pass
# without a libnftables read-back), then ours (each must be found).
FINGERPRINT_CHANGES = (
    ("another table added", "add table ip other; add chain ip other pass { type filter hook forward priority 0; "
                            "policy accept; }"),
    ("another table's rule", "add rule ip other pass counter"),
    ("a rule added to ours", "add rule inet greupd forward counter"),
    ("an element added to ours", 'add element inet greupd forward_into { "x" : drop }'),
    ("our base chain's policy", "add chain inet greupd forward { type filter hook forward priority 0; policy drop; }"),
    ("a chain added to ours", "add chain inet greupd spare"),
    ("our rule deleted and the same put back", "flush chain inet greupd clamp_1436; add rule inet greupd clamp_1436 "
                                                "tcp option maxseg size set meta nfproto map { ipv4 : 1436, "
                                                'ipv6 : 1416 } comment "clamp mss to 1436 (ipv6: 1416)"'),
)


# --- the driver: runs inside the netns --------------------------------------------------------------------


def _driver(action: str, config_path: str, *more: str) -> None:
    ruleset = render_ruleset(load_config(Path(config_path)))
    table = NftTable(ruleset.table)
    result: dict[str, object] = {}
    if action == "apply":
        result["matched_before"] = table.matches(ruleset)
        table.apply(ruleset)
        result["matched_after"] = table.matches(ruleset)
        # A fresh NftTable knows nothing of that apply: equality must come from the rendering itself.
        result["canonical"] = NftTable(ruleset.table).matches(ruleset)
        result["described"] = describe_ruleset(ruleset)
    elif action == "matches":
        result["matches"] = table.matches(ruleset)
    elif action == "remove":
        table.remove()
        result["present"] = table.present()
    elif action == "refused":
        # A masquerade in a filter chain: libnftables passes it, the kernel refuses it (EOPNOTSUPP).
        good = ruleset.rules[0]
        masquerade = next(r for r in ruleset.rules if r.chain == "masquerade_into_My_Tunnel")
        misplaced = Rule(good.chain, masquerade.tunnel, masquerade.comment, masquerade.statements)
        try:
            table.apply(Ruleset(ruleset.table, ruleset.chains, (good, misplaced), ruleset.sets))
        except NftError as exc:
            result.update(error=str(exc), tunnel=exc.tunnel, rule=exc.rule)
    elif action == "fingerprint":
        # One NftTable throughout, as the daemon's: after its apply, each change made with `nft` in turn, and
        # whether matches() (the fingerprint first, libnftables only when it differs) still finds our table.
        table = _Counting(ruleset.table)
        table.apply(ruleset)
        looks = {"untouched": table.matches(ruleset)}
        for name, command in FINGERPRINT_CHANGES[:2]:
            subprocess.run(["nft", "-f", "-"], input=command, text=True, check=True)
            looks[name] = table.matches(ruleset)
        result["read_backs"] = table.read_backs  # libnftables listings so far: none, the fingerprint held
        for name, command in FINGERPRINT_CHANGES[2:]:
            subprocess.run(["nft", "-f", "-"], input=command, text=True, check=True)
            looks[name] = table.matches(ruleset)
            if not looks[name]:
                table.apply(ruleset)
                looks[f"{name}, put back"] = table.matches(ruleset) and NftTable(ruleset.table).matches(ruleset)
        result["looks"] = looks
    elif action == "keep":
        result.update(asyncio.run(_keep(table, ruleset)))
    elif action == "steps":
        # The keeper's way, config after config: apply when the kernel differs. What table is there after each?
        steps = []
        for path in (config_path, *more):
            ruleset = render_ruleset(load_config(Path(path)))
            if not table.matches(ruleset):
                table.apply(ruleset)
            listed = subprocess.run(["nft", "-j", "list", "tables"], capture_output=True, text=True).stdout
            handles = [o["table"]["handle"] for o in json.loads(listed)["nftables"] if "table" in o]
            steps.append({"table_handle": handles, "canonical": NftTable(ruleset.table).matches(ruleset)})
        result["steps"] = steps
    print(json.dumps(result), flush=True)


class _Counting(NftTable):
    read_backs = 0

    def observe(self) -> str | None:
        self.read_backs += 1
        return super().observe()


async def _keep(table: NftTable, ruleset: Ruleset) -> dict[str, int]:
    """The daemon's loop in small: apply, then on every "look again" re-apply if the kernel differs.

    Prints "ready" once watching; stops when stdin closes.
    """
    loop = asyncio.get_running_loop()
    counts = {"looks": 0, "repairs": 0}

    def look_again() -> None:
        counts["looks"] += 1
        if not table.matches(ruleset):
            counts["repairs"] += 1
            table.apply(ruleset)

    watch = NftWatch(look_again)
    watch.start(loop)
    table.apply(ruleset)
    print("ready", flush=True)
    stdin_closed = asyncio.Event()

    def on_stdin() -> None:
        if not os.read(sys.stdin.fileno(), 4096):
            stdin_closed.set()

    loop.add_reader(sys.stdin.fileno(), on_stdin)
    await stdin_closed.wait()
    watch.close()
    return counts


# --- the host side ----------------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def drive(host: Host, action: str, config: Path) -> dict[str, object]:
    proc = host.run(sys.executable, "-m", "tests.test_nft_kernel", action, str(config), env=_env(), timeout=120)
    result: dict[str, object] = json.loads(proc.stdout.splitlines()[-1])
    return result


def nft(host: Host, *argv: str, check: bool = True) -> str:
    return host.run("nft", *argv, check=check).stdout


def wait_for(predicate: object, timeout: float = 15.0) -> bool:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return bool(predicate())


def readline(stream: IO[str], timeout: float = 60.0) -> str:
    ready, _, _ = select.select([stream], [], [], timeout)
    return stream.readline() if ready else ""


@pytest.fixture
def router(lab: Lab) -> Host:
    """Router A of the seed, alone: nftables rules match interfaces by name, none need to exist."""
    return lab.host("a")


def test_apply_installs_the_table_and_reapply_changes_nothing(router: Host) -> None:
    first = drive(router, "apply", SEED)
    listed = nft(router, "list", "table", "inet", "greupd")
    second = drive(router, "apply", SEED)

    assert first["matched_before"] is False and first["matched_after"] is True and first["canonical"] is True
    assert listed == first["described"]  # `greupd plan` shows exactly what nft will list
    assert ('tcp option maxseg size set meta nfproto map { ipv4 : 1436, ipv6 : 1416 }'
            ' comment "clamp mss to 1436 (ipv6: 1416)"') in listed
    assert 'elements = { "My_Tunnel" : jump clamp_1436 }' in listed
    assert second["matched_before"] is True
    assert nft(router, "list", "ruleset") == listed
    assert drive(router, "matches", SEED) == {"matches": True}


def test_pmtu_ipv6_and_host_prefixes_are_taken_as_rendered(router: Host, tmp_path: Path) -> None:
    config = tmp_path / "tunnels.toml"
    config.write_text(PMTU_V6)

    result = drive(router, "apply", config)

    assert result["canonical"] is True, "the kernel lists something else than we render"
    listed = nft(router, "list", "table", "inet", "edge")
    assert listed == result["described"]
    assert "tcp option maxseg size set rt mtu" in listed
    assert "ip6 saddr 2001:db8:10::/48" in listed and "ip saddr 10.0.0.7 " in listed
    assert "ip saddr 0.0.0.0/0 masquerade" in listed


def test_foreign_table_stays_byte_identical_through_apply_reapply_and_remove(router: Host) -> None:
    router.run("nft", "-f", "-", input=FOREIGN)
    before = nft(router, "-a", "list", "table", "inet", "filter")

    drive(router, "apply", SEED)
    after_apply = nft(router, "-a", "list", "table", "inet", "filter")
    drive(router, "apply", SEED)
    after_reapply = nft(router, "-a", "list", "table", "inet", "filter")
    removed = drive(router, "remove", SEED)
    after_remove = nft(router, "-a", "list", "table", "inet", "filter")

    assert before == after_apply == after_reapply == after_remove
    assert removed == {"present": False}
    assert nft(router, "list", "tables") == "table inet filter\n"


def test_a_config_without_clamp_or_nat_removes_our_table(router: Host, tmp_path: Path) -> None:
    config = tmp_path / "tunnels.toml"
    config.write_text(NO_NFT)
    drive(router, "apply", SEED)

    result = drive(router, "apply", config)

    assert result["matched_before"] is False and result["matched_after"] is True
    assert nft(router, "list", "tables") == ""
    assert drive(router, "matches", config) == {"matches": True}


def test_someone_adding_a_rule_to_our_table_is_a_difference(router: Host) -> None:
    drive(router, "apply", SEED)
    nft(router, "add", "rule", "inet", "greupd", "forward", "drop")

    assert drive(router, "matches", SEED) == {"matches": False}
    drive(router, "apply", SEED)
    assert "drop" not in nft(router, "list", "table", "inet", "greupd")


def test_the_fingerprint_lets_other_tables_changes_pass_and_finds_every_change_to_ours(router: Host) -> None:
    result = drive(router, "fingerprint", SEED)
    looks = result["looks"]

    drifts = [name for name, _ in FINGERPRINT_CHANGES[2:]]
    # The last too: new handles, so the fingerprint differs, and the table is put back without asking how.
    assert looks == {"untouched": True, "another table added": True, "another table's rule": True,
                     **{name: False for name in drifts}, **{f"{name}, put back": True for name in drifts}}
    assert result["read_backs"] == 0


BACKUP = """
[[tunnel]]
name = "Backup"
local = "172.19.1.1"
remote = "172.19.1.3"
[tunnel.mss]
clamp = 1400
[tunnel.nat]
into_tunnel = ["10.10.2.0/24"]
from_tunnel = ["eth2"]
"""


def test_a_tunnel_added_or_removed_changes_its_elements_not_the_whole_table(router: Host, tmp_path: Path) -> None:
    grown, pmtu, both = tmp_path / "grown.toml", tmp_path / "pmtu.toml", tmp_path / "both.toml"
    grown.write_text(SEED.read_text() + BACKUP)
    pmtu.write_text(SEED.read_text().replace("clamp = 1436", 'clamp = "pmtu"'))
    both.write_text(pmtu.read_text() + BACKUP)
    configs = [SEED, grown, SEED, pmtu, both]

    proc = router.run(sys.executable, "-m", "tests.test_nft_kernel", "steps", *map(str, configs), env=_env(),
                      timeout=120)
    steps = json.loads(proc.stdout.splitlines()[-1])["steps"]

    # Each time the kernel holds exactly what the config renders (a fresh look agrees), and it is the same
    # table throughout: the tunnel's elements and chains came and went, the table was never replaced.
    assert [s["canonical"] for s in steps] == [True] * len(configs)
    assert len({tuple(s["table_handle"]) for s in steps}) == 1, steps
    listed = nft(router, "list", "table", "inet", "greupd")
    assert '"Backup" : jump clamp_1400' in listed and '"My_Tunnel" : jump clamp_pmtu' in listed
    assert "chain clamp_1436" not in listed and "chain forward_into_Backup" in listed


def test_flush_and_delete_are_undone_by_the_watcher(router: Host) -> None:
    router.run("nft", "-f", "-", input=FOREIGN)
    keeper = router.popen(sys.executable, "-m", "tests.test_nft_kernel", "keep", str(SEED), env=_env(),
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert keeper.stdout is not None and keeper.stdin is not None
    assert readline(keeper.stdout) == "ready\n"
    ours = nft(router, "list", "table", "inet", "greupd")

    def restored() -> bool:
        return nft(router, "list", "table", "inet", "greupd", check=False) == ours

    nft(router, "flush", "ruleset")
    assert wait_for(restored), "greupd's table was not put back after `nft flush ruleset`"
    nft(router, "delete", "table", "inet", "greupd")
    assert wait_for(restored), "greupd's table was not put back after `nft delete table inet greupd`"
    router.run("nft", "-f", "-", input=FOREIGN)  # someone else's change: a look, nothing to repair
    time.sleep(0.5)

    keeper.stdin.close()
    counts = json.loads(keeper.stdout.read().splitlines()[-1])
    keeper.wait(timeout=30)
    # One look per foreign transaction; our own re-applies cause none (no loop).
    assert counts == {"looks": 3, "repairs": 2}
    assert nft(router, "list", "table", "inet", "greupd") == ours


def test_a_rule_the_kernel_refuses_is_an_nft_error_naming_tunnel_and_rule(router: Host) -> None:
    drive(router, "apply", SEED)
    before = nft(router, "-a", "list", "ruleset")

    result = drive(router, "refused", SEED)

    assert "Operation not supported" in str(result["error"])
    assert result["tunnel"] == "My_Tunnel"
    assert "masquerade" in str(result["rule"]) and "chain mss_clamp" in str(result["rule"])
    assert nft(router, "-a", "list", "ruleset") == before  # the refused transaction changed nothing


if __name__ == "__main__":
    _driver(sys.argv[1], *sys.argv[2:])
