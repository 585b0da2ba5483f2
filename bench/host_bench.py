"""The parts of greupd's cost that do not depend on the kernel, measured natively on this machine (no guest).

The lab guest (UML) makes every syscall and page fault expensive, so its absolute numbers overstate what a
real kernel would show. These pure-CPU pieces (imports, config validation, planning, probe bytes, and
pyroute2 parsing rtnetlink dumps of the same size as a 1000-tunnel observe) run here at native speed, as a
yardstick for what the same code costs on real hardware.

    python -m bench.host_bench [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from bench import nft_keep, scenario, status_bench

REPO = Path(__file__).resolve().parent.parent
Json = dict[str, Any]


def timed(fn: Callable[[], object], trials: int) -> list[float]:
    samples = []
    for _ in range(trials):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


def command(argv: list[str], trials: int) -> list[float]:
    def run() -> None:
        subprocess.run(argv, check=True, cwd=REPO, capture_output=True)

    run()  # page cache warm, as on a machine that has run greupd before
    return timed(run, trials)


def cpu_parts(count: int, trials: int) -> Json:
    from greupd.config import load_config_text
    from greupd.keepalive.codec import ProbeBytes, build_probe_template, new_token, parse_gre
    from greupd.model import Observed, ObservedLink, desired_state
    from greupd.plan import plan_changes

    text = scenario.greupd_toml(count)
    config = load_config_text(text)
    desired = desired_state(config)
    empty = Observed({}, {}, frozenset(), {})
    # The kernel as greupd left it, except one tunnel's ttl: what a reload plans against.
    links = {name: ObservedLink(i, intent.link, True, True) for i, (name, intent) in enumerate(desired.tunnels.items())}
    changed = next(iter(links))
    links[changed] = ObservedLink(0, links[changed].spec.__class__(**{**links[changed].spec.__dict__, "ttl": 1}),
                                  True, True)
    converged = Observed(links, {n: i.addresses for n, i in desired.tunnels.items()},
                         frozenset(r for i in desired.tunnels.values() for r in i.routes), {})
    assert len(plan_changes(desired, converged).actions) == 1

    template = build_probe_template(IPv4Address(scenario.LOCAL), IPv4Address(scenario.REMOTE), 1, 1)
    reply = template.with_token(new_token())[template.inner_ip_offset:]
    probe = ProbeBytes(template)
    probes = 10000
    return {
        "tunnels": count,
        "config_load": timed(lambda: load_config_text(text), trials),
        "desired_state": timed(lambda: desired_state(config), trials),
        "plan_cold": timed(lambda: plan_changes(desired, empty), trials),
        "plan_reload": timed(lambda: plan_changes(desired, converged), trials),
        # what the engine does per probe: a fresh token written into the tunnel's own buffer
        "probe_build_us": [s / probes * 1e6 for s in timed(lambda: [probe.stamp(new_token())
                                                                     for _ in range(probes)], trials)],
        "reply_parse_us": [s / probes * 1e6 for s in timed(lambda: [parse_gre(reply) for _ in range(probes)],
                                                            trials)],
    }


def dump_parsing(count: int, trials: int) -> Json:
    """pyroute2 (as greupd's Kernel uses it) reading dumps of `count` links with an address and 2 routes each.

    Bridge links stand in for GRE ones (this kernel has neither GRE nor dummy): the messages are of the same
    number and about the same size.
    """
    netns = f"benchhost{os.getpid()}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        lines = []
        for t in scenario.tunnels(count):
            lines += [f"link add {t.name} type bridge", f"link set {t.name} up",
                      f"addr add {t.address} peer {t.peer} dev {t.name}",
                      *(f"route add {r} dev {t.name} proto 222" for r in t.routes)]
        subprocess.run(["ip", "-n", netns, "-batch", "-"], input="\n".join(lines) + "\n", text=True, check=True)
        proc = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-m", "bench.host_bench",
                               "--dumps-here", str(trials)], cwd=REPO, capture_output=True, text=True, check=True)
        return {"tunnels": count, **json.loads(proc.stdout)}
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=False)


def _dumps_here(trials: int) -> Json:
    # pyroute2's AsyncIPRoute, as greupd's Kernel used it for every observe up to commit 7dc12ff.
    from pyroute2 import AsyncIPRoute

    async def measure() -> Json:
        ipr = AsyncIPRoute()
        result: Json = {}
        try:
            for kind in ("link", "addr", "route"):
                samples = []
                for _ in range(trials):
                    start = time.perf_counter()
                    [msg async for msg in await getattr(ipr, kind)("dump")]
                    samples.append(time.perf_counter() - start)
                result[f"dump_{kind}"] = samples
        finally:
            ipr.close()
        return result

    return asyncio.run(measure())


def request_encoding(count: int, trials: int) -> Json:
    """The requests of `count` new tunnels (create up, look up, mark, address, two routes), framed into one
    buffer: by greupd/netlink/rtnl.py, and by pyroute2's IPBatch (its request compiler, which sends nothing).
    Encoding only: the kernel's work for the same messages is the same whichever side built them."""
    from pyroute2 import IPBatch

    from greupd.config import load_config_text
    from greupd.model import LINK_ALIAS, ROUTE_PROTO, desired_state
    from greupd.netlink import nlmsg, rtnl

    intents = list(desired_state(load_config_text(scenario.greupd_toml(count))).tunnels.values())

    def by_rtnl() -> bytes:
        requests = []
        for index, t in enumerate(intents, 100):
            requests += [rtnl.new_link(t.link, True), rtnl.get_link(t.link.name), rtnl.set_alias(index, LINK_ALIAS),
                         *(rtnl.address(True, index, a) for a in t.addresses),
                         *(rtnl.route(True, index, r, ROUTE_PROTO) for r in t.routes)]
        return b"".join(nlmsg.message(r.type, r.flags, seq, 0, r.body) for seq, r in enumerate(requests, 1))

    def by_ipbatch() -> bytes:
        ipb = IPBatch()
        for index, t in enumerate(intents, 100):
            link = t.link
            ipb.link("add", ifname=link.name, kind="gre", gre_local=str(link.local), gre_remote=str(link.remote),
                     gre_ikey=link.ikey, gre_okey=link.okey, gre_iflags=0x2000, gre_oflags=0x2000, gre_ttl=link.ttl,
                     state="up")
            ipb.link("get", ifname=link.name)
            ipb.link("set", index=index, ifalias=LINK_ALIAS)
            for a in t.addresses:
                ipb.addr("add", index=index, local=str(a.local.ip), address=str(a.peer),
                         prefixlen=a.local.network.prefixlen)
            for r in t.routes:
                ipb.route("add", dst=str(r.dst), oif=index, proto=ROUTE_PROTO, table=r.table, priority=r.metric)
        return bytes(ipb.batch)

    ours, theirs = by_rtnl(), by_ipbatch()
    messages = sum(1 for _ in nlmsg.messages(ours))
    assert messages == sum(1 for _ in nlmsg.messages(theirs))
    return {"tunnels": count, "messages": messages, "rtnl": timed(by_rtnl, trials),
            "ipbatch": timed(by_ipbatch, trials)}


def compiled() -> None:
    """Bytecode for greupd, as pip and dpkg leave it at install: this environment may set
    PYTHONDONTWRITEBYTECODE=1, and then every start compiled each module from source (~2x the imports)."""
    import compileall

    compileall.compile_dir(REPO / "greupd", quiet=1)
    compileall.compile_dir(REPO / "bench", quiet=1)


def ready_natively(trials: int) -> Json:
    """`greupd run` (via bench.greupd_timed) with one tunnel and its keepalive, spawn to READY=1, in a netns of
    this machine. Its kernel has no GRE, so the create is refused and the tunnel reported in error: everything
    else (Python, imports, config, the netlink requests, the keepalive engine and its probe) is as in real use.
    `python -c pass` is timed in the same netns right before each trial (`bare`), the yardstick of the load."""
    import socket

    compiled()

    netns = f"benchready{os.getpid()}"
    directory = Path(tempfile.mkdtemp(prefix="bench-ready-"))
    config = directory / "tunnels.toml"
    config.write_text(scenario.greupd_toml(1, keepalive=(1.0, 3, 1)))
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(directory / "notify.sock"))
    notify.settimeout(60)
    env = {**os.environ, "NOTIFY_SOCKET": str(directory / "notify.sock"), "GREUPD_CONFIG": str(config),
           "GREUPD_CONTROL_SOCKET": str(directory / "control.sock"), "GREUPD_STATE_DIR": str(directory / "state"),
           "GREUPD_LOG_LEVEL": "WARNING", "PYTHONPATH": str(REPO)}
    samples: list[Json] = []
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
        for trial in range(trials + 1):  # the first warms the page cache, as on a machine that ran greupd before
            start = time.monotonic()
            subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", "pass"], check=True)
            bare = time.monotonic() - start
            start = time.monotonic()
            proc = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-m", "bench.greupd_timed"],
                                    cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            imported = ready = None
            cpu = 0.0
            try:
                while ready is None:
                    data = notify.recv(65536).decode(errors="replace")
                    if data.startswith("BENCH_IMPORTED="):
                        imported = float(data.split("=", 1)[1]) - start
                    elif "READY=1" in data.split("\n"):
                        ready = time.monotonic() - start
                cpu = _cpu_seconds(proc.pid)  # a figure the machine's load does not stretch, unlike wall time
            finally:
                proc.terminate()
                proc.wait(30)
            if trial:
                samples.append({"imported": imported, "seconds": ready, "cpu_seconds": cpu, "bare": bare})
    finally:
        notify.close()
        subprocess.run(["ip", "netns", "del", netns], check=False)
        shutil.rmtree(directory, ignore_errors=True)
    return {"trials": samples, "load_average": Path("/proc/loadavg").read_text().split()[:3]}


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _tx_packets(netns: str, ifname: str) -> int:
    proc = subprocess.run(["ip", "netns", "exec", netns, "cat", f"/sys/class/net/{ifname}/statistics/tx_packets"],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout)


