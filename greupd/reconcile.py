"""One reconcile pass, the controller's core: observe the kernel, plan (pure), apply, and what it holds after.

The daemon decides when a pass runs and for which tunnels (greupd/queue.py), and what its outcome means for
tunnel states (greupd/report.py); this module is only the observe -> plan -> apply step between them.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass

from greupd.model import Desired, Observed, Plan, action_tunnel
from greupd.netlink.kernel import ApplyError, Kernel
from greupd.plan import describe, plan_changes

log = logging.getLogger("greupd")


@dataclass(frozen=True)
class PassOutcome:
    observed: Observed  # before the pass
    plan: Plan
    errors: list[ApplyError]
    after: Observed  # what the kernel holds now, as far as the pass touched it
    touched: frozenset[str]  # tunnels the plan acted on
    refused: frozenset[str]  # tunnels the kernel refused an action of

    def applied(self, configured: Collection[str]) -> list[str]:
        """The configured tunnels this pass looked at and the kernel refused nothing of (scope only)."""
        looked_at = configured if self.after.scope is None else (n for n in self.after.scope if n in configured)
        return [n for n in looked_at if n not in self.refused]


def reconcile_pass(kernel: Kernel, desired: Desired, names: frozenset[str] | None,
                   trusted: frozenset[str] = frozenset()) -> PassOutcome:
    """Observe `names` (None: everything), plan, apply. Raises OSError when the kernel cannot be read.

    `trusted`: names nothing in the kernel has changed about since the last pass, as far as the kernel's
    notifications tell (a keepalive verdict flipped): the kernel's memory of them will do (Kernel.observe).
    """
    observed = kernel.observe(desired, names, trusted)
    plan = plan_changes(desired, observed)
    errors = kernel.apply(plan.actions) if plan.actions else []
    if plan.actions:
        log.debug("applied:\n%s", describe(plan))
    touched = frozenset(t for a in plan.actions if (t := action_tunnel(a)) is not None)
    refused = frozenset(e.tunnel for e in errors if e.tunnel is not None)
    # What the kernel acknowledged is as planned; look again only where it refused something.
    after = observed.updated(Observed.as_planned(desired, touched - refused, kernel.indices(touched - refused)))
    if refused:
        after = after.updated(kernel.observe(desired, refused))
    kernel.remember(after)
    return PassOutcome(observed, plan, errors, after, touched, refused)


def remove_everything(kernel: Kernel) -> list[ApplyError]:
    """on_exit = "remove": every link and route greupd owns goes (and nothing else)."""
    empty = Desired({}, {})
    return kernel.apply(plan_changes(empty, kernel.observe(empty)).actions)
