"""The metrics on a real kernel (issue #15's acceptance): router A runs greupd with a keepalive tunnel to B, a plain
Linux router, and exports metrics as a textfile and on GET /metrics. Prometheus' own parser reads `greupd
metrics`, the textfile and the scrape; their values follow B's death, its return, a route someone deleted (and
greupd put back) and a config that does not validate.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lab.greupd_process import GreupdProcess
from lab.hosts import Lab, SeedTopology, seed_topology
from lab.waiting import eventually
from tests.test_failover_kernel import INTERVAL, RETRIES, SERVICE, plain_peer

pytestmark = pytest.mark.needs_gre

LISTEN = "127.0.0.1:9474"
TO_B = (f'[[tunnel]]\nname = "to_b"\nlocal = "172.19.1.1"\nremote = "172.19.1.2"\naddress = "192.168.8.1"\n'
        f'peer = "192.168.8.11"\nroutes = ["{SERVICE}/32"]\n'
        f"[tunnel.keepalive]\ninterval = {INTERVAL}\nretries = {RETRIES}\n")


def metrics(text: str) -> dict[str, float]:
    """`name{tunnel="to_b"}` (or a bare name) -> value, for every sample in a Prometheus text."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            tunnel = sample.labels.get("tunnel")
            found[f'{sample.name}{{tunnel="{tunnel}"}}' if tunnel and len(sample.labels) == 1 else sample.name] = \
                sample.value
    return found


def to_b(name: str) -> str:
    return f'{name}{{tunnel="to_b"}}'


@dataclass
class RouterA:
    seed: SeedTopology
    greupd: GreupdProcess
    textfile: Path

    def textfile_metrics(self) -> dict[str, float]:
        return metrics(self.textfile.read_text()) if self.textfile.exists() else {}

    def until(self, what: str, **expected: float) -> dict[str, float]:
        """Wait until the textfile shows `expected` (metric name, tunnel to_b -> value)."""
        seen: list[dict[str, float]] = [{}]

        def shows() -> bool:
            seen.append(self.textfile_metrics())
            return all(seen[-1].get(to_b(name)) == value for name, value in expected.items())

        eventually(shows, 15, what=what, detail=lambda: f"{seen[-1]}\n{self.greupd.output()}", interval=0.1)
        return seen[-1]

    def cli_metrics(self) -> dict[str, float]:
        result = self.greupd.cli("metrics")
        assert result.returncode == 0, result.stderr
        return metrics(result.stdout)

    def scrape(self) -> dict[str, float]:
        return metrics(self.seed.a.run("curl", "-sSf", f"http://{LISTEN}/metrics").stdout)


@pytest.fixture
def router_a() -> Iterator[RouterA]:
    with Lab() as lab:
        seed = seed_topology(lab)
        plain_peer(seed.b, "192.168.8.11", "192.168.8.1")
        a = GreupdProcess(seed.a, "")
        textfile = a.dir / "textfile" / "greupd.prom"
        textfile.parent.mkdir()
        a.config_path.write_text(f'[daemon]\nmetrics_textfile = "{textfile}"\nmetrics_listen = "{LISTEN}"\n\n{TO_B}')
        yield RouterA(seed, a.start(), textfile)


def test_metrics_follow_a_dead_peer_its_return_and_a_repaired_drift(router_a: RouterA) -> None:
    a, seed = router_a, router_a.seed
    a.greupd.wait_for("to_b", "up")
    up = a.until("tunnel up, replies counted", greupd_tunnel_up=1, greupd_routes_installed=1)
    assert up["greupd_config_generation"] == 1 and up["greupd_config_last_reload_success"] == 1
    asked = a.cli_metrics()
    assert asked['greupd_build_info'] == 1
    assert asked[to_b("greupd_tunnel_state_changes_total")] == 0
    assert asked[to_b("greupd_drift_repairs_total")] == 0
    assert asked[to_b("greupd_keepalive_sent_total")] >= 1
    assert asked["process_resident_memory_bytes"] > 0  # the daemon's own, not the CLI's
    scraped = a.scrape()
    assert scraped[to_b("greupd_tunnel_up")] == 1
    assert 0 < scraped[to_b("greupd_keepalive_rtt_seconds")] < 1
    assert re.search(r"^greupd_tunnel_info\{.*tunnel=\"to_b\".*\} 1\.0$", a.textfile.read_text(), re.M)

    # B dies: the keepalive verdict's pass rewrites the textfile.
    seed.b.ip("link", "set", "to_a", "down")
    dead = a.until("tunnel down", greupd_tunnel_up=0, greupd_routes_installed=0,
                   greupd_tunnel_state_changes_total=1)
    assert dead[to_b("greupd_keepalive_missed_in_a_row")] >= RETRIES
    assert a.scrape()[to_b("greupd_tunnel_up")] == 0

    # B comes back.
    seed.b.ip("link", "set", "to_a", "up")
    seed.b.ip("route", "replace", "10.10.1.0/24", "dev", "to_a")
    back = a.until("tunnel back up", greupd_tunnel_up=1, greupd_routes_installed=1,
                   greupd_tunnel_state_changes_total=2)
    assert back[to_b("greupd_keepalive_received_total")] > up[to_b("greupd_keepalive_received_total")]
    assert back[to_b("greupd_drift_repairs_total")] == 0  # greupd's own changes are no drift

    # Someone deletes greupd's route: it is put back, a drift repair and no state change.
    seed.a.ip("route", "del", f"{SERVICE}/32", "dev", "to_b")
    a.until("drift repaired", greupd_drift_repairs_total=1, greupd_tunnel_up=1)
    eventually(lambda: f"{SERVICE} dev to_b" in seed.a.ip("route", "show").stdout, what="route back")
    asked = a.cli_metrics()
    assert asked[to_b("greupd_drift_repairs_total")] == 1
    assert asked[to_b("greupd_tunnel_state_changes_total")] == 2

    # A config that does not validate: the reload fails, the metrics say so, the tunnel stays.
    assert a.greupd.reload("[[tunnel]]\nname = 7\n").returncode == 1
    eventually(lambda: a.textfile_metrics().get("greupd_config_last_reload_success") == 0, what="reload failure")
    assert a.scrape()["greupd_config_last_reload_success"] == 0
    assert a.textfile_metrics()[to_b("greupd_tunnel_up")] == 1

    # A stopped daemon leaves no stale metrics behind.
    assert a.greupd.stop() == 0
    assert not a.textfile.exists()
