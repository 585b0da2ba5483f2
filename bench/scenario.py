"""The benchmark's tunnels, written out three ways: greupd's TOML, an `ip -batch` file, systemd-networkd units.

Tunnel i (0-based): GRE from LOCAL to REMOTE with key i+1 (so a thousand tunnels share one underlay pair and
one reflecting peer), inner address 100.64.x.y peer 100.64.x.y+1 (/30 blocks), and two /24 routes in 10/8.
All pure: the lab driver writes these strings to files.
"""

from __future__ import annotations

from dataclasses import dataclass

LOCAL = "172.19.1.1"
REMOTE = "172.19.1.2"
UNDERLAY_PREFIX = 24


@dataclass(frozen=True)
class Tunnel:
    index: int

    @property
    def name(self) -> str:
        return f"t{self.index}"

    @property
    def key(self) -> int:
        return self.index + 1

    def _inner(self, host: int) -> str:
        block = self.index * 4
        return f"100.{64 + (block >> 16)}.{(block >> 8) & 255}.{(block & 255) + host}"

    @property
    def address(self) -> str:
        return self._inner(1)

    @property
    def peer(self) -> str:
        return self._inner(2)

    @property
    def routes(self) -> tuple[str, str]:
        first, second = 2 * self.index, 2 * self.index + 1
        return (f"10.{first >> 8}.{first & 255}.0/24", f"10.{second >> 8}.{second & 255}.0/24")


def tunnels(count: int) -> list[Tunnel]:
    if count > 16000:
        raise ValueError("at most 16000 tunnels: the route plan runs out of 10/8")
    return [Tunnel(i) for i in range(count)]


def greupd_toml(count: int, *, ttl: int = 64, ttl_of: dict[int, int] | None = None,
                keepalive: tuple[float, int, int] | None = None, mirror: bool = False) -> str:
    """The config greupd runs with; `keepalive` = (interval, retries, up_after), answered by the peer's kernel.

    `mirror`: the far end's config instead (local and remote swapped), answering keepalives itself.
    """
    local, remote = (REMOTE, LOCAL) if mirror else (LOCAL, REMOTE)
    lines = ["[daemon]", "ip_forward = false", ""]
    if keepalive is not None:
        interval, retries, up_after = keepalive
        lines += ["[defaults.keepalive]", f"interval = {interval}", f"retries = {retries}",
                  f"up_after = {up_after}", f'answer = "{"daemon" if mirror else "off"}"', ""]
    for t in tunnels(count):
        routes = ", ".join(f'"{r}"' for r in t.routes)
        lines += ["[[tunnel]]", f'name = "{t.name}"', f'local = "{local}"', f'remote = "{remote}"', f"key = {t.key}",
                  f"ttl = {(ttl_of or {}).get(t.index, ttl)}", f'address = "{t.address}"', f'peer = "{t.peer}"',
                  f"routes = [{routes}]", ""]
    return "\n".join(lines)


def ip_batch(count: int, ttl: int = 64) -> str:
    """What a shell script would run: the same links, addresses and routes, one `ip -batch` process."""
    lines = []
    for t in tunnels(count):
        lines += [f"link add {t.name} type gre local {LOCAL} remote {REMOTE} key {t.key} ttl {ttl}",
                  f"link set {t.name} up",
                  f"addr add {t.address} peer {t.peer} dev {t.name}",
                  *(f"route add {r} dev {t.name}" for r in t.routes)]
    return "\n".join(lines) + "\n"


def peer_batch(count: int) -> str:
    """The far end (REMOTE) as a plain kernel: the mirror tunnels, up, nothing else (it reflects keepalives
    once ip_forward, accept_local and rp_filter are set, see kernel-lab.md)."""
    lines = []
    for t in tunnels(count):
        lines += [f"link add {t.name} type gre local {REMOTE} remote {LOCAL} key {t.key}", f"link set {t.name} up"]
    return "\n".join(lines) + "\n"


def networkd_files(count: int, ttl: int = 64) -> dict[str, str]:
    """/etc/systemd/network/*: a .netdev and a .network per tunnel, as close to greupd's config as networkd goes."""
    files: dict[str, str] = {}
    for t in tunnels(count):
        files[f"50-{t.name}.netdev"] = (
            f"[NetDev]\nName={t.name}\nKind=gre\n\n"
            f"[Tunnel]\nIndependent=yes\nLocal={LOCAL}\nRemote={REMOTE}\nKey={t.key}\nTTL={ttl}\n")
        routes = "".join(f"\n[Route]\nDestination={r}\n" for r in t.routes)
        files[f"50-{t.name}.network"] = (
            f"[Match]\nName={t.name}\n\n"
            "[Network]\nLinkLocalAddressing=no\nIPv6AcceptRA=no\nConfigureWithoutCarrier=yes\n\n"
            f"[Address]\nAddress={t.address}/32\nPeer={t.peer}/32\n{routes}")
    return files
