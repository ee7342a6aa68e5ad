"""updatepath: appends (or finds) this hop's segment in the connection's path.

On the way down the connection carries this hop's segment id; on the way back up the path
index and id are restored to the caller's, so every hop sees its own id. A segment's
``expires`` is this hop's lifetime, never later than the previous hop's.
"""

from __future__ import annotations

import time

from google.protobuf.timestamp_pb2 import Timestamp

from nsm.api.connection_pb2 import Connection, Path, PathSegment
from nsm.api.networkservice_pb2 import NetworkServiceRequest
from nsm.chain import Ctx, Element, NextClose, NextRequest, new_id
from nsm.errors import InvalidArgument

DEFAULT_LIFETIME = 600.0


def ts(seconds: float) -> Timestamp:
    t = Timestamp()
    t.FromNanoseconds(int(seconds * 1e9))
    return t


def expiry_of(segment: PathSegment) -> float | None:
    if not segment.HasField("expires"):
        return None
    value = segment.expires.ToNanoseconds() / 1e9
    return value if value > 0 else None


def enter(path: Path, name: str, first_id: str = "") -> tuple[int, bool]:
    """Advance ``path`` to this hop's segment. Returns (previous index, created).

    An empty path (a caller that keeps none) starts with this hop's segment, whose id is
    ``first_id`` (the connection id the caller sent) so that the caller's id stays valid."""
    segments = path.path_segments
    if not segments:
        segments.add(name=name, id=first_id or new_id())
        path.index = 0
        return 0, True
    if path.index >= len(segments):
        raise InvalidArgument(f"path index {path.index} is outside a path of {len(segments)}")
    if segments[path.index].name == name:
        return path.index, False
    prev = path.index
    path.index += 1
    if path.index < len(segments) and segments[path.index].name != name:
        del segments[path.index:]  # a different next hop than last time: forget the rest
    created = path.index == len(segments)
    if created:
        segments.add(name=name, id=new_id())
    return prev, created


class UpdatePath(Element):
    def __init__(self, name: str, *, lifetime: float = DEFAULT_LIFETIME) -> None:
        self.name = name
        self.lifetime = lifetime

    async def request(self, ctx: Ctx, request: NetworkServiceRequest, next: NextRequest) -> Connection:
        conn = request.connection
        prev, _ = enter(conn.path, self.name, conn.id)
        own = conn.path.path_segments[conn.path.index]
        if not own.id:
            own.id = new_id()
        deadline = time.time() + self.lifetime
        if conn.path.index > 0:
            before = expiry_of(conn.path.path_segments[conn.path.index - 1])
            if before is not None:
                deadline = min(deadline, before)
        own.expires.CopyFrom(ts(deadline))
        conn.id = own.id
        result = await next(ctx, request)
        result.path.index = prev
        result.id = result.path.path_segments[prev].id
        return result

    async def close(self, ctx: Ctx, conn: Connection, next: NextClose) -> None:
        if conn.path.path_segments:
            prev, _ = enter(conn.path, self.name, conn.id)
            conn.id = conn.path.path_segments[conn.path.index].id
            await next(ctx, conn)
            conn.path.index = prev
            conn.id = conn.path.path_segments[prev].id
        else:
            await next(ctx, conn)
