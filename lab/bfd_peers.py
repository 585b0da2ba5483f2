"""BFD speakers from Debian as a lab host's peer: FRR's bfdd (with zebra) and BIRD 2, one per host.

Each runs in the host's netns with every path of its own under a scratch directory (config, pid files, the vty
and control sockets), so no private /run is needed and two hosts can run one each. FRR 8.4's staticd has no
BFD-gated routes (`ip route ... bfd` came in 8.5); BIRD's `protocol static` has them (kernel-lab.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from lab.hosts import Host

FRR = Path("/usr/lib/frr")


def _scratch(prefix: str) -> Path:
    # The guest's own /tmp (a tmpfs in UML): the daemons' sockets and a chown to frr work there.
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    directory.chmod(0o755)
    return directory


def frr_available() -> bool:
    return (FRR / "bfdd").exists() and shutil.which("vtysh") is not None


def bird_available() -> bool:
    return shutil.which("bird") is not None and shutil.which("birdc") is not None


class FrrBfd:
    """zebra + bfdd in `host`, with one configured single-hop peer on `interface`."""

    def __init__(self, host: Host, peer: str, local: str, interface: str, interval_ms: int = 300,
                 multiplier: int = 3) -> None:
        self.host = host
        self.dir = _scratch(f"frr-{host.name}-")
        shutil.chown(self.dir, "frr", "frr")
        self.peer = peer
        self.config = self.dir / "frr.conf"
        self.write_config(peer, local, interface, interval_ms, multiplier)

    def write_config(self, peer: str, local: str, interface: str, interval_ms: int, multiplier: int) -> None:
        self.config.write_text(
            "frr defaults traditional\n"
            f"log file {self.dir}/frr.log debugging\n"
            "debug bfd peer\n"
            "bfd\n"
            f" peer {peer} local-address {local} interface {interface}\n"
            f"  receive-interval {interval_ms}\n  transmit-interval {interval_ms}\n"
            f"  detect-multiplier {multiplier}\n"
            " !\n!\n")
        self.config.chmod(0o644)

    def _common(self, daemon: str) -> list[str]:
        return [str(FRR / daemon), "-d", "-u", "frr", "-g", "frr", "-f", str(self.config),
                "-i", str(self.dir / f"{daemon}.pid"), "-z", str(self.dir / "zserv.api"), "--vty_socket", str(self.dir)]

    def start(self) -> FrrBfd:
        self.host.run(*self._common("zebra"))
        self.start_bfdd()
        return self

    def start_bfdd(self) -> None:
        self.host.run(*self._common("bfdd"), "--bfdctl", str(self.dir / "bfdd.sock"))

    def _pid(self, daemon: str) -> int | None:
        try:
            return int((self.dir / f"{daemon}.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def stop_bfdd(self, sig: signal.Signals = signal.SIGKILL) -> None:
        pid = self._pid("bfdd")
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            (self.dir / "bfdd.pid").unlink(missing_ok=True)

    def vtysh(self, *commands: str) -> str:
        argv = ["vtysh", "--vty_socket", str(self.dir)]
        for command in commands:
            argv += ["-c", command]
        return self.host.run(*argv, check=False).stdout

    def session(self) -> dict[str, Any] | None:
        """bfdd's view of the peer (`show bfd peers json`), None while bfdd does not answer."""
        try:
            peers = json.loads(self.vtysh("show bfd peers json") or "[]")
        except json.JSONDecodeError:
            return None
        return next((p for p in peers if p.get("peer") == self.peer), None)

    def close(self) -> None:
        for daemon in ("bfdd", "zebra"):
            pid = self._pid(daemon)
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


class BirdBfd:
    """BIRD 2 in `host`: a BFD session to `peer` and a static route gated on it (`route P via GW bfd`)."""

    def __init__(self, host: Host, peer: str, local: str, interface: str, route: str, interval_ms: int = 300,
                 multiplier: int = 3, key: str | None = None) -> None:
        self.host = host
        self.dir = _scratch(f"bird-{host.name}-")
        self.socket = self.dir / "bird.ctl"
        self.config = self.dir / "bird.conf"
        auth = (f'    authentication meticulous keyed sha1;\n    password "{key}" {{ id 1; }};\n' if key else "")
        self.config.write_text(
            "router id 192.0.2.254;\n"
            "protocol device { }\n"
            "protocol kernel { ipv4 { export all; }; }\n"
            "protocol bfd {\n"
            f'  interface "{interface}" {{\n    interval {interval_ms} ms;\n    multiplier {multiplier};\n{auth}  }};\n'
            f"  neighbor {peer} dev \"{interface}\" local {local};\n"
            "}\n"
            "protocol static {\n  ipv4;\n"
            f"  route {route} via {peer} bfd;\n"
            "}\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> BirdBfd:
        log = (self.dir / "bird.log").open("ab")
        self.proc = self.host.popen("bird", "-f", "-c", str(self.config), "-s", str(self.socket), "-P",
                                    str(self.dir / "bird.pid"), stdout=log, stderr=subprocess.STDOUT)
        return self

    def birdc(self, *command: str) -> str:
        return self.host.run("birdc", "-s", str(self.socket), *command, check=False).stdout

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    close = stop
