"""Netlink for the forwarder: the only part of the product that imports pyroute2.

Three layers, each a module:

- :mod:`~nsm.kernel.netlink.sockets`: one netlink socket per network namespace, opened after
  ``setns()`` without forking, checked, pruned when its namespace is gone or idle; the
  send / batch / one / dump primitives and the name → index ioctl.
- :mod:`~nsm.kernel.netlink.messages`: building the messages (links, veths, VXLAN, addresses,
  routes, rules, neighbours), reading the answers (:class:`LinkInfo`, :class:`RouteInfo`,
  :class:`RuleInfo`) and mapping the kernel's errors to domain errors. No I/O.
- :mod:`~nsm.kernel.netlink.operations`: :class:`Netlink`, the operations (create a veth or a
  VXLAN device, set an interface up in one datagram, wait until it is ready, routes, rules, FDB,
  neighbours, sysctls).

``from nsm.kernel.netlink import Netlink, LinkInfo, ...`` is the interface for everyone else.
"""

from __future__ import annotations

from nsm.kernel.netlink.messages import MAIN_TABLE, LinkInfo, Route, RouteInfo, RuleInfo
from nsm.kernel.netlink.operations import Netlink

__all__ = ["MAIN_TABLE", "LinkInfo", "Netlink", "Route", "RouteInfo", "RuleInfo"]
