"""GRE keepalives (Cisco's on gre, MikroTik's GRE6 on ip6gre): probes out, replies in, an up/down verdict per tunnel.

- `codec`: the probe and reply packets (shapes built by scapy, stored as bytes), and the socket filter that
  keeps tunnel traffic out.
- `gre6`: the same for ip6gre, in MikroTik's GRE6 format; `gre6_socket`: its IPv6 sockets.
- `answering`: what a peer's probe gets back, also from peers that address it their own way (pure).
- `liveness`: the state machine per tunnel (`Liveness`), pure: time and events in, transitions out.
- `engine`: `KeepaliveEngine`, the raw sockets and its one timer on the asyncio loop.
- `batch`: sendmmsg/recvmmsg through ctypes, a tick's probes in one system call.
- `bpf`: the classic BPF programs of the GRE sockets (configured addresses, issued tokens, shapes), pure.
- `gre_socket`: those sockets opened, their programs attached as tunnels and tokens change, their drops read.
- `underlay`: the device and fwmark a tunnel's link sends by (its `dev`, VRF, `fwmark`), pure.
- `__main__`: `python -m greupd.keepalive`, the engine alone.
"""

from greupd.keepalive.engine import KeepaliveEngine, KeepaliveTarget, LivenessChange, targets_from_config

__all__ = ["KeepaliveEngine", "KeepaliveTarget", "LivenessChange", "targets_from_config"]
