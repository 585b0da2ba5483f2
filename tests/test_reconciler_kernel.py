"""The reconciler on a real kernel: the seed's two routers, greupd on each, drift, reload, restart."""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator

import pytest

from lab.greupd_process import GreupdProcess
from lab.hosts import Host, Lab, SeedTopology, seed_topology
from lab.waiting import eventually

pytestmark = pytest.mark.needs_gre


def tunnel_toml(name: str, local: str, remote: str, address: str, peer: str, routes: list[str],
                extra: str = "") -> str:
    quoted = ", ".join(f'"{r}"' for r in routes)
    return (f'[[tunnel]]\nname = "{name}"\nlocal = "{local}"\nremote = "{remote}"\n'
            f'address = "{address}"\npeer = "{peer}"\nroutes = [{quoted}]\n{extra}\n')


SEED_A = tunnel_toml("My_Tunnel", "172.19.1.1", "172.19.1.2", "192.168.8.1", "192.168.8.11", ["20.10.1.0/24"])
SEED_B = tunnel_toml("My_Tunnel", "172.19.1.2", "172.19.1.1", "192.168.8.11", "192.168.8.1", ["10.10.1.0/24"])


@pytest.fixture
def seed() -> Iterator[SeedTopology]:
    with Lab() as lab:
        yield seed_topology(lab)




def routes(host: Host, *args: str) -> str:
    return host.ip("route", "show", *args).stdout


def test_seed_story_two_lans_reach_each_other_through_the_tunnel(seed: SeedTopology) -> None:
    a = GreupdProcess(seed.a, SEED_A).start()
    GreupdProcess(seed.b, SEED_B).start()
    assert a.tunnel("My_Tunnel")["state"] == "up"
    assert "20.10.1.0/24 dev My_Tunnel proto 222" in routes(seed.a)
    assert seed.lan_a.wait_ping("20.10.1.2", timeout=10)
    assert seed.lan_b.ping("10.10.1.2")
    traceroute_path = seed.lan_a.run("ping", "-c", "1", "-R", "20.10.1.2", check=False).stdout
    assert "192.168.8.1" in traceroute_path or "172.19" not in traceroute_path  # went through the tunnel


@pytest.mark.parametrize("drift", [
    "ip link del My_Tunnel",
    "ip route del 20.10.1.0/24",
    "ip addr flush dev My_Tunnel",
    "ip link set My_Tunnel down",
])
def test_drift_on_owned_objects_is_undone(seed: SeedTopology, drift: str) -> None:
    a = GreupdProcess(seed.a, SEED_A).start()
    GreupdProcess(seed.b, SEED_B).start()
    assert seed.lan_a.wait_ping("20.10.1.2")
    seed.a.sh(drift)
    eventually(lambda: "20.10.1.0/24 dev My_Tunnel" in routes(seed.a)
               and "192.168.8.1 peer 192.168.8.11" in seed.a.ip("addr", "show", "My_Tunnel", check=False).stdout
               and ",UP" in seed.a.ip("link", "show", "My_Tunnel", check=False).stdout,
               what=f"repair after {drift!r}")
    assert seed.lan_a.wait_ping("20.10.1.2")
    assert a.tunnel("My_Tunnel")["state"] == "up"


def foreign_state(host: Host) -> str:
    link = host.ip("-d", "link", "show", "foreign0").stdout
    gre = host.ip("-d", "link", "show", "hand_gre").stdout
    addrs = host.ip("addr", "show", "hand_gre").stdout
    table = routes(host, "table", "all")
    # Not table local: the kernel fills it on its own (a link-local address's route appears once DAD is done,
    # a second or so after a link comes up), and the foreign addresses it mirrors are compared above.
    foreign_routes = "\n".join(line for line in table.splitlines() if "proto 222" not in line
                               and "My_Tunnel" not in line and "t_" not in line and " table local " not in line)
    return "\n".join(re.sub(r"\s+", " ", s) for s in (link, gre, addrs, foreign_routes))


