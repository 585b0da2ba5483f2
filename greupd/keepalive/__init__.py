"""Cisco-compatible GRE keepalives: probes out, replies in, an up/down verdict per tunnel.

- `codec`: the probe and reply packets (shapes built by scapy, stored as bytes), and the socket filter that
  keeps tunnel traffic out.
- `liveness`: the state machine per tunnel (`Liveness`), pure: time and events in, transitions out.
- `engine`: `KeepaliveEngine`, the raw sockets and its one timer on the asyncio loop.
- `batch`: sendmmsg/recvmmsg through ctypes, a tick's probes in one system call.
- `bpf`: the classic BPF program of the GRE socket (configured addresses, keepalive shapes), pure.
- `gre_socket`: that socket opened, its program attached as the tunnels change, its drops read.
- `__main__`: `python -m greupd.keepalive`, the engine alone.
"""

from greupd.keepalive.engine import KeepaliveEngine, KeepaliveTarget, LivenessChange, targets_from_config

__all__ = ["KeepaliveEngine", "KeepaliveTarget", "LivenessChange", "targets_from_config"]
