"""The kernel forwarder: its chain elements and :mod:`nsm.forwarder.netlink`, the only module of
the product that talks to the kernel (and the only one that imports pyroute2)."""
