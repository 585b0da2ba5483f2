"""Forwarding rate through greupd's nftables table, 1 tunnel against 1000 (issue #16, code review M5).

    python -m bench.forwarding [--quick] [--out FILE]     in a kernel with GRE and nftables inet (the vng guest)

Router A forwards traffic from its LAN into a GRE tunnel to router B; what A's forward hook costs per packet
is what greupd's table adds. The question: does that cost grow with the number of tunnels configured?

    lan_a --eth1-- A ==My_Tunnel (GRE over the veth wan0)== B --eth1-- lan_b

A holds 1000 GRE links throughout (My_Tunnel and 999 others, up, carrying nothing); only the table changes
between cases. The sender is pktgen, the kernel's packet generator, in lan_a: 64-byte UDP frames to lan_b as
fast as it can, in kernel space, on the guest's second CPU. RPS steers what A receives from lan_a to the first
CPU, which does nothing else: A's forward hook and greupd's table, GRE encapsulation, the send on wan0. The
sender offers more than that CPU can forward (the surplus is dropped when it queues for it, which costs the
forwarding CPU nothing), so the rate A puts into the tunnel (wan0's sent + dropped frames over a window) is
what A's forwarding path can do. During the trials B drops the tunnel's packets as they arrive (a netdev
ingress rule on its wan0, on the second CPU, after the veth counted them): B's own decapsulation and
forwarding would load the sender's CPU until the sender, not A, set the rate. Before the trials a ping
crosses the whole path, lan_a to lan_b through the tunnel.
(Earlier versions of this benchmark measured at lan_b: without the steering, pktgen refilled the one backlog
queue both hops share and a slow case showed nothing at the far end; with it but B forwarding, the sender's
CPU was the bottleneck for every fast case.)

Cases, one trial each per round, their order rotated every round (the machine is shared, so trials of
different cases are interleaved and the ratios taken from medians): no table; greupd's table for the config
with the carrying tunnel alone, and with it last of 1000 (the seed's tunnel: clamp 1436, into_tunnel and
from_tunnel NAT); and, to show what M5 was about, the same two configs in the linear table greupd rendered
before (one to three rules per tunnel in each hooked chain, `linear_table` below). All four tables are loaded
once, under their own names, and kept dormant (`flags dormant`: their hooks unregistered) but for the one a
trial measures, so a case switch is one small transaction.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from typing import Any

from bench.record import results_file
from lab.hosts import Host, Lab, in_netns

Json = dict[str, Any]

TUNNELS = 1000
CARRIER = "My_Tunnel"
LAN_A, LAN_B = "10.10.1.0/24", "20.10.1.0/24"
SENDER, RECEIVER = "10.10.1.2", "20.10.1.2"
PACKET_BYTES = 64  # pktgen's pkt_size: the frame without its FCS
UDP_PORT = 9
CASES = ("none", "greupd_1", f"greupd_{TUNNELS}", "linear_1", f"linear_{TUNNELS}")


@dataclass(frozen=True)
class Sizes:
    rounds: int
    window: float  # seconds counted per trial
    warmup: float  # seconds of traffic before the window opens
    extra: int  # configured tunnels besides the carrier


FULL = Sizes(rounds=11, window=3.0, warmup=1.0, extra=TUNNELS - 1)
QUICK = Sizes(rounds=2, window=1.5, warmup=0.5, extra=TUNNELS - 1)


def log(*parts: object) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] forwarding:", *parts, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the configs and their tables


def extra_names(count: int) -> list[str]:
    return [f"t{i:04d}" for i in range(1, count + 1)]


def extra_remote(i: int) -> str:
    return f"172.21.{i // 250}.{i % 250 + 1}"


def greupd_ruleset(extra: int, table: str = "greupd") -> Any:
    """greupd's table for the carrier last of `extra` + 1 seed-like tunnels (validated once, then copied)."""
    from greupd.config import Config, DaemonConfig, TunnelConfig
    from greupd.nft.render import render_ruleset

    seed = TunnelConfig.model_validate({
        "name": CARRIER, "local": "172.19.1.1", "remote": "172.19.1.2",
        "mss": {"clamp": 1436}, "nat": {"into_tunnel": [LAN_A], "from_tunnel": ["eth1"]}})
    others = [seed.model_copy(update={"name": name, "remote": ip_address(extra_remote(i))})
              for i, name in enumerate(extra_names(extra), start=1)]
    return render_ruleset(Config(DaemonConfig(nft_table=table), (*others, seed)))


