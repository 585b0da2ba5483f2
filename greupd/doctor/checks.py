"""The checks: pure functions of the config and one HostFacts snapshot, each returning its findings.

No I/O here (read.py and trace.py read the host), so every check is unit-tested with made-up facts, and the same
checks serve `greupd doctor`, `greupd plan`'s warnings and, through `runtime_findings`, the daemon.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from greupd.config import Config, TunnelConfig
from greupd.doctor.facts import Chain, HostFacts, Rule, TracedPacket
from greupd.doctor.findings import CHECKS, Finding
from greupd.gre import IPV6_MODES
from greupd.nft.foreign import FAMILY_VERSIONS

# The module that gives the kernel each link kind (rtnl_link_ops registered under "rtnl-link-<kind>").
MODULE_OF = {"gre": "ip_gre", "gretap": "ip_gre", "erspan": "ip_gre",
             "ip6gre": "ip6_gre", "ip6gretap": "ip6_gre", "ip6erspan": "ip6_gre"}
IP_FORWARD = "net/ipv4/ip_forward"
GRE_TIMEOUT = "net/netfilter/nf_conntrack_gre_timeout"  # before the first reply
GRE_TIMEOUT_STREAM = "net/netfilter/nf_conntrack_gre_timeout_stream"  # once both directions were seen


def rp_filter_key(ifname: str) -> str:
    return f"net/ipv4/conf/{ifname}/rp_filter"


def enabled(config: Config, names: Sequence[str] = ()) -> list[TunnelConfig]:
    return [t for t in config.tunnels if t.enabled and (not names or t.name in names)]


# --- what the kernel lacks: module, address, interface ---------------------------------------------------------

def gre_module_missing(config: Config, facts: HostFacts, tunnels: Sequence[TunnelConfig]) -> list[Finding]:
    if facts.modules is None:
        return []
    findings: list[Finding] = []
    for module in sorted({MODULE_OF[t.mode] for t in tunnels if t.mode in MODULE_OF}):
        if module in facts.modules or (facts.loadable is not None and module in facts.loadable):
            continue  # loaded or built in; or the kernel loads it on the first `ip link add` (module alias)
        who = sorted(t.name for t in tunnels if MODULE_OF.get(t.mode) == module)
        if facts.loadable is None:
            evidence = (f"/sys/module/{module} does not exist and this kernel cannot load modules (no "
                        f"/proc/modules): `ip link add ... type {_kind_of(module)}` answers \"Unknown device type\" "
                        f"(errno 95, EOPNOTSUPP)")
            fix = (f"boot a kernel built with {'CONFIG_NET_IPGRE' if module == 'ip_gre' else 'CONFIG_IPV6_GRE'} "
                   f"(every Debian, Ubuntu and RHEL kernel has it as a module)")
        else:
            evidence = (f"/sys/module/{module} does not exist and {module} is in neither modules.dep nor "
                        f"modules.builtin of this kernel")
            fix = (f"apt-get install linux-modules-extra-$(uname -r)   # or your distribution's package with "
                   f"{module}.ko\nmodprobe {module}\necho {module} > /etc/modules-load.d/greupd.conf")
        findings.extend(Finding("gre-module-missing", name, "error",
                                f"the kernel has no {module}: it cannot make this tunnel's link", evidence, fix)
                        for name in who)
    return findings


def _kind_of(module: str) -> str:
    return "gre" if module == "ip_gre" else "ip6gre"


def local_address_missing(config: Config, facts: HostFacts, tunnels: Sequence[TunnelConfig]) -> list[Finding]:
    present = {address: ifname for ifname, found in facts.addresses.items() for address in found}
    findings = []
    for t in tunnels:
        if t.local.is_unspecified or t.local in present:
            continue
        listed = ", ".join(f"{a} ({n})" for a, n in sorted(present.items(), key=lambda i: str(i[0]))
                           if a.version == t.local.version) or "none"
        findings.append(Finding(
            "local-address-missing", t.name, "error",
            f"local = {t.local} is on no interface of this host: the kernel sends nothing from it and the peer's "
            f"GRE to it never reaches the tunnel",
            f"IPv{t.local.version} addresses on this host: {listed}",
            f"ip address add {t.local}/{t.local.max_prefixlen} dev <the underlay interface>\n"
            f"or, in [[tunnel]] name = \"{t.name}\": local = \"<one of the addresses above>\""))
    return findings


def interface_missing(config: Config, facts: HostFacts, tunnels: Sequence[TunnelConfig]) -> list[Finding]:
    findings = []
    for t in tunnels:
        for ifname in t.nat.from_tunnel:
            if ifname in facts.links:
                continue
            findings.append(Finding(
                "interface-missing", t.name, "error",
                f"[tunnel.nat] from_tunnel names {ifname}, which does not exist: the masquerade and forward accept "
                f"greupd keeps for it match nothing",
                f"no link named {ifname} (links: {', '.join(sorted(facts.links)) or 'none'})",
                f"in [[tunnel]] name = \"{t.name}\", [tunnel.nat]: from_tunnel = [\"<an existing interface>\"]"))
    return findings


# --- firewalls: traced first, rule text where tracing could not reach --------------------------------------------

def firewall_drops_gre(config: Config, facts: HostFacts, tunnels: Sequence[TunnelConfig]) -> list[Finding]:
    findings = []
    for t in tunnels:
        trace = facts.traces.get(t.name) if facts.traces is not None else None
        traced_out = trace is not None and bool(trace.outgoing)
        traced_in = trace is not None and bool(trace.incoming)
        seen: set[tuple[str, str, str, int | None]] = set()
        for packet in trace.packets if trace is not None else ():
            final = packet.final
            if final is None or (final.table == facts.own_table and final.family == "inet"):
                continue
            key = (final.family, final.table, final.chain, final.handle)
            if key in seen:
                continue
            seen.add(key)
            findings.append(_traced_drop(t, packet, facts))
        # What tracing did not reach (no nftrace here, or no GRE came back to follow): read the rule text.
        for rule in _gre_drop_rules(facts, t):
            outgoing = rule.hook in ("output", "postrouting")
            if (traced_out if outgoing else traced_in) or (rule.family, rule.table, rule.chain, rule.handle) in seen:
                continue
            why = (facts.notes[0] if facts.traces is None and facts.notes else
                   "no GRE from the remote arrived while doctor traced" if not outgoing else
                   "doctor's keepalive could not be traced")
            findings.append(Finding(
                "firewall-drops-gre", t.name, "error",
                f"{rule.family} {rule.table} {rule.chain} {'drops' if rule.verdict == 'drop' else 'rejects'} "
                f"GRE {'to' if outgoing else 'from'} {t.remote} ({rule.hook})",
                f"inferred from the rule text, not traced ({why}):\n"
                f"table {rule.family} {rule.table} chain {rule.chain} (hook {rule.hook}): {rule.text}"
                f"{f' # handle {rule.handle}' if rule.handle is not None else ''}",
                _accept_fix(t, rule.family, rule.table, rule.chain, rule.handle, outgoing,
                            _chain_named(facts, rule.family, rule.table, rule.chain))))
    return findings


def _traced_drop(t: TunnelConfig, packet: TracedPacket, facts: HostFacts) -> Finding:
    final = packet.final
    assert final is not None
    way = "our keepalive to" if packet.outgoing else "GRE from"
    decided = (f"{final.where}: {final.rule} # handle {final.handle} (verdict {final.verdict})" if final.kind == "rule"
               else f"{final.where}: policy {final.verdict}")
    # Every verdict it met on the way, when there was more than the one that decided.
    path = "".join(f"\n  {e.where}: {e.rule or 'policy'} (verdict {e.verdict})" for e in packet.events) \
        if len(packet.events) > 1 else ""
    via = f"iif {packet.iif}" if packet.iif else f"oif {packet.oif}"
    # A reject is traced as "verdict drop" (the kernel drops, then answers with an ICMP error): say which.
    verb = "rejects" if final.kind == "rule" and " reject" in f" {final.rule}" else f"{final.verdict}s"
    return Finding(
        "firewall-drops-gre", t.name, "error",
        f"{final.family} {final.table} {final.chain} {verb} {way} {t.remote}",
        f"nftables trace {packet.trace_id} of {way} {t.remote} ({packet.saddr} > {packet.daddr}, {via}), "
        f"decided by {decided}{path}",
        _accept_fix(t, final.family, final.table, final.chain, final.handle if final.kind == "rule" else None,
                    packet.outgoing, _chain_named(facts, final.family, final.table, final.chain)))


def _chain_named(facts: HostFacts, family: str, table: str, name: str) -> Chain | None:
    return next((c for c in facts.chains or () if (c.family, c.table, c.name) == (family, table, name)), None)


def _accept_fix(t: TunnelConfig, family: str, table: str, chain: str, handle: int | None, outgoing: bool,
                found: Chain | None) -> str:
    """A rule that lets this tunnel's GRE through, before the one that drops it (greupd never edits it itself)."""
    ip = "ip6" if t.remote.version == 6 else "ip"
    src, dst = (t.local, t.remote) if outgoing else (t.remote, t.local)
    if found is not None and found.iptables:
        tool = "ip6tables" if family == "ip6" else "iptables"
        return f"{tool} -I {chain} -s {src} -d {dst} -p gre -j ACCEPT"
    proto = "meta l4proto gre" if family == "inet" or ip == "ip6" else "ip protocol gre"
    position = f" position {handle}" if handle is not None else ""
    return f"nft insert rule {family} {table} {chain}{position} {ip} saddr {src} {ip} daddr {dst} {proto} accept"


