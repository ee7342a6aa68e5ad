"""The kernel forwarder: its chain elements. It programs the kernel through :mod:`nsm.kernel`
(:mod:`nsm.kernel.netlink` is the only module of the product that talks rtnetlink, and the only
one allowed to import pyroute2)."""