def keepalive_engine(count: int, interval: float, window: float) -> Json:
    """The keepalive engine alone (`python -m greupd.keepalive`, no links or routes: it needs none, only raw
    sockets) probing `count` peers, answered by a second engine (answer = "daemon") in another netns, on this
    machine's own kernel. Measures the prober's CPU and memory: the host-native counterpart of the lab's
    keepalive-cost table."""
    tag = f"benchka{os.getpid()}"
    a, b = f"{tag}a", f"{tag}b"
    procs: list[subprocess.Popen[bytes]] = []
    directory = Path(tempfile.mkdtemp(prefix="bench-ka-"))
    try:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "add", ns], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "-n", a, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", b],
                       check=True)
        for ns, addr in ((a, scenario.LOCAL), (b, scenario.REMOTE)):
            subprocess.run(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0"], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", "eth0", "up"], check=True)
        for ns, mirror in ((b, True), (a, False)):
            config = directory / f"{ns}.toml"
            config.write_text(scenario.greupd_toml(count, keepalive=(interval, 3, 1), mirror=mirror))
            procs.append(subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, "-m", "greupd.keepalive", "-c", str(config),
                 "--status-file", str(directory / f"{ns}.json"), "--status-every", "3600"],
                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        prober = procs[-1]
        time.sleep(5 + 3 * interval)
        sent_before = _tx_packets(a, "eth0")
        before, start = _cpu_seconds(prober.pid), time.monotonic()
        time.sleep(window)
        cpu, elapsed = _cpu_seconds(prober.pid) - before, time.monotonic() - start
        probes = _tx_packets(a, "eth0") - sent_before  # the prober sends nothing else (answer = "off")
        rss = _rss_mb(prober.pid)
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(30)
        report = json.loads((directory / f"{a}.json").read_text())
        tunnels = report["tunnels"].values()
        # probes_per_s: a starved prober (a loaded machine) skips probes, and its CPU % looks better than it is
        return {"tunnels": count, "interval": interval, "seconds": elapsed, "cpu_percent": 100 * cpu / elapsed,
                "probes_per_s": probes / elapsed, "cpu_us_per_probe": 1e6 * cpu / max(probes, 1),
                "load_average": Path("/proc/loadavg").read_text().split()[:3],
                "rss_mb": rss, "up": sum(bool(t["up"]) for t in tunnels),
                "sent": sum(t["sent"] for t in tunnels), "received": sum(t["received"] for t in tunnels)}
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], check=False)
        shutil.rmtree(directory, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.host_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--dumps-here", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.dumps_here is not None:
        print(json.dumps(_dumps_here(a.dumps_here)))
        return 0
    trials = 3 if a.quick else 7
    count = 100 if a.quick else 1000
    py = sys.executable
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine())
    result: Json = {
        "meta": {"machine": {"kernel": platform.release(), "cpus": os.cpu_count(), "cpu": cpu,
                             "python": platform.python_version(), "guest": "none (host)"},
                 "quick": a.quick, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")},
        "imports": {
            "python_bare": command([py, "-c", "pass"], trials),
            "import_daemon": command([py, "-c", "import greupd.daemon"], trials),
            "import_daemon_scapy": command([py, "-c", "import greupd.daemon; import scapy.layers.inet, "
                                                      "scapy.layers.l2"], trials),
            "import_scapy_all": command([py, "-c", "import scapy.all"], trials),
        },
        "cpu": cpu_parts(count, trials),
        "ready_one_tunnel_keepalive": ready_natively(trials if a.quick else 20),  # #26: a median of 20
        "request_encoding": request_encoding(100, trials),
        "dumps": dump_parsing(count, trials),
        "keepalive": [keepalive_engine(count, interval, 10 if a.quick else 30) for interval in (1.0, 0.1)],
        # issue #26: the nftables keep, and status / metrics, at a hub's size
        "nft_keep": [nft_keep.measure(n, trials if n <= 1000 else 3)
                     for n in ((100,) if a.quick else (1000, 10000))],
        "status_metrics": status_bench.measure(1000 if a.quick else 10000, trials),
    }
    text = json.dumps(result, indent=1, sort_keys=True)
    if a.out:
        a.out.write_text(text)
    else:
        print(text)
    medians = {k: round(statistics.median(v), 4) for k, v in result["cpu"].items() if isinstance(v, list)}
    print(f"host bench: {medians}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())


def hub_rows(host: Json) -> tuple[list[str], list[str]]:
    """(target rows, table rows) of issue #26's native figures, for bench/render.py."""
    def figure(seconds: float) -> str:
        return f"{seconds * 1e3:.3g}" if seconds * 1e3 < 100 else f"{seconds * 1e3:.0f}"

    def ms(values: list[float]) -> str:
        return figure(statistics.median(values)) if values else "-"

    def spread(values: list[float]) -> str:
        return f"{ms(values)} ({figure(min(values))}-{figure(max(values))})" if values else "-"

    targets: list[str] = []
    rows: list[str] = []
    for keep in host.get("nft_keep", []):
        n, cpu, goal = keep["tunnels"], keep["cpu"], 0.05 if keep["tunnels"] <= 1000 else 0.3
        rows.append(f"| nftables keep, {n} tunnels (clamp + NAT each): the read-back of before / nothing changed / "
                    f"another table changed / our table drifted, put back: wall ms (CPU ms) | "
                    f"{spread(keep['before'])} ({ms(cpu['before'])}) / {spread(keep['unchanged'])} / "
                    f"{spread(keep['other_table_changed'])} ({ms(cpu['other_table_changed'])}) / "
                    f"{spread(keep['drift_repaired'])} ({ms(cpu['drift_repaired'])}); "
                    f"load {' '.join(keep['load_average'])} |")
        worst = max(statistics.median(keep["unchanged"]), statistics.median(keep["other_table_changed"]))
        worst_cpu = max(statistics.median(cpu["unchanged"]), statistics.median(cpu["other_table_changed"]))
        ratio = statistics.median(keep["before"]) / max(worst, 1e-9)
        targets.append(f"| 26 | (host) nftables keep, {n} tunnels, under {goal * 1e3:.0f} ms | "
                       f"{figure(worst)} ms wall, {figure(worst_cpu)} ms CPU (read-back of before: {ratio:.0f}x) | "
                       f"{'met' if worst < goal else 'met in CPU' if worst_cpu < goal else '**missed**'} |")
    sm = host.get("status_metrics")
    if sm:
        stall = sm["loop_stall_max"]
        rows.append(f"| {sm['tunnels']} tunnels: `python -c pass` / `greupd status --json` (a process, spawn to "
                    f"exit) / GET /metrics (curl) / `greupd metrics`, wall ms | {spread(sm['python_bare'])} / "
                    f"{spread(sm['status_json_cli'])} / {spread(sm['metrics_http'])} / {spread(sm['metrics_cli'])} |")
        rows.append(f"| the same: longest loop stall while answering, ms (idle, during `python -c pass`: "
                    f"{1e3 * stall['python_bare']:.0f}) | {1e3 * stall['status_json_cli']:.0f} / "
                    f"{1e3 * stall['metrics_http']:.0f} / {1e3 * stall['metrics_cli']:.0f} |")
        rows.append(f"| before: the whole status built + json.dumps'ed at once / prometheus_client's rendering, "
                    f"one block on the loop, ms | {spread(sm['before']['status_whole'])} / "
                    f"{spread(sm['before']['metrics_prometheus_client'])} |")
        for case, label in (("status_json_cli", "`greupd status --json`"), ("metrics_http", "GET /metrics")):
            wall = statistics.median(sm[case])
            targets.append(f"| 26 | (host) {label}, {sm['tunnels']} tunnels, under 100 ms, loop never held over 10 ms "
                           f"| {wall * 1e3:.0f} ms (`python -c pass` {ms(sm['python_bare'])} ms), longest stall "
                           f"{1e3 * stall[case]:.0f} ms; load {' '.join(sm['load_average'])} | "
                           f"{'met' if wall < 0.1 and stall[case] < 0.01 else '**missed**'} |")
    ready = host.get("ready_one_tunnel_keepalive", {}).get("trials")
    if ready:
        wall = statistics.median([t["seconds"] for t in ready])
        bare = statistics.median([t["bare"] for t in ready if "bare" in t] or [0.0])
        cpu = statistics.median([t["cpu_seconds"] for t in ready])
        targets.append(f"| 26 | (host) `greupd run` → READY, 1 tunnel with keepalive, median of {len(ready)}, "
                       f"under 150 ms | {wall * 1e3:.0f} ms (CPU {cpu * 1e3:.0f} ms; `python -c pass` in the netns "
                       f"{bare * 1e3:.0f} ms) | {'met' if wall < 0.15 else '**missed**'} |")
    return targets, rows