def _gre_drop_rules(facts: HostFacts, t: TunnelConfig) -> list[Rule]:
    """Rules of other tables' input/output-side base chains that drop or reject GRE (without an address match
    that leaves this tunnel out: doctor does not evaluate addresses from the text, so it reports them all)."""
    found: list[Rule] = []
    for chain in facts.chains or ():
        if chain.family == "inet" and chain.table == facts.own_table:
            continue
        if chain.hook not in ("prerouting", "input", "output", "postrouting"):
            continue
        if chain.family not in ("inet", "ip6" if t.remote.version == 6 else "ip"):
            continue
        for rule in chain.rules:
            if rule.matches_gre and rule.verdict == "accept":
                break  # GRE accepted before any drop of it in this chain (a fix doctor printed, say)
            if rule.matches_gre and rule.verdict in ("drop", "reject"):
                found.append(rule)
    return found


def forward_drop(config: Config, facts: HostFacts, tunnels: Sequence[TunnelConfig]) -> list[Finding]:
    """Another table's forward chain that drops what crosses the tunnel (Docker's `iptables -P FORWARD DROP`).

    Forwarded LAN traffic cannot be traced without sending some, so this one reads the rule text: a chain drops
    the tunnel's traffic when its policy is drop (or it ends with a drop or reject of everything) and no rule
    accepts the tunnel's interface in either direction (iifname/oifname, also through a jump or goto).
    """
    findings = []
    routed = [t for t in tunnels if t.routes or t.nat.into_tunnel or t.nat.from_tunnel]
    for chain in facts.chains or ():
        if chain.hook != "forward" or (chain.family == "inet" and chain.table == facts.own_table):
            continue
        how = chain.drops_everything
        if how is None:
            continue
        for t in routed:
            if not _inner_versions(t) & FAMILY_VERSIONS.get(chain.family, frozenset()):
                continue  # the traffic crossing the tunnel is of the other IP version
            # One direction accepted is taken as the tunnel being let through: firewalld accepts by ingress zone
            # only (`iifname "T1" goto filter_FWD_trusted`), the other way in by the LAN interface's zone,
            # which doctor cannot name. Nothing naming the tunnel at all is what Docker's default leaves.
            if any(_accepts_interface(chain, facts, d, t.name) for d in ("iifname", "oifname")):
                continue
            missing = ["iifname", "oifname"]
            findings.append(Finding(
                "forward-drop", t.name, "error",
                f"{chain.where} (hook forward) {how}: traffic routed through {t.name} is dropped there",
                f"inferred from the rule text (forwarded traffic is not traced): {chain.where} "
                f"(hook forward priority {chain.priority}) {how}, and none of its rules accepts "
                f"{' or '.join(f'{d} {t.name}' for d in missing)}",
                _forward_fix(chain, t.name, missing)))
    return findings


