"""Gather one HostFacts snapshot: the thin I/O shell of doctor's room. Nothing here judges.

Links and addresses come through greupd's own rtnetlink codec (netlink/rtnl.py, the seam the daemon reads
with); sysctls through netlink/kernel.py's read_sysctl; nftables through nft/table.py's libnftables session;
what greupd's codec does not decode (a route lookup with an input interface, conntrack entries) through
pyroute2; the daemon's status through control.py. A part that cannot be read is left None, with a note.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import socket
import subprocess
from collections.abc import Mapping, Sequence
from ipaddress import IPv4Address
from pathlib import Path

from greupd.config import Config, TunnelConfig
from greupd.doctor.checks import GRE_TIMEOUT, GRE_TIMEOUT_STREAM, IP_FORWARD, enabled, rp_filter_key
from greupd.doctor.facts import Chain, HostFacts, Rule, TunnelTrace, XfrmPair
from greupd.doctor.pmtu import PathProbe
from greupd.gre import IPAddress
from greupd.model import ObservedLink
from greupd.netlink import rtnl
from greupd.netlink.kernel import read_sysctl
from greupd.nft.foreign import forward_drop
from greupd.nft.render import Json
from greupd.status import DaemonStatus

SYS_MODULE = Path("/sys/module")
PROC_MODULES = Path("/proc/modules")
LIB_MODULES = Path("/lib/modules")


def runtime_facts(config: Config) -> HostFacts:
    """What `greupd plan` (and the daemon) can afford to read each time: links, addresses, modules."""
    links, addresses = read_links_and_addresses()
    modules, loadable = read_modules()
    return HostFacts(links, addresses, {}, modules, loadable, None, own_table=config.daemon.nft_table)


def gather(config: Config, names: Sequence[str] = (), trace: bool = True,
           daemon: DaemonStatus | None = None) -> HostFacts:
    """Everything the checks need, read once. `trace`: follow keepalives with nftables tracing (root only)."""
    tunnels = enabled(config, names)
    notes: list[str] = []
    links, addresses = read_links_and_addresses()
    chains = read_chains(notes)
    traces: dict[str, TunnelTrace] | None = None
    if trace and tunnels:
        traces = read_traces(tunnels, notes)
    sysctls = {key: read_sysctl(key) for key in (IP_FORWARD, GRE_TIMEOUT, GRE_TIMEOUT_STREAM, rp_filter_key("all"))}
    sysctls |= {rp_filter_key(name): read_sysctl(rp_filter_key(name)) for name in links}
    routes_out, refusals, conntrack = read_routes_and_conntrack(tunnels, traces, links, notes)
    modules, loadable = read_modules()
    paths, learned = read_paths(tunnels, traces)
    heard: dict[str, tuple[str, ...]] = {}
    if traces is not None:
        from greupd.doctor.hear import hear_keepalives

        silent = [t for t in tunnels if t.keepalive is not None and (seen := traces.get(t.name)) is not None
                  and seen.sent and not seen.reflected and not seen.peer_sources]
        heard = {name: trace.peer_sources for name, trace in traces.items() if trace.peer_sources}
        heard |= hear_keepalives(silent) if silent else {}
    xfrm = read_xfrm([t for t in tunnels if t.ipsec is not None], notes)
    return HostFacts(links, addresses, sysctls, modules, loadable, chains, routes_out, refusals, conntrack, traces,
                     paths, learned, heard, xfrm, daemon, config.daemon.nft_table, tuple(notes))


def read_xfrm(tunnels: Sequence[TunnelConfig], notes: list[str]) -> dict[str, XfrmPair] | None:
    """Each IPsec tunnel's SAs and GRE policies, from `ip xfrm` (pyroute2 has no XFRM socket; iproute2 is the
    kernel's own tool for it, and greupd writes no XFRM decoder of its own)."""
    if not tunnels:
        return {}
    found: dict[str, XfrmPair] = {}
    try:
        for t in tunnels:
            local, remote = str(t.local), str(t.remote)
            plen = t.local.max_prefixlen
            found[t.name] = XfrmPair(
                xfrm_summaries(_ip_xfrm("state", "list", "src", local, "dst", remote, "proto", "esp")),
                xfrm_summaries(_ip_xfrm("state", "list", "src", remote, "dst", local, "proto", "esp")),
                tuple(f"{'out' if way == 0 else 'in'}: {line}" for way, (s, d) in enumerate(((local, remote),
                                                                                          (remote, local)))
                      for line in xfrm_summaries(_ip_xfrm("policy", "list", "src", f"{s}/{plen}", "dst",
                                                          f"{d}/{plen}", "proto", "gre"), header=True)))
    except (OSError, subprocess.CalledProcessError) as exc:
        notes.append(f"the kernel's IPsec state could not be read (ip xfrm: {exc}): ipsec-no-sa is not checked")
        return None
    return found


