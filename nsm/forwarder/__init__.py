"""The kernel forwarder: its chain elements and :mod:`nsm.forwarder.netlink`, the only module of
the product that talks to the kernel's rtnetlink (and the only one allowed to import pyroute2)."""
