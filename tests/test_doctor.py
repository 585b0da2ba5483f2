"""doctor's pure parts: the trace parser, the ruleset reader, and each check over made-up HostFacts (#24)."""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from pathlib import Path

import pytest

from greupd.config import Config, load_config_text
from greupd.doctor.checks import (
    GRE_TIMEOUT,
    GRE_TIMEOUT_STREAM,
    IP_FORWARD,
    rp_filter_key,
    run_checks,
    runtime_findings,
)
from greupd.doctor.facts import HostFacts, TunnelTrace
from greupd.doctor.findings import CHECKS, Finding, describe_findings, findings_json
from greupd.doctor.read import chains_from_listing
from greupd.doctor.trace import by_tunnel, parse_trace, trace_ruleset
from greupd.model import LinkSpec, ObservedLink
from greupd.nft.render import Json

CONFIG = """[daemon]
ip_forward = true

[[tunnel]]
name = "T1"
mode = "gre"
local = "10.9.0.1"
remote = "10.9.0.2"
key = 7
routes = ["192.168.50.0/24"]

[tunnel.keepalive]
interval = "10s"
"""

# `nft -a monitor trace` as nftables 1.0.6 printed it here: our keepalive out (dropped by ip other), GRE in.
TRACE = """\
trace id 34727401 inet greupd_doctor keepalives packet: oif "eth0" ip saddr 10.9.0.1 ip daddr 10.9.0.2 ip protocol gre
trace id 34727401 inet greupd_doctor keepalives rule meta mark 0x1 meta nftrace set 1 # handle 2 (verdict continue)
trace id 34727401 inet greupd_doctor keepalives policy accept meta mark 0x47524544
trace id 34727401 ip other output packet: oif "eth0" ip saddr 10.9.0.1 ip daddr 10.9.0.2 ip protocol gre
trace id 34727401 ip other output rule ip protocol gre counter packets 1 bytes 44 drop # handle 2 (verdict drop)
trace id 5a5a5a5a inet greupd_doctor from_remotes packet: iif "eth1" ip saddr 10.9.0.2 ip daddr 10.9.0.1 ip protocol gre
trace id 5a5a5a5a inet greupd_doctor from_remotes policy accept
trace id 5a5a5a5a inet fw input packet: iif "eth1" ip saddr 10.9.0.2 ip daddr 10.9.0.1
trace id 5a5a5a5a inet fw input rule ct state established accept # handle 4 (verdict accept)
"""


def config(text: str = CONFIG) -> Config:
    return load_config_text(text, Path("tunnels.toml"))


def facts(**changes: object) -> HostFacts:
    base = HostFacts(
        links={"eth0": _link("eth0", 2), "eth1": _link("eth1", 3), "lo": _link("lo", 1)},
        addresses={"eth0": frozenset({ipaddress.ip_address("10.9.0.1")})},
        sysctls={IP_FORWARD: "1", rp_filter_key("all"): "0"},
        modules=frozenset({"ip_gre"}), loadable=frozenset(), chains=(), routes_out={"10.9.0.2": "eth0"},
        traces={"T1": TunnelTrace(1, ())})
    return replace(base, **changes)  # type: ignore[arg-type]


def _link(name: str, index: int, kind: str = "veth", **gre: object) -> ObservedLink:
    any_ip = ipaddress.ip_address("0.0.0.0")
    return ObservedLink(index, LinkSpec(name, kind, gre.pop("local", any_ip), gre.pop("remote", any_ip),  # type: ignore[arg-type]
                                        **gre), True, False)  # type: ignore[arg-type]


def traced(text: str = TRACE) -> dict[str, TunnelTrace]:
    return by_tunnel(config().tunnels, parse_trace(text.splitlines()), {"T1": 1})


def ids(found: list[Finding]) -> list[str]:
    return [f.check for f in found]


# --- the trace ------------------------------------------------------------------------------------------------

def test_the_trace_parser_follows_each_packet_and_leaves_doctors_own_table_out() -> None:
    out, back = parse_trace(TRACE.splitlines())
    assert (out.outgoing, out.oif, out.saddr, out.daddr) == (True, "eth0", "10.9.0.1", "10.9.0.2")
    assert [(e.table, e.chain, e.rule, e.handle, e.verdict) for e in out.events] == [
        ("other", "output", "ip protocol gre counter drop", 2, "drop")]
    assert out.final is not None and out.final.where == "table ip other chain output"
    assert (back.outgoing, back.iif) == (False, "eth1") and back.final is None