def _ip_xfrm(*argv: str) -> str:
    return subprocess.run(["ip", "xfrm", *argv], capture_output=True, text=True, check=True, timeout=10).stdout


def xfrm_summaries(text: str, header: bool = False) -> tuple[str, ...]:
    """One line per SA (`proto esp spi 0x... mode transport`) or, with `header`, per policy (its selector and
    direction) of `ip xfrm ... list`; the key lines are never kept."""
    found = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line and not line[0].isspace():
            nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
            found.append(f"{line.strip()} {nxt}".strip() if header else nxt.split(" replay")[0])
    return tuple(found)


def read_paths(tunnels: Sequence[TunnelConfig], traces: Mapping[str, TunnelTrace] | None,
               ) -> tuple[dict[str, PathProbe], dict[str, int | None]]:
    """Padded keepalives (pmtu.py) for the IPv4 gre tunnels whose peer answered the trace's keepalives; then the
    path MTU the kernel learnt for each remote (an ICMP "fragmentation needed" that came back).

    Without tracing (`traces` None: no nftables ip/inet family, e.g. UML's kernel) every IPv4 gre tunnel is
    probed: a silent peer then costs two unanswered probes (the needed size and the floor), 0.6 s."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    from greupd.doctor.pmtu import probe_path

    paths: dict[str, PathProbe] = {}
    learned: dict[str, int | None] = {}
    with IPRoute() as ipr:
        for t in tunnels:
            trace = traces.get(t.name) if traces is not None else None
            unanswered = traces is not None and (trace is None or not trace.incoming)
            if t.mode != "gre" or unanswered or not isinstance(t.local, IPv4Address) \
                    or not isinstance(t.remote, IPv4Address):
                continue
            okey, ikey = (t.okey if t.okey is not None else t.key), (t.ikey if t.ikey is not None else t.key)
            overhead = 24 + (4 if okey is not None else 0)
            try:
                (route,) = ipr.route("get", dst=str(t.remote))
                (link,) = ipr.link("get", index=route.get("RTA_OIF"))
                underlay = int(link.get("IFLA_MTU"))
            except (NetlinkError, ValueError, TypeError):
                continue
            # mtu = "probe" (#23): greupd measures the path itself; doctor tries the underlay's size, as unset
            configured = t.mtu if isinstance(t.mtu, int) else None
            paths[t.name] = probe_path(t.local, t.remote, okey, ikey, configured + overhead if configured else underlay)
            try:
                (route,) = ipr.route("get", dst=str(t.remote))
                metrics = route.get("RTA_METRICS")
                learned[str(t.remote)] = metrics.get("RTAX_MTU") if metrics is not None else None
            except (NetlinkError, ValueError):
                learned[str(t.remote)] = None
    return paths, learned


def read_links_and_addresses() -> tuple[dict[str, ObservedLink], dict[str, frozenset[IPAddress]]]:
    """Every link (GRE-family ones decoded with their parameters) and every global address, by interface."""
    sock = rtnl.RtnlSocket()
    try:
        links: dict[str, ObservedLink] = {}
        for msg in sock.dump(rtnl.dump_links()):
            found = rtnl.link_from_message(msg)
            if found is not None:
                links[found[0]] = found[1]
        names = {link.index: name for name, link in links.items()}
        addresses: dict[str, set[IPAddress]] = {name: set() for name in links}
        for msg in sock.dump(rtnl.dump_addresses(0)):
            address = rtnl.address_from_message(msg, names)
            if address is not None:
                addresses[address.ifname].add(address.local.ip)
    finally:
        sock.close()
    return links, {name: frozenset(found) for name, found in addresses.items()}


def read_modules() -> tuple[frozenset[str] | None, frozenset[str] | None]:
    """Modules loaded or built in (/sys/module), and those modprobe could load (None: no module support)."""
    try:
        present = frozenset(os.listdir(SYS_MODULE))
    except OSError:
        return None, None
    if not PROC_MODULES.exists():
        return present, None  # CONFIG_MODULES off: only what is built in
    loadable: set[str] = set()
    for name in ("modules.dep", "modules.builtin"):
        try:
            text = (LIB_MODULES / platform.release() / name).read_text()
        except OSError:
            continue
        for line in text.splitlines():
            path = line.split(":", 1)[0].strip()
            if path:
                loadable.add(Path(path).name.split(".ko")[0].replace("-", "_"))
    return present, frozenset(loadable)


def read_traces(tunnels: Sequence[TunnelConfig], notes: list[str]) -> dict[str, TunnelTrace] | None:
    from greupd.doctor.trace import TraceUnavailable, trace_tunnels

    try:
        return trace_tunnels(tunnels)
    except (TraceUnavailable, OSError, ImportError) as exc:
        notes.append(f"nftables tracing was not possible ({exc}); the firewall checks read the rule text instead")
        return None


def read_routes_and_conntrack(
        tunnels: Sequence[TunnelConfig], traces: Mapping[str, TunnelTrace] | None,
        links: Mapping[str, ObservedLink], notes: list[str],
) -> tuple[dict[str, str | None], dict[tuple[str, str], str], dict[str, tuple[str, ...]]]:
    """The route to each remote (its output interface), the kernel's verdict on GRE from a remote arriving on an
    interface traced (`ip route get LOCAL from REMOTE iif IIF`, which applies rp_filter), and each tunnel's GRE
    conntrack entries: pyroute2, since greupd's codec decodes neither lookups nor conntrack."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    names = {link.index: name for name, link in links.items()}
    routes_out: dict[str, str | None] = {}
    refusals: dict[tuple[str, str], str] = {}
    with IPRoute() as ipr:
        for t in tunnels:
            try:
                (answer,) = ipr.route("get", dst=str(t.remote))
                routes_out[str(t.remote)] = names.get(answer.get("RTA_OIF"))
            except (NetlinkError, ValueError):
                routes_out[str(t.remote)] = None
            trace = traces.get(t.name) if traces is not None else None
            for iif in {p.iif for p in trace.incoming if p.iif} if trace is not None else ():
                index = links[iif].index if iif in links else None
                if index is None:
                    continue
                try:
                    ipr.route("get", dst=str(t.local), src=str(t.remote), iif=index)
                except NetlinkError as exc:
                    # EXDEV is rp_filter's refusal; other answers (EINVAL for some lookups) say nothing about it.
                    if exc.code == errno.EXDEV:
                        refusals[(t.name, iif)] = f"{os.strerror(exc.code)} (EXDEV)"
    return routes_out, refusals, read_conntrack(tunnels, notes)


