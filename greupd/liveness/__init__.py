"""Liveness detectors beside the Cisco keepalive (greupd/keepalive/): BFD, dampening, and one verdict.

One module per wire format (bfd_codec), one pure state machine per protocol (bfd_session, dampening), the
combiner (verdict), and one engine that owns the sockets and timers (bfd_engine); the daemon sees them through
liveness/room.py only.
"""
