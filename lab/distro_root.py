"""Fresh root file systems of a Debian release, for the install tests (tests/test_install_distro.py).

A root is made with mmdebstrap from Debian's archive (the mirror this machine's apt already uses) with the
smallest variant that has apt, plus the packages asked for, and is kept under a cache folder named by a hash of
the release, the mirror and the package list: a second run with the same list reuses it (seconds, not minutes),
and a changed list (a new Depends in the .deb) makes a new one. The UML guest boots it read-only under an overlay
(lab/guest.py, ``root=``), so a test never changes the cached root.

Usage: python -m lab.distro_root SUITE [PACKAGE ...]   (prints the root's path; builds it when missing)
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

# Where the roots are kept: outside the checkout, so that CI's fresh clone on the same machine finds them too.
DEFAULT_CACHE = Path("/var/cache/greupd-lab/roots")
# What every root has besides the packages a test asks for: systemd as PID 1, modprobe for the kernel's on-demand
# module loads, ping for the tunnel check. Bump RECIPE when the way a root is made changes.
BASE_PACKAGES = ("systemd", "kmod", "iproute2", "iputils-ping")
RECIPE = "1"


class RootError(RuntimeError):
    """A root could not be made (no mmdebstrap, no mirror, the archive refused a package)."""


def cache_dir() -> Path:
    return Path(os.environ.get("GREUPD_LAB_ROOTS") or DEFAULT_CACHE)


def debian_mirror(policy: str | None = None) -> str:
    """The Debian archive this machine's apt uses (the URI of its main suite in `apt-cache policy`).

    GREUPD_LAB_MIRROR overrides it. Read from apt, not written here, so the roots come from where the
    machine's packages come from.
    """
    forced = os.environ.get("GREUPD_LAB_MIRROR")
    if forced:
        return forced
    if policy is None:
        policy = subprocess.run(["apt-cache", "policy"], capture_output=True, text=True, timeout=60).stdout
    lines = policy.splitlines()
    for line, release in itertools.pairwise(lines):
        source = re.match(r"\s*-?\d+ (\S+) ([a-z]+)/main \S+ Packages$", line)
        if source and "o=Debian," in release and f"n={source.group(2)}," in release:
            return source.group(1)
    raise RootError("no Debian archive in `apt-cache policy` (set GREUPD_LAB_MIRROR to one)")


def root_key(suite: str, mirror: str, packages: Sequence[str]) -> str:
    text = "\n".join([RECIPE, suite, mirror, *sorted(set(packages))])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def distro_root(suite: str, packages: Sequence[str] = (), *, log: Path | None = None) -> Path:
    """The cached root of this Debian suite with these packages (and BASE_PACKAGES), made when missing."""
    mirror = debian_mirror()
    wanted = sorted({*BASE_PACKAGES, *packages})
    root = cache_dir() / f"{suite}-{root_key(suite, mirror, wanted)}"
    if (root / ".greupd-root-complete").exists():
        return root
    if shutil.which("mmdebstrap") is None:
        raise RootError("no mmdebstrap (apt-get install mmdebstrap)")
    root.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{suite}-", dir=root.parent))
    argv = ["mmdebstrap", "--mode=root", "--variant=apt", f"--include={','.join(wanted)}",
            suite, str(partial), mirror]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
    if log is not None:
        log.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        raise RootError(f"mmdebstrap {suite} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    (partial / ".greupd-root-complete").write_text("\n".join(wanted) + "\n")
    partial.chmod(0o755)
    try:
        partial.rename(root)
    except OSError:  # another process made the same root meanwhile: keep theirs
        shutil.rmtree(partial, ignore_errors=True)
    # Roots of older package lists for this suite go: each is a few hundred MB.
    for old in root.parent.glob(f"{suite}-*"):
        if old != root and (old / ".greupd-root-complete").exists():
            shutil.rmtree(old, ignore_errors=True)
    return root


def deb_dependencies(depends: str) -> list[str]:
    """Package names from a Depends/Recommends field: the first of each alternative, no version, no arch."""
    names = []
    for group in depends.split(","):
        first = group.split("|")[0].strip()
        if first:
            names.append(re.split(r"[\s(:]", first, maxsplit=1)[0])
    return names


def main(argv: Sequence[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    print(distro_root(argv[0], argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
