"""The kernel side of the reconciler, over netlink.

- `nlmsg`: netlink framing (header, attributes, socket options), shared with the nftables watcher.
- `rtnl`: the rtnetlink codec: model values to requests and kernel messages back to model values (one table
  of GRE attributes walked both ways), and the pipelined request socket.
- `kernel`: `Kernel` (observe, apply) and `KernelWatch` (notifications -> names of tunnels to look at again).
"""
