"""Run a command inside a guest kernel that has what this machine's kernel lacks.

Kinds (see /work/shared/kernel-lab.md):

- ``uml``: Debian's user-mode-linux kernel (ip_gre, veth, bridge; nftables only for the bridge
  family), booted with the host's root file system (hostfs) and a shell script as PID 1. ~3 s.
- ``uml-systemd``: the same kernel, with an overlay of / (tmpfs upper layer) and real systemd as
  PID 1, which starts one unit that runs the command and powers off. ~10 s.
- ``vng``: the full Debian kernel (GRE and nftables ``inet`` together) under qemu without KVM,
  started by virtme-ng, with Python, the venv and the checkout on a block device (lab/python_disk.py); the
  kernel's init is our script (not virtme-ng-init, whose udev coldplug cost a third of a boot), which runs the
  command in an overlay of / as ``uml-systemd`` does. Slow: the CPU is emulated (Python ~30-50x slower than
  native; see lab/README.md).
- ``vng-systemd``: the same kernel, init and disk, with real systemd as PID 1 in that overlay: the packaged
  unit with nftables ``inet``.

The guest writes the command's output and exit status to a run directory under the repository's
``.lab/`` (on the host's disk, which every kind of guest shares), and the host reads them once the
guest is gone. The guest's own exit status carries nothing (``poweroff -f``).

Every guest has a /tmp of its own, a fresh tmpfs (under virtme-ng-init, vng's default, vng's is an overlay on
the host's). A checkout, venv or run dir under the host's /tmp is bound back into the guest's fresh /tmp, so
the lab works from a clone in any folder.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TextIO, get_args

from lab.python_disk import PythonDisk, python_disk

GuestKind = Literal["uml", "uml-systemd", "vng", "vng-systemd"]
KINDS: tuple[GuestKind, ...] = get_args(GuestKind)

REPO = Path(__file__).resolve().parents[1]

# Loaded at boot when present; a module a kernel lacks (or has built in) is skipped silently.
MODULES = (
    *("veth", "bridge", "dummy", "tun", "8021q", "overlay"),
    *("gre", "ip_gre", "ip_tunnel", "ip6_tunnel", "ip6_gre", "ip6_udp_tunnel"),
    *("nfnetlink", "nf_tables", "nf_conntrack", "nf_nat", "nf_reject_ipv4", "nf_reject_ipv6"),
    *("nft_chain_nat", "nft_nat", "nft_masq", "nft_ct", "nft_compat", "nft_reject", "nft_reject_inet"),
    *("nft_fib", "nft_fib_inet", "nft_fib_ipv4", "nft_fib_ipv6", "nft_limit", "nft_log", "nft_counter"),
    *("nft_exthdr", "nft_tunnel", "x_tables", "xt_TCPMSS", "xt_tcpmss", "xt_MASQUERADE", "xt_conntrack"),
    "xt_tcpudp",
)

# Variables the guest's command sees (besides every GREUPD_* one); PID 1 starts with none at all.
PASSTHROUGH_ENV = ("CI", "PATH", "HOME", "LANG", "LC_ALL", "TZ", "PYTHONPATH", "PYTHONHASHSEED", "TERM")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_TIMEOUT: dict[GuestKind, float] = {"uml": 900, "uml-systemd": 900, "vng": 1800, "vng-systemd": 2400}
UNIT = "greupd-lab.service"
VNG_BLACKLIST = (
    *("kvm", "kvm_amd", "kvm_intel", "ahci", "libahci", "sr_mod", "cdrom", "sg", "i2c_i801", "lpc_ich"),
    *("iTCO_wdt", "iTCO_vendor_support", "i6300esb", "pcspkr", "psmouse", "serio_raw", "evdev", "joydev"),
    *("powernow_k8", "aesni_intel", "ghash_clmulni_intel", "drm", "bochs", "qemu_fw_cfg"),
)


@dataclass
class GuestResult:
    kind: GuestKind
    status: int | None  # the command's exit status; None when it did not finish
    output: str  # the command's stdout + stderr
    console: str  # the guest's console (kernel log, init, systemd)
    seconds: float
    booted: bool  # the guest reached its init script
    timed_out: bool = False
    error: str | None = None  # why the guest could not run at all or the command did not finish
    rundir: Path | None = None
    files: dict[str, str] = field(default_factory=dict)  # the run dir files asked for by ``collect``
    # CPU seconds (user + system) of the guest's process and every process it waited for (wait4), None if it
    # was killed: how much of its wall time the guest computed rather than waited (lab/README.md, test time).
    cpu_seconds: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == 0

    def console_tail(self, lines: int = 40) -> str:
        return "\n".join(self.console.splitlines()[-lines:])

    def describe(self) -> str:
        """A paragraph for a failure report: what went wrong and the end of the console."""
        what = self.error or f"exit status {self.status}"
        if self.rundir is None:  # never started
            return f"lab: {self.kind} guest: {what}"
        parts = [f"lab: {self.kind} guest: {what} (after {self.seconds:.1f} s; run dir {self.rundir})"]
        if self.output.strip():
            parts += ["--- command output (tail) ---", "\n".join(self.output.splitlines()[-40:])]
        parts += ["--- guest console (tail) ---", self.console_tail()]
        return "\n".join(parts)


# --------------------------------------------------------------------------- locating the guests


def uml_kernel() -> str:
    return os.environ.get("GREUPD_LAB_UML_KERNEL") or shutil.which("linux.uml") or "/usr/bin/linux.uml"


def uml_modules() -> Path | None:
    dirs = sorted(Path("/usr/lib/uml/modules").glob("*"))
    return dirs[-1] if dirs else None


def vng_kernel() -> str | None:
    forced = os.environ.get("GREUPD_LAB_VNG_KERNEL")
    if forced:
        return forced
    images = sorted(glob.glob("/boot/vmlinuz-*-amd64"))
    return images[-1] if images else None


def vng_binary() -> str | None:
    beside = Path(sys.executable).parent / "vng"  # the venv's, when pytest runs from .venv/bin
    return str(beside) if beside.exists() else shutil.which("vng")


# The packaged greupd (vng-systemd) runs on Debian's python3.11: its interpreter and stdlib go on the disk too.
PACKAGED_PYTHON = (Path("/usr/lib/python3.11"), Path("/usr/bin/python3.11"))


def vng_python_disk(kind: GuestKind = "vng") -> PythonDisk | None:
    """Python, the venv and this checkout on a block device for the vng guests (see lab/python_disk.py).

    GREUPD_LAB_VNG_DISK=0 boots without it (everything over 9p, as virtme-ng does by itself).
    """
    if os.environ.get("GREUPD_LAB_VNG_DISK") == "0" or not shutil.which("mkfs.ext4"):
        return None
    image = vng_kernel() or ""
    version = Path(image).name.removeprefix("vmlinuz-")
    has_modules = bool(version) and (Path("/lib/modules") / version).is_dir()
    if kind == "vng-systemd":
        return python_disk(REPO, lab_dir(), version if has_modules else None, PACKAGED_PYTHON, "vng-systemd-python")
    return python_disk(REPO, lab_dir(), version if has_modules else None)


def unavailable(kind: GuestKind) -> str | None:
    """Why this kind of guest cannot be booted here, or None."""
    if kind in ("uml", "uml-systemd"):
        kernel = uml_kernel()
        if not os.access(kernel, os.X_OK):
            return f"no user-mode-linux kernel at {kernel} (apt-get install user-mode-linux)"
        if kernel == "/usr/bin/linux.uml" and uml_modules() is None:
            return "no /usr/lib/uml/modules/<version> (apt-get install user-mode-linux)"
        if kind == "uml-systemd" and not os.access("/lib/systemd/systemd", os.X_OK):
            return "no /lib/systemd/systemd (apt-get install systemd)"
        return None
    if kind == "vng-systemd" and not os.access("/lib/systemd/systemd", os.X_OK):
        return "no /lib/systemd/systemd (apt-get install systemd)"
    image = vng_kernel()
    if not image or not os.path.exists(image):
        return f"no kernel image {image or '/boot/vmlinuz-*-amd64'} (apt-get install linux-image-amd64)"
    if not vng_binary():
        return "no vng (pip install virtme-ng)"
    if not shutil.which("qemu-system-x86_64"):
        return "no qemu-system-x86_64 (apt-get install qemu-system-x86)"
    if not shutil.which("busybox"):
        return "no busybox (apt-get install busybox-static)"
    return None


# --------------------------------------------------------------------------- scripts for the guest


def lab_dir() -> Path:
    return Path(os.environ.get("GREUPD_LAB_DIR") or REPO / ".lab")


def guest_env(kind: GuestKind, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: os.environ[k] for k in PASSTHROUGH_ENV if k in os.environ}
    env.update({k: v for k, v in os.environ.items() if k.startswith("GREUPD_")})
    env.setdefault("PATH", DEFAULT_PATH)
    env.setdefault("HOME", "/root")
    env.setdefault("LANG", "C.UTF-8")
    env["PYTHONUNBUFFERED"] = "1"
    if kind in ("vng", "vng-systemd"):  # the root is read-only 9p (only the run dir is writable)
        env.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", "/tmp/.hypothesis")
    env.update(extra or {})
    env["GREUPD_LAB_GUEST"] = kind
    return env


def _command_script(rundir: Path, argv: Sequence[str], cwd: Path, env: Mapping[str, str]) -> str:
    """cmd.sh: the same for every kind; writes output and status to the run dir (status last)."""
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(env.items()))
    r = shlex.quote(str(rundir))
    return (
        "#!/bin/sh\n"
        f"{exports}"
        f"cd {shlex.quote(str(cwd))} || exit 1\n"
        f"{shlex.join(argv)} >{r}/output 2>&1 </dev/null\n"
        f"echo $? >{r}/status.tmp && mv {r}/status.tmp {r}/status\n"
    )


def folders_under_tmp(paths: Sequence[Path | str]) -> list[Path]:
    """The folders right under /tmp that hold any of these paths (a checkout, its venv, the run dir).

    Every guest starts with a fresh, empty /tmp (a booting machine's, and systemd-tmpfiles must not
    walk the host's), which would hide a checkout cloned under /tmp; the guest binds these back.
    """
    kept: list[Path] = []
    for path in paths:
        resolved = Path(path).resolve()
        if resolved.is_relative_to("/tmp") and resolved != Path("/tmp"):
            top = Path("/tmp") / resolved.relative_to("/tmp").parts[0]
            if top not in kept:
                kept.append(top)
    return kept


def _fresh_tmp(kept: Sequence[Path]) -> list[str]:
    """Shell lines: a fresh tmpfs on /tmp, with the kept folders of the host's /tmp bound back in."""
    lines = [f"mkdir -p /run/lab-kept/{i} && mount --bind {shlex.quote(str(d))} /run/lab-kept/{i}"
             for i, d in enumerate(kept)]
    lines.append("mount -t tmpfs -o mode=1777 tmpfs /tmp")
    lines += [f"mkdir -p {shlex.quote(str(d))} && mount --move /run/lab-kept/{i} {shlex.quote(str(d))}"
              for i, d in enumerate(kept)]
    return lines


def _modprobe_wrapper(rundir: Path, moddir: str) -> str:
    # The kernel runs /proc/sys/kernel/modprobe for on-demand loads (nft expressions, tunnels);
    # UML's modules are not under /lib/modules, so point it at a wrapper that knows where they are.
    return f'#!/bin/sh\nexec /sbin/modprobe -d {shlex.quote(moddir)} "$@"\n'


def _uml_init(kind: GuestKind, rundir: Path, kept: Sequence[Path] = (), root: Path | None = None) -> str:
    """PID 1 of the UML guest: mounts, modules, then the command (or systemd, which runs it).

    ``root`` (uml-systemd only): another root file system on the host's disk (a Debian release's, made by
    lab/distro_root.py) that systemd boots instead of the host's own, read-only under the same overlay.
    """
    r = shlex.quote(str(rundir))
    modules = uml_modules()
    version = modules.name if modules else "none"
    lines = [
        "#!/bin/sh",
        f"export PATH={DEFAULT_PATH}",
        "mount -t proc proc /proc",
        'stamp() { read -r up _ </proc/uptime; echo "lab-init: $1 at $up s"; }',  # builtins: no fork
        "stamp start",
        "mount -t sysfs sysfs /sys",
        "mount -t tmpfs -o mode=0755 tmpfs /run",
        *_fresh_tmp(kept),
        "mkdir -p /dev/pts /dev/shm",
        "mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts",
        "mount -t tmpfs -o mode=1777 tmpfs /dev/shm",
        "ip link set lo up",
        "hostname greupd-lab",
        f"mkdir -p {r}/mods/lib/modules",
        f"ln -sfn /usr/lib/uml/modules/{version} {r}/mods/lib/modules/{version}",
        f"echo {r}/modprobe > /proc/sys/kernel/modprobe",
        # -a: one process for all (each exec costs ~50 ms in UML); it carries on past missing ones.
        f"modprobe -a -q -d {r}/mods {' '.join(MODULES)} 2>/dev/null",
        f"echo booted > {r}/booted",
        "stamp booted",
    ]
    if kind == "uml":
        lines += [
            "mount -t cgroup2 cgroup2 /sys/fs/cgroup",
            f"sh {r}/cmd.sh",
            "poweroff -f",
        ]
        return "\n".join(lines) + "\n"
    # uml-systemd: writes must not reach the host's disk (systemd-tmpfiles would clean the host's
    # /tmp, journald would write /var/log), so run systemd in an overlay with a tmpfs upper layer;
    # only the run dir is bound through, so the status and output reach the host.
    lines += [
        *_systemd_overlay(rundir, kept, root, extra=(REPO, *([modules] if modules else []))),
        *_lab_unit(rundir),
        # Hand the API file systems over; systemd mounts /run (tmpfs) and cgroup2 itself.
        "stamp systemd",
        "for fs in /dev /proc /sys; do mount --move $fs /run/ov/root$fs; done",
        f"exec chroot /run/ov/root /lib/systemd/systemd --unit={UNIT} --show-status=false",
    ]
    return "\n".join(lines) + "\n"


def _systemd_overlay(rundir: Path, kept: Sequence[Path], root: Path | None = None,
                     extra: Sequence[Path] = ()) -> list[str]:
    """Shell lines: the root systemd runs in, an overlay of / with a tmpfs upper layer (writes vanish with the
    guest; systemd-tmpfiles would otherwise clean the host's /tmp and journald write its /var/log), at
    /run/ov/root, with the run dir bound through so the status and output reach the host.

    With ``root``, that folder is the overlay's lower layer instead of /, and the folders in ``extra`` (this
    checkout, the UML modules) are bound into it at their own paths, since that root does not have them."""
    r = shlex.quote(str(rundir))
    lower = shlex.quote(str(root)) if root else "/"
    binds = [*kept, *extra] if root else kept
    return [
        "mkdir -p /run/ov",
        "mount -t tmpfs -o mode=0755 tmpfs /run/ov",
        "mkdir -p /run/ov/upper /run/ov/work /run/ov/root",
        f"mount -t overlay overlay -o lowerdir={lower},upperdir=/run/ov/upper,workdir=/run/ov/work /run/ov/root",
        # A fresh /tmp, as on a booting machine; else systemd-tmpfiles' "D /tmp" walks (and, in the
        # overlay, whites out) the host's whole /tmp: 12 s and more in UML. The kept folders (a checkout
        # under /tmp) are bound through as they are: the host's, writable.
        "mount -t tmpfs -o mode=1777 tmpfs /run/ov/root/tmp",
        *(f"mkdir -p /run/ov/root{q} && mount --bind {q} /run/ov/root{q}" for q in map(shlex.quote, map(str, binds))),
        f"mkdir -p /run/ov/root{r} && mount --bind {r} /run/ov/root{r}",
    ]


def _lab_unit(rundir: Path) -> list[str]:
    """Shell lines: install the unit systemd starts (the command, then power off) in the overlay's /etc."""
    r = shlex.quote(str(rundir))
    unit = (
        "[Unit]\nDescription=greupd lab command\n\n"
        # Type=simple: the boot transaction (whose goal is this unit) ends once the command starts,
        # so the command sees a system that is "running", not "initializing".
        "[Service]\nType=simple\nStandardOutput=journal+console\n"
        f"ExecStart=/bin/sh -c 'sh {r}/cmd.sh; exec /bin/systemctl poweroff --force'\n"
    )
    return [
        f"cat > /run/ov/root/etc/systemd/system/{UNIT} <<'UNIT_EOF'\n{unit}UNIT_EOF",
        # udev's coldplug costs ~10 s in UML (a process per uevent), far more under emulation, and comes
        # before sysinit.target; nothing here needs it. udevd itself still runs for new devices.
        "ln -sf /dev/null /run/ov/root/etc/systemd/system/systemd-udev-trigger.service",
    ]


def _vng_systemd_init(rundir: Path, disk: PythonDisk | None, kept: Sequence[Path] = (), systemd: bool = True) -> str:
    """PID 1 of the vng guests: the kernel's init, run by virtme-ng's initramfs on the host's root (9p, ro).

    virtme-ng-init, which would mount the run dir and the rest, is not there (it would be PID 1 instead of
    systemd): mount the API file systems, the run dir (virtme-ng's 9p tag) and the Python disk, then the same
    overlay as uml-systemd (writes vanish with the guest) and exec systemd in it.

    ``systemd=False`` (the ``vng`` guest): the same, but the command runs in the overlay straight from this init,
    as in the UML guest. virtme-ng-init's own start-up is skipped: systemd-tmpfiles and a udev coldplug whose
    module loads (every modalias of qemu's board, read over 9p) took 60-70 s of an emulated boot at load 7,
    and nothing in the tests needs them.
    """
    r = shlex.quote(str(rundir))
    setup = (disk.guest_lines(MODULES, rundir, root="/run/ov/root") if disk
             else [f"modprobe -a -q {' '.join(MODULES)} 2>/dev/null"])
    if disk and disk.kernel_version:
        # Kernel threads share PID 1's root, so after the chroot the kernel's modprobe helper runs in the overlay,
        # where systemd's own /run hides /run/lab-disk: the module tree is bound into the run dir there instead.
        (rundir / "kmod").mkdir(exist_ok=True)
        kmod = ["mount --bind /run/lab-disk/kmod /run/ov/root" + r + "/kmod"]
        (rundir / "modprobe").write_text(_modprobe_wrapper(rundir, f"{rundir}/kmod"))
    else:
        kmod = []
    lines = [
        "#!/bin/sh",
        f"export PATH={DEFAULT_PATH}",
        "mount -t proc proc /proc",
        "mount -t devtmpfs devtmpfs /dev",
        'stamp() { read -r up _ </proc/uptime; echo "lab-init: $1 at $up s" >/dev/kmsg; }',
        "stamp start",
        "mount -t sysfs sysfs /sys",
        "mount -t tmpfs -o mode=0755 tmpfs /run",
        f"mount -t 9p -o trans=virtio,version=9p2000.L,access=any,msize=524288 {VNG_RUNDIR_TAG} {r}"
        f" || mount -t virtiofs {VNG_RUNDIR_TAG} {r}",
        *_systemd_overlay(rundir, kept),
        *setup,
        "ip link set lo up",
        *kmod,
    ]
    if not systemd:
        # What systemd would mount itself: a /run of its own (not the host's, seen through the overlay), /dev/pts,
        # /dev/shm, the /dev/fd links, cgroup2. Then the command, and power off as the UML guest does.
        o = "/run/ov/root"
        lines += [
            "hostname greupd-lab",
            f"mount -t tmpfs -o mode=0755 tmpfs {o}/run",
            f"echo booted > {r}/booted",
            "stamp booted",
            f"for fs in /dev /proc /sys; do mount --move $fs {o}$fs; done",
            f"mkdir -p {o}/dev/pts {o}/dev/shm",
            f"mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts {o}/dev/pts",
            f"mount -t tmpfs -o mode=1777 tmpfs {o}/dev/shm",
            f"ln -sfn /proc/self/fd {o}/dev/fd",
            *(f"ln -sfn /proc/self/fd/{n} {o}/dev/{name}" for n, name in enumerate(("stdin", "stdout", "stderr"))),
            f"mount -t cgroup2 cgroup2 {o}/sys/fs/cgroup",
            f"exec chroot {o} /bin/sh {r}/in-root",
        ]
        # Power off by sysrq, not `poweroff -f`: that is systemctl, whose libraries come over 9p (over a minute
        # under emulation at load 20, for a guest whose command took a second).
        (rundir / "in-root").write_text(
            "#!/bin/sh\n"
            'stamp() { read -r up _ </proc/uptime; echo "lab-init: $1 at $up s" >/dev/kmsg; }\n'
            "stamp command\n"
            f"sh {r}/cmd.sh\n"
            "stamp done\n"
            "echo o >/proc/sysrq-trigger\n"
            "exec sleep 60\n"  # PID 1 must not exit before the power-off happens (a panic instead)
        )
        return "\n".join(lines) + "\n"
    lines += [
        # The host's root is a container's (/.dockerenv): systemd would take itself for one and skip units.
        "rm -f /run/ov/root/.dockerenv",
        # binfmt_misc is not in the kernel's module tree on the disk: its units would only fail.
        *(f"ln -sf /dev/null /run/ov/root/etc/systemd/system/{unit}"
          for unit in ("systemd-binfmt.service", "proc-sys-fs-binfmt_misc.automount")),
        *_lab_unit(rundir),
        f"echo booted > {r}/booted",
        "stamp systemd",
        f"exec chroot /run/ov/root /lib/systemd/systemd --unit={UNIT} --show-status=false",
    ]
    return "\n".join(lines) + "\n"


def _virtme_ng_init() -> bool:
    """The ``vng`` guest boots virtme-ng's own init, which runs _vng_init's script, unless GREUPD_LAB_VNG_INIT=own:
    then vng-systemd's init with the command instead of systemd (a third less CPU per boot). Not the default: under
    it IKE comes up but GRE never flows through ESP in tests/test_ipsec_fail_closed.py's qemu test (2 of 2 runs on
    89ac290, quiet; passes under virtme-ng-init), cause not found yet."""
    return os.environ.get("GREUPD_LAB_VNG_INIT", "virtme") != "own"


def _vng_init(rundir: Path, disk: PythonDisk | None = None) -> str:
    """What vng --exec runs under virtme-ng-init (GREUPD_LAB_VNG_INIT=virtme), which has mounted /proc, /sys,
    /tmp; load modules, go."""
    r = shlex.quote(str(rundir))
    setup = disk.guest_lines(MODULES, rundir) if disk else [f"modprobe -a -q {' '.join(MODULES)} 2>/dev/null"]
    return (
        "#!/bin/sh\n"
        f"export PATH={DEFAULT_PATH}\n"
        'stamp() { read -r up _ </proc/uptime; echo "lab-init: $1 at $up s" >/dev/kmsg; }\n'
        "stamp start\n"
        + "".join(f"{line}\n" for line in setup)
        + "ip link set lo up\n"
        "mountpoint -q /sys/fs/cgroup || mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null\n"
        f"echo booted > {r}/booted\n"
        "stamp booted\n"
        f"sh {r}/cmd.sh\n"
    )


# --------------------------------------------------------------------------- running


# The 9p tag virtme-ng gives the first --rwdir (virtme_initmount0), mounted by our own init in vng-systemd.
VNG_RUNDIR_TAG = "virtme.initmount0"


def _vng_systemd_cmdline(rundir: Path) -> str:
    """The kernel command line of vng-systemd: virtme-ng's, with our init instead of virtme-ng-init.

    virtme-ng has no option for another init (its --systemd boots the host's own units on a read-only
    root), so a second -append, after virtme-ng's in qemu's argv (the last one counts), replaces its
    command line; virtme-ng's initramfs still mounts the host's root (9p) and runs init= from it.
    """
    return " ".join([
        "console=ttyS0", "earlyprintk=serial,ttyS0,115200", "panic=-1", "loglevel=6",
        f"module_blacklist={','.join(VNG_BLACKLIST)}",
        f"init={rundir}/init",
    ])


def _guest_argv(kind: GuestKind, rundir: Path, disk: PythonDisk | None = None) -> list[str]:
    if kind in ("uml", "uml-systemd"):
        return [
            uml_kernel(),
            "mem=1G",
            "root=/dev/root",
            "rootfstype=hostfs",
            "rootflags=/",
            "rw",
            f"init={rundir}/init",
            "con=null",
            "con0=fd:0,fd:1",
            f"uml_dir={rundir}",  # UML's mconsole socket dir; left in the run dir if the guest is killed
        ]
    # "=": the value starts with "-". virtme-ng hands it to a shell, which splits it (hence the quoting).
    opts = [disk.qemu_opts()] if disk else []
    if kind == "vng-systemd" or not _virtme_ng_init():
        opts.append(f"-append {shlex.quote(_vng_systemd_cmdline(rundir))}")
    qemu_opts = [f"--qemu-opts={' '.join(opts)}"] if opts else []
    return [
        # Niced: the vng batch runs beside the UML ones (lab/pytest_plugin.py), whose keepalive and
        # failover tests time detection to a few hundred ms; qemu's emulation is what can wait.
        *("nice", "-n", "10"),
        str(vng_binary()),
        "--run",
        str(vng_kernel()),
        "--disable-kvm",
        "--memory",
        os.environ.get("GREUPD_LAB_VNG_MEMORY", "2G"),
        "--rwdir",
        str(rundir),
        "--verbose",  # the kernel log on stdout: the console log, for when the guest does not boot
        # virtme-ng-init's udev coldplug loads drivers for qemu's q35 board that no test needs; under
        # emulation kvm_amd alone takes ~10 s. The kernel refuses these, so the coldplug ends sooner.
        "--append",
        f"module_blacklist={','.join(VNG_BLACKLIST)}",
        *qemu_opts,
        "--exec",
        f"sh {rundir}/init",
    ]


def _host_env(kind: GuestKind) -> dict[str, str]:
    env = dict(os.environ)
    if kind in ("vng", "vng-systemd"):  # vng runs virtme-run and friends by name: they sit beside it (in the venv)
        env["PATH"] = f"{Path(str(vng_binary())).parent}:{env.get('PATH', DEFAULT_PATH)}"
    return env


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run(
    kind: GuestKind,
    argv: Sequence[str],
    *,
    cwd: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    stream: TextIO | None = None,
    keep: bool | None = None,
    collect: Sequence[str] = (),
    cancel: threading.Event | None = None,
    root: Path | None = None,
) -> GuestResult:
    """Boot a guest of this kind, run argv in it (in cwd, default: the current dir), power off.

    ``stream``: a file to copy the command's output to as it arrives. ``keep``: leave the run dir
    (default: keep it only when something failed, or GREUPD_LAB_KEEP=1). The command finds the
    run dir (the one place every guest kind can write to the host) in $GREUPD_LAB_RUNDIR; the
    files named in ``collect`` are read from it into ``result.files``. ``cancel``: set it (from
    another thread) to kill the guest. ``root`` (uml-systemd only): boot systemd from that root file system
    (lab/distro_root.py) instead of the host's.
    """
    start = time.monotonic()
    why = unavailable(kind)
    if why:
        return GuestResult(kind, None, "", "", 0.0, booted=False, error=f"guest unavailable: {why}")
    if timeout is None:
        timeout = float(os.environ.get("GREUPD_LAB_TIMEOUT") or DEFAULT_TIMEOUT[kind])
    lab_dir().mkdir(parents=True, exist_ok=True)
    rundir = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=lab_dir()))
    rundir.chmod(0o755)
    env = guest_env(kind, {**(env or {}), "GREUPD_LAB_RUNDIR": str(rundir)})
    workdir = Path(cwd or os.getcwd()).resolve()
    (rundir / "cmd.sh").write_text(_command_script(rundir, argv, workdir, env))
    # What the guest must see of the host's /tmp: the run dir, the command's folder, this checkout,
    # the Python running it (a venv) and HOME (.ci/run makes a fresh one), when they live there.
    kept = folders_under_tmp([rundir, workdir, REPO, sys.prefix, sys.base_prefix, env["HOME"]])
    disk = None
    if kind == "vng":
        disk = vng_python_disk()
        init = _vng_init(rundir, disk) if _virtme_ng_init() else _vng_systemd_init(rundir, disk, kept, systemd=False)
    elif kind == "vng-systemd":
        disk = vng_python_disk(kind)
        init = _vng_systemd_init(rundir, disk, kept)
    else:
        if root is not None and kind != "uml-systemd":
            raise ValueError(f"root= is for uml-systemd guests, not {kind}")
        init = _uml_init(kind, rundir, kept, root)
        (rundir / "modprobe").write_text(_modprobe_wrapper(rundir, f"{rundir}/mods"))
        (rundir / "modprobe").chmod(0o755)
    (rundir / "init").write_text(init)
    (rundir / "init").chmod(0o755)

    timed_out = cancelled = False
    with open(rundir / "console.log", "wb") as console:
        # Own session, so a timeout can kill the guest and every helper process it forked.
        proc = subprocess.Popen(
            _guest_argv(kind, rundir, disk),
            stdin=subprocess.DEVNULL,
            stdout=console,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=rundir,
            env=_host_env(kind),
        )
        shown = 0
        cpu = None
        try:
            while proc.returncode is None:
                pid, wstatus, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    proc.returncode = os.waitstatus_to_exitcode(wstatus)
                    cpu = usage.ru_utime + usage.ru_stime
                    break
                if time.monotonic() - start > timeout:
                    timed_out = True
                    _kill_group(proc)
                    break
                if cancel is not None and cancel.is_set():
                    cancelled = True
                    _kill_group(proc)
                    break
                time.sleep(0.1)
                if stream:
                    shown = _copy_new(rundir / "output", shown, stream)
        except BaseException:
            _kill_group(proc)
            raise
        if stream:
            _copy_new(rundir / "output", shown, stream)
        # vng/qemu may leave helpers (virtiofsd) behind in the group; UML its ptraced children.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    seconds = time.monotonic() - start
    status_text = _read(rundir / "status").strip()
    status = int(status_text) if status_text.lstrip("-").isdigit() else None
    booted = (rundir / "booted").exists()
    error = None
    if timed_out:
        error = f"timed out after {timeout:.0f} s"
    elif cancelled:
        error = "cancelled: pytest stopped before the guest was done"
    elif not booted:
        error = f"guest did not boot (exit status {proc.returncode})"
    elif status is None:
        error = f"guest stopped before the command finished (exit status {proc.returncode})"
    result = GuestResult(
        kind,
        status,
        _read(rundir / "output"),
        _read(rundir / "console.log"),
        seconds,
        booted,
        timed_out,
        error,
        rundir,
        {name: _read(rundir / name) for name in collect if (rundir / name).exists()},
        cpu,
    )
    if keep is None:
        keep = os.environ.get("GREUPD_LAB_KEEP") == "1" or error is not None
    if not keep:
        shutil.rmtree(rundir, ignore_errors=True)
    return result


def _copy_new(path: Path, offset: int, stream: TextIO) -> int:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return offset
    if data:
        stream.write(data.decode(errors="replace"))
        stream.flush()
    return offset + len(data)
