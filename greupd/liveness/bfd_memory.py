"""BFD sessions across a restart with on_exit = "keep": `state_dir/bfd.json` holds every Up session's
discriminators and the peer's timers, written when greupd stops without removing its tunnels, read (for this
boot only) when it starts. See BfdSession.resume for what the peer then sees.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

FILE = "bfd.json"
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


@dataclass(frozen=True)
class SessionMemo:
    address: str
    peer: str
    my_discriminator: int
    remote_discriminator: int
    remote_min_rx_us: int
    remote_desired_min_tx_us: int
    remote_detect_mult: int
    auth_sequence: int | None = None  # the last meticulous SHA1 sequence number sent


def _boot_id() -> str | None:
    try:
        return _BOOT_ID.read_text().strip()
    except OSError:
        return None


def save(directory: Path, memos: dict[str, SessionMemo]) -> None:
    """Replace the file in one rename; nothing to keep removes it."""
    path = directory / FILE
    if not memos:
        path.unlink(missing_ok=True)
        return
    document = {"format": 1, "boot_id": _boot_id(), "sessions": {n: asdict(m) for n, m in memos.items()}}
    directory.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{FILE}.", dir=directory)
    try:
        with os.fdopen(handle, "w") as file:
            json.dump(document, file)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load(directory: Path) -> dict[str, SessionMemo]:
    """What the previous greupd of this boot left; {} for anything else (a reboot, no file, a file not ours)."""
    try:
        document: Any = json.loads((directory / FILE).read_text())
        if document.get("format") != 1 or document.get("boot_id") != _boot_id():
            return {}
        return {str(name): SessionMemo(**memo) for name, memo in document["sessions"].items()}
    except (OSError, ValueError, TypeError, AttributeError, KeyError):
        return {}
