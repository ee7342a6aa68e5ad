"""The forwarder's next hop and mechanism selection.

The next hop is never taken from the caller: the connection names the endpoint the manager
chose (``network_service_endpoint_name``) and the forwarder resolves that name itself through
its registry (its own manager's registry proxy, which answers this node's endpoints with their
real URLs). The record says where the endpoint is: its ``nodeName`` label is this forwarder's
node → the endpoint itself is the next hop, reached by a KERNEL link, whatever its URL's scheme;
another node → that node's manager (the URL the endpoint is registered under), reached by VXLAN.
A Request that carries a next-hop header is refused.

Upstream (toward the client's side) it takes the first offered mechanism it supports. The
(upstream, downstream) pair then selects the one datapath element that builds the link
(:data:`PAIR`): each datapath element acts only on its own pair. The connection returned upward
carries the upstream mechanism; the downstream one is remembered for refresh and Close.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass

from nsm.api.connection_pb2 import Connection, Mechanism
from nsm.api.networkservice_pb2 import NetworkServiceRequest
from nsm.chain import Ctx, Element, Key, NextClose, NextRequest
from nsm.elements.connect import NEXT_URL
from nsm.errors import InvalidArgument, NsmError, PermissionDenied, Unsupported
from nsm.wellknown import NEXT_HOP_HEADER

#: The mechanism chosen toward the previous hop.
UPSTREAM: Key[Mechanism] = Key("mechanism.upstream")
#: The mechanism the next hop answered with.
DOWNSTREAM: Key[Mechanism] = Key("mechanism.downstream")
#: (upstream mechanism type, downstream mechanism type): which datapath element builds the link.
PAIR: Key[tuple[str, str]] = Key("mechanism.pair")


@dataclass(frozen=True)
class NextHop:
    """Where a connection goes next: the URL to dial, and whether it is an endpoint on this
    node (a KERNEL link) or another node's manager (a tunnel)."""

    url: str
    local: bool


def describe(mechs: Sequence[Mechanism]) -> str:
    return ", ".join(f"{m.type}/{m.cls}" for m in mechs) or "none"


class SelectMechanism(Element):
    """``supported``: (class, type) of the upstream mechanisms served; ``pairs``: the
    (upstream type, downstream type) pairs some datapath element builds; ``next_hop`` resolves
    the connection's endpoint; ``offer`` gives the downstream preferences for a next hop."""

    def __init__(self, *, supported: Sequence[tuple[str, str]],
                 pairs: Collection[tuple[str, str]],
                 next_hop: Callable[[Ctx, Connection], Awaitable[NextHop]],
                 offer: Callable[[Ctx, NextHop], list[Mechanism]]) -> None:
        self.supported = list(supported)  # (cls, type)
        self.pairs = set(pairs)
        self.next_hop = next_hop
        self.offer = offer

    def _ok(self, m: Mechanism) -> bool:
        return (m.cls, m.type) in self.supported

    async def request(self, ctx: Ctx, request: NetworkServiceRequest, next: NextRequest) -> Connection:
        if NEXT_HOP_HEADER in ctx.headers:
            raise PermissionDenied(f"the {NEXT_HOP_HEADER} header is not accepted: a forwarder "
                                   "resolves the endpoint it connects to itself")
        conn = request.connection
        offered = list(request.mechanism_preferences)
        chosen = next_choice = None
        if conn.HasField("mechanism") and self._ok(conn.mechanism):
            next_choice = conn.mechanism  # refresh keeps what was chosen
        for m in offered:
            if self._ok(m):
                chosen = m
                break
        if next_choice is not None and (chosen is None or (chosen.cls, chosen.type) ==
                                        (next_choice.cls, next_choice.type)):
            chosen = next_choice
        if chosen is None:
            supported = ", ".join(f"{t}/{c}" for c, t in self.supported)
            raise Unsupported(f"none of the offered mechanisms ({describe(offered)}) is supported; "
                              f"this forwarder supports {supported}")
        upstream = Mechanism()
        upstream.CopyFrom(chosen)
        ctx.meta.set(UPSTREAM, upstream)

        hop = await self.next_hop(ctx, conn)
        downstream = self.offer(ctx, hop)
        pair = (upstream.type, downstream[0].type)
        if pair not in self.pairs:
            raise Unsupported(f"this forwarder cannot link {pair[0]} to {pair[1]} (next hop "
                              f"{'an endpoint on this node' if hop.local else 'another node'})")
        ctx.meta.set(PAIR, pair)
        ctx.meta.set(NEXT_URL, hop.url)

        out = NetworkServiceRequest()
        out.connection.CopyFrom(conn)
        out.connection.ClearField("mechanism")
        previous = ctx.meta.get(DOWNSTREAM)
        if previous is not None and previous.type == downstream[0].type:
            out.connection.mechanism.CopyFrom(previous)
        out.mechanism_preferences.extend(downstream)
        result = await next(ctx, out)  # an endpoint it cannot reach: Connect's EndpointUnreachable
        down = Mechanism()
        down.CopyFrom(result.mechanism)
        ctx.meta.set(DOWNSTREAM, down)
        result.mechanism.CopyFrom(upstream)
        return result

    async def close(self, ctx: Ctx, conn: Connection, next: NextClose) -> None:
        out = Connection()
        out.CopyFrom(conn)
        down = ctx.meta.get(DOWNSTREAM)
        if down is not None:
            out.mechanism.CopyFrom(down)
        await next(ctx, out)


def answered(conn: Connection, cls: str, type_: str, who: str) -> Mechanism:
    """The mechanism the next hop answered with, when it is the one offered; INVALID_ARGUMENT
    otherwise (nothing is built from a wrong answer)."""
    down = conn.mechanism
    if (down.cls, down.type) != (cls, type_):
        raise InvalidArgument(f"{who} answered {down.type}/{down.cls}, not {type_}/{cls}")
    return down


class Datapath(Element):
    """Base of the elements that build one kind of link: they act only when the connection's
    mechanism pair (:data:`PAIR`) is theirs, and pass everything else on."""

    pair: tuple[str, str] = ("", "")

    def mine(self, ctx: Ctx) -> bool:
        return ctx.meta.get(PAIR) == self.pair


async def close_downstream(element: Element, ctx: Ctx, conn: Connection, exc: BaseException,
                           what: str = "datapath failed") -> None:
    """Undo what the hops after ``element`` did for a first Request that ``element`` then
    failed (``exc``): Close through them, shielded, errors logged."""
    ctx.log.warning(f"{what}; closing downstream", error=str(exc))
    try:
        await asyncio.shield(ctx.chain.close_after(element, ctx, conn))
    except (NsmError, OSError) as close_exc:
        ctx.log.warning("downstream close after failure failed", error=str(close_exc))
