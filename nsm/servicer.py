"""The ``networkservice.NetworkService`` gRPC servicer of any role: Request and Close go
down a :class:`~nsm.chain.Chain`.

The gRPC invocation metadata becomes ``ctx.headers`` (text values only; keys lower-case as gRPC
delivers them). Domain errors become gRPC statuses through :func:`~nsm.errors.grpc_errors`; an
unexpected exception is logged with its traceback and answered as INTERNAL, a timeout as
DEADLINE_EXCEEDED.
"""

from __future__ import annotations

import grpc
from google.protobuf.empty_pb2 import Empty

from nsm.api import networkservice_pb2_grpc
from nsm.api.connection_pb2 import Connection
from nsm.api.networkservice_pb2 import NetworkServiceRequest
from nsm.chain import Chain, Ctx
from nsm.errors import DeadlineExceeded, Internal, NsmError, grpc_errors
from nsm.security import prove
from nsm.security.tls import Security

SERVICE_NAME = "networkservice.NetworkService"


def headers_of(context: grpc.aio.ServicerContext) -> dict[str, str]:
    metadata = context.invocation_metadata() or ()
    return {key: value for key, value in metadata if isinstance(value, str)}


class NetworkServiceServicer(networkservice_pb2_grpc.NetworkServiceServicer):
    """Serves Request/Close by running them through ``chain``."""

    def __init__(self, chain: Chain, security: Security | None = None) -> None:
        self.chain = chain
        self.security = security or Security.insecure()

    def _context(self, context: grpc.aio.ServicerContext) -> Ctx:
        """The chain context of a call: its headers and the caller's identity (an
        unauthenticated caller of a secure server is refused here)."""
        peer = self.security.peer_id(context)
        cert = self.security.peer_certificate(context) if peer is not None else None
        return self.chain.context(headers_of(context), peer=peer, peer_cert=cert)

    @grpc_errors
    async def Request(
        self, request: NetworkServiceRequest, context: grpc.aio.ServicerContext
    ) -> Connection:
        ctx = self._context(context)
        if ctx.peer is not None and prove.WANT_HEADER in ctx.headers:
            # The caller expects this server's identity (the handshake proved it): the
            # certificate that verifies this hop's token goes with the answer.
            await context.send_initial_metadata(prove.chain_metadata(self.security))
        try:
            return await self.chain.request(request, ctx)
        except (NsmError, grpc.aio.AioRpcError):
            raise
        except TimeoutError as exc:
            raise DeadlineExceeded(f"request timed out: {exc}" if str(exc) else "request timed out") from exc
        except Exception as exc:
            ctx.log.error("request failed unexpectedly", exc_info=True, error=repr(exc))
            raise Internal(f"internal error: {type(exc).__name__}: {exc}") from exc

    @grpc_errors
    async def Close(self, request: Connection, context: grpc.aio.ServicerContext) -> Empty:
        ctx = self._context(context)
        try:
            await self.chain.close(request, ctx)
        except (NsmError, grpc.aio.AioRpcError):
            raise
        except TimeoutError as exc:
            raise DeadlineExceeded("close timed out") from exc
        except Exception as exc:
            ctx.log.error("close failed unexpectedly", exc_info=True, error=repr(exc))
            raise Internal(f"internal error: {type(exc).__name__}: {exc}") from exc
        return Empty()