def linear_table(names: Sequence[str], table: str = "greupd") -> str:
    """The table greupd rendered before review M5 was fixed (main at 0ecc809), for the same seed-like
    tunnels: every forwarded packet walks two clamp rules per tunnel and the forward accepts one by one."""
    clamp = "tcp option maxseg size set meta nfproto map { ipv4 : 1436, ipv6 : 1416 }"
    mss, forward, nat = [], [], []
    for name in names:
        mss += [f'oifname "{name}" tcp flags syn / syn,rst {clamp} comment "{name}: clamp mss out"',
                f'iifname "{name}" tcp flags syn / syn,rst {clamp} comment "{name}: clamp mss in"']
        forward += [f'ip saddr {LAN_A} oifname "{name}" accept comment "{name}: forward {LAN_A} into the tunnel"',
                    f'iifname "{name}" oifname "eth1" meta mark set meta mark | 0x20000000 accept'
                    f' comment "{name}: forward from the tunnel to eth1"']
        nat += [f'ip saddr {LAN_A} oifname "{name}" masquerade comment "{name}: masquerade {LAN_A} into the tunnel"',
                f'meta mark & 0x20000000 == 0x20000000 oifname "eth1" masquerade'
                f' comment "{name}: masquerade from the tunnel to eth1"']

    def chain(name: str, head: str, rules: list[str]) -> str:
        return f"\tchain {name} {{\n\t\t{head}\n" + "".join(f"\t\t{r}\n" for r in rules) + "\t}\n"

    return (f"table inet {table} {{\n"
            + chain("mss_clamp", "type filter hook forward priority mangle; policy accept;", mss) + "\n"
            + chain("forward", "type filter hook forward priority filter; policy accept;", forward) + "\n"
            + chain("postrouting", "type nat hook postrouting priority srcnat; policy accept;", nat)
            + "}\n")


def hooked_rules(case: str, tables: dict[str, Any]) -> int:
    """How many rules the hooked chains hold: what a forwarded packet may walk."""
    if case == "none":
        return 0
    table = tables[case]
    if isinstance(table, str):
        return sum(1 for line in table.splitlines() if line.startswith("\t\t") and " comment " in line)
    base = {c.name for c in table.chains if c.hook is not None}
    return sum(1 for r in table.rules if r.chain in base)


# --------------------------------------------------------------------------- the lab


def build(lab: Lab, extra: int) -> tuple[Host, Host, Host, Host]:
    a, b, lan_a, lan_b = (lab.host(n) for n in ("a", "b", "lan_a", "lan_b"))
    lab.link(a, b, "172.19.1.1/24", "172.19.1.2/24", if1="wan0", if2="wan0")
    lab.link(a, lan_a, "10.10.1.1/24", f"{SENDER}/24", if1="eth1", if2="eth0",
             then2=["route add default via 10.10.1.1"])
    lab.link(b, lan_b, "20.10.1.1/24", f"{RECEIVER}/24", if1="eth1", if2="eth0",
             then2=["route add default via 20.10.1.1"])
    for router, local, remote, address, peer, far in (
            (a, "172.19.1.1", "172.19.1.2", "192.168.8.1", "192.168.8.11", LAN_B),
            (b, "172.19.1.2", "172.19.1.1", "192.168.8.11", "192.168.8.1", LAN_A)):
        router.sysctl("net.ipv4.ip_forward", 1)
        router.ip_batch(f"tunnel add {CARRIER} mode gre local {local} remote {remote} ttl 64",
                        f"addr add {address} peer {peer} dev {CARRIER}", f"link set {CARRIER} up",
                        f"route add {far} dev {CARRIER}")
    # The other tunnels: links like greupd's (up, own remotes), which carry nothing.
    lines = [f"link add {name} type gre local 172.19.1.1 remote {extra_remote(i)} ttl 64\nlink set {name} up"
             for i, name in enumerate(extra_names(extra), start=1)]
    subprocess.run(["ip", "-n", a.netns, "-batch", "-"], input="\n".join(lines) + "\n", check=True, text=True,
                   capture_output=True, timeout=1800)
    assert lan_a.wait_ping(RECEIVER, timeout=60), "lan_a cannot reach lan_b through the tunnel"
    # From now on B counts what the tunnel brings (wan0's rx counter) and drops it at once.
    b.run("nft", "-f", "-", input="table netdev sink {\n chain in {\n"
          '  type filter hook ingress device "wan0" priority 0; policy accept;\n'
          "  ip protocol gre drop\n }\n}\n")
    # RPS: A's receive from lan_a on CPU 0 (the forwarding CPU), B's from the tunnel on CPU 1 (the sender's).
    a.sh(f"echo {FORWARDING_CPUS} > /sys/class/net/eth1/queues/rx-0/rps_cpus")
    b.sh(f"echo {OTHER_CPUS} > /sys/class/net/wan0/queues/rx-0/rps_cpus")
    return a, b, lan_a, lan_b


