"""The qemu guest's Python, venv, checkout and kernel modules on a block device instead of 9p.

virtme-ng shows the guest the host's root over 9p, and every file Python's import system opens or
stats there is a round trip to qemu: importing greupd's dependencies took 150-180 s in the guest,
with the guest CPU mostly idle (measured in lab/README.md). So before booting, the host puts what
Python reads into one ext4 image (read-only in the guest, its pages cached there) and the guest
binds its folders over the same paths; nothing else changes (same interpreter path, same venv, the
same checkout path, so tracebacks and ``sys.path`` look as on the host).

The image is built once per content: its name holds a hash of the checkout's Python sources and of
the size and mtime of every file of the interpreter, venv and module tree, so an edit to greupd or a
``pip install`` builds a new one (~15 s on this machine) and older ones are removed.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

# The disk's serial (qemu's virtio-blk ``serial=``), how the guest tells it from any other disk.
SERIAL = "greupd-lab-py"
GUEST_MOUNT = "/run/lab-disk"
# Stdlib folders no test or demo imports: the test suite alone is 120 MB.
STDLIB_SKIP = frozenset({"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "site-packages"})
# Programs the lab runs many times (a LAN built with `ip`, shells, pings), and the libraries they load:
# an exec reads all of them again over 9p, ~0.3-1 s each under emulation.
TOOLS = ("ip", "sh", "sysctl", "ping", "nft", "sed", "grep", "tail", "modprobe", "mount", "mountpoint",
         "tcpdump", "swanctl", "unshare")
# strongSwan's charon, its libraries and plugins (lab/charon.py, two per IPsec story): a folder off PATH, bound whole;
# its programs and plugins' libraries (libcrypto for openssl) join the TOOLS' ldd.
IPSEC = Path("/usr/lib/ipsec")
# The kernel's network stack (tunnels, nftables, bridges) and its dependencies, for modprobe -d; and the crypto
# templates the kernel loads by itself when charon installs an ESP SA (rfc4106(gcm(aes)): gcm, ghash, seqiv...).
MODULE_DIRS = ("kernel/net", "kernel/drivers/net/veth.ko", "kernel/drivers/net/dummy.ko", "kernel/drivers/net/tun.ko",
               "kernel/crypto")


@dataclass(frozen=True)
class Bind:
    """One folder of the image (``name``) bound over ``path`` in the guest."""

    name: str
    path: Path


@dataclass(frozen=True)
class PythonDisk:
    image: Path
    binds: tuple[Bind, ...]
    kernel_version: str | None  # the module tree under modules/ is for this kernel

    def qemu_opts(self) -> str:
        return (f"-drive file={self.image},if=none,id=labpy,format=raw,readonly=on "
                f"-device virtio-blk-pci,drive=labpy,serial={SERIAL}")

    def guest_lines(self, modules: Sequence[str], rundir: Path, root: str = "") -> list[str]:
        """Shell lines for the guest's init: mount the disk, bind its folders, load modules from it.

        root: where the guest's root will be (the vng-systemd guest binds into the overlay it chroots into).
        """
        m = GUEST_MOUNT
        lines = [
            # virtio_blk and ext4 come over 9p (a handful of files); everything after that from the disk.
            "modprobe -a -q virtio_blk ext4",
            f"mkdir -p {m}",
            f'for s in /sys/block/vd*/serial; do [ "$(cat $s)" = {SERIAL} ] && dev=/dev/${{s#/sys/block/}}; done',
            f"mount -t ext4 -o ro,noatime ${{dev%/serial}} {m}",
        ]
        # All binds by one `mount -a` on a fstab of our own: a `mount` process each would cost ~0.5-1 s apiece
        # under emulation (its binary and libraries read over 9p), ~40 s for the ~50 of them.
        fstab = rundir / "fstab"
        fstab.write_text("".join(f"{_fstab_path(f'{m}/{b.name}')} {_fstab_path(root + str(b.path))} none bind 0 0\n"
                                 for b in self.binds))
        lines.append(f"mount -a -T {shlex.quote(str(fstab))}")
        lines.append("stamp disk-mounted")  # stamp(): defined by the init script (lab/guest.py)
        if self.kernel_version:
            wrapper = rundir / "modprobe"
            wrapper.write_text(f'#!/bin/sh\nexec /sbin/modprobe -d {m}/kmod "$@"\n')
            wrapper.chmod(0o755)
            # Nothing loaded up front: under emulation each module costs ~0.2-0.5 s to load (most of the
            # list is never used by a given run), and the kernel asks for what it needs (rtnl-link-gre,
            # nft-expr-exthdr, nft-chain-2-nat) through the wrapper, from the disk.
            lines.append(f"echo {shlex.quote(str(wrapper))} > /proc/sys/kernel/modprobe")
        else:
            lines.append(f"modprobe -a -q {' '.join(modules)} 2>/dev/null")
        return lines


def _fstab_path(path: str) -> str:
    # fstab fields are separated by blanks; a blank inside a path is written in octal, as the kernel does.
    return path.replace("\\", "\\134").replace(" ", "\\040").replace("\t", "\\011")


def _venv_includes_system_site() -> bool:
    cfg = Path(sys.prefix) / "pyvenv.cfg"
    return cfg.exists() and "include-system-site-packages = true" in cfg.read_text()


def _python_binds(repo: Path, extra: Sequence[Path] = ()) -> list[tuple[str, Path, frozenset[str]]]:
    """(image folder, host folder, names to leave out at its top) for what Python reads.

    extra: more host folders or files (the vng-systemd guest's packaged greupd runs on Debian's python3.11).
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    skip = STDLIB_SKIP - ({"site-packages"} if _venv_includes_system_site() or sys.prefix == sys.base_prefix
                          else set())
    found = [("stdlib", stdlib, frozenset(skip))]
    libpython = sysconfig.get_config_var("INSTSONAME")
    libdir = sysconfig.get_config_var("LIBDIR")
    if sysconfig.get_config_var("Py_ENABLE_SHARED") and libpython and libdir and (Path(libdir) / libpython).exists():
        # A shared libpython (pyenv's, Debian's): mapped by every interpreter start. A file, bound as one.
        found.append(("libpython", (Path(libdir) / libpython).resolve(), frozenset()))
    if sys.prefix != sys.base_prefix:
        found.append(("venv", Path(sys.prefix).resolve(), frozenset()))
    if IPSEC.is_dir():
        found.append(("ipsec", IPSEC.resolve(), frozenset()))
    # The checkout's Python folders (packages and plain script folders such as demo/).
    for n, path in enumerate(_tools()):
        found.append((f"tool-{n}", path, frozenset()))
    for package in sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith(".")
                          and any(p.glob("*.py"))):
        found.append((f"src-{package.name}", package, frozenset()))
    resolved = {top for _, top, _ in found}
    for n, path in enumerate(p.resolve() for p in extra):
        if path.exists() and path not in resolved:
            found.append((f"extra-{n}", path, STDLIB_SKIP - {"site-packages"} if path.is_dir() else frozenset()))
    return found