def _inner_versions(t: TunnelConfig) -> frozenset[int]:
    versions = {r.version for r in t.routes} | {p.version for p in t.nat.into_tunnel}
    return frozenset(versions | ({4, 6} if t.nat.from_tunnel else set()))


def _accepts_interface(chain: Chain, facts: HostFacts, direction: str, ifname: str,
                       depth: int = 0) -> bool:
    for rule in chain.rules:
        name = rule.iifname if direction == "iifname" else rule.oifname
        if name is not None and _matches(name, ifname) and rule.only_interface and rule.verdict == "accept":
            return True
        if rule.verdict in ("jump", "goto") and depth < 8:
            target = rule.text.split()[-1]
            sub = _chain_named(facts, chain.family, chain.table, target)
            if sub is not None and ((name is not None and _matches(name, ifname) and rule.only_interface)
                                    or _accepts_interface(sub, facts, direction, ifname, depth + 1)):
                return True
    return False


def _matches(pattern: str, ifname: str) -> bool:
    """nftables' `iifname "gre*"` and iptables' `-i gre+` (which iptables-nft lists as "gre*")."""
    return ifname.startswith(pattern[:-1]) if pattern.endswith(("*", "+")) else pattern == ifname


def _forward_fix(chain: Chain, ifname: str, missing: Iterable[str]) -> str:
    if chain.iptables:
        tool = "ip6tables" if chain.family == "ip6" else "iptables"
        return "\n".join(f"{tool} -I {chain.name} {'-i' if d == 'iifname' else '-o'} {ifname} -j ACCEPT"
                         for d in missing)
    return "\n".join(f"nft insert rule {chain.family} {chain.table} {chain.name} {d} \"{ifname}\" accept"
                     for d in missing)