def link_counter(host: Host, ifname: str, column: int) -> int:
    """A column of /proc/net/dev in host's netns (0: rx packets... see proc(5)), read in-process."""
    with in_netns(host):
        text = Path("/proc/thread-self/net/dev").read_text()
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == ifname:
            return int(rest.split()[column])
    raise KeyError(f"{ifname} not in {host.name}'s /proc/net/dev")


# /proc/net/dev columns after the interface name: rx bytes, rx packets, ..., tx bytes, tx packets, errs, drop
RX_PACKETS, TX_PACKETS, TX_DROP = 1, 9, 11
FORWARDING_CPUS, OTHER_CPUS = "1", "2"  # RPS masks: CPU 0, CPU 1
SENDER_THREAD = "kpktgend_1"  # pktgen's thread on CPU 1


class Pktgen:
    """pktgen's /proc/net/pktgen, in the sender's netns: one device, UDP to the receiver, until stopped."""

    def __init__(self, host: Host, ifname: str, dst_mac: str) -> None:
        self.host = host
        self.ifname = ifname
        for cpu in range(os.cpu_count() or 1):
            self._write(f"kpktgend_{cpu}", "rem_device_all")
        self._write(SENDER_THREAD, f"add_device {ifname}")
        for line in ("count 0", "clone_skb 0", f"pkt_size {PACKET_BYTES}", "delay 0", f"dst {RECEIVER}",
                     f"dst_mac {dst_mac}", f"src_min {SENDER}", f"src_max {SENDER}", f"udp_src_min {UDP_PORT}",
                     f"udp_src_max {UDP_PORT}", f"udp_dst_min {UDP_PORT}", f"udp_dst_max {UDP_PORT}"):
            self._write(ifname, line)
        self._runner: threading.Thread | None = None

    def _write(self, name: str, line: str) -> None:
        with in_netns(self.host), open(f"/proc/thread-self/net/pktgen/{name}", "w") as f:
            f.write(line + "\n")

    def result(self) -> str:
        with in_netns(self.host):
            return Path(f"/proc/thread-self/net/pktgen/{self.ifname}").read_text()

    def start(self) -> None:
        # Writing "start" returns when the run ends: in a thread of its own, stopped by "stop" below.
        self._runner = threading.Thread(target=self._write, args=("pgctrl", "start"), daemon=True)
        self._runner.start()

    def stop(self) -> None:
        self._write("pgctrl", "stop")
        if self._runner is not None:
            self._runner.join(timeout=120)
            self._runner = None


def load_pktgen() -> None:
    if Path("/proc/net/pktgen").exists():
        return
    # In the vng guest the kernel's modprobe helper is lab/python_disk's wrapper (modules on its disk).
    helper = Path("/proc/sys/kernel/modprobe").read_text().strip() or "modprobe"
    subprocess.run([helper, "pktgen"], check=True, capture_output=True, timeout=300)


# --------------------------------------------------------------------------- the trials


def nft_text(router: Host, commands: str) -> None:
    """nft commands through libnftables, in router's netns (no process to start: seconds under emulation)."""
    import nftables

    with in_netns(router):
        rc, _, error = nftables.Nftables().cmd(commands)
    if rc != 0:
        raise RuntimeError(f"nft {commands!r}: {error}")


def load_table(router: Host, table: Any) -> float:
    """Load one case's table into router, then make it dormant (its hooks unregistered: it costs a packet
    nothing until woken). The seconds its transaction took."""
    import nftables

    start = time.monotonic()
    if isinstance(table, str):
        nft_text(router, table)
        name = table.split()[2]
    else:
        with in_netns(router):
            rc, _, error = nftables.Nftables().json_cmd({"nftables": table.commands()})  # greupd's transaction
        if rc != 0:
            raise RuntimeError(f"greupd's table {table.table}: {error}")
        name = table.table
    seconds = time.monotonic() - start
    nft_text(router, f"add table inet {name} {{ flags dormant; }}")
    return seconds