def test_foreign_link_and_route_survive_start_reload_and_stop(seed: SeedTopology) -> None:
    a_host = seed.a
    a_host.ip("link", "add", "foreign0", "type", "dummy")
    a_host.ip("link", "set", "foreign0", "up")
    a_host.ip("link", "add", "hand_gre", "type", "gre", "local", "172.19.1.1", "remote", "172.19.1.9", "key", "7")
    a_host.ip("addr", "add", "192.168.77.1/30", "dev", "hand_gre")
    a_host.ip("link", "set", "hand_gre", "up")
    a_host.ip("route", "add", "30.0.0.0/24", "dev", "foreign0", "proto", "static")
    a_host.ip("route", "add", "31.0.0.0/24", "dev", "hand_gre")
    before = foreign_state(a_host)
    config = "[daemon]\non_exit = \"remove\"\n" + SEED_A
    a = GreupdProcess(a_host, config).start()
    assert foreign_state(a_host) == before
    assert a.reload(config + tunnel_toml("t_extra", "172.19.1.1", "172.19.1.3", "192.168.9.1", "192.168.9.2",
                                         ["40.0.0.0/24"])).returncode == 0
    assert foreign_state(a_host) == before
    assert a.stop() == 0
    assert foreign_state(a_host) == before
    assert "My_Tunnel" not in a_host.ip("link", "show").stdout  # on_exit = "remove" removed only what it made
    assert "proto 222" not in routes(a_host, "table", "all")


def test_name_clash_with_a_foreign_link_fails_that_tunnel_only(seed: SeedTopology) -> None:
    seed.a.ip("link", "add", "My_Tunnel", "type", "dummy")
    config = SEED_A + tunnel_toml("t_other", "172.19.1.1", "172.19.1.3", "192.168.9.1", "192.168.9.2",
                                  ["40.0.0.0/24"])
    a = GreupdProcess(seed.a, config).start()
    mine = a.tunnel("My_Tunnel")
    assert mine["state"] == "error" and "not greupd's" in mine["error"]
    assert a.tunnel("t_other")["state"] == "up"
    assert "dummy" in seed.a.ip("-d", "link", "show", "My_Tunnel").stdout


def three_tunnels(ttl3: int = 64, with_t2: bool = True, with_t4: bool = False) -> str:
    text = ""
    for i in (1, 2, 3, 4):
        if (i == 2 and not with_t2) or (i == 4 and not with_t4):
            continue
        extra = f"ttl = {ttl3}" if i == 3 else ""
        text += tunnel_toml(f"t_{i}", "172.19.1.1", f"172.19.1.{10 + i}", f"192.168.{i}.1", f"192.168.{i}.2",
                            [f"40.0.{i}.0/24"], extra)
    return text


def test_reload_adds_removes_and_changes_only_what_changed(seed: SeedTopology) -> None:
    a = GreupdProcess(seed.a, three_tunnels()).start()
    before = {name: seed.a.ifindex(name) for name in ("t_1", "t_3")}
    route_t1 = routes(seed.a, "40.0.1.0/24")
    result = a.reload(three_tunnels(ttl3=32, with_t2=False, with_t4=True))
    assert result.returncode == 0, result.stderr
    links = seed.a.ip("link", "show").stdout
    assert "t_2" not in links and "t_4" in links
    assert {name: seed.a.ifindex(name) for name in ("t_1", "t_3")} == before
    assert "ttl 32" in seed.a.ip("-d", "link", "show", "t_3").stdout
    assert routes(seed.a, "40.0.1.0/24") == route_t1
    status = a.status()
    assert status is not None and status["generation"] == 2
    assert [t["name"] for t in status["tunnels"]] == ["t_1", "t_3", "t_4"]


def test_invalid_reload_keeps_everything_running_and_reports_the_error(seed: SeedTopology) -> None:
    a = GreupdProcess(seed.a, SEED_A).start()
    index = seed.a.ifindex("My_Tunnel")
    result = a.reload(SEED_A + "\n[[tunnel]]\nname = \"bad\"\nlocal = \"172.19.1.1\"\nremtoe = \"1.2.3.4\"\n")
    assert result.returncode == 1
    assert "remtoe" in result.stderr and "tunnels.toml:" in result.stderr
    status = a.status()
    assert status is not None
    assert status["generation"] == 1 and "remtoe" in status["last_error"]
    assert a.tunnel("My_Tunnel")["state"] == "up"
    assert seed.a.ifindex("My_Tunnel") == index
    assert a.proc is not None and a.proc.poll() is None


def test_sighup_reloads_and_a_repair_waiting_beside_it_still_happens(seed: SeedTopology) -> None:
    a = GreupdProcess(seed.a, SEED_A).start()
    # Both wait for the daemon when it resumes: a reload (of the same config: it changes nothing in the
    # kernel, so no event of its own wakes the loop again) and the route's deletion, which must be repaired
    # whichever the loop sees first.
    a.signal(signal.SIGSTOP)
    seed.a.ip("route", "del", "20.10.1.0/24")
    a.signal(signal.SIGHUP)
    a.signal(signal.SIGCONT)
    eventually(lambda: "20.10.1.0/24 dev My_Tunnel" in routes(seed.a), timeout=10, what="route after SIGHUP",
               detail=a.output)
    eventually(lambda: (a.status() or {}).get("generation") == 2, what="generation 2 after SIGHUP")


