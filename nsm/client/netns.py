"""The client's side of namespace confinement: while a connection names a namespace (its KERNEL
mechanism's ``inodeURL``), this client keeps a proof listener inside it
(:meth:`nsm.security.netns.NetnsProof.listen`), so that the forwarder can check the namespace is
this client's before it puts the connection's interface there. One listener per namespace,
shared by the connections naming it, closed with the last of them (a Close before a reselect
keeps it). Nothing when insecure (no identity to prove)."""

from __future__ import annotations

import contextlib
import os

from nsm.api.connection_pb2 import Connection, Mechanism
from nsm.api.networkservice_pb2 import NetworkServiceRequest
from nsm.chain import Ctx, Element, NextClose, NextRequest
from nsm.client.begin import EVENT, Kind
from nsm.errors import NsmError
from nsm.kernel.netns import NetnsId, parse_netns
from nsm.log import get_logger
from nsm.mechanisms import KERNEL, LOCAL, NETNS_INODE_URL
from nsm.security.netns import NetnsProof, ProofListener
from nsm.security.tls import Security

log = get_logger("nsm.client")


def named_netns(request: NetworkServiceRequest) -> str | None:
    """The namespace a Request names: its first KERNEL preference's, else its mechanism's."""
    candidates: list[Mechanism] = list(request.mechanism_preferences)
    if request.connection.HasField("mechanism"):
        candidates.append(request.connection.mechanism)
    for m in candidates:
        if (m.cls, m.type) == (LOCAL, KERNEL) and m.parameters.get(NETNS_INODE_URL):
            try:  # a path, or by identity (its own namespace, mostly)
                return parse_netns(m.parameters[NETNS_INODE_URL])
            except NsmError:
                return None  # nothing to prove: the forwarder refuses what it cannot find
    return None


class ProveNetns(Element):
    """Holds a proof listener in each namespace a live connection of this chain names."""

    def __init__(self, security: Security) -> None:
        self.security = security
        self._listeners: dict[NetnsId, tuple[contextlib.AbstractAsyncContextManager[ProofListener | None],
                                             set[str]]] = {}
        self._held: dict[str, NetnsId] = {}

    @property
    def listeners(self) -> int:
        return len(self._listeners)

    async def request(self, ctx: Ctx, request: NetworkServiceRequest, next: NextRequest) -> Connection:
        path = named_netns(request) if self.security.enabled else None
        new = False
        if path is not None:
            new = await self._hold(ctx.conn_id, path)
        try:
            return await next(ctx, request)
        except BaseException:
            if new:  # a failed first Request (or one that moved): nothing names it now
                await self._release(ctx.conn_id)
            raise

    async def _hold(self, conn_id: str, path: str) -> bool:
        try:
            st = os.stat(path)
        except OSError:
            return False  # the forwarder answers NOT_FOUND with the path
        ident = (st.st_dev, st.st_ino)
        if self._held.get(conn_id) == ident:
            return False
        await self._release(conn_id)  # the connection moved to another namespace
        entry = self._listeners.get(ident)
        if entry is None:
            cm = NetnsProof.listen(self.security, path)
            await cm.__aenter__()
            entry = self._listeners[ident] = (cm, set())
            log.debug("proof listener up", netns=path)
        entry[1].add(conn_id)
        self._held[conn_id] = ident
        return True

    async def _release(self, conn_id: str) -> None:
        ident = self._held.pop(conn_id, None)
        entry = self._listeners.get(ident) if ident is not None else None
        if entry is None or ident is None:
            return
        entry[1].discard(conn_id)
        if not entry[1]:
            del self._listeners[ident]
            await entry[0].__aexit__(None, None, None)

    async def close(self, ctx: Ctx, conn: Connection, next: NextClose) -> None:
        try:
            await next(ctx, conn)
        finally:
            event = ctx.meta.get(EVENT)
            if event is None or event.kind is not Kind.RESELECT:
                await self._release(ctx.conn_id or conn.id)

    async def shutdown(self) -> None:
        for conn_id in list(self._held):
            await self._release(conn_id)
