"""strongSwan's charon in a lab host: one IKE daemon per router namespace (kernel-lab.md, last section).

charon's pid file path (/var/run/charon.pid) is compiled in, so each one runs in a private mount namespace
with its own /run; its strongswan.conf and VICI socket live in a scratch folder on the host file system, where
greupd (in the same netns, but the host's mount namespace) and the test reach them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from lab.hosts import Host

CHARON = "/usr/lib/ipsec/charon"
SWANCTL = "swanctl"
# The plugins the lab's connections use, and no others (strongswan.conf's `charon.load`, load_modular off): IKEv2
# with a PSK or an X.509 certificate (greupd's load-key/load-cert), AES-GCM, SHA-2 and ECP/x25519/MODP groups
# (openssl), XFRM (kernel-netlink), UDP 500/4500 and VICI. Debian's modular default loads 39: each one a library
# loaded and initialised, which in the qemu guest (emulated CPU, libraries over 9p) is most of charon's start-up.
PLUGINS = ("random nonce openssl kdf pem pkcs1 pkcs8 x509 pubkey revocation constraints "
           "kernel-netlink socket-default vici")


def gre_transport_conf(name: str, local: str, remote: str, psk: str, start_action: str = "trap") -> str:
    """An operator's hand-written swanctl.conf: GRE in ESP transport mode between two routers, with the
    proposals greupd offers by default (so either end may be greupd's)."""
    return f"""connections {{
  {name} {{
    version = 2
    local_addrs = {local}
    remote_addrs = {remote}
    local {{ auth = psk }}
    remote {{ auth = psk }}
    children {{
      gre {{
        mode = transport
        local_ts = dynamic[gre]
        remote_ts = dynamic[gre]
        esp_proposals = aes256gcm16-ecp384
        start_action = {start_action}
      }}
    }}
    proposals = aes256gcm16-prfsha384-ecp384
  }}
}}
secrets {{
  ike-{name} {{ secret = "{psk}" }}
}}
"""


def available() -> str | None:
    """Why charon cannot run here, or None."""
    if not os.access(CHARON, os.X_OK):
        return f"{CHARON} is missing (apt install strongswan-charon charon-systemd strongswan-swanctl)"
    return None


class Charon:
    """One charon in one host, with its own strongswan.conf, VICI socket and log under a scratch folder."""

    def __init__(self, host: Host) -> None:
        from lab.greupd_process import _scratch

        self.host = host
        self.dir = Path(tempfile.mkdtemp(prefix=f"charon-{host.name}-", dir=_scratch()))
        self.socket = self.dir / "charon.vici"
        self.log = self.dir / "charon.log"
        self.conf = self.dir / "strongswan.conf"
        # strongswan.conf wants newlines between settings, not `;`.
        self.conf.write_text(
            "charon {\n"
            f"  load = {PLUGINS}\n"  # instead of load_modular and /etc/strongswan.d's 40 snippets
            "  install_routes = no\n"  # transport mode: nothing to route, and no table 220 in the lab
            "  retransmit_tries = 2\n"
            "  retransmit_timeout = 1.0\n"
            "  retransmit_base = 1.4\n"
            "  plugins {\n"
            f"    vici {{\n      socket = unix://{self.socket}\n    }}\n"
            "  }\n"
            "  filelog {\n"
            f"    lab {{\n      path = {self.log}\n      default = 1\n      time_format = %T\n"
            "      flush_line = yes\n    }\n"
            "  }\n"
            "}\n"
            f"swanctl {{\n  socket = unix://{self.socket}\n}}\n")
        self.proc: subprocess.Popen[Any] | None = None

    @property
    def uri(self) -> str:
        return f"unix://{self.socket}"

    def start(self, timeout: float = 30) -> Charon:
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        env = {**os.environ, "STRONGSWAN_CONF": str(self.conf)}
        out = (self.dir / "charon.out").open("ab")
        self.proc = self.host.popen(
            "unshare", "-m", "sh", "-c", f"mount -t tmpfs none /run && exec {CHARON}",
            env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"charon in {self.host.name} exited with {self.proc.returncode}:\n"
                                     f"{self.output()}")
            if self.socket.exists() and self.answers():
                return self
            time.sleep(0.1)
        raise AssertionError(f"charon in {self.host.name}: no VICI socket after {timeout}s:\n{self.output()}")

    def answers(self) -> bool:
        """Whether charon answers a VICI `version` request, asked from this process: polling with `swanctl --stats`
        cost an exec each time, seconds apiece in the qemu guest while charon itself was starting there."""
        request = bytes([0, len(b"version")]) + b"version"  # CMD_REQUEST, the command's name
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(10)
                conn.connect(str(self.socket))
                conn.sendall(struct.pack("!I", len(request)) + request)
                header = conn.recv(4)
                reply = conn.recv(struct.unpack("!I", header)[0]) if len(header) == 4 else b""
        except (OSError, struct.error):
            return False
        return reply[:1] == b"\x01"  # CMD_RESPONSE

    def stop(self) -> None:
        """SIGTERM, as `systemctl stop strongswan` does: charon takes its SAs and policies out of the kernel."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(30)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL, as a crash would: no IKE delete is sent, the peer has to find out by itself."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def swanctl(self, *argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        # The sub-command comes first: `swanctl --load-all --uri ...` (kernel-lab.md).
        return self.host.run(SWANCTL, *argv, "--uri", self.uri, check=check, timeout=timeout)

    def load(self, swanctl_conf: str) -> None:
        """Load a hand-written swanctl.conf (connections and secrets), as an operator would."""
        path = self.dir / "swanctl.conf"
        path.write_text(swanctl_conf)
        self.swanctl("--load-all", "--file", str(path))

    def output(self) -> str:
        parts = [p.read_text(errors="replace") for p in (self.dir / "charon.out", self.log) if p.exists()]
        return "\n".join(parts)[-6000:]
