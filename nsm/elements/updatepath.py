"""updatepath: appends (or finds) this hop's segment in the connection's path.

On the way down the connection carries this hop's segment id; on the way back up the path
index and id are restored to the caller's, so every hop sees its own id. A segment's
``expires`` is this hop's lifetime, never later than the previous hop's.
"""

from __future__ import annotations

import math
import time

from google.protobuf.timestamp_pb2 import Timestamp

from nsm.api.connection_pb2 import Connection, Path, PathSegment
from nsm.api.networkservice_pb2 import NetworkServiceRequest
from nsm.chain import Ctx, Element, NextClose, NextRequest, new_id
from nsm.errors import InvalidArgument

#: The lifetime of a path segment unless the caller's is shorter: the client's default expiry
#: (``nsm nsc``, the SDK) and every hop's longest (``--lifetime`` of the manager, forwarder and
#: endpoint), one value. A client refreshes at a third of it (15 s); one that dies without Close
#: is released by every hop at its expiry, within 45 s (the reference leaks it for 10 minutes).
DEFAULT_LIFETIME = 45.0

#: The range of a protobuf Timestamp: 0001-01-01T00:00:00Z ..= 9999-12-31T23:59:59.999999999Z.
TS_MIN_SECONDS = -62135596800
TS_MAX_SECONDS = 253402300799
NANOS_PER_SECOND = 1_000_000_000


def ts(seconds: float) -> Timestamp:
    """``seconds`` since the epoch as a Timestamp; InvalidArgument outside its range."""
    if not math.isfinite(seconds) or not TS_MIN_SECONDS <= math.floor(seconds) <= TS_MAX_SECONDS:
        raise InvalidArgument(f"time {seconds} s since the epoch is outside the range of a "
                              f"Timestamp ({TS_MIN_SECONDS}..{TS_MAX_SECONDS})")
    whole = math.floor(seconds)
    return Timestamp(seconds=whole, nanos=min(int((seconds - whole) * 1e9), NANOS_PER_SECOND - 1))


def check_timestamp(t: Timestamp, what: str) -> None:
    """InvalidArgument unless ``t`` is a valid Timestamp (what protobuf's conversions require)."""
    if not TS_MIN_SECONDS <= t.seconds <= TS_MAX_SECONDS:
        raise InvalidArgument(f"{what} has seconds {t.seconds}, outside the range of a Timestamp "
                              f"({TS_MIN_SECONDS}..{TS_MAX_SECONDS})")
    if not 0 <= t.nanos < NANOS_PER_SECOND:
        raise InvalidArgument(f"{what} has nanos {t.nanos}, outside 0..{NANOS_PER_SECOND - 1}")


def check_expires(segment: PathSegment, what: str = "path segment") -> None:
    if segment.HasField("expires"):
        check_timestamp(segment.expires, f"{what} {segment.name[:40]!r} expires")


def expiry_of(segment: PathSegment) -> float | None:
    """When ``segment`` expires (seconds since the epoch); None when it carries no (or a
    non-positive) expiry."""
    if not segment.HasField("expires"):
        return None
    check_expires(segment)
    value = segment.expires.seconds + segment.expires.nanos / 1e9
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
        own.expires.CopyFrom(ts(min(time.time() + self.lifetime, TS_MAX_SECONDS)))
        if conn.path.index > 0:
            before = conn.path.path_segments[conn.path.index - 1]
            if expiry_of(before) is not None and _earlier(before.expires, own.expires):
                own.expires.CopyFrom(before.expires)  # exact: no round trip through a float
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


def _earlier(a: Timestamp, b: Timestamp) -> bool:
    return (a.seconds, a.nanos) < (b.seconds, b.nanos)