def _tools() -> list[Path]:
    """The TOOLS' real files and the shared libraries each loads (as ldd lists them), each once."""
    programs = {Path(found).resolve() for found in map(shutil.which, TOOLS) if found}
    files = set(programs)  # not IPSEC's own files: they come with its folder
    if IPSEC.is_dir():
        programs |= {p.resolve() for p in (IPSEC / "charon", *(IPSEC / "plugins").glob("*.so")) if p.is_file()}
    ldd = subprocess.run(["ldd", *map(str, sorted(programs))], capture_output=True, text=True).stdout
    for line in ldd.splitlines():
        words = [w for w in line.split() if w.startswith("/")]
        if words and not line.rstrip().endswith(":"):
            files.add(Path(words[0]).resolve())
    return sorted(f for f in files if f.is_file() and not f.is_relative_to(IPSEC))


def _files(top: Path, skip: frozenset[str]) -> Iterable[Path]:
    """Every file under top (or top itself, a file), without the names in skip at its top level."""
    if top.is_file():
        yield top
        return
    for dirpath, dirnames, filenames in os.walk(top):
        if Path(dirpath) == top:
            dirnames[:] = [d for d in dirnames if d not in skip]
            filenames = [f for f in filenames if f not in skip]
        for name in filenames:
            yield Path(dirpath) / name


def _module_files(version: str) -> list[Path]:
    """The .ko files of the network stack and everything they depend on, as modprobe resolves them."""
    tree = Path("/lib/modules") / version
    names = []
    for entry in MODULE_DIRS:
        path = tree / entry
        names += [p.name.removesuffix(".ko") for p in ([path] if path.is_file() else path.rglob("*.ko"))]
    out = subprocess.run(["modprobe", "-S", version, "-D", "-a", *names], capture_output=True, text=True).stdout
    return sorted({Path(line.split()[1]) for line in out.splitlines() if line.startswith("insmod ")})