def test_a_trace_id_the_kernel_reuses_for_the_next_packet_is_a_new_packet() -> None:
    again = "\n".join(line for line in TRACE.splitlines() if "34727401" in line)
    first, second = parse_trace([*again.splitlines(), *again.splitlines()])
    assert first.trace_id == second.trace_id and len(first.events) == len(second.events) == 1


def test_the_trace_table_marks_our_keepalives_and_gre_from_each_remote() -> None:
    text = trace_ruleset(config().tunnels)
    assert "meta mark 0x47524544 meta nftrace set 1" in text
    assert "ip saddr 10.9.0.2 ip daddr 10.9.0.1 meta l4proto gre meta nftrace set 1" in text
    assert "hook output priority -400" in text and "hook prerouting priority -400" in text


def test_a_traced_drop_names_the_rule_and_its_fix_inserts_an_accept_before_it() -> None:
    (finding,) = run_checks(config(), facts(traces=traced()), only=["firewall-drops-gre"])
    assert finding.message == "ip other output drops our keepalive to 10.9.0.2"
    assert "decided by table ip other chain output: ip protocol gre counter drop # handle 2" in finding.evidence
    assert finding.fix == ("nft insert rule ip other output position 2 ip saddr 10.9.0.1 ip daddr 10.9.0.2 "
                           "ip protocol gre accept")


def test_greupds_own_table_is_not_a_firewall_to_report() -> None:
    own = TRACE.replace("ip other output", "inet greupd output")
    assert run_checks(config(), facts(traces=traced(own)), only=["firewall-drops-gre"]) == []


# --- the rule text, where tracing does not reach ----------------------------------------------------------------

IPTABLES_NFT_FORWARD_DROP: list[Json] = [
    {"chain": {"family": "ip", "table": "filter", "name": "FORWARD", "handle": 1, "type": "filter",
               "hook": "forward", "prio": 0, "policy": "drop"}},
    {"chain": {"family": "ip", "table": "filter", "name": "DOCKER-USER", "handle": 5}},
    {"rule": {"family": "ip", "table": "filter", "chain": "FORWARD", "handle": 6,
              "expr": [{"counter": {"packets": 0, "bytes": 0}}, {"jump": {"target": "DOCKER-USER"}}]}},
    {"rule": {"family": "ip", "table": "filter", "chain": "FORWARD", "handle": 7,
              "expr": [{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "docker0"}},
                       {"accept": None}]}},
]


def test_docker_forward_policy_drop_is_found_and_an_accept_in_docker_user_satisfies_it() -> None:
    chains = chains_from_listing(IPTABLES_NFT_FORWARD_DROP)
    (finding,) = run_checks(config(), facts(chains=chains), only=["forward-drop"])
    assert finding.fix == "iptables -I FORWARD -i T1 -j ACCEPT\niptables -I FORWARD -o T1 -j ACCEPT"
    assert finding.evidence.startswith("inferred from the rule text")
    accepted: list[Json] = [*IPTABLES_NFT_FORWARD_DROP] + [
        {"rule": {"family": "ip", "table": "filter", "chain": "DOCKER-USER", "handle": 9 + i,
                  "expr": [{"match": {"op": "==", "left": {"meta": {"key": key}}, "right": "T1"}},
                           {"counter": None}, {"accept": None}]}} for i, key in enumerate(("iifname", "oifname"))]
    assert run_checks(config(), facts(chains=chains_from_listing(accepted)), only=["forward-drop"]) == []