def test_sigkill_and_restart_keeps_the_tunnel_and_loses_no_ping(seed: SeedTopology) -> None:
    a = GreupdProcess(seed.a, SEED_A).start()
    GreupdProcess(seed.b, SEED_B).start()
    assert seed.lan_a.wait_ping("20.10.1.2")
    index = seed.a.ifindex("My_Tunnel")
    pinger = seed.lan_a.popen("ping", "-n", "-q", "-i", "0.05", "-c", "100", "-W", "1", "20.10.1.2",
                              stdout=__import__("subprocess").PIPE, text=True)
    time.sleep(1)
    a.signal(signal.SIGKILL)
    assert a.proc is not None
    a.proc.wait(10)
    again = GreupdProcess(seed.a, SEED_A)
    again.start()
    output, _ = pinger.communicate(timeout=60)
    assert " 0% packet loss" in output, output
    assert seed.a.ifindex("My_Tunnel") == index
    assert again.tunnel("My_Tunnel")["state"] == "up"
    assert "down" not in again.output()  # adopted, never flapped


def test_a_fight_with_another_manager_backs_off_instead_of_spinning(seed: SeedTopology) -> None:
    a = GreupdProcess(seed.a, SEED_A).start()
    # Another "manager" that deletes our route again and again, until greupd says it backs off. (Not for a
    # fixed time: on a loaded machine the guest runs only a few `ip route del` a second, and the back-off
    # needs FIGHT_REPAIRS repairs within FIGHT_WINDOW.)
    fighter = seed.a.popen("sh", "-c", "while :; do ip route del 20.10.1.0/24 2>/dev/null; sleep 0.05; done")
    try:
        eventually(lambda: "another program keeps changing it" in a.output(), timeout=60, what="back-off",
                   detail=a.output, interval=0.2)
    finally:
        fighter.kill()
        fighter.wait(timeout=10)
    status = a.status()
    assert status is not None and "another program" in (status["last_error"] or "")
    # Once the fight is over, the route comes back by itself.
    eventually(lambda: "20.10.1.0/24 dev My_Tunnel" in routes(seed.a), timeout=70, what="route back after fight")
    assert a.proc is not None and a.proc.poll() is None


def test_lost_netlink_events_lead_to_a_full_resync(seed: SeedTopology) -> None:
    a = GreupdProcess(seed.a, SEED_A).start()
    a.signal(signal.SIGSTOP)
    seed.a.ip("route", "del", "20.10.1.0/24")
    # While the daemon sleeps, flood its event socket until the kernel drops notifications (ENOBUFS).
    batch = "".join(f"link add flood{i} type dummy\n" for i in range(1500))
    seed.a.run("ip", "-batch", "-", input=batch, timeout=300)
    a.signal(signal.SIGCONT)
    eventually(lambda: "20.10.1.0/24 dev My_Tunnel" in routes(seed.a), timeout=60, what="route after resync")
    assert "resynchronising everything" in a.output()


def test_a_route_refused_for_a_foreign_route_is_retried_and_installed_once_that_route_goes(seed: SeedTopology) -> None:
    """Review M1 and L8: a static route holds the tunnel's prefix (same table and metric: EEXIST). greupd
    reports it, says so on reload too, and puts its own route in within the backoff once the static one is
    deleted, though the deletion of another protocol's route is no event greupd listens to."""
    seed.a.ip("route", "add", "20.10.1.0/24", "via", "172.19.1.2", "proto", "static")
    a = GreupdProcess(seed.a, SEED_A).start()
    mine = a.wait_for("My_Tunnel", "error")
    assert "File exists" in mine["error"] and "20.10.1.0/24" in mine["error"], mine

    reloaded = a.reload()  # the same config: "try again", and tell me what the kernel says
    assert reloaded.returncode == 0
    assert "not all of it is applied" in reloaded.stderr and "tunnel My_Tunnel:" in reloaded.stderr, reloaded.stderr
    assert "File exists" in reloaded.stderr

    seed.a.ip("route", "del", "20.10.1.0/24", "proto", "static")
    eventually(lambda: "20.10.1.0/24 dev My_Tunnel proto 222" in routes(seed.a), timeout=40,
               what="greupd's route once the static one is gone", detail=a.output)
    assert a.wait_for("My_Tunnel", "up")["reason"] == "repaired"
    assert "trying again in" in a.output()