def read_conntrack(tunnels: Sequence[TunnelConfig], notes: list[str]) -> dict[str, tuple[str, ...]]:
    try:
        from pyroute2 import Conntrack
        from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

        found: dict[str, tuple[str, ...]] = {}
        with Conntrack() as ct:
            for t in tunnels:
                family = socket.AF_INET6 if t.remote.version == 6 else socket.AF_INET
                wanted = NFCTAttrTuple(family=family, saddr=str(t.local), daddr=str(t.remote), proto=47)
                entries = list(ct.dump_entries(tuple_orig=wanted))
                back = NFCTAttrTuple(family=family, saddr=str(t.remote), daddr=str(t.local), proto=47)
                entries += list(ct.dump_entries(tuple_orig=back))
                found[t.name] = tuple(f"{e.tuple_orig.saddr} > {e.tuple_orig.daddr} gre, reply "
                                      f"{e.tuple_reply.saddr} > {e.tuple_reply.daddr}, [{e.status_name()}], "
                                      f"expires in {e.timeout} s" for e in entries)
        return found
    except Exception as exc:  # pyroute2's conntrack socket raises several kinds; this is evidence only
        notes.append(f"conntrack entries could not be read ({exc})")
        return {}


# --- nftables: every ip/ip6/inet chain with its rules -------------------------------------------------------

def read_chains(notes: list[str]) -> tuple[Chain, ...] | None:
    from greupd.nft.table import NftError, NftTable

    try:
        listing = NftTable("greupd").query({"list": {"ruleset": None}})
    except NftError as exc:
        notes.append(f"nftables could not be read ({exc}): the firewall checks are skipped")
        return None
    return chains_from_listing(listing)


def chains_from_listing(listing: Sequence[Json]) -> tuple[Chain, ...]:
    """`nft -j list ruleset` -> Chain values (pure)."""
    raw_chains: list[dict[str, Json]] = []
    rules: dict[tuple[str, str, str], list[dict[str, Json]]] = {}
    for obj in listing:
        if not isinstance(obj, dict):
            continue
        if isinstance(chain := obj.get("chain"), dict) and chain.get("family") in ("ip", "ip6", "inet"):
            raw_chains.append(chain)
        elif isinstance(rule := obj.get("rule"), dict):
            rules.setdefault((str(rule.get("family")), str(rule.get("table")), str(rule.get("chain"))), []).append(rule)
    chains = []
    for chain in raw_chains:
        family, table, name = str(chain.get("family")), str(chain.get("table")), str(chain.get("name"))
        hook = chain.get("hook")
        own_rules = rules.get((family, table, name), [])
        drop = forward_drop(chain, [{"rule": r} for r in own_rules]) \
            if hook == "forward" and chain.get("type") == "filter" else None
        priority = chain.get("prio")
        chains.append(Chain(family, table, name, hook if isinstance(hook, str) else None,
                            priority if isinstance(priority, int) else None,
                            str(chain["policy"]) if isinstance(chain.get("policy"), str) else None,
                            tuple(rule_from_json(r, hook if isinstance(hook, str) else None) for r in own_rules),
                            "has policy drop" if drop is not None and drop.how == "policy drop"
                            else f"{drop.how}" if drop is not None else None))
    return tuple(chains)


