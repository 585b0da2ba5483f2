"""`greupd doctor`: why a tunnel does not work on this host, with the evidence and the fix (issue #24).

One way through the room, as in the rest of the house:

    read.py   gather(config)  -> HostFacts   (the kernel through greupd's seams: rtnl, sysctls, nftables, pyroute2)
    trace.py  one marked keepalive per tunnel, followed by nftables tracing  -> TunnelTrace (inside HostFacts)
    pmtu.py   padded DF keepalives the peer reflects: the largest size the path carries  -> PathProbe
    checks.py run_checks(config, facts) -> [Finding]   (pure: every check is a function of values)
    findings.py  Finding, its JSON, and the text people read

Doctor never changes the host. The one thing it adds is its trace table (`inet greupd_doctor`, rules that set
`meta nftrace` on its own marked keepalives and on GRE from the tunnels' remotes), for the two seconds the trace
lasts; it is removed before doctor answers. Its keepalives (and padded ones, for the path MTU) are only sent.
"""

from greupd.doctor.findings import CHECKS, Finding

__all__ = ["CHECKS", "Finding"]