def test_a_gre_drop_rule_is_inferred_only_in_the_direction_tracing_did_not_see() -> None:
    listing: list[Json] = [
        {"chain": {"family": "inet", "table": "fw", "name": "input", "type": "filter", "hook": "input", "prio": 0,
                   "policy": "accept"}},
        {"rule": {"family": "inet", "table": "fw", "chain": "input", "handle": 3,
                  "expr": [{"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "gre"}},
                           {"drop": None}]}},
    ]
    chains = chains_from_listing(listing)
    (inferred,) = run_checks(config(), facts(chains=chains, traces=None, notes=("no nftrace here",)),
                             only=["firewall-drops-gre"])
    assert inferred.evidence.startswith("inferred from the rule text, not traced (no nftrace here):")
    assert inferred.fix.startswith("nft insert rule inet fw input position 3 ip saddr 10.9.0.2")
    # an accept of GRE before the drop (the fix doctor prints) satisfies the text reading too
    gre: Json = {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "gre"}}
    accept: Json = {"rule": {"family": "inet", "table": "fw", "chain": "input", "handle": 5,
                             "expr": [gre, {"accept": None}]}}
    accept_first: list[Json] = [listing[0], accept, listing[1]]
    assert run_checks(config(), facts(chains=chains_from_listing(accept_first), traces=None),
                      only=["firewall-drops-gre"]) == []
    # GRE from the remote was traced in and went through: the text is not second-guessed
    assert run_checks(config(), facts(chains=chains, traces=traced()), only=["firewall-drops-gre"]) \
        == run_checks(config(), facts(traces=traced()), only=["firewall-drops-gre"])


# --- sysctls, modules, links ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("all_value", "if_value", "found"), [
    ("0", "1", True), ("1", "0", True), ("2", "1", False), ("1", "2", False), ("0", "0", False)])
def test_rp_filter_is_the_larger_of_all_and_the_interface(all_value: str, if_value: str, found: bool) -> None:
    trace = traced()  # GRE from 10.9.0.2 arrived on eth1; the route back leaves by eth0
    sysctls = {rp_filter_key("all"): all_value, rp_filter_key("eth1"): if_value}
    findings = run_checks(config(), facts(traces=trace, sysctls=sysctls), only=["rp-filter"])
    assert ids(findings) == (["rp-filter"] if found else [])


def test_rp_filter_is_no_problem_on_a_symmetric_path() -> None:
    sysctls = {rp_filter_key("all"): "1"}
    assert run_checks(config(), facts(traces=traced(), sysctls=sysctls, routes_out={"10.9.0.2": "eth1"}),
                      only=["rp-filter"]) == []


def test_ip_forward_off_only_when_greupd_will_not_switch_it_on() -> None:
    off = {IP_FORWARD: "0"}
    assert run_checks(config(), facts(sysctls=off), only=["ip-forward-off"]) == []  # `greupd run` will
    no = config(CONFIG.replace("ip_forward = true", "ip_forward = false"))
    (finding,) = run_checks(no, facts(sysctls=off), only=["ip-forward-off"])
    assert finding.fix.startswith("in [daemon]: ip_forward = true")


def test_conntrack_timeout_against_the_keepalive_interval() -> None:
    defaults = {GRE_TIMEOUT: "30", GRE_TIMEOUT_STREAM: "180"}
    assert run_checks(config(), facts(sysctls=defaults), only=["conntrack-timeout"]) == []
    assert run_checks(config(), facts(sysctls={}), only=["conntrack-timeout"]) == []  # no conntrack here
    (finding,) = run_checks(config(), facts(sysctls={GRE_TIMEOUT: "5", GRE_TIMEOUT_STREAM: "180"}),
                            only=["conntrack-timeout"])
    assert finding.fix.splitlines()[0] == "sysctl -w net.netfilter.nf_conntrack_gre_timeout=40"


def test_gre_module_missing_says_whether_it_can_be_loaded() -> None:
    assert run_checks(config(), facts(), only=["gre-module-missing"]) == []
    assert run_checks(config(), facts(modules=frozenset(), loadable=frozenset({"ip_gre"})),
                      only=["gre-module-missing"]) == []  # the kernel loads it on `ip link add`
    (cannot,) = run_checks(config(), facts(modules=frozenset(), loadable=None), only=["gre-module-missing"])
    assert "cannot load modules" in cannot.evidence and "CONFIG_NET_IPGRE" in cannot.fix
    (absent,) = run_checks(config(), facts(modules=frozenset(), loadable=frozenset()), only=["gre-module-missing"])
    assert "modprobe ip_gre" in absent.fix


def test_tunnel_clash_needs_the_same_endpoints_and_key() -> None:
    local, remote = ipaddress.ip_address("10.9.0.1"), ipaddress.ip_address("10.9.0.2")
    clash = _link("old", 9, "gre", local=local, remote=remote, ikey=7, okey=7)
    (finding,) = run_checks(config(), facts(links={"old": clash}), only=["tunnel-clash"])
    assert finding.fix.startswith("ip link del old")
    other_key = _link("old", 9, "gre", local=local, remote=remote, ikey=8, okey=8)
    assert run_checks(config(), facts(links={"old": other_key}), only=["tunnel-clash"]) == []
    itself = _link("T1", 9, "gre", local=local, remote=remote, ikey=7, okey=7)
    assert run_checks(config(), facts(links={"T1": itself}), only=["tunnel-clash"]) == []