_VERDICTS = ("accept", "drop", "reject", "jump", "goto", "return", "queue")
_PASSIVE = frozenset({"counter", "log", "limit"})


def rule_from_json(rule: Mapping[str, Json], hook: str | None) -> Rule:
    listed = rule.get("expr")
    exprs = [e for e in listed if isinstance(e, dict)] if isinstance(listed, list) else []
    verdict = next((k for e in exprs[-1:] for k in e if k in _VERDICTS), None)
    iifname = oifname = None
    matches_gre = False
    only_interface = True
    for e in exprs[:-1] if verdict else exprs:
        key = next(iter(e), "")
        if key in _PASSIVE:
            continue
        match = e.get("match")
        left = match.get("left") if isinstance(match, dict) else None
        right = match.get("right") if isinstance(match, dict) else None
        meta = left.get("meta") if isinstance(left, dict) else None
        payload = left.get("payload") if isinstance(left, dict) else None
        meta_key = meta.get("key") if isinstance(meta, dict) else None
        op = match.get("op", "==") if isinstance(match, dict) else None
        if meta_key in ("iifname", "oifname") and op == "==" and isinstance(right, str):
            if meta_key == "iifname":
                iifname = right
            else:
                oifname = right
            continue
        only_interface = False
        protocol_field = (meta_key in ("l4proto", "protocol") or (isinstance(payload, dict) and (
            payload.get("field") in ("protocol", "nexthdr"))))
        if protocol_field and op in ("==", "in") and _names_gre(right):
            matches_gre = True
    text = " ".join(_expr_text(e) for e in exprs)
    handle = rule.get("handle")
    return Rule(str(rule.get("family")), str(rule.get("table")), str(rule.get("chain")), hook,
                handle if isinstance(handle, int) else None, text, matches_gre, verdict, iifname, oifname,
                only_interface and (iifname is not None or oifname is not None))


def _names_gre(right: Json) -> bool:
    if right in ("gre", 47):
        return True
    items = right.get("set") if isinstance(right, dict) else None
    if isinstance(items, list):
        return any(_names_gre(item) for item in items)
    return False


def _expr_text(e: Mapping[str, Json]) -> str:
    """One JSON expression as nft prints it, for the common ones (evidence text; the rest as compact JSON)."""
    key, body = next(iter(e.items()))
    if key == "match" and isinstance(body, dict):
        op = body.get("op", "==")
        return f"{_value_text(body.get('left'))}{'' if op in ('==', 'in') else ' ' + str(op)} " \
               f"{_value_text(body.get('right'))}"
    if key in ("jump", "goto") and isinstance(body, dict):
        return f"{key} {body.get('target')}"
    if key in ("accept", "drop", "return", "counter", "log") or body is None:
        return key
    if key == "reject":
        return "reject"
    return json.dumps(e, separators=(",", ":"))


def _value_text(value: Json) -> str:
    if isinstance(value, dict):
        if isinstance(meta := value.get("meta"), dict):
            return f"meta {meta.get('key')}" if meta.get("key") in ("l4proto", "mark", "nfproto") \
                else str(meta.get("key"))
        if isinstance(payload := value.get("payload"), dict):
            return f"{payload.get('protocol')} {payload.get('field')}"
        if isinstance(ct := value.get("ct"), dict):
            return f"ct {ct.get('key')}"
        if isinstance(items := value.get("set"), list):
            return "{ " + ", ".join(_value_text(i) for i in items) + " }"
        if isinstance(prefix := value.get("prefix"), dict):
            return f"{prefix.get('addr')}/{prefix.get('len')}"
    if isinstance(value, list):
        return ",".join(_value_text(v) for v in value)
    return str(value)


def daemon_status(socket_path: Path) -> DaemonStatus | None:
    """The running daemon's status, if one answers within a second (doctor works without one)."""
    from greupd.control import ControlError, ControlUnavailable, request

    try:
        return request(socket_path, "status", timeout=1.0)
    except (ControlUnavailable, ControlError, OSError):
        return None