# --- sysctls -------------------------------------------------------------------------------------------------

def rp_filter(config: Config, facts: HostFacts, tunnels: Sequence[TunnelConfig]) -> list[Finding]:
    """Strict reverse-path filtering (1) on the interface GRE from the remote arrives on, while the route back to
    the remote leaves by another: the kernel drops it (it takes the larger of `all` and the interface's value)."""
    findings = []
    for t in tunnels:
        trace = facts.traces.get(t.name) if facts.traces is not None else None
        back = facts.routes_out.get(str(t.remote))
        for iif in sorted({p.iif for p in trace.incoming if p.iif} if trace is not None else set()):
            all_value, if_value = _int(facts.sysctls.get(rp_filter_key("all"))), _int(
                facts.sysctls.get(rp_filter_key(iif)))
            if max(all_value, if_value) != 1 or back == iif:
                continue
            refusal = facts.route_refusals.get((t.name, iif))
            kernel = f"; the kernel's route check (ip route get {t.local} from {t.remote} iif {iif}): {refusal}" \
                if refusal else ""
            findings.append(Finding(
                "rp-filter", t.name, "error",
                f"strict rp_filter on {iif} drops GRE from {t.remote}: it arrives on {iif}, the route back leaves "
                f"by {back or 'no interface'}",
                f"net.ipv4.conf.all.rp_filter = {all_value}, net.ipv4.conf.{iif}.rp_filter = {if_value} "
                f"(the kernel uses the larger: {max(all_value, if_value)}, strict); nftables traced GRE from "
                f"{t.remote} arriving on {iif}; ip route get {t.remote}: dev {back}{kernel}",
                f"sysctl -w net.ipv4.conf.{iif}.rp_filter=2   # loose: max(all, {iif}) is then 2\n"
                f"echo 'net.ipv4.conf.{iif}.rp_filter = 2' > /etc/sysctl.d/60-greupd-rp-filter.conf"))
    return findings


def _int(value: str | None) -> int:
    try:
        return int(value) if value is not None else 0
    except ValueError:
        return 0


def ip_forward_off(config: Config, facts: HostFacts, tunnels: Sequence[TunnelConfig]) -> list[Finding]:
    """Forwarding off while tunnels carry routed traffic (or reflect the peer's keepalives in the kernel)."""
    value = facts.sysctls.get(IP_FORWARD)
    if value != "0":
        return []
    needing = [t for t in tunnels if t.routes or (t.keepalive is not None and t.keepalive.answer == "kernel")]
    if not needing:
        return []
    if config.daemon.ip_forward and facts.daemon is None:
        return []  # `greupd run` switches it on ([daemon] ip_forward = true)
    names = ", ".join(t.name for t in needing)
    fix = ("in [daemon]: ip_forward = true   # greupd then switches it on\nor: sysctl -w net.ipv4.ip_forward=1"
           if not config.daemon.ip_forward else "sysctl -w net.ipv4.ip_forward=1   # and find what switched it off")
    return [Finding(
        "ip-forward-off", None, "error",
        f"IPv4 forwarding is off: nothing is routed between the tunnels ({names}) and the LANs",
        f"net.ipv4.ip_forward = 0; [daemon] ip_forward = {str(config.daemon.ip_forward).lower()}"
        f"{'; a daemon is running' if facts.daemon is not None else ''}",
        fix)]