def test_a_silent_peer_is_not_reported_when_this_host_explains_it() -> None:
    out_only = "\n".join(line for line in TRACE.splitlines() if "34727401" in line and "other" not in line)
    (silent,) = run_checks(config(), facts(traces=traced(out_only)), only=["peer-silent"])
    assert silent.severity == "warning"
    gone = run_checks(config(), facts(traces=traced(out_only), addresses={}))
    assert "local-address-missing" in ids(gone) and "peer-silent" not in ids(gone)


def test_plan_gets_only_the_checks_that_need_no_trace() -> None:
    found = runtime_findings(config(), facts(addresses={}, sysctls={IP_FORWARD: "0"}, traces=None))
    assert ids(found) == ["local-address-missing"]


def test_findings_as_json_and_text() -> None:
    finding = Finding("rp-filter", "T1", "error", "m", "e", "f1\nf2")
    assert findings_json([finding]) == {"findings": [{"check": "rp-filter", "tunnel": "T1", "severity": "error",
                                                      "message": "m", "evidence": "e", "fix": "f1\nf2"}]}
    assert describe_findings([finding]) == "error T1: m [rp-filter]\n  evidence:\n      e\n  fix:\n      f1\n      f2"
    assert describe_findings([], ["not root"]) == "doctor: nothing found\n\nnote: not root"
    with pytest.raises(ValueError, match="unknown check id"):
        Finding("nope", None, "error", "", "", "")
    assert len(set(CHECKS)) == 13


# --- path MTU, IPsec, NAT ------------------------------------------------------------------------------------

def test_a_padded_probe_is_exactly_the_size_asked_with_df_and_valid_checksums() -> None:
    from greupd.doctor.pmtu import padded_probe
    from greupd.keepalive.codec import ones_complement_sum

    local, remote = ipaddress.IPv4Address("10.9.0.1"), ipaddress.IPv4Address("10.9.0.2")
    packet = padded_probe(local, remote, 7, 7, 1400)
    assert len(packet) == 1400 and int.from_bytes(packet[2:4]) == 1400 and packet[6] & 0x40
    inner = 28  # outer IP + GRE with a key
    assert int.from_bytes(packet[inner + 2:inner + 4]) == 1400 - inner
    assert ones_complement_sum(packet[:20]) == 0xFFFF and ones_complement_sum(packet[inner:inner + 20]) == 0xFFFF
    with pytest.raises(ValueError, match="too small"):
        padded_probe(local, remote, None, None, 40)


def test_mtu_blackhole_only_without_a_learned_path_mtu() -> None:
    from greupd.doctor.pmtu import PathProbe

    narrow = {"T1": PathProbe(1500, 1400, (1500, 576, 1038, 1269, 1385, 1443, 1414, 1400, 1407, 1401))}
    (finding,) = run_checks(config(), facts(paths=narrow), only=["mtu-blackhole"])
    assert "1400 bytes came back, 1401 did not" in finding.evidence
    assert finding.fix.startswith('in [[tunnel]] name = "T1": mtu = 1372\n')  # 1400 - 20 - 4 - 4 (key)
    assert run_checks(config(), facts(paths=narrow, learned_mtu={"10.9.0.2": 1400}), only=["mtu-blackhole"]) == []
    wide = {"T1": PathProbe(1500, 1500, (1500,))}
    assert run_checks(config(), facts(paths=wide), only=["mtu-blackhole"]) == []


