"""validate: rejects malformed requests with INVALID_ARGUMENT before anything is built."""

from __future__ import annotations

from nsm.addresses import check_ip, check_ip_context
from nsm.api.connection_pb2 import Connection, Mechanism
from nsm.api.networkservice_pb2 import NetworkServiceRequest
from nsm.chain import Ctx, Element, NextClose, NextRequest
from nsm.elements.updatepath import check_expires
from nsm.errors import InvalidArgument
from nsm.limits import MAX_MECHANISMS, MAX_REQUEST_BYTES, check_connection, check_mechanism, check_size
from nsm.mechanisms import DST_IP, PAYLOADS, SRC_IP, validate_mechanism
from nsm.names import check_name


def validate_connection(conn: Connection) -> None:
    check_connection(conn)  # the bounds first: nothing below parses an oversized field
    check_name(conn.id, "connection id", required=False)
    check_name(conn.network_service, "network service name", required=True)
    check_name(conn.network_service_endpoint_name, "endpoint name", required=False)
    if conn.payload and conn.payload not in PAYLOADS:
        raise InvalidArgument(f"payload {conn.payload!r} is not one of {', '.join(PAYLOADS)}")
    if any(not k for k in conn.labels):
        raise InvalidArgument("a label has an empty key")
    if conn.path.path_segments and conn.path.index >= len(conn.path.path_segments):
        raise InvalidArgument(
            f"path index {conn.path.index} is outside a path of {len(conn.path.path_segments)}")
    for segment in conn.path.path_segments:
        check_expires(segment)
    check_ip_context(conn.context.ip_context)
    if conn.HasField("mechanism"):
        validate_addressed_mechanism(conn.mechanism)


def validate_addressed_mechanism(m: Mechanism) -> None:
    """:func:`validate_mechanism`, and its tunnel addresses (``src_ip``/``dst_ip``), when
    present, are IP addresses."""
    validate_mechanism(m)
    for key in (SRC_IP, DST_IP):
        if key in m.parameters:
            check_ip(m.parameters[key], f"{m.type} mechanism parameter {key}")


class Validate(Element):
    """Checks the shape of every Request (``need_mechanism``: the caller must offer one)."""

    def __init__(self, *, need_mechanism: bool = True) -> None:
        self.need_mechanism = need_mechanism

    async def request(self, ctx: Ctx, request: NetworkServiceRequest, next: NextRequest) -> Connection:
        if not request.HasField("connection"):
            raise InvalidArgument("request has no connection")
        prefs = request.mechanism_preferences
        if len(prefs) > MAX_MECHANISMS:
            raise InvalidArgument(f"mechanism preferences: {len(prefs)} entries; at most {MAX_MECHANISMS} "
                                  f"are allowed")
        for index, m in enumerate(prefs):
            check_mechanism(m, f"mechanism preference {index}")
        validate_connection(request.connection)
        check_size(request, MAX_REQUEST_BYTES, "request")
        if self.need_mechanism and not prefs and not request.connection.HasField("mechanism"):
            raise InvalidArgument("request offers no mechanism preferences")
        for m in prefs:
            validate_addressed_mechanism(m)
        return await next(ctx, request)

    async def close(self, ctx: Ctx, conn: Connection, next: NextClose) -> None:
        check_connection(conn)
        await next(ctx, conn)
