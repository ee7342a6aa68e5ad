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

#: Trailing metadata key that carries an error's :attr:`NsmError.reason` across a hop, so a peer
#: can tell one kind of failure from another with the same code without reading the message.
REASON_KEY = "nsm-error-reason"


class NsmError(Exception):
    """Base of every domain error. ``code`` is the gRPC status it maps to (given as a class
    keyword: ``class NotFound(NsmError, code=grpc.StatusCode.NOT_FOUND)``); ``reason``
    (optional, UPPER_SNAKE) names the kind of failure within the code and travels with the
    status."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = ""

    def __init_subclass__(cls, code: grpc.StatusCode | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if code is not None:
            cls.code = code

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason


class InvalidArgument(NsmError, code=grpc.StatusCode.INVALID_ARGUMENT):
    """Malformed input: the caller must change its request."""


class NotFound(NsmError, code=grpc.StatusCode.NOT_FOUND):
    """What the request names (a service, an endpoint, a namespace) does not exist."""


class AlreadyExists(NsmError, code=grpc.StatusCode.ALREADY_EXISTS):
    """What the request would create is there already (an interface name taken)."""


class FailedPrecondition(NsmError, code=grpc.StatusCode.FAILED_PRECONDITION):
    """The system is not in a state that allows this (the kernel refused, a node lacks a setting)."""


class PermissionDenied(NsmError, code=grpc.StatusCode.PERMISSION_DENIED):
    """The caller may not do this (the message says why)."""


class Unauthenticated(NsmError, code=grpc.StatusCode.UNAUTHENTICATED):
    """The caller, a token or a certificate could not be authenticated."""


class ResourceExhausted(NsmError, code=grpc.StatusCode.RESOURCE_EXHAUSTED):
    """A pool ran dry or a limit was reached (addresses, VNIs, watchers)."""


class Unavailable(NsmError, code=grpc.StatusCode.UNAVAILABLE):
    """A peer cannot be reached (yet): worth trying again, or another peer."""


class DeadlineExceeded(NsmError, code=grpc.StatusCode.DEADLINE_EXCEEDED):
    """A call took longer than its deadline."""


class Unsupported(NsmError, code=grpc.StatusCode.UNIMPLEMENTED):
    """A mechanism or feature this build or kernel cannot provide."""


class Internal(NsmError, code=grpc.StatusCode.INTERNAL):
    """A bug of ours, or a peer's: never the caller's fault."""


class VniConflict(AlreadyExists):
    """The VNI offered for a cross-node link is taken on the receiving node: pick another."""

    reason = "VNI_CONFLICT"


class EndpointUnreachable(Unavailable):
    """The hop before the endpoint (its node's forwarder) could not reach it: the endpoint is
    gone or going, not just a hop on the way (which a restart brings back)."""

    reason = "ENDPOINT_UNREACHABLE"


class Conflict(NsmError, code=grpc.StatusCode.ABORTED):
    """A compare-and-set lost: the record changed since it was read. Read it again and retry."""


#: Failures that may be the peer's (or the moment's) fault rather than the caller's: the same
#: call may succeed later, or with another peer. The one list every retry and every fallback
#: to another candidate uses; caller-side failures (INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS,
#: FAILED_PRECONDITION) are never retried.
RETRYABLE: tuple[type[NsmError], ...] = (Unavailable, DeadlineExceeded, Internal, Unsupported,
                                         ResourceExhausted)

#: Errors that carry a reason of their own, restored by :func:`from_rpc_error`.
_BY_REASON: dict[str, type[NsmError]] = {cls.reason: cls for cls in (VniConflict,
                                                                       EndpointUnreachable)}


_BY_CODE: dict[grpc.StatusCode, type[NsmError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        PermissionDenied,
        Unauthenticated,
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


def reason_of(exc: grpc.aio.AioRpcError) -> str:
    """The :attr:`NsmError.reason` a peer sent with its status ("" when none)."""
    for key, value in exc.trailing_metadata() or ():
        if key == REASON_KEY and isinstance(value, str):
            return value
    return ""


def from_rpc_error(exc: grpc.aio.AioRpcError, where: str = "") -> NsmError:
    """The domain error matching a gRPC error received from a peer (its reason included)."""
    reason = reason_of(exc)
    cls = _BY_CODE.get(exc.code(), Internal)
    typed = _BY_REASON.get(reason)
    if typed is not None and typed.code == exc.code():
        cls = typed
    details = exc.details() or exc.code().name
    return cls(f"{where}: {details}" if where else details, reason=reason or None)


async def abort(context: grpc.aio.ServicerContext, exc: NsmError | grpc.aio.AioRpcError) -> None:
    """End an RPC with the status of a domain error, or pass a peer's status on unchanged
    (its reason included)."""
    reason = exc.reason if isinstance(exc, NsmError) else reason_of(exc)
    if reason:
        context.set_trailing_metadata(((REASON_KEY, reason),))
    code, message = status_of(exc)
    await context.abort(code, message)


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
                await abort(context, exc)
            except grpc.aio.AioRpcError as exc:
                await abort(context, exc)

        return stream  # type: ignore[return-value]

    @functools.wraps(method)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except NsmError as exc:
            await abort(context, exc)
        except grpc.aio.AioRpcError as exc:
            await abort(context, exc)

    return unary  # type: ignore[return-value]


async def call(coro: Awaitable[Any], where: str) -> Any:
    """Await a client RPC, turning a gRPC error into the matching domain error."""
    try:
        return await coro
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc, where) from exc
