"""Domain errors and their one mapping to gRPC status codes.

Every component raises these; servicers convert them to gRPC statuses with
:func:`grpc_errors` (the only place the mapping is applied), and clients turn a gRPC
error back into the matching domain error with :func:`from_rpc_error`, so a status
code survives every hop of a connection's path.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc


class NsmError(Exception):
    """Base of every domain error. ``code`` is the gRPC status it maps to."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(NsmError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(NsmError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(NsmError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(NsmError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(NsmError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(NsmError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(NsmError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unsupported(NsmError):
    """A mechanism or feature this build or kernel cannot provide."""

    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(NsmError):
    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[NsmError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        Unsupported,
        Internal,
    )
}
# Codes with no domain class of their own.
_BY_CODE[grpc.StatusCode.CANCELLED] = Unavailable
_BY_CODE[grpc.StatusCode.UNKNOWN] = Internal
_BY_CODE[grpc.StatusCode.PERMISSION_DENIED] = FailedPrecondition
_BY_CODE[grpc.StatusCode.UNAUTHENTICATED] = FailedPrecondition
_BY_CODE[grpc.StatusCode.ABORTED] = Unavailable
_BY_CODE[grpc.StatusCode.OUT_OF_RANGE] = InvalidArgument
_BY_CODE[grpc.StatusCode.DATA_LOSS] = Internal


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status (code, message) for any exception."""
    if isinstance(exc, NsmError):
        return exc.code, exc.message
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code(), exc.details() or str(exc.code())
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "timed out"
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


def from_rpc_error(exc: grpc.aio.AioRpcError, where: str = "") -> NsmError:
    """The domain error matching a gRPC error received from a peer."""
    cls = _BY_CODE.get(exc.code(), Internal)
    details = exc.details() or exc.code().name
    return cls(f"{where}: {details}" if where else details)


F = TypeVar("F", bound=Callable[..., Any])


def grpc_errors(method: F) -> F:
    """Decorate a servicer method (unary coroutine or async generator) so that domain
    errors become gRPC statuses. The one place errors are mapped to the wire."""

    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async for item in method(self, request, context):
                    yield item
            except NsmError as exc:
                await context.abort(exc.code, exc.message)
            except grpc.aio.AioRpcError as exc:
                code, msg = status_of(exc)
                await context.abort(code, msg)

        return stream  # type: ignore[return-value]

    @functools.wraps(method)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except NsmError as exc:
            await context.abort(exc.code, exc.message)
        except grpc.aio.AioRpcError as exc:
            code, msg = status_of(exc)
            await context.abort(code, msg)

    return unary  # type: ignore[return-value]


async def call(coro: Awaitable[Any], where: str) -> Any:
    """Await a client RPC, turning a gRPC error into the matching domain error."""
    try:
        return await coro
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc, where) from exc
