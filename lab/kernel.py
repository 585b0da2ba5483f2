"""What the running kernel offers the tests, found by trying it in a throwaway netns."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess

from lab.guest import GuestKind

# Capabilities: "root" = root with working netns; "gre" = ip_gre; "nft_gre" = ip_gre and nftables
# family inet in one kernel; "systemd" = a lab guest whose PID 1 is systemd (UML, or qemu with nft_gre).
MARKERS: dict[str, frozenset[str]] = {
    "needs_root": frozenset({"root"}),
    "needs_gre": frozenset({"root", "gre"}),
    "needs_nft_gre": frozenset({"root", "gre", "nft_gre"}),
    "needs_systemd": frozenset({"root", "systemd"}),
    "needs_systemd_nft": frozenset({"root", "gre", "nft_gre", "systemd"}),
}
# What each guest offers, in order of preference (cheapest boot first).
GUEST_CAPS: dict[GuestKind, frozenset[str]] = {
    "uml": frozenset({"root", "gre"}),
    "uml-systemd": frozenset({"root", "gre", "systemd"}),
    "vng": frozenset({"root", "gre", "nft_gre"}),
    "vng-systemd": frozenset({"root", "gre", "nft_gre", "systemd"}),
}


def current_guest() -> str | None:
    return os.environ.get("GREUPD_LAB_GUEST") or None


def _ok(*argv: str) -> bool:
    try:
        return subprocess.run(argv, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@functools.cache
def capabilities() -> frozenset[str]:
    caps: set[str] = set()
    if os.geteuid() != 0 or not shutil.which("ip"):
        return frozenset()
    ns = f"glab{os.getpid()}-probe"
    if not _ok("ip", "netns", "add", ns):
        return frozenset()
    try:
        caps.add("root")
        if _ok("ip", "-n", ns, "link", "add", "g0", "type", "gre", "local", "127.0.0.1", "remote", "127.0.0.2"):
            caps.add("gre")
            if shutil.which("nft") and _ok("ip", "netns", "exec", ns, "nft", "add", "table", "inet", "t"):
                caps.add("nft_gre")
    finally:
        _ok("ip", "netns", "del", ns)
    # Tests install units and restart services: only ever on a guest's throwaway systemd.
    if current_guest() in ("uml-systemd", "vng-systemd") and os.path.isdir("/run/systemd/system"):
        caps.add("systemd")
    return frozenset(caps)


def guest_for(needs: frozenset[str]) -> GuestKind | None:
    return next((k for k, caps in GUEST_CAPS.items() if needs <= caps), None)
