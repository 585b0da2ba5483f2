"""The soak's short version (`make soak` runs the long one): router A's greupd with a primary tunnel to B and a
backup to C, lan_a pinging lan_b all along, and every kind of fault once, in seeded order: drift on links,
routes and addresses, a foreign link taking a tunnel's name, SIGKILL and a restart, a peer dying and coming
back, valid and invalid reloads, a netlink overrun (lab/soak.py says what each does and what is checked).

After each fault the kernel must converge to greupd's plan, nothing foreign may change, and pings may be lost
only while a dead peer is being detected. The watchdog fault (SIGSTOP for the unit's WatchdogSec, then SIGKILL)
is left to `make soak`: here it would only add WatchdogSec of waiting to what SIGKILL already tests.
GREUPD_SOAK_SEED picks another order.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from greupd.config import load_config, load_config_text
from lab.soak import CLASSIC_KINDS, KINDS, NESTED_TUNNEL, a_config, format_report, main, run_soak

SEED = int(os.environ.get("GREUPD_SOAK_SEED", "11"))
# The faults of issue #21 (lab.soak.ROUND3_KINDS) run in `make soak`; they join here once their fixes are on main.
SHORT_KINDS = [kind for kind in CLASSIC_KINDS if kind != "watchdog"]


@pytest.mark.needs_gre
def test_every_fault_once_and_the_network_stays_as_planned() -> None:
    progress: list[str] = []
    # slack 3 s, as in the 30-minute run of record: at load 20 on this 2-core machine the one-CPU guest's
    # detection of a dead peer (nominal 0.8 s) reached 2.43 s, over 1.5 s of slack, with nothing wrong.
    report = run_soak(0, SEED, kinds=SHORT_KINDS, each_once=True, slack=3.0, out=progress.append)
    replay = f"python -m lab.soak --each-once --seed {SEED} --slack 3 --faults {','.join(SHORT_KINDS)}"
    figures = format_report(report, replay) + "\n" + "\n".join(progress)
    assert report["broken"] is None, figures
    # Every kind ran (nft-flush only where nftables has the inet family), and each converged.
    ran = {kind for kind, f in report["kinds"].items() if f["injected"]}
    assert ran >= set(SHORT_KINDS) - {"nft-flush"}, figures
    assert report["faults_converged"] == report["faults_injected"], figures


@pytest.mark.parametrize("variant", [0, 1])
def test_the_soaks_config_as_files_is_the_config_it_plans_with(tmp_path: Path, variant: int) -> None:
    # The soak plans with the two files' text as one; greupd reads tunnels.toml and tunnels.d/ (to_c is a
    # drop-in's, for the unreadable-directory fault). Both must be the same config.
    config = a_config(variant, nft=False)
    (tmp_path / "tunnels.toml").write_text(config.main)
    (tmp_path / "tunnels.d").mkdir()
    (tmp_path / "tunnels.d" / "50-backup.toml").write_text(config.dropin)
    from_files, from_text = load_config(tmp_path / "tunnels.toml"), load_config_text(config.text)
    assert (from_files.daemon, from_files.tunnels) == (from_text.daemon, from_text.tunnels)
    assert "to_c" not in config.main and "to_c" in config.dropin


def test_the_nested_fault_is_the_newcomers_file() -> None:
    assert NESTED_TUNNEL.count("[") - 2 == 500 == NESTED_TUNNEL.count("]") - 2  # [[tunnel]] has two of each


def test_fault_groups_and_unknown_kinds_on_the_command_line() -> None:
    assert len(KINDS) == len(set(KINDS)) == 19
    with pytest.raises(SystemExit) as exc:
        main(["--faults", "round3,nope"])
    assert exc.value.code == 2  # argparse: unknown fault kinds: nope