def _digest(binds: Sequence[tuple[str, Path, frozenset[str]]], modules: Sequence[Path], repo: Path) -> str:
    h = hashlib.sha256()
    for name, top, skip in binds:
        h.update(f"\0{name}\0{top}\0".encode())
        for path in sorted(_files(top, skip)):
            if path.parent.name == "__pycache__":  # derived from the sources hashed here
                continue
            if top.is_relative_to(repo):  # our own sources: by content (an edit may keep size and mtime)
                h.update(f"{path.relative_to(top)}\0".encode() + path.read_bytes())
            else:  # the interpreter and venv: thousands of files, pip changes size or mtime
                st = path.lstat()
                h.update(f"{path.relative_to(top)}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    for ko in modules:
        h.update(f"{ko}\0{ko.stat().st_mtime_ns}\0".encode())
    return h.hexdigest()[:16]


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:  # another file system (a checkout under /tmp): copy
        shutil.copy2(src, dst, follow_symlinks=False)


def _compile(binds: Sequence[tuple[str, Path, frozenset[str]]]) -> None:
    # The guest cannot write bytecode (its root is read-only) and compiles at emulated speed: every
    # module gets its .pyc here, on the host, once (compileall skips those that are up to date).
    # The extra folders are the system's (Debian's python3.11 ships its own bytecode): left as they are.
    for bind, top, skip in binds:
        if top.is_dir() and not bind.startswith("extra-"):
            left_out = ["-x", "/(" + "|".join(sorted(skip)) + ")/"] if skip else []
            subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0", *left_out, str(top)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def python_disk(repo: Path, cache: Path, kernel_version: str | None, extra: Sequence[Path] = (),
                name: str = "vng-python") -> PythonDisk:
    """The image for this interpreter, venv, checkout and kernel, built when missing (cached in ``cache``).

    name: the image's name before its hash; one image of each name is kept (each guest kind has its own).
    """
    binds = _python_binds(repo, extra)
    modules = _module_files(kernel_version) if kernel_version and shutil.which("modprobe") else []
    image = cache / f"{name}-{_digest(binds, modules, repo)}.img"
    result = PythonDisk(image, tuple(Bind(folder, top) for folder, top, _ in binds),
                        kernel_version if modules else None)
    if image.exists():
        return result
    cache.mkdir(parents=True, exist_ok=True)
    # Two guests of a kind boot side by side (lab/pytest_plugin.py, SHARDS): one builds, the other waits for it.
    with open(cache / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not image.exists():
            _build(image, name, binds, modules, kernel_version, cache)
    return result


def _build(image: Path, name: str, binds: Sequence[tuple[str, Path, frozenset[str]]], modules: Sequence[Path],
           kernel_version: str | None, cache: Path) -> None:
    _compile(binds)
    with tempfile.TemporaryDirectory(prefix=f"{name}-", dir=cache) as tmp:
        stage = Path(tmp) / "stage"
        for folder, top, skip in binds:
            if top.is_file():
                _link_or_copy(top, stage / folder)
                continue
            (stage / folder).mkdir(parents=True)
            for path in _files(top, skip):
                _link_or_copy(path, stage / folder / path.relative_to(top))
        if modules and kernel_version:
            kmod = stage / "kmod" / "lib" / "modules" / kernel_version
            for ko in modules:
                _link_or_copy(ko, kmod / ko.relative_to(Path("/lib/modules") / kernel_version))
            for meta in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
                if (Path("/lib/modules") / kernel_version / meta).exists():
                    shutil.copy2(Path("/lib/modules") / kernel_version / meta, kmod / meta)
            subprocess.run(["depmod", "-b", str(stage / "kmod"), kernel_version], check=True)
        size_mb = sum(p.lstat().st_size for p in stage.rglob("*")) // 2**20
        partial = Path(tmp) / "image"
        # No journal: the guest mounts it read-only. root_owner: the stage's owner is whoever built it.
        subprocess.run(["mkfs.ext4", "-q", "-O", "^has_journal", "-E", "root_owner=0:0", "-d", str(stage),
                        str(partial), f"{size_mb * 5 // 4 + 64}M"], check=True)
        os.replace(partial, image)
    for old in cache.glob(f"{name}-*.img"):
        if old != image:
            old.unlink(missing_ok=True)