def conntrack_timeout(config: Config, facts: HostFacts, tunnels: Sequence[TunnelConfig]) -> list[Finding]:
    """conntrack forgets a GRE flow sooner than the next keepalive comes: every keepalive starts a new entry
    (state NEW, not ESTABLISHED: a `ct state established accept` firewall drops it, a NAT maps it anew)."""
    findings = []
    values = {key: _int(facts.sysctls.get(key)) for key in (GRE_TIMEOUT, GRE_TIMEOUT_STREAM)
              if facts.sysctls.get(key) is not None}
    if not values:
        return []  # conntrack is not in use in this namespace
    for t in tunnels:
        if t.keepalive is None:
            continue
        short = {k: v for k, v in values.items() if v < t.keepalive.interval}
        if not short:
            continue
        need = int(t.keepalive.interval * (t.keepalive.retries + 1))
        entries = "\n".join(facts.conntrack.get(t.name, ())) or f"(no GRE entry for {t.local} <-> {t.remote} now)"
        findings.append(Finding(
            "conntrack-timeout", t.name, "error",
            f"conntrack forgets this tunnel's GRE after {min(short.values())} s, but keepalives come every "
            f"{t.keepalive.interval:g} s",
            "; ".join(f"{k.replace('/', '.')} = {v}" for k, v in values.items())
            + f"; keepalive interval {t.keepalive.interval:g} s\nconntrack entries:\n{entries}",
            "\n".join(f"sysctl -w {k.replace('/', '.')}={max(need, 30 if k == GRE_TIMEOUT else 180)}"
                      for k in short)
            # A flow keeps the timeouts it was created with (nf_conntrack_proto_gre), and a tunnel's flow that
            # packets refresh both ways never ends: without these lines the sysctls help only the next flow.
            + "".join(f"\nconntrack -D -p gre --orig-src {src} --orig-dst {dst}  # the flow tracked with the old "
                      "timeouts (conntrack-tools); none found is fine" for src, dst in ((t.local, t.remote),
                                                                                 (t.remote, t.local)))
            + f"\nor, in [[tunnel]] name = \"{t.name}\", [tunnel.keepalive]: interval = "
              f"\"{max(min(short.values()) // 2, 1)}s\""))
    return findings


# --- other links, the peer ---------------------------------------------------------------------------------------

def tunnel_clash(config: Config, facts: HostFacts, tunnels: Sequence[TunnelConfig]) -> list[Finding]:
    """Another GRE link with the same local, remote and key: the kernel hands the peer's GRE to one of them only
    (ip_tunnel_lookup), so the other tunnel hears nothing."""
    findings = []
    for t in tunnels:
        ikey = t.ikey if t.ikey is not None else t.key
        v6 = t.mode in IPV6_MODES
        for name, link in sorted(facts.links.items()):
            spec = link.spec
            if name == t.name or spec.kind not in MODULE_OF or (spec.kind in IPV6_MODES) != v6:
                continue
            if (spec.local, spec.remote, spec.ikey) != (t.local, t.remote, ikey):
                continue
            key = f" key {ikey}" if ikey is not None else " (no key)"
            findings.append(Finding(
                "tunnel-clash", t.name, "error",
                f"link {name} has the same endpoints and key as this tunnel: the kernel gives the peer's GRE to only "
                f"one of them",
                f"{name}: {spec.kind} local {spec.local} remote {spec.remote}{key}"
                f"{' (greupd' + chr(39) + 's)' if link.owned else ' (not greupd' + chr(39) + 's)'}; "
                f"{t.name}: local {t.local} remote {t.remote}{key}",
                f"ip link del {name}   # if it is a leftover\nor, on both ends, in [[tunnel]] name = \"{t.name}\": "
                f"key = <a key no other tunnel between {t.local} and {t.remote} uses>"))
    return findings