def switch(router: Host, asleep: str | None, awake: str | None) -> None:
    """One transaction: the previous case's table goes dormant, this case's wakes (`add table` without flags)."""
    commands = [*([f"add table inet {asleep} {{ flags dormant; }}"] if asleep else []),
                *([f"add table inet {awake}"] if awake else [])]
    if commands:
        nft_text(router, "\n".join(commands))


def counters(a: Host, lan_a: Host, b: Host) -> tuple[float, int, int, int]:
    """(time, frames A put into the tunnel, frames lan_a sent, frames B received from the tunnel)."""
    forwarded = link_counter(a, "wan0", TX_PACKETS) + link_counter(a, "wan0", TX_DROP)
    return time.monotonic(), forwarded, link_counter(lan_a, "eth0", TX_PACKETS), link_counter(b, "wan0", RX_PACKETS)


def trial(sender: Pktgen, a: Host, lan_a: Host, b: Host, sizes: Sizes) -> Json:
    sender.start()
    time.sleep(sizes.warmup)
    t1, fwd1, sent1, rx1 = counters(a, lan_a, b)
    time.sleep(sizes.window)
    t2, fwd2, sent2, rx2 = counters(a, lan_a, b)
    sender.stop()
    seconds = t2 - t1
    return {"pps": (fwd2 - fwd1) / seconds, "sent_pps": (sent2 - sent1) / seconds,
            "delivered_pps": (rx2 - rx1) / seconds, "seconds": seconds}


def run(sizes: Sizes) -> Json:
    load_pktgen()
    log("rendering the tables")
    every = [*extra_names(sizes.extra), CARRIER]
    big = f"{TUNNELS}"
    tables: dict[str, Any] = {
        "greupd_1": greupd_ruleset(0, "greupd_1"), f"greupd_{big}": greupd_ruleset(sizes.extra, f"greupd_{big}"),
        "linear_1": linear_table([CARRIER], "linear_1"), f"linear_{big}": linear_table(every, f"linear_{big}")}
    with Lab("fwd") as lab:
        log(f"building the lab ({sizes.extra + 1} tunnels on A)")
        started = time.monotonic()
        a, b, lan_a, _lan_b = build(lab, sizes.extra)
        nft_text(a, "list tables")  # libnftables imported and opened before anything is timed
        log(f"lab built in {time.monotonic() - started:.0f} s")
        # Every case's table is loaded once, dormant; a trial wakes one (a table switch is one small transaction,
        # where loading 1000 tunnels' worth under emulation takes a minute).
        applied = {}
        for case, table in tables.items():
            applied[case] = load_table(a, table)
            log(f"table {case} loaded in {applied[case]:.1f} s")
        mac = json.loads(a.ip("-j", "link", "show", "eth1").stdout)[0]["address"]
        sender = Pktgen(lan_a, "eth0", mac)
        samples: dict[str, list[Json]] = {case: [] for case in CASES}
        awake: str | None = None
        for number in range(sizes.rounds):
            order = CASES[number % len(CASES):] + CASES[:number % len(CASES)]
            for case in order:
                wanted = None if case == "none" else case
                switch(a, awake, wanted)
                awake = wanted
                result = {**trial(sender, a, lan_a, b, sizes), "round": number}
                samples[case].append(result)
                log(f"round {number + 1}/{sizes.rounds} {case}: {result['pps']:.0f} pps forwarded "
                    f"(lan_a sent {result['sent_pps']:.0f}, B received {result['delivered_pps']:.0f})")
        last_run = sender.result()
    return {"tunnels": sizes.extra + 1, "packet_bytes": PACKET_BYTES, "window_s": sizes.window,
            "warmup_s": sizes.warmup, "rounds": sizes.rounds, "trials": samples, "applied_s": applied,
            "hooked_rules": {case: hooked_rules(case, tables) for case in CASES},
            "pktgen_last_run": last_run.strip().splitlines()[-1] if last_run.strip() else ""}


# --------------------------------------------------------------------------- BENCHMARKS.md (bench/render.py)


def _pps(rows: Sequence[Json]) -> list[float]:
    return [float(r["pps"]) for r in rows]