def test_ipsec_no_sa_reads_both_directions(tmp_path: Path) -> None:
    from greupd.doctor.facts import XfrmPair
    from greupd.doctor.read import xfrm_summaries

    listing = ("src 10.9.0.1 dst 10.9.0.2\n\tproto esp spi 0x00000100 reqid 0 mode transport\n\treplay-window 0 \n"
               "\tauth-trunc hmac(sha256) 0x0102 96\n")
    assert xfrm_summaries(listing) == ("proto esp spi 0x00000100 reqid 0 mode transport",)
    psk = tmp_path / "psk"
    psk.write_text("secret\n")
    psk.chmod(0o600)
    with_ipsec = config(CONFIG.replace("[tunnel.keepalive]",
                                       f'[tunnel.ipsec]\npsk_file = "{psk}"\n\n[tunnel.keepalive]'))
    one_way = {"T1": XfrmPair(xfrm_summaries(listing), (), ())}
    (finding,) = run_checks(with_ipsec, facts(xfrm=one_way), only=["ipsec-no-sa"])
    assert finding.message == "no IPsec SA for 10.9.0.2 > 10.9.0.1: greupd's table drops its GRE (require = true)"
    assert "0x0102" not in finding.evidence
    both = {"T1": XfrmPair(xfrm_summaries(listing), xfrm_summaries(listing), ())}
    assert run_checks(with_ipsec, facts(xfrm=both), only=["ipsec-no-sa"]) == []
    assert run_checks(config(), facts(xfrm={}), only=["ipsec-no-sa"]) == []  # no [tunnel.ipsec]


def test_nat_in_path_when_the_peer_names_us_otherwise() -> None:
    (finding,) = run_checks(config(), facts(peer_keepalives={"T1": ("203.0.113.7",)}), only=["nat-in-path"])
    assert "the peer knows this host as 203.0.113.7, not 10.9.0.1" in finding.message
    assert run_checks(config(), facts(peer_keepalives={"T1": ("10.9.0.1",)}), only=["nat-in-path"]) == []


# --- the daemon's run-time warnings (runtime.py) ----------------------------------------------------------------

def test_the_daemon_looks_at_start_on_a_refusal_and_while_a_finding_stands(caplog: pytest.LogCaptureFixture) -> None:
    from greupd.doctor.runtime import HostWarnings
    from greupd.model import DeleteLink
    from greupd.netlink.kernel import ApplyError

    host = [facts(modules=frozenset(), loadable=None)]  # no ip_gre, and no way to load it
    reads: list[Config] = []
    errors: list[str] = []

    def read(c: Config) -> HostFacts:
        reads.append(c)
        return host[-1]

    warnings = HostWarnings(errors.append, read)
    first = config()
    caplog.set_level("INFO", logger="greupd")
    warnings.after_pass(first, None, [])  # the start: a new config is looked at
    assert [f.check for f in warnings.findings] == ["gre-module-missing"]
    (line,) = warnings.lines()
    assert line.startswith("T1: the kernel has no ip_gre: it cannot make this tunnel's link (greupd doctor: "
                           "gre-module-missing; fix: boot a kernel built with CONFIG_NET_IPGRE")
    warnings.after_pass(first, frozenset({"T2"}), [])  # a pass about another tunnel: no look
    assert len(reads) == 1
    warnings.after_pass(first, frozenset({"T1"}), [])  # about T1, while its finding stands: a look (it may go) ...
    assert len(reads) == 2 and [r.message for r in caplog.records].count(line) == 1  # ... but journals it once
    assert errors == []  # a warning, not the daemon's last_error

    class Nft:
        warnings = ("another table drops it",)

    assert warnings.lines(Nft()) == ["another table drops it", line]
    host.append(facts())  # the module is there now
    refused = ApplyError(None, DeleteLink("old", "leftover"), "Device or resource busy (errno 16)")
    warnings.after_pass(first, frozenset({"T1"}), [refused])  # not a tunnel's: journalled as the daemon's error
    assert warnings.findings == [] and errors == ["delete link old (leftover): Device or resource busy (errno 16)"]
    assert f"no longer: {line}" in [r.message for r in caplog.records]
    warnings.after_pass(first, None, [])  # the same config, nothing refused, nothing standing: no read at all
    assert len(reads) == 3
    warnings.after_pass(config(), None, [])  # a reload that changes nothing the checks read: no look either
    assert len(reads) == 3
    warnings.after_pass(config(CONFIG.replace("10.9.0.1", "10.9.0.3")), None, [])  # a new local: a look
    assert len(reads) == 4


def test_greupd_8_documents_every_check_in_order_with_its_evidence_and_fix() -> None:
    from tests.test_man_page import SOURCE, sections, tags

    lines = sections(SOURCE)["DOCTOR CHECKS"]
    assert tags(lines) == list(CHECKS)
    paragraphs = "\n".join(lines).split("\n.TP\n")[1:]
    for check, paragraph in zip(CHECKS, paragraphs, strict=True):
        assert "Evidence:" in paragraph and "Fix" in paragraph, check