def peer_silent(config: Config, facts: HostFacts, tunnels: Sequence[TunnelConfig]) -> list[Finding]:
    """Our keepalives left this host (traced through every table) and nothing came back from the remote."""
    findings = []
    for t in tunnels:
        trace = facts.traces.get(t.name) if facts.traces is not None else None
        if t.keepalive is None or trace is None or not trace.sent or trace.reflected:
            continue
        left = [p for p in trace.outgoing if p.final is None]
        if trace.outgoing and not left:
            continue  # dropped here: firewall-drops-gre says where
        daemon = next((x for x in facts.daemon["tunnels"] if x["name"] == t.name), None) if facts.daemon else None
        counters = ""
        if daemon is not None and daemon["keepalive"] is not None:
            k = daemon["keepalive"]
            counters = f"; the daemon's keepalive: sent {k['sent']}, received {k['received']}"
        out = f"{len(left)} of them traced out through every table" if trace.outgoing else "(not traced)"
        own = facts.peer_keepalives.get(t.name, ())
        if own:
            counters += f"; the peer's own keepalives do arrive (from {', '.join(own)} inside)"
        findings.append(Finding(
            "peer-silent", t.name, "warning",
            f"{t.remote} does not answer: doctor's keepalives left this host and none came back",
            f"{trace.sent} keepalive(s) sent from {t.local} to {t.remote}, {out}; none came back "
            f"within the trace{counters}",
            f"on the peer {t.remote}: a GRE tunnel with local {t.remote} remote {t.local}"
            f"{' and the same key' if t.key or t.ikey or t.okey else ''}, up; net.ipv4.ip_forward = 1; "
            f"rp_filter 0 or 2 and accept_local = 1 on that tunnel (what reflects a keepalive); "
            f"and no firewall there dropping GRE from {t.local} (run greupd doctor there)"))
    return findings


def mtu_blackhole(config: Config, facts: HostFacts, tunnels: Sequence[TunnelConfig]) -> list[Finding]:
    """The path carries less than the tunnel's MTU needs and says nothing: no ICMP "fragmentation needed" came
    back (the kernel learnt no path MTU), so full-size packets through the tunnel vanish."""
    findings = []
    for t in tunnels:
        probe = facts.paths.get(t.name)
        if probe is None or probe.largest is None or probe.largest >= probe.needed:
            continue
        learned = facts.learned_mtu.get(str(t.remote))
        if learned is not None:
            continue  # ICMP got through: path MTU discovery adjusts the tunnel, not a black hole
        overhead = 24 + (4 if (t.okey if t.okey is not None else t.key) is not None else 0)  # IPv4 + GRE (+ key)
        fits = probe.largest - overhead
        findings.append(Finding(
            "mtu-blackhole", t.name, "error",
            f"the path to {t.remote} carries packets of at most {probe.largest} bytes, the tunnel needs "
            f"{probe.needed}, and no ICMP error says so: larger packets vanish",
            f"padded keepalives with DF set, reflected by the peer: {probe.largest} bytes came back, "
            f"{min(s for s in probe.tried if s > probe.largest)} did not (sizes tried: "
            f"{', '.join(map(str, probe.tried))}); ip route get {t.remote}: no learned mtu (no ICMP "
            f"\"fragmentation needed\" arrived)",
            f"in [[tunnel]] name = \"{t.name}\": mtu = {fits}\n[tunnel.mss]\nclamp = \"pmtu\"\n"
            f"and let ICMP type 3 code 4 (fragmentation needed) through wherever the path drops it"))
    return findings


def ipsec_no_sa(config: Config, facts: HostFacts, tunnels: Sequence[TunnelConfig]) -> list[Finding]:
    """A tunnel with [tunnel.ipsec] and no ESP SA one way or the other: its GRE is dropped (require = true,
    greupd's table) or leaves in the clear, until charon installs them again."""
    from greupd.ipsec.connections import CHILD_NAME, connection_name

    findings = []
    for t in tunnels:
        pair = facts.xfrm.get(t.name) if facts.xfrm is not None else None
        if t.ipsec is None or pair is None or (pair.sas_out and pair.sas_in):
            continue
        missing = " and ".join(way for way, sas in ((f"{t.local} > {t.remote}", pair.sas_out),
                                                    (f"{t.remote} > {t.local}", pair.sas_in)) if not sas)
        effect = "greupd's table drops its GRE (require = true)" if t.ipsec.require else "its GRE leaves in the clear"
        policies = "\n".join(pair.policies) or "none (charon has not loaded the connection, or greupd is not running)"
        present = "\n".join(pair.sas_out + pair.sas_in)
        ike, uri = connection_name(t.name), f"unix://{config.daemon.vici_socket}"
        findings.append(Finding(
            "ipsec-no-sa", t.name, "error",
            f"no IPsec SA for {missing}: {effect}",
            f"ip xfrm state: no ESP SA for {missing}{chr(10) + 'present: ' + present if present else ''}\n"
            f"GRE policies (ip xfrm policy):\n{policies}",
            f"swanctl --terminate --ike {ike} --force --uri {uri}   # charon forgets the SAs it believes installed\n"
            f"swanctl --initiate --ike {ike} --child {CHILD_NAME} --uri {uri}   # \"existing duplicate\": the peer "
            f"was first\n"
            f"(a running greupd does both itself when the kernel loses them.) If no SA comes: swanctl --log, "
            f"`greupd status {t.name}` (ipsec.error), the peer's PSK or certificates and its connection for "
            f"{t.remote}"))
    return findings


