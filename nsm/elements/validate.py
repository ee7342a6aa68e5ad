"""validate: rejects malformed requests with INVALID_ARGUMENT before anything is built."""

from __future__ import annotations

import re

from nsm.api.connection_pb2 import Connection
from nsm.api.networkservice_pb2 import NetworkServiceRequest
from nsm.chain import Ctx, Element, NextClose, NextRequest
from nsm.errors import InvalidArgument
from nsm.mechanisms import PAYLOADS, validate_mechanism

MAX_NAME = 253
MAX_LABELS = 64
MAX_LABEL_LEN = 1024
MAX_MECHANISMS = 16
MAX_PATH = 32
_PRINTABLE = re.compile(r"^[\x21-\x7e]+$")


def _check_name(value: str, what: str, *, required: bool) -> None:
    if not value:
        if required:
            raise InvalidArgument(f"{what} is empty")
        return
    if len(value) > MAX_NAME:
        raise InvalidArgument(f"{what} is longer than {MAX_NAME} characters")
    if not _PRINTABLE.match(value):
        raise InvalidArgument(f"{what} {value!r} has spaces or control characters")


def validate_connection(conn: Connection) -> None:
    _check_name(conn.id, "connection id", required=False)
    _check_name(conn.network_service, "network service name", required=True)
    _check_name(conn.network_service_endpoint_name, "endpoint name", required=False)
    if conn.payload and conn.payload not in PAYLOADS:
        raise InvalidArgument(f"payload {conn.payload!r} is not one of {', '.join(PAYLOADS)}")
    if len(conn.labels) > MAX_LABELS:
        raise InvalidArgument(f"more than {MAX_LABELS} labels")
    for k, v in conn.labels.items():
        if not k or len(k) > MAX_LABEL_LEN or len(v) > MAX_LABEL_LEN:
            raise InvalidArgument(f"label {k[:40]!r} is empty or too long")
    if len(conn.path.path_segments) > MAX_PATH:
        raise InvalidArgument(f"path longer than {MAX_PATH} segments")
    if conn.path.path_segments and conn.path.index >= len(conn.path.path_segments):
        raise InvalidArgument(
            f"path index {conn.path.index} is outside a path of {len(conn.path.path_segments)}")


class Validate(Element):
    """Checks the shape of every Request (``need_mechanism``: the caller must offer one)."""

    def __init__(self, *, need_mechanism: bool = True) -> None:
        self.need_mechanism = need_mechanism

    async def request(self, ctx: Ctx, request: NetworkServiceRequest, next: NextRequest) -> Connection:
        if not request.HasField("connection"):
            raise InvalidArgument("request has no connection")
        validate_connection(request.connection)
        prefs = request.mechanism_preferences
        if len(prefs) > MAX_MECHANISMS:
            raise InvalidArgument(f"more than {MAX_MECHANISMS} mechanism preferences")
        if self.need_mechanism and not prefs and not request.connection.HasField("mechanism"):
            raise InvalidArgument("request offers no mechanism preferences")
        for m in prefs:
            validate_mechanism(m)
        if request.connection.HasField("mechanism"):
            validate_mechanism(request.connection.mechanism)
        return await next(ctx, request)

    async def close(self, ctx: Ctx, conn: Connection, next: NextClose) -> None:
        await next(ctx, conn)
