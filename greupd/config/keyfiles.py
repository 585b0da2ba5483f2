"""Key files named in [tunnel.ipsec] (psk_file, key): who may own them, and who may read them."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def secret_file_problem(path: Path) -> str | None:
    """Why a pre-shared key (or private key) file cannot be used, or None: it must exist, hold a key, and be
    root's alone.

    A key that others can read is a key others may have: refuse it rather than negotiate with it.
    """
    try:
        info = path.stat()
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror or exc}"
    if not stat.S_ISREG(info.st_mode):
        return f"{path} is not a regular file"
    if info.st_mode & 0o077:
        return (f"{path} is readable or writable by others (mode {stat.S_IMODE(info.st_mode):04o}):"
                f" chmod 600 {path}")
    if info.st_uid != 0 and info.st_uid != os.geteuid():
        return f"{path} is owned by uid {info.st_uid}, not root: chown root {path}"
    try:
        if not path.read_bytes().strip():
            return f"{path} is empty: write the key into it"
    except PermissionError:
        # Under the shipped unit the daemon runs as user greupd: the key must be that user's (mode 600).
        return f"cannot read {path} as uid {os.geteuid()}: chown it to the user greupd runs as, mode 600"
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror or exc}"
    return None

