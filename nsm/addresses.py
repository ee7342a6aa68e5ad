"""IP addresses and prefixes that arrive on the wire (IP contexts, mechanism parameters): one
rule per kind, checked in one place, so a malformed one is INVALID_ARGUMENT naming the field
wherever it is met, never a ``ValueError`` from :mod:`ipaddress` deep in a datapath."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import TypeVar

from nsm.api.connectioncontext_pb2 import IPContext
from nsm.errors import InvalidArgument

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
T = TypeVar("T")


def _present(text: object, what: str) -> None:
    if not isinstance(text, str):
        raise InvalidArgument(f"{what} must be a string")
    if not text:
        raise InvalidArgument(f"{what} is empty")
    if "%" in text:  # an IPv6 zone names an interface of the sender's: meaningless here
        raise InvalidArgument(f"{what} {text[:60]!r} has a zone (%...)")


def _parse(parse: Callable[[str], T], text: str, what: str, kind: str) -> T:
    _present(text, what)
    try:
        return parse(text)
    except ValueError:
        raise InvalidArgument(f"{what} {text[:60]!r} is not {kind}") from None


def check_ip(text: str, what: str) -> IPAddress:
    """An address without prefix (``10.0.0.1``, ``fd00::1``)."""
    return _parse(ipaddress.ip_address, text, what, "an IP address")


def check_interface(text: str, what: str) -> IPInterface:
    """An address with an optional prefix length (``10.0.0.1/32``; ``10.0.0.1`` means /32)."""
    return _parse(ipaddress.ip_interface, text, what, "an IP address with prefix")


def check_prefix(text: str, what: str) -> IPNetwork:
    """A prefix (``10.0.0.0/8``); host bits are ignored, as the kernel does."""
    return _parse(lambda t: ipaddress.ip_network(t, strict=False), text, what, "an IP prefix")


def check_ip_context(ip: IPContext) -> None:
    """Every address and prefix of an IP context that a hop parses: the two ends' addresses,
    their routes (prefix and optional next hop) and the excluded prefixes."""
    for field in ("src_ip_addrs", "dst_ip_addrs"):
        for text in getattr(ip, field):
            check_interface(text, f"ip_context.{field} entry")
    for field in ("src_routes", "dst_routes"):
        for route in getattr(ip, field):
            check_prefix(route.prefix, f"ip_context.{field} prefix")
            if route.nextHop:
                check_ip(route.nextHop, f"ip_context.{field} nextHop")
    for text in ip.excluded_prefixes:
        check_prefix(text, "ip_context.excluded_prefixes entry")
