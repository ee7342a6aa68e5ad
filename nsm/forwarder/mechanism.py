"""The forwarder's mechanism selection.

Upstream (toward the client's side) it takes the first offered mechanism it supports; downstream
it offers the mechanisms that fit the next hop: KERNEL/LOCAL toward a unix URL (an endpoint on
this node), VXLAN/REMOTE toward a tcp URL (a manager on another node). The connection returned
upward carries the upstream mechanism; the downstream one is remembered for refresh and Close.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from nsm.api.connection_pb2 import Connection, Mechanism
from nsm.api.networkservice_pb2 import NetworkServiceRequest
from nsm.chain import Ctx, Element, Key, NextClose, NextRequest
from nsm.elements.connect import NEXT_URL
from nsm.errors import InvalidArgument, Unsupported
from nsm.transport import Url, parse_url
from nsm.wellknown import NEXT_HOP_HEADER

#: The mechanism chosen toward the previous hop.
UPSTREAM: Key[Mechanism] = Key("mechanism.upstream")
#: The mechanism the next hop answered with.
DOWNSTREAM: Key[Mechanism] = Key("mechanism.downstream")


def describe(mechs: Sequence[Mechanism]) -> str:
    return ", ".join(f"{m.type}/{m.cls}" for m in mechs) or "none"


class SelectMechanism(Element):
    def __init__(self, *, supported: Sequence[tuple[str, str]],
                 downstream: Callable[[Ctx, Url], list[Mechanism]]) -> None:
        self.supported = list(supported)  # (cls, type)
        self.downstream = downstream

    def _ok(self, m: Mechanism) -> bool:
        return (m.cls, m.type) in self.supported

    async def request(self, ctx: Ctx, request: NetworkServiceRequest, next: NextRequest) -> Connection:
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

        url_text = ctx.headers.get(NEXT_HOP_HEADER) or ctx.meta.get(NEXT_URL)
        if not url_text:
            raise InvalidArgument(f"a forwarder needs the {NEXT_HOP_HEADER} header")
        url = parse_url(url_text)
        ctx.meta.set(NEXT_URL, str(url))

        out = NetworkServiceRequest()
        out.connection.CopyFrom(conn)
        out.connection.ClearField("mechanism")
        previous = ctx.meta.get(DOWNSTREAM)
        if previous is not None:
            out.connection.mechanism.CopyFrom(previous)
        out.mechanism_preferences.extend(self.downstream(ctx, url))
        result = await next(ctx, out)
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
