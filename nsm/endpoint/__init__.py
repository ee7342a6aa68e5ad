"""The network service endpoint: :class:`~nsm.endpoint.endpoint.Endpoint`, its elements
(:mod:`~nsm.endpoint.kernel`, :mod:`~nsm.endpoint.ipam`) and ``nsm nse``."""

from __future__ import annotations

from nsm.endpoint.endpoint import Endpoint
from nsm.endpoint.ipam import PointToPointIPAM, parse_cidr
from nsm.endpoint.kernel import KernelServer, ifname_for

__all__ = ["Endpoint", "KernelServer", "PointToPointIPAM", "ifname_for", "parse_cidr"]
