"""kernel: the endpoint's side of the KERNEL/LOCAL mechanism.

The endpoint programs nothing itself: the forwarder creates the veth pair and moves one end into
the endpoint's network namespace. This element only answers *where* that end goes: it selects the
first KERNEL/LOCAL preference and returns it with

- ``name``: the interface name in the endpoint's namespace: the one the request asks for when
  valid (in the preference, or on a refresh in the connection's current mechanism), else ``nsm``
  + 12 hex digits of sha256(connection id) (15 characters, so a refresh yields the same name and
  no state is needed to find it again);
- ``inodeURL``: ``file://<the endpoint's netns path>`` when it was given one; for its own
  namespace ``inode://<dev>/<ino>`` (:func:`nsm.mechanisms.inode_url`): its PIDs mean nothing to
  the forwarder when it runs in a pod without hostPID, so the forwarder finds the namespace by
  its identity (:class:`nsm.kernel.netns.NetnsFinder`).

It also sets the payload to ``IP`` when the request leaves it empty.
"""

from __future__ import annotations

import hashlib

from nsm.api.connection_pb2 import Connection, Mechanism
from nsm.api.networkservice_pb2 import NetworkServiceRequest
from nsm.chain import Ctx, Element, NextClose, NextRequest
from nsm.errors import InvalidArgument, Unsupported
from nsm.kernel.netns import netns_id
from nsm.mechanisms import (
    KERNEL,
    LOCAL,
    NAME,
    NETNS_INODE_URL,
    PAYLOAD_IP,
    inode_url,
    netns_path,
    netns_url,
    validate_ifname,
)

IFNAME_PREFIX = "nsm"


def ifname_for(conn_id: str, prefix: str = IFNAME_PREFIX) -> str:
    """A deterministic interface name (at most 15 characters) for a connection id."""
    digest = hashlib.sha256(conn_id.encode()).hexdigest()
    return validate_ifname(prefix + digest[: 15 - len(prefix)])


def describe(m: Mechanism) -> str:
    return f"{m.cls}/{m.type}"


def _valid_name(name: str) -> bool:
    try:
        validate_ifname(name)
    except InvalidArgument:
        return False
    return True


class KernelServer(Element):
    """Selects KERNEL/LOCAL and fills in the endpoint's interface name and namespace."""

    def __init__(self, netns: str, *, own: bool = False) -> None:
        self.netns_path = netns_path(netns)
        self.netns_url = (inode_url(netns_id(self.netns_path)) if own
                          else netns_url(self.netns_path))

    async def request(self, ctx: Ctx, request: NetworkServiceRequest, next: NextRequest) -> Connection:
        conn = request.connection
        offered = list(request.mechanism_preferences)
        if not offered and conn.HasField("mechanism"):
            offered = [conn.mechanism]  # a refresh that only repeats the selected mechanism
        chosen = next_kernel(offered)
        if chosen is None:
            what = ", ".join(describe(m) for m in offered) or "nothing"
            raise Unsupported(
                f"no supported mechanism: the request offers {what}; this endpoint supports {LOCAL}/{KERNEL}")
        asked = chosen.parameters.get(NAME, "")
        if not asked and conn.HasField("mechanism") and next_kernel([conn.mechanism]) is not None:
            asked = conn.mechanism.parameters.get(NAME, "")  # a refresh keeps the name it was given
        mechanism = Mechanism(cls=LOCAL, type=KERNEL)
        for key, value in chosen.parameters.items():
            mechanism.parameters[key] = value
        mechanism.parameters[NAME] = asked if asked and _valid_name(asked) else ifname_for(conn.id)
        mechanism.parameters[NETNS_INODE_URL] = self.netns_url
        conn.mechanism.CopyFrom(mechanism)
        if not conn.payload:
            conn.payload = PAYLOAD_IP
        return await next(ctx, request)

    async def close(self, ctx: Ctx, conn: Connection, next: NextClose) -> None:
        await next(ctx, conn)


def next_kernel(offered: list[Mechanism]) -> Mechanism | None:
    for m in offered:
        if m.cls == LOCAL and m.type == KERNEL:
            return m
    return None
