"""What a restarted daemon believes about its peers before its first probe is answered (review H3).

A keepalive verdict lives in the daemon's memory. Starting every tunnel "up" would, after a crash, a watchdog
abort or a package upgrade, re-install the routes of a tunnel whose peer is dead (the backup loses its traffic
for `retries` intervals) and journal a false "up". So a tunnel starts with what is known of it:

1. the verdict saved in state_dir (`keepalive.json`, written at every flip), if it is of this boot and for the
   tunnel's current endpoints;
2. else what the kernel shows greupd left behind: an owned link whose routes are all gone (action "routes"),
   or that is administratively down (action "link"), was withdrawn for a dead peer;
3. else up, as before: a tunnel seen for the first time keeps its routes until keepalives prove it dead.

A tunnel started down comes up after `up_after` replies, like any other. Pure functions; the daemon does the I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from greupd.config import Config
from greupd.keepalive.engine import KeepaliveTarget
from greupd.model import Observed
from greupd.state import KeepaliveVerdict, endpoints_of

__all__ = ["initial_verdicts", "target_endpoints"]


def target_endpoints(target: KeepaliveTarget) -> str:
    """What a saved verdict is about: it says nothing about a tunnel whose endpoints or keys changed since."""
    return endpoints_of(target.local, target.remote, target.okey, target.ikey)


def initial_verdicts(targets: Sequence[KeepaliveTarget], saved: Mapping[str, KeepaliveVerdict], config: Config,
                     observed: Observed | None) -> dict[str, bool]:
    """Tunnel name -> up, for every target (see the module's docstring for the order of trust)."""
    tunnels = {tunnel.name: tunnel for tunnel in config.tunnels}
    verdicts: dict[str, bool] = {}
    for target in targets:
        kept = saved.get(target.name)
        if kept is not None and kept.endpoints == target_endpoints(target):
            verdicts[target.name] = kept.up
            continue
        tunnel = tunnels.get(target.name)
        link = observed.links.get(target.name) if observed is not None else None
        up = True
        if tunnel is not None and tunnel.keepalive is not None and link is not None and link.owned:
            if tunnel.keepalive.action == "link":
                up = link.up
            elif tunnel.routes:
                up = any(route.ifname == target.name for route in observed.routes) if observed else True
        verdicts[target.name] = up
    return verdicts
