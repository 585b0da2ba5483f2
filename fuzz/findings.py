"""A crash's signature and its reproducer on disk: fuzz/crashes/<target>/crash-<signature>.bin, with the
traceback beside it (.txt). One file per signature (exception type and where greupd raised it), so a campaign
that hits the same bug a million times keeps one reproducer, and a committed one is never replaced.
"""

from __future__ import annotations

import hashlib
import os
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent
CRASHES = Path(os.environ.get("GREUPD_FUZZ_CRASHES") or ROOT / "crashes")  # the smoke test points it elsewhere
CORPUS = ROOT / "corpus"


def signature(exc: BaseException) -> str:
    """The exception's type and where greupd raised it: the innermost frame in greupd (file, function, line),
    else the innermost in the harness (file and function only: a harness's line numbers move with its edits,
    its checks do not), else the innermost overall. Library frames below greupd's are left out, so one site
    that fails in several ways inside ipaddress or int() stays one finding."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/greupd/" in f.filename]
    harness = [f for f in frames if "/fuzz/" in f.filename and not f.filename.endswith("worker.py")]
    if ours:
        where = f"{Path(ours[-1].filename).name}:{ours[-1].name}:{ours[-1].lineno}"
    elif harness:
        where = f"{Path(harness[-1].filename).name}:{harness[-1].name}"
    else:
        where = f"{Path(frames[-1].filename).name}:{frames[-1].name}:{frames[-1].lineno}" if frames else "?"
    return f"{type(exc).__name__}-{hashlib.sha1(f'{type(exc).__name__}|{where}'.encode()).hexdigest()[:10]}"


def record(target: str, data: bytes, exc: BaseException, directory: Path = CRASHES) -> tuple[str, bool]:
    """Save a crashing input (once per signature); return (signature, whether it was new)."""
    name = signature(exc)
    folder = directory / target
    reproducer = folder / f"crash-{name}.bin"
    if reproducer.exists():
        return name, False
    folder.mkdir(parents=True, exist_ok=True)
    reproducer.write_bytes(data)
    lines = traceback.format_exception(exc)
    text = "".join(lines)
    if len(text) > 20_000:  # a RecursionError's thousand identical frames: keep the two ends
        text = text[:8_000] + "\n[...]\n" + text[-8_000:]
    shown = data[:300]
    (folder / f"crash-{name}.txt").write_text(
        f"target: {target}\ninput ({len(data)} bytes, first {len(shown)}): {shown!r}\n\n{text}", encoding="utf-8")
    return name, True
