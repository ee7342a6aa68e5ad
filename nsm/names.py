"""Names of things in the mesh (services, endpoints, forwarders, nodes, connection ids): one
rule, checked in one place, so a name refused at the CLI is refused the same way on the wire."""

from __future__ import annotations

import re

from nsm.errors import InvalidArgument

#: Longest name (a DNS name's limit; the registry and every hop accept no longer).
MAX_NAME = 253
_PRINTABLE = re.compile(r"^[\x21-\x7e]+$")


def check_name(value: str, what: str, *, required: bool = True, max_len: int = MAX_NAME) -> str:
    """``value`` when it is a valid name: printable ASCII without spaces, at most ``max_len``
    characters; empty only when not ``required``. Raises InvalidArgument naming ``what``."""
    if not isinstance(value, str):
        raise InvalidArgument(f"{what} must be a string")
    if not value:
        if required:
            raise InvalidArgument(f"{what} is empty")
        return value
    if len(value) > max_len:
        raise InvalidArgument(f"{what} is {len(value)} characters; at most {max_len} are allowed")
    if not _PRINTABLE.match(value):
        raise InvalidArgument(f"{what} {value[:40]!r} has spaces or control characters")
    return value
