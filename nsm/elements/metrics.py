"""metrics: counts and times every Request and Close a hop serves (``nsm_requests_total``,
``nsm_request_duration_seconds``, :mod:`nsm.metrics`), by the gRPC status each ends with.

First in every role's chain, so a caller refused by the rules after it is counted too
(``PERMISSION_DENIED``), and the time is the whole of this hop's part and the path below it.
A Close from the connection's own expiry (:mod:`nsm.elements.timeout`) starts at the head of
the chain and is counted as a Close.
"""

from __future__ import annotations

from nsm.api.connection_pb2 import Connection
from nsm.api.networkservice_pb2 import NetworkServiceRequest
from nsm.chain import Ctx, Element, NextClose, NextRequest
from nsm.metrics import Metrics


class Measured(Element):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    async def request(self, ctx: Ctx, request: NetworkServiceRequest, next: NextRequest) -> Connection:
        with self.metrics.measure("Request"):
            return await next(ctx, request)

    async def close(self, ctx: Ctx, conn: Connection, next: NextClose) -> None:
        with self.metrics.measure("Close"):
            await next(ctx, conn)