def nat_in_path(config: Config, facts: HostFacts, tunnels: Sequence[TunnelConfig]) -> list[Finding]:
    """The peer's own keepalives name this host by another address than `local`: a NAT rewrites it on the way."""
    findings = []
    for t in tunnels:
        others = [a for a in facts.peer_keepalives.get(t.name, ()) if a != str(t.local)]
        if not others:
            continue
        public = others[0]
        findings.append(Finding(
            "nat-in-path", t.name, "error",
            f"a NAT between this host and {t.remote}: the peer knows this host as {public}, not {t.local}, and "
            f"routes the keepalives it reflects to {t.local}, which it cannot reach",
            f"GRE keepalives from {t.remote} carry an inner packet from {public} (the peer's `remote` for this "
            f"host) to {t.remote}, while local = {t.local}; doctor's own keepalives to {t.remote} got no answer",
            f"carry GRE between the two without NAT (on the NAT: no masquerade for protocol 47 between "
            f"{t.local} and {t.remote}, and a route back to {t.local}), or give this host {public} itself\n"
            f"or, if the NAT must stay: in [[tunnel]] name = \"{t.name}\", keepalive = false (GRE through a NAT "
            f"carries one tunnel per address pair; its keepalives cannot be reflected)"))
    return findings


Check = Callable[[Config, HostFacts, Sequence[TunnelConfig]], list[Finding]]
CHECK_FUNCTIONS: dict[str, Check] = {
    "gre-module-missing": gre_module_missing,
    "local-address-missing": local_address_missing,
    "interface-missing": interface_missing,
    "firewall-drops-gre": firewall_drops_gre,
    "forward-drop": forward_drop,
    "rp-filter": rp_filter,
    "ip-forward-off": ip_forward_off,
    "conntrack-timeout": conntrack_timeout,
    "tunnel-clash": tunnel_clash,
    "peer-silent": peer_silent,
    "mtu-blackhole": mtu_blackhole,
    "ipsec-no-sa": ipsec_no_sa,
    "nat-in-path": nat_in_path,
}
# What `greupd plan` and the daemon can judge without tracing (links, addresses, modules).
RUNTIME_CHECKS = ("gre-module-missing", "local-address-missing", "interface-missing", "tunnel-clash")


def run_checks(config: Config, facts: HostFacts, names: Sequence[str] = (),
               only: Iterable[str] = CHECKS) -> list[Finding]:
    """Every finding of the checks in `only`, for the enabled tunnels named (all with no names), in CHECKS order."""
    tunnels = enabled(config, names)
    wanted = set(only)
    found = [finding for check in CHECKS if check in wanted and check in CHECK_FUNCTIONS
             for finding in CHECK_FUNCTIONS[check](config, facts, tunnels)]
    # A silent peer is a consequence when this host already explains why nothing comes back (no local address
    # for the answer to reach, a firewall here dropping it): report the cause, not the symptom.
    explained = {f.tunnel for f in found if f.check in ("local-address-missing", "firewall-drops-gre", "rp-filter",
                                                           "nat-in-path", "mtu-blackhole", "ipsec-no-sa")}
    return [f for f in found if not (f.check == "peer-silent" and f.tunnel in explained)]


def runtime_findings(config: Config, facts: HostFacts) -> list[Finding]:
    """The findings `greupd plan` prints as warnings (and the daemon could log instead of a bare errno)."""
    return run_checks(config, facts, only=RUNTIME_CHECKS)
