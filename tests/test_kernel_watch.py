"""KernelWatch.concerned (#26): which link notifications send a tunnel back to the reconciler. Linux before 6.3
stamps the notifications of our own link changes with port 0, so the watch compares what they show with what
the last pass wants: a link as wanted needs no second look; anything else does. Notifications are built here
as the kernel sends them (ifinfomsg, name, GRE link info, alias); the sockets are plain netlink ones."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import pytest

from bench import scenario
from greupd.config import load_config_text
from greupd.model import Desired, Observed, desired_state
from greupd.netlink import rtnl
from greupd.netlink.kernel import Kernel, KernelWatch
from greupd.netlink.nlmsg import attr, message

INDEX = 7
CREATION = 0xFFFFFFFF  # ifi_change of the announcement of a new link


def config_desired() -> Desired:
    return desired_state(load_config_text(scenario.greupd_toml(2)), {})


@pytest.fixture
def watch() -> Iterator[tuple[Kernel, KernelWatch]]:
    try:
        kernel = Kernel()
        watch = KernelWatch(kernel, lambda names: None)
    except PermissionError:
        pytest.skip("needs netlink multicast (root)")
    yield kernel, watch
    watch.close()
    kernel.close()


def notification(desired: Desired, name: str, *, up: bool = True, change: int = 0, alias: bool = True,
                 ttl: int | None = None, index: int = INDEX) -> bytes:
    spec = desired.tunnels[name].link
    if ttl is not None:
        spec = type(spec)(**{**spec.__dict__, "ttl": ttl})
    request = rtnl.new_link(spec, up)
    header = struct.pack("=BxHiII", socket.AF_UNSPEC, 778, index, rtnl.IFF_UP if up else 0, change)
    body = header + request.body[len(header):] + (attr(rtnl.IFLA_IFALIAS, b"greupd\0") if alias else b"")
    return message(rtnl.RTM_NEWLINK, 0, 0, 0, body)


def known(kernel: Kernel, desired: Desired, name: str, created_at: float | None = None) -> None:
    """As after a pass that looked at (or made) the link: the kernel session knows its index."""
    kernel._desired_of = desired.tunnels
    kernel._remember(name, INDEX, owned=True)
    if created_at is not None:
        kernel._created[INDEX] = created_at


def test_our_own_change_shown_as_wanted_marks_nothing(watch: tuple[Kernel, KernelWatch]) -> None:
    kernel, w = watch
    desired = config_desired()
    known(kernel, desired, "t0")
    assert w.concerned([notification(desired, "t0")], 100.0) == set()


def test_a_changed_parameter_a_lost_alias_or_a_link_set_down_is_looked_at(watch: tuple[Kernel, KernelWatch]) -> None:
    kernel, w = watch
    desired = config_desired()
    known(kernel, desired, "t0")
    assert w.concerned([notification(desired, "t0", ttl=9)], 100.0) == {"t0"}
    assert w.concerned([notification(desired, "t0", alias=False)], 100.0) == {"t0"}
    assert w.concerned([notification(desired, "t0", up=False)], 100.0) == {"t0"}
    # Down and up again within one read: IPv4 drops the link's routes silently on the way (no RTM_DELROUTE).
    assert w.concerned([notification(desired, "t0", up=False), notification(desired, "t0")], 100.0) == {"t0"}
    assert w.concerned([notification(desired, "t0", index=INDEX + 1)], 100.0) == {"t0"}  # another link by that name


def test_a_link_we_just_made_is_announced_down_then_up_by_our_own_requests(watch: tuple[Kernel, KernelWatch]) -> None:
    kernel, w = watch
    desired = config_desired()
    known(kernel, desired, "t0", created_at=100.0)
    made = [notification(desired, "t0", up=False, change=CREATION, alias=False), notification(desired, "t0"),
            notification(desired, "t0")]
    assert w.concerned(made, 100.5) == set()
    # Linux 6.1 announces a new link down with ifi_change 0; once it was seen up, a down is somebody's.
    kernel._remember("t1", INDEX + 2, owned=True)
    kernel._created[INDEX + 2] = 100.0
    made = [notification(desired, "t1", up=False, alias=False, index=INDEX + 2),
            notification(desired, "t1", index=INDEX + 2)]
    assert w.concerned(made, 100.5) == set()
    flap = [notification(desired, "t1", up=False, index=INDEX + 2), notification(desired, "t1", index=INDEX + 2)]
    assert w.concerned(flap, 100.6) == {"t1"}
    # Fresh, it is judged by its flags: set down by someone else, it is looked at all the same.
    assert w.concerned([notification(desired, "t0", up=False)], 101.0) == {"t0"}
    # Later, by everything it shows.
    assert w.concerned([notification(desired, "t0", ttl=9)], 100.0 + Kernel.FRESH + 1) == {"t0"}


def test_a_verdicts_pass_plans_from_what_the_last_pass_left_until_a_notification_says_otherwise(
        watch: tuple[Kernel, KernelWatch]) -> None:
    """#26: a hub's thousand flipped verdicts cost no dump of every address and route."""
    kernel, _ = watch
    desired = config_desired()
    left = Observed.as_planned(desired, frozenset(desired.tunnels), {"t0": INDEX, "t1": INDEX + 1})
    kernel.remember(Observed(left.links, left.addresses, left.routes, {}, None))  # a full pass
    sent = kernel.requests
    seen = kernel.observe(desired, {"t0"}, trusted={"t0"})
    assert kernel.requests == sent  # nothing asked of the kernel
    assert seen.links["t0"] == left.links["t0"] and seen.scope == frozenset({"t0"})
    assert seen.routes == desired.tunnels["t0"].routes and seen.addresses["t0"] == desired.tunnels["t0"].addresses
    # A route of t0 deleted by someone: the notification drops t0 from the memory, and it is looked at again.
    kernel.forget_observations({"t0"})
    seen = kernel.observe(desired, {"t0"}, trusted={"t0"})
    assert kernel.requests == sent + 1 and "t0" not in seen.links  # looked up: no such link on this machine
    # Not trusted (a kernel event marked it): looked at, memory or not.
    kernel.observe(desired, {"t1"})
    assert kernel.requests == sent + 2