def round_ratios(data: Json, case: str, base: str) -> list[float]:
    """case / base within each round (the two measured a few seconds apart)."""
    by_round = {r["round"]: r["pps"] for r in data["trials"][base]}
    return [r["pps"] / by_round[r["round"]] for r in data["trials"][case]
            if by_round.get(r["round"])]


def section(results: Json) -> tuple[list[str], list[str]]:
    """(target rows, body lines) for BENCHMARKS.md from the nft suite's JSON."""
    data = results.get("forwarding")
    if not data or not data.get("trials"):
        return [], []
    n = data["tunnels"]
    trials = data["trials"]
    base = statistics.median(_pps(trials["greupd_1"])) if trials.get("greupd_1") else None
    labels = {"none": "no table", "greupd_1": "greupd's table, 1 tunnel",
              f"greupd_{n}": f"greupd's table, {n} tunnels (the carrier last)",
              "linear_1": "linear table of before, 1 tunnel",
              f"linear_{n}": f"linear table of before, {n} tunnels (the carrier last)"}
    lines = ["## 7. Forwarding through greupd's nftables table", "",
             f"Router A forwards {data['packet_bytes']}-byte UDP frames from its LAN into a GRE tunnel to B "
             f"(`bench/forwarding.py`); A holds {n} GRE links throughout, only its nftables table changes. The "
             "sender (kernel pktgen) offers more than A's forwarding CPU can take (RPS gives that CPU nothing "
             "else to do); *forwarded*: frames A put into the tunnel per second over a "
             f"{data['window_s']:.1f} s window, {data['rounds']} rounds, cases interleaved; *arrived*: what "
             "B received from the tunnel (and dropped, so that its CPU, the sender's, does not set the pace; "
             "a ping crosses the whole path first). *Hooked rules*: the rules in the chains a "
             "forwarded packet walks. Absolute rates are those of an emulated CPU (qemu TCG) on a shared "
             "machine: compare the ratios.", "",
             "| case | hooked rules | forwarded (pps), median (min-max) | vs greupd, 1 tunnel | arrived at B (pps) | "
             "table loaded (s) |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for case, label in labels.items():
        rows = trials.get(case) or []
        if not rows:
            continue
        pps = _pps(rows)
        med = statistics.median(pps)
        versus = f"{med / base:.3f}" if base else "-"
        delivered = statistics.median(float(r.get("delivered_pps", 0.0)) for r in rows)
        applied = data["applied_s"].get(case)
        lines.append(f"| {label} | {data['hooked_rules'][case]} | {med:.0f} ({min(pps):.0f}-{max(pps):.0f}) | "
                     f"{versus} | {delivered:.0f} | {'-' if applied is None else f'{applied:.2f}'} |")
    targets = []
    if base and trials.get(f"greupd_{n}"):
        ratio = statistics.median(_pps(trials[f"greupd_{n}"])) / base
        per_round = round_ratios(data, f"greupd_{n}", "greupd_1")
        lines += ["", f"greupd's table, {n} tunnels against 1, the ratio within each round: median "
                  f"{statistics.median(per_round):.3f} (min {min(per_round):.3f}, max {max(per_round):.3f})."]
        targets.append(f"| 7 | forwarding rate with {n} tunnels within 5 % of 1 tunnel (qemu guest) | "
                       f"{ratio:.3f}x (per-round median {statistics.median(per_round):.3f}) | "
                       f"{'met' if ratio >= 0.95 else '**missed**'} |")
    if trials.get(f"linear_{n}") and trials.get("linear_1"):
        old = statistics.median(_pps(trials[f"linear_{n}"])) / statistics.median(_pps(trials["linear_1"]))
        lines += ["", f"The linear table of before, {n} tunnels against 1: {old:.3f}x."]
    lines.append("")
    return targets, lines


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.forwarding", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="few short trials: a smoke run")
    p.add_argument("--out", type=Path, default=None, help="JSON output (default: $GREUPD_LAB_RUNDIR/bench.json)")
    a = p.parse_args(argv)
    out = a.out or Path(os.environ.get("GREUPD_LAB_RUNDIR", ".")) / "bench.json"
    sizes = QUICK if a.quick else FULL
    started = time.monotonic()
    with results_file(out, "nft", a.quick) as data:
        data["forwarding"] = run(sizes)
    log(f"done in {time.monotonic() - started:.0f} s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
