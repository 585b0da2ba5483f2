"""Key files named in [tunnel.ipsec] (psk_file, key): who may own them, and who may read them.

The rule is about the file, not about who checks it (review M5, newcomer-3 High 1): mode 600 or stricter, owned by
root or by the user greupd.service runs as. Under the unit the daemon is user greupd and needs the file as its
own; root's `greupd check` (the package's restart-if-valid, ansible's `validate:`) must accept that same file.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import stat
from pathlib import Path

# systemd/greupd.sysusers: the user greupd.service and greupd@.service run as.
DAEMON_USER = "greupd"


def key_owners() -> dict[int, str]:
    """The owners a key file may have, by uid: root, the unit's user (where it exists), and whoever runs greupd
    (a daemon started by hand as another user keeps its own key)."""
    owners = {os.geteuid(): f"uid {os.geteuid()}"}
    with contextlib.suppress(KeyError):  # no such user: not installed from the package
        owners[pwd.getpwnam(DAEMON_USER).pw_uid] = DAEMON_USER
    owners[0] = "root"
    return owners


def secret_file_problem(path: Path) -> str | None:
    """Why a pre-shared key (or private key) file cannot be used, or None: it must exist, hold a key, be readable
    and writable by its owner alone, and that owner be root or the user greupd runs as.

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
    owners = key_owners()
    if info.st_uid not in owners:
        return (f"{path} is owned by uid {info.st_uid}: a key is root's or {DAEMON_USER}'s (the user greupd.service"
                f" runs as): chown {DAEMON_USER} {path}")
    try:
        with path.open("rb") as file:
            if not file.read(64 * 1024).strip():
                return f"{path} is empty: write the key into it"
    except PermissionError:
        # Root's file, checked by the daemon under the unit (user greupd): it cannot read it, say what to do.
        return (f"cannot read {path} as {owners.get(os.geteuid(), f'uid {os.geteuid()}')}: greupd.service runs as"
                f" user {DAEMON_USER}, which must own the key: chown {DAEMON_USER} {path}; chmod 600 {path}")
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror or exc}"
    return None
