"""gRPC listening and dialing: the one place where sockets, credentials and channel options
are decided (and the HTTPS listener of a daemon's metrics, :class:`HttpListener`, with its
client :func:`http_get`). With a :class:`~nsm.security.tls.Security` every listen and dial is mTLS with the
process's SVID (unix sockets included); without one (``--insecure``) plaintext.

URLs are ``unix:///absolute/path`` or ``tcp://host:port`` (port 0 picks a free port).
Every server also serves ``grpc.health.v1.Health`` (for every registered service name and
the empty name) and server reflection.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import inspect
import os
import secrets
import ssl
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
from cryptography import x509
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from nsm.errors import FailedPrecondition, InvalidArgument, NsmError, Unauthenticated, Unavailable
from nsm.limits import MAX_MESSAGE_BYTES
from nsm.log import get_logger
from nsm.security import prove
from nsm.security.ids import SpiffeId, identity_name, parse_id
from nsm.security.svid import spiffe_id_of
from nsm.security.tls import Security

#: Longest path of a unix socket (sun_path is 108 bytes with its NUL).
UNIX_PATH_MAX = 107

#: How long a replaced channel lives on for the calls still on it (:meth:`Channels.renew`).
STALE_GRACE = 5.0
#: How long at most a channel made before an SVID rotation may still connect again (with its
#: certificate, the old one); after that it is closed as soon as its connection is gone or idle
#: (its streams keep their connection until then: :meth:`Channels._rotated`).
STALE_AFTER_ROTATION = 600.0
#: How long the health check of a preconnect (:meth:`Channels.preconnect`) may take.
PRECONNECT_TIMEOUT = 5.0

#: How many of a peer's latest proven certificates :meth:`Channels.proven` keeps.
PROVEN_KEPT = 3

log = get_logger("nsm.transport")

#: Connect timeout of one attempt over TCP and over a unix socket (see :data:`CHANNEL_OPTIONS`).
TCP_CONNECT_TIMEOUT_MS = 300
LOCAL_CONNECT_TIMEOUT_MS = 2_000

#: The largest message a dialed channel accepts. A server accepts at most
#: :data:`~nsm.limits.MAX_MESSAGE_BYTES` (every request is bounded), and a channel sends no more;
#: but one answer is not bounded by the limits of a single message: a MonitorConnections
#: INITIAL_STATE_TRANSFER carries every connection of the hop in one event (its consumers take
#: what is missing from it as gone, so it cannot be split). 16 MiB is ~4000 connections of the
#: largest valid size, far more of typical ones.
MAX_RECEIVE_BYTES = 16 * 1024 * 1024

#: Channel options shared by every dialed connection. Each channel has subchannels of its own
#: (``use_local_subchannel_pool``): by default a process shares one subchannel per target among
#: its channels, so a new channel to a peer that was down would inherit the old one's reconnect
#: backoff (up to 2 s) instead of connecting at once to the restarted peer.
#: ``grpc.min_reconnect_backoff_ms`` is, in gRPC core, the *connect timeout* of one attempt
#: (connect, TLS handshake, HTTP/2 settings), not a backoff. Over TCP it is
#: :data:`TCP_CONNECT_TIMEOUT_MS`: a node that is gone answers nothing, and a Close toward it
#: must fail fast (a reselect waits for it; at 2 s, a lost node healed in 2.2 s instead of
#: 1.3 s). On a unix socket a connect never hangs (a peer not listening refuses at once), so
#: :data:`LOCAL_CONNECT_TIMEOUT_MS` only bounds the TLS handshake: at 100 ms, handshakes with a
#: busy manager (tens of clients connecting at once on two loaded cores) timed out and were
#: retried in a loop.
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", TCP_CONNECT_TIMEOUT_MS),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
)
#: Longest reconnect backoff to a peer on this node (a unix socket): a connect there costs
#: microseconds, and a restarted manager or forwarder is used — and registered with again by its
#: endpoints — within a quarter of a second instead of up to 2 s.
LOCAL_MAX_RECONNECT_BACKOFF_MS = 250
SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
)


@dataclass(frozen=True)
class Service:
    """A gRPC service to serve: its full name (for health and reflection), the generated
    ``add_..._to_server`` function and the servicer object."""

    name: str
    add: Callable[[Any, grpc.aio.Server], None]
    servicer: Any


@dataclass(frozen=True)
class Url:
    """A parsed listen/dial URL."""

    scheme: str  # "unix" or "tcp"
    path: str = ""  # unix socket path
    host: str = ""
    port: int = 0

    @property
    def is_unix(self) -> bool:
        return self.scheme == "unix"

    def target(self) -> str:
        """The gRPC target string."""
        if self.is_unix:
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def with_port(self, port: int) -> Url:
        return Url(self.scheme, self.path, self.host, port)

    def __str__(self) -> str:
        if self.is_unix:
            return f"unix://{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"


def parse_url(text: str) -> Url:
    """Parse ``unix:///path`` or ``tcp://host:port``; raise InvalidArgument otherwise."""
    if not isinstance(text, str) or not text:
        raise InvalidArgument("empty URL")
    parts = urlsplit(text)
    if parts.scheme == "unix":
        path = parts.path
        if parts.netloc or not path.startswith("/"):
            raise InvalidArgument(f"unix URL needs an absolute path: {text!r}")
        if "\x00" in path:
            raise InvalidArgument(f"unix socket path {path[:60]!r} has a NUL character")
        size = len(path.encode(errors="surrogateescape"))
        if size > UNIX_PATH_MAX:
            raise InvalidArgument(f"unix socket path is {size} bytes; at most {UNIX_PATH_MAX} fit "
                                  f"in a socket address: {path[:60]}...")
        return Url("unix", path=path)
    if parts.scheme == "tcp":
        try:
            port = parts.port
        except ValueError as exc:
            raise InvalidArgument(f"bad port in URL {text!r}") from exc
        if not parts.hostname or port is None:
            raise InvalidArgument(f"tcp URL needs host and port: {text!r}")
        return Url("tcp", host=parts.hostname, port=port)
    raise InvalidArgument(f"unsupported URL {text!r}: use unix:///path or tcp://host:port")


def normalize_url(url: str) -> str:
    """``url`` in its canonical form (so two spellings of one address compare equal); an
    unparsable URL is returned unchanged."""
    try:
        return str(parse_url(url))
    except InvalidArgument:
        return url


def _prepare_unix_socket(path: str, created: list[Path]) -> None:
    """Make the socket's directory (appending each directory made to ``created``, outermost
    first) and remove a stale socket of a previous run."""
    parent = Path(path).parent
    missing = [d for d in (parent, *parent.parents) if not d.exists()]
    for directory in reversed(missing):
        try:
            directory.mkdir()
        except FileExistsError:
            continue  # made meanwhile by someone else: not ours to remove
        except OSError as exc:
            raise FailedPrecondition(f"cannot create {directory} for {path}: {exc.strerror}") from exc
        created.append(directory)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    except NotADirectoryError as exc:
        raise FailedPrecondition(f"cannot listen on {path}: a parent is not a directory") from exc
    if not stat.S_ISSOCK(mode):
        raise InvalidArgument(f"{path} exists and is not a socket")
    os.unlink(path)  # stale socket of a previous run


def _remove_dirs(directories: list[Path]) -> None:
    """Remove the directories a failed start made, innermost first (each only while empty)."""
    for directory in reversed(directories):
        with contextlib.suppress(OSError):
            directory.rmdir()


class _TrustDomainOnly(grpc.aio.ServerInterceptor):
    """Every call of a secure server comes from an SVID of the trust domain: the handshake only
    checks that the client's certificate chains to the bundle, so a certificate of that
    authority with another trust domain's ID (or none) is refused here, UNAUTHENTICATED,
    before any servicer (health, reflection and Prove included) sees the call."""

    def __init__(self, security: Security) -> None:
        self._security = security

    async def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        for kind, make in _HANDLER_KINDS:
            inner = getattr(handler, kind)
            if inner is not None:
                return make(self._guard(inner, streaming=kind.endswith("_stream")),
                            request_deserializer=handler.request_deserializer,
                            response_serializer=handler.response_serializer)
        return handler

    def _guard(self, inner: Callable[..., Any], *, streaming: bool) -> Callable[..., Any]:
        security = self._security

        async def check(context: grpc.aio.ServicerContext) -> None:
            try:
                security.peer_id(context)
            except NsmError as exc:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, exc.message)

        if streaming and inspect.isasyncgenfunction(inner):
            async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                await check(context)
                async for response in inner(request, context):
                    yield response
            return stream

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await check(context)
            result = inner(request, context)
            return await result if inspect.isawaitable(result) else result
        return call


#: The four kinds of RPC method handlers, and how each is made.
_HANDLER_KINDS: tuple[tuple[str, Callable[..., Any]], ...] = (
    ("unary_unary", grpc.unary_unary_rpc_method_handler),
    ("unary_stream", grpc.unary_stream_rpc_method_handler),
    ("stream_unary", grpc.stream_unary_rpc_method_handler),
    ("stream_stream", grpc.stream_stream_rpc_method_handler),
)


class Server:
    """An asyncio gRPC server bound to one or more URLs, with health and reflection.

    Usage::

        server = Server(["unix:///run/nsm/x.sock"])
        registry_pb2_grpc.add_..._to_server(servicer, server.grpc)
        server.add_service_names(["registry.NetworkServiceRegistry"])
        await server.start()
        ...
        await server.stop()
    """

    def __init__(self, urls: Iterable[str | Url], *, security: Security | None = None) -> None:
        self.security = security or Security.insecure()
        interceptors = (_TrustDomainOnly(self.security),) if self.security.enabled else ()
        self.grpc: grpc.aio.Server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=interceptors)
        self._requested = [u if isinstance(u, Url) else parse_url(u) for u in urls]
        if not self._requested:
            raise InvalidArgument("a server needs at least one listen URL")
        self.urls: list[Url] = []
        self._inodes: dict[str, int] = {}
        self._names: list[str] = []
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self.grpc)
        if self.security.enabled:
            self.grpc.add_generic_rpc_handlers((prove.handler(self.security),))
            self._names.append(prove.SERVICE)

    def add(self, *services: Service) -> None:
        """Serve these services (before :meth:`start`); each is also reported by health and
        reflection. The one way every daemon registers what it serves."""
        for service in services:
            service.add(service.servicer, self.grpc)
            self._names.append(service.name)

    def add_service_names(self, names: Iterable[str]) -> None:
        self._names.extend(names)

    async def start(self) -> None:
        """Bind every URL and start serving. A failed start leaves nothing: no socket bound
        here and no directory made for one."""
        created: list[Path] = []
        try:
            await self._start(created)
        except BaseException:
            await self.grpc.stop(None)
            self._unlink_own()
            self.urls.clear()
            _remove_dirs(created)
            raise

    async def _start(self, created: list[Path]) -> None:
        for url in self._requested:
            bind = url
            if url.is_unix:
                _prepare_unix_socket(url.path, created)
                # gRPC core unlinks the path it bound when the server shuts down, even if another
                # server listens there by then (a restart that overlaps). So bind a private name
                # and rename it into place: core's unlink then misses, and stop() removes the
                # path only while it is still our socket.
                private = f"{url.path}.~{secrets.token_hex(3)}"
                if len(private.encode()) <= UNIX_PATH_MAX:
                    bind = Url("unix", path=private)
            try:
                if self.security.enabled:
                    port = self.grpc.add_secure_port(bind.target(), server_credentials(self.security))
                else:
                    port = self.grpc.add_insecure_port(bind.target())
            except RuntimeError as exc:
                raise FailedPrecondition(f"cannot listen on {url}: {exc}") from exc
            if port == 0 and not url.is_unix:
                raise FailedPrecondition(f"cannot listen on {url} (address in use?)")
            if bind is not url:
                os.rename(bind.path, url.path)
            if url.is_unix:
                self._inodes[url.path] = os.stat(url.path).st_ino
            self.urls.append(url if url.is_unix else url.with_port(port))
        names = [*self._names, health.SERVICE_NAME, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(names, self.grpc)
        await self.grpc.start()
        for name in ["", *self._names]:
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float | None = 1.0) -> None:
        await self._health.enter_graceful_shutdown()
        await self.grpc.stop(grace)
        self._unlink_own()

    def _unlink_own(self) -> None:
        for url in self.urls:
            if url.is_unix:
                with contextlib.suppress(FileNotFoundError):
                    # Only our own socket: a successor may already listen at this path.
                    if os.stat(url.path).st_ino == self._inodes.get(url.path):
                        os.unlink(url.path)


def channel_options(url: Url) -> tuple[tuple[str, int], ...]:
    """:data:`CHANNEL_OPTIONS`; for a unix socket with :data:`LOCAL_MAX_RECONNECT_BACKOFF_MS`
    and :data:`LOCAL_CONNECT_TIMEOUT_MS`."""
    if not url.is_unix:
        return CHANNEL_OPTIONS
    local = {"grpc.max_reconnect_backoff_ms": LOCAL_MAX_RECONNECT_BACKOFF_MS,
             "grpc.min_reconnect_backoff_ms": LOCAL_CONNECT_TIMEOUT_MS}
    return tuple((k, local.get(k, v)) for k, v in CHANNEL_OPTIONS)


def server_credentials(security: Security) -> grpc.ServerCredentials:
    """Credentials that present the current SVID to every new connection (a rotation applies to
    the next handshake; live connections are not dropped) and require a client certificate
    chaining to the trust bundle. One per listener: each moves to a new SVID on its own next
    handshake."""

    def config() -> Any:
        svid = security.svid
        return grpc.ssl_server_certificate_configuration([(svid.key_pem, svid.chain_pem)],
                                                         root_certificates=svid.bundle_pem)

    served = [security.generation]

    def fetch() -> Any:  # called by grpc core on each handshake, in its own thread
        generation = security.generation
        if served[0] == generation:
            return None
        served[0] = generation
        return config()

    return grpc.dynamic_ssl_server_credentials(config(), fetch, require_client_authentication=True)


def channel_credentials(security: Security, name: str | None = None
                        ) -> tuple[grpc.ChannelCredentials, tuple[tuple[str, str], ...]]:
    """Credentials of a new channel (the current SVID as client certificate, the bundle as the
    roots the server's certificate must chain to) and the option naming the DNS name the
    server's certificate must carry: ``name``, else the one every SVID carries
    (:attr:`Security.server_name`)."""
    svid = security.svid
    return (grpc.ssl_channel_credentials(svid.bundle_pem, svid.key_pem, svid.chain_pem),
            (("grpc.ssl_target_name_override", name or security.server_name),))


def dial(url: str | Url, security: Security | None = None, *, follow: bool = True,
         name: str | None = None) -> grpc.aio.Channel:
    """Open a channel to a URL: mTLS with ``security``'s current SVID, plaintext without.

    A secure channel follows the SVID's rotations (``follow``, :class:`FollowingChannel`): a
    channel's credentials are fixed when it is made, and one kept for long (a daemon's registry
    channel) would otherwise reconnect after its first certificate expired with that one, and
    be refused forever. ``follow=False``: a plain channel with the current SVID (what
    :class:`Channels` makes, which renews its channels itself); ``name``: the DNS name the
    server's certificate must carry (:func:`channel_credentials`; not with ``follow``)."""
    parsed = url if isinstance(url, Url) else parse_url(url)
    if security is None or not security.enabled:
        return grpc.aio.insecure_channel(parsed.target(), options=channel_options(parsed))
    if follow:
        return FollowingChannel(parsed, security)
    credentials, options = channel_credentials(security, name)
    return grpc.aio.secure_channel(parsed.target(), credentials,
                                   options=(*channel_options(parsed), *options))


def _old_certificate_life(svid: Any) -> float:
    """Seconds until the certificate a rotation to ``svid`` replaced expires: renewed at half
    its life, about half the new one's (at most :data:`STALE_AFTER_ROTATION`)."""
    life = max(0.0, (svid.expires - dt.datetime.now(dt.UTC)).total_seconds())
    return min(life / 2, STALE_AFTER_ROTATION)


async def _retire_after_rotation(stale: grpc.aio.Channel, after: float) -> None:
    """Close a channel made with an SVID that rotated since: not before its certificate
    expired (``after`` seconds: until then it may even reconnect with it), then once its
    connection is gone or idle (no call for the channel's idle timeout) — closing it earlier
    would cancel the streams on it (a monitor stream lives as long as the connection it
    watches)."""
    await asyncio.sleep(after)
    state = stale.get_state()
    while state == grpc.ChannelConnectivity.READY:
        await stale.wait_for_state_change(state)
        state = stale.get_state()
    await stale.close()


class _Following:
    """A multicallable of a :class:`FollowingChannel`: each call goes to the channel current
    at that moment (made again for a new channel)."""

    def __init__(self, owner: FollowingChannel, kind: str, args: tuple[Any, ...]) -> None:
        self._owner, self._kind, self._args = owner, kind, args
        self._made: tuple[grpc.aio.Channel, Any] | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        channel = self._owner.current
        if self._made is None or self._made[0] is not channel:
            self._made = (channel, getattr(channel, self._kind)(*self._args))
        return self._made[1](*args, **kwargs)


class FollowingChannel(grpc.aio.Channel):
    """A secure channel that follows its :class:`Security`'s SVID rotations: a rotation makes a
    new underlying channel (with the new certificate) for the next calls; the calls on the old
    one go on, and it is closed once its certificate expired and its connection is gone or
    idle. Its connectivity is the current channel's (a rotation is not reported as a change
    when the new channel connects)."""

    def __init__(self, url: Url, security: Security) -> None:
        self._url = url
        self._security = security
        self.current = dial(url, security, follow=False)
        self._swapped = asyncio.Event()
        self._retiring: set[asyncio.Task[None]] = set()
        self._stale: set[grpc.aio.Channel] = set()
        self._unsubscribe: Callable[[], None] | None = security.on_rotate(self._rotated)
        #: A connection lost on the old channel across a rotation, reported once by
        #: :meth:`get_state` (the new channel may be READY already: the loss must still be seen).
        self._lost: grpc.ChannelConnectivity | None = None

    def _rotated(self, svid: Any) -> None:
        stale, self.current = self.current, dial(self._url, self._security, follow=False)
        swapped, self._swapped = self._swapped, asyncio.Event()
        swapped.set()
        self._stale.add(stale)

        async def retire() -> None:
            try:
                await _retire_after_rotation(stale, _old_certificate_life(svid))
            finally:
                self._stale.discard(stale)

        task = asyncio.get_running_loop().create_task(retire(), name=f"channel-rotate:{self._url}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def unary_unary(self, *args: Any, **kwargs: Any) -> Any:
        return _Following(self, "unary_unary", _method_args(*args, **kwargs))

    def unary_stream(self, *args: Any, **kwargs: Any) -> Any:
        return _Following(self, "unary_stream", _method_args(*args, **kwargs))

    def stream_unary(self, *args: Any, **kwargs: Any) -> Any:
        return _Following(self, "stream_unary", _method_args(*args, **kwargs))

    def stream_stream(self, *args: Any, **kwargs: Any) -> Any:
        return _Following(self, "stream_stream", _method_args(*args, **kwargs))

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        lost, self._lost = self._lost, None
        state = self.current.get_state(try_to_connect)
        return lost if lost is not None else state

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        while True:
            channel, swapped = self.current, self._swapped
            if channel.get_state() != last_observed_state:
                return
            changed = asyncio.ensure_future(channel.wait_for_state_change(last_observed_state))
            rotated = asyncio.ensure_future(swapped.wait())
            try:
                await asyncio.wait({changed, rotated}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in (changed, rotated):
                    waiter.cancel()
                await asyncio.gather(changed, rotated, return_exceptions=True)
            if self.current is channel:
                return
            # A rotation: let the new channel connect before its state is compared; unless the
            # old channel's connection changed meanwhile (lost: the peer may have restarted),
            # which is a change whatever the new channel's state.
            self.current.get_state(try_to_connect=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.current.channel_ready(), PRECONNECT_TIMEOUT)
            try:
                old = channel.get_state()
            except Exception:  # closed meanwhile (its certificate expired)
                return
            if old != last_observed_state:
                if old != grpc.ChannelConnectivity.READY:
                    self._lost = old
                return

    async def channel_ready(self) -> None:
        await self.current.channel_ready()

    async def close(self, grace: float | None = None) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        stale, self._stale = list(self._stale), set()
        retiring = list(self._retiring)
        for task in retiring:
            task.cancel()
        await asyncio.gather(*retiring, return_exceptions=True)
        for channel in stale:
            await channel.close(grace)
        await self.current.close(grace)

    async def __aenter__(self) -> FollowingChannel:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def _method_args(method: str, request_serializer: Any = None, response_deserializer: Any = None,
                 _registered_method: bool | None = False) -> tuple[Any, ...]:
    return (method, request_serializer, response_deserializer, _registered_method)


async def watch_reconnects(channel: grpc.aio.Channel, on_back: Callable[[], None]) -> None:
    """Run until cancelled: call ``on_back()`` each time ``channel`` is READY again after losing
    its connection (the peer may have restarted and forgotten state). Keeps the channel
    connecting meanwhile (reconnect backoff: :data:`CHANNEL_OPTIONS`)."""
    state = channel.get_state(try_to_connect=True)
    # Not READY at the first look: a connection lost before we looked still counts as lost.
    lost = state != grpc.ChannelConnectivity.READY
    while True:
        was = state
        await channel.wait_for_state_change(state)
        state = channel.get_state(try_to_connect=True)
        if state == grpc.ChannelConnectivity.READY:
            # READY again after a change from READY: it left and came back before we looked
            # (a quick reconnect to a restarted peer), which is a reconnect too.
            if lost or was == grpc.ChannelConnectivity.READY:
                on_back()
            lost = False
        else:
            # Any state but READY after a change means the connection is gone, CONNECTING too:
            # looking with ``try_to_connect`` at an IDLE channel starts connecting at once.
            lost = True


class Channels:
    """A per-daemon cache of channels by URL, so hot paths don't reconnect per call."""

    def __init__(self, factory: Callable[[str], grpc.aio.Channel] | None = None, *,
                 security: Security | None = None) -> None:
        self._factory = factory or self._dial
        #: Whether this class dials (a given factory decides the DNS name itself).
        self._dials = factory is None
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._unsubscribe: Callable[[], None] | None = None
        if security is not None and security.enabled and factory is None:
            self._unsubscribe = security.on_rotate(self._rotated)
        self._stale: set[grpc.aio.Channel] = set()
        self._retiring: set[asyncio.Task[None]] = set()
        self._warming: dict[str, asyncio.Task[None]] = {}
        #: The channel each URL's preconnect was for (a renewed channel is connected again).
        self._warmed: dict[str, grpc.aio.Channel] = {}
        self._security = security or Security.insecure()
        #: Proven identities of the servers, by channel (a new channel proves again).
        self._peers: dict[str, tuple[grpc.aio.Channel, asyncio.Future[tuple[SpiffeId, Any]]]] = {}
        self._proven: dict[str, list[tuple[SpiffeId, Any]]] = {}
        #: The identity each URL's server must be (:meth:`expect`).
        self._expected: dict[str, SpiffeId] = {}
        #: The DNS name each URL's channel asks for: its expected identity's own, while the
        #: server's certificate carries it (the handshake proves who it is).
        self._names: dict[str, str] = {}
        #: The certificate chain each URL's server last sent with an answer (DER), checked, and
        #: its leaf.
        self._chains: dict[str, tuple[tuple[bytes, ...], Any]] = {}

    @property
    def security(self) -> Security:
        """The security its channels are dialled with (insecure when none was given)."""
        return self._security

    def _dial(self, url: str) -> grpc.aio.Channel:
        return dial(url, self._security, follow=False, name=self._names.get(url))

    def expect(self, url: str, spiffe_id: str | SpiffeId) -> None:
        """The server at ``url`` must be ``spiffe_id`` (InvalidArgument when it is no SPIFFE ID;
        nothing when insecure). Its channel then asks for that identity's own DNS name
        (:func:`~nsm.security.ids.identity_name`, which the built-in CA puts in every SVID), so
        the TLS handshake itself proves who the server is: :meth:`peer` answers at once, with
        no Prove round trip, and the certificate the server sends with its answer
        (:meth:`learn`) verifies its tokens. A server whose certificate lacks the name is
        refused by the handshake: :meth:`fall_back` then has it prove itself instead, and what
        it proves must still be ``spiffe_id``. Call before the URL's first use."""
        sid = parse_id(str(spiffe_id))
        if not self._security.enabled:
            return
        self._expected[url] = sid
        name = identity_name(sid, self._security.server_name)
        if name is not None and self._dials:
            self._names[url] = name

    def named(self, url: str) -> bool:
        """Whether the channel to ``url`` has the handshake prove the server's identity (it
        then sends its certificate with its answers: :data:`~nsm.security.prove.WANT_HEADER`)."""
        return url in self._names

    def fall_back(self, url: str) -> None:
        """The server at ``url`` failed the handshake's check of its identity's DNS name (its
        SVID does not carry it: a SPIRE entry without it, PEM files): from now on its channel
        asks for the name every SVID carries, and the server proves who it is
        (:mod:`nsm.security.prove`), which must still be the expected identity."""
        if self._names.pop(url, None) is None:
            return
        log.warning("server certificate lacks its identity's DNS name: it proves its identity "
                    "by a round trip instead", url=url, expected=str(self._expected.get(url)))
        stale = self._channels.get(url)
        if stale is not None:
            self.renew(url, stale)

    def learn(self, url: str, metadata: Any) -> None:
        """The certificate chain the server at ``url`` sent with an answer
        (:data:`~nsm.security.prove.CHAIN_HEADER` in ``metadata``), checked against the trust
        bundle and the expected identity; remembered as the server's (:meth:`peer`,
        :meth:`proven`). Unauthenticated when it is not of the expected identity; nothing when
        it sent none."""
        expected = self._expected.get(url)
        if expected is None:
            return
        chain = tuple(v for k, v in (metadata or ()) if k == prove.CHAIN_HEADER)
        last = self._chains.get(url)
        if chain and last is not None and last[0] == chain \
                and last[1].not_valid_after_utc > dt.datetime.now(dt.UTC):
            return  # the chain checked last time, still valid (a refresh): nothing new
        cert = prove.chain_from(metadata, self._security, expected)
        if cert is None:
            return
        self._chains[url] = (chain, cert)
        seen = self._proven.setdefault(url, [])
        if not seen or seen[0][1] != cert:
            seen.insert(0, (expected, cert))
            del seen[PROVEN_KEPT:]

    def get(self, url: str) -> grpc.aio.Channel:
        channel = self._channels.get(url)
        if channel is None:
            channel = self._factory(url)
            self._channels[url] = channel
        return channel

    async def peer(self, url: str, *, again: bool = False) -> tuple[SpiffeId, Any]:
        """The SPIFFE ID and certificate the server at ``url`` proves
        (:mod:`nsm.security.prove`), once per channel (``again``: ask anew, e.g. the peer
        restarted on the same channel with a new key); Unauthenticated if it cannot,
        InvalidArgument when insecure."""
        if not self._security.enabled:
            raise InvalidArgument("an insecure channel has no identity to prove")
        expected = self._expected.get(url)
        if expected is not None and not again and url in self._names:
            # The handshake proves it; the certificate is the one its last answer carried.
            seen = self._proven.get(url)
            return expected, (seen[0][1] if seen else None)
        sid, cert = await asyncio.shield(self._proof(url, again=again))
        if expected is not None and sid != expected:
            raise Unauthenticated(f"the server at {url} is {sid}, not {expected}")
        return sid, cert

    def prove_soon(self, url: str) -> None:
        """Connect to ``url`` now, in the background, and have the server prove who it is (by
        the handshake when :meth:`named`, else by ``Prove``), so that a call and a
        :meth:`peer` soon after find it done or under way; a failure is theirs to report."""
        self.get(url).get_state(try_to_connect=True)
        if self._security.enabled and url not in self._names:
            self._proof(url)

    def _proof(self, url: str, *, again: bool = False) -> asyncio.Future[tuple[SpiffeId, Any]]:
        channel = self.get(url)
        held = self._peers.get(url)
        if again and held is not None and held[1].done():
            held = None
        if held is None or held[0] is not channel or (held[1].done() and held[1].exception()):
            future = asyncio.ensure_future(prove.prove(channel, self._security))

            def done(f: asyncio.Future[tuple[SpiffeId, Any]]) -> None:
                if not f.cancelled() and f.exception() is None:
                    # The certificates this peer proved lately (it may sign with the one before
                    # its last rotation a moment longer: a token minted just before it).
                    seen = self._proven.setdefault(url, [])
                    seen.insert(0, f.result())
                    del seen[PROVEN_KEPT:]

            future.add_done_callback(done)
            held = self._peers[url] = (channel, future)
        return held[1]

    def proven(self, url: str) -> list[tuple[SpiffeId, Any]]:
        """The identities and certificates the server at ``url`` proved lately, newest first
        (at most :data:`PROVEN_KEPT`)."""
        return list(self._proven.get(url, ()))

    def preconnect(self, url: str) -> None:
        """Connect to ``url`` now and make one health check over the channel, in the background
        (a next hop that will be used soon: the first call on a channel — and a process's first
        call at all, on either side — costs milliseconds more than the next; the first Request
        then finds that paid), and, when secure, has the server prove who it is
        (:meth:`peer`: the first Request's token needs it). Once per channel; a failed check
        is only logged at debug."""
        channel = self.get(url)
        if self._warmed.get(url) is channel:
            return  # this channel was connected (or is being connected) already
        self._warmed[url] = channel

        async def warm() -> None:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=PRECONNECT_TIMEOUT)
            if self._security.enabled:
                with contextlib.suppress(NsmError):
                    await self.peer(url)

        self._warming[url] = asyncio.get_running_loop().create_task(warm(), name=f"preconnect:{url}")

    async def drop(self, url: str) -> None:
        channel = self._channels.pop(url, None)
        if channel is not None:
            await channel.close()

    def renew(self, url: str, stale: grpc.aio.Channel) -> grpc.aio.Channel:
        """A new channel to ``url`` in place of ``stale`` (one that could not connect and waits
        out its reconnect backoff), unless another caller renewed it already: then that one.
        The stale channel is closed a little later, so that calls still on it end by
        themselves instead of being cancelled."""
        current = self._channels.get(url)
        if current is not None and current is not stale:
            return current
        channel = self._channels[url] = self._factory(url)
        self._stale.add(stale)

        async def retire() -> None:
            await asyncio.sleep(STALE_GRACE)
            self._stale.discard(stale)
            await stale.close()

        task = asyncio.get_running_loop().create_task(retire(), name=f"channel-retire:{url}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        return channel

    def _rotated(self, svid: Any) -> None:
        """The SVID rotated: new calls get channels with the new certificate. An old channel
        keeps its connection and the calls on it (a monitor stream lives as long as the
        connection it watches): it is closed once its certificate expired (so that it never
        reconnects with it) and its connection is gone or idle (no call for the channel's idle
        timeout); closing it earlier would cancel those streams."""
        loop = asyncio.get_running_loop()
        old_expiry = _old_certificate_life(svid)
        # A rotation may bring another trust bundle: the servers' chains are checked anew.
        self._chains.clear()
        for url, stale in list(self._channels.items()):
            self._channels[url] = self._factory(url)
            self._warmed.pop(url, None)
            self._stale.add(stale)

            async def retire(stale: grpc.aio.Channel = stale) -> None:
                try:
                    await _retire_after_rotation(stale, old_expiry)
                finally:
                    self._stale.discard(stale)

            task = loop.create_task(retire(), name=f"channel-rotate:{url}")
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    async def close(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        warming, self._warming = list(self._warming.values()), {}
        self._warmed = {}
        peers, self._peers = list(self._peers.values()), {}
        for _, proof in peers:
            proof.cancel()
        for task in warming:
            task.cancel()
        await asyncio.gather(*warming, *(proof for _, proof in peers), return_exceptions=True)
        for task in list(self._retiring):
            task.cancel()
        stale, self._stale = self._stale, set()
        for channel in stale:
            await channel.close()
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            await channel.close()


# --- HTTP: a daemon's metrics ---------------------------------------------------------------------

#: Longest request head (request line and headers) the HTTP listener reads: 431 beyond.
MAX_HTTP_HEAD = 8 * 1024
#: How long a client of the HTTP listener has for its TLS handshake and its request head.
HTTP_READ_TIMEOUT = 10.0
#: Connections the HTTP listener serves at once; one more is closed at once, unanswered.
MAX_HTTP_CONNECTIONS = 32

#: What a route answers: the body and its content type.
HttpRoute = Callable[[], tuple[bytes, str]]

_REASONS = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
            405: "Method Not Allowed", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 505: "HTTP Version Not Supported"}


def _tls_context(security: Security, *, server: bool) -> ssl.SSLContext:
    """A TLS context with the current SVID that requires the peer's certificate to chain to the
    trust bundle; a client's also checks the server's DNS name (:attr:`Security.server_name`,
    which every SVID carries, as for gRPC)."""
    svid = security.svid
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=svid.bundle_pem.decode())
    fd = os.memfd_create("svid", os.MFD_CLOEXEC)  # the key never touches a disk
    try:
        os.write(fd, svid.chain_pem + svid.key_pem)
        context.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
    return context


async def http_get(url: str | Url, path: str, security: Security | None = None, *,
                   timeout: float = 10.0) -> tuple[int, bytes]:
    """GET ``path`` from an :class:`HttpListener` at ``url`` (HTTPS with ``security``'s SVID,
    HTTP without): the status and the body. Unavailable when it cannot connect or answer."""
    parsed = url if isinstance(url, Url) else parse_url(url)
    context: ssl.SSLContext | None = None
    name: str | None = None
    if security is not None and security.enabled:
        context, name = _tls_context(security, server=False), security.server_name
    try:
        async with asyncio.timeout(timeout):
            if parsed.is_unix:
                reader, writer = await asyncio.open_unix_connection(
                    parsed.path, ssl=context, server_hostname=name)
            else:
                reader, writer = await asyncio.open_connection(
                    parsed.host, parsed.port, ssl=context, server_hostname=name)
            try:
                writer.write(f"GET {path} HTTP/1.1\r\nHost: {name or 'localhost'}\r\n"
                             f"Connection: close\r\n\r\n".encode())
                answer = await reader.read()
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
    except (OSError, TimeoutError) as exc:
        raise Unavailable(f"GET {parsed}{path}: {exc!r}") from None
    head, _, body = answer.partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        raise Unavailable(f"GET {parsed}{path}: no HTTP answer ({answer[:40]!r})") from None
    return status, body


class _Refused(Exception):
    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


class HttpListener:
    """HTTP/1.1 GET (and HEAD) of a few fixed paths, a daemon's ``/metrics``, on one URL
    (``unix:///path`` or ``tcp://host:port``, port 0 picks one: :attr:`url` after start).

    With security on it is HTTPS with the process's current SVID (each handshake uses the SVID
    current then) and the client must present an SVID chaining to the trust bundle (else the
    handshake fails), of the trust domain and accepted by ``allowed(spiffe_id)`` (else 403).
    ``--insecure``: plain HTTP, anyone. One request per connection (``Connection: close``);
    a malformed request is 400, a head over :data:`MAX_HTTP_HEAD` 431, another method 405, an
    unknown path 404; a client slower than :data:`HTTP_READ_TIMEOUT` is dropped."""

    def __init__(self, url: str | Url, routes: dict[str, HttpRoute], *, security: Security,
                 allowed: Callable[[SpiffeId], bool]) -> None:
        self.url = url if isinstance(url, Url) else parse_url(url)
        self._routes = routes
        self._security = security
        self._allowed = allowed
        self._server: asyncio.Server | None = None
        self._created: list[Path] = []
        self._context: tuple[int, ssl.SSLContext] | None = None
        #: The connections being served.
        self._serving: set[asyncio.StreamWriter] = set()
        self.log = get_logger("nsm.http").bind(url=str(self.url))

    async def start(self) -> None:
        try:
            if self.url.is_unix:
                _prepare_unix_socket(self.url.path, self._created)
                self._server = await asyncio.start_unix_server(self._serve, self.url.path,
                                                               limit=MAX_HTTP_HEAD)
            else:
                self._server = await asyncio.start_server(self._serve, self.url.host, self.url.port,
                                                          limit=MAX_HTTP_HEAD, reuse_address=True)
                if self.url.port == 0:
                    self.url = self.url.with_port(self._server.sockets[0].getsockname()[1])
        except OSError as exc:
            _remove_dirs(self._created)
            raise FailedPrecondition(f"cannot listen on {self.url}: {exc.strerror or exc}") from exc

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for writer in list(self._serving):  # each handler ends on its connection's end
            writer.close()
        for _ in range(int(HTTP_READ_TIMEOUT / 0.01)):
            if not self._serving:
                break
            await asyncio.sleep(0.01)
        await server.wait_closed()
        if self.url.is_unix:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.url.path)
        _remove_dirs(self._created)

    def _tls(self) -> ssl.SSLContext:
        """The server's TLS context for the current SVID (made again after a rotation)."""
        generation = self._security.generation
        if self._context is None or self._context[0] != generation:
            self._context = (generation, _tls_context(self._security, server=True))
        return self._context[1]

    def _check_peer(self, writer: asyncio.StreamWriter) -> None:
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:
            raise _Refused(403, "no client certificate")
        try:
            sid = spiffe_id_of(x509.load_der_x509_certificate(der))
        except (ValueError, NsmError) as exc:
            raise _Refused(403, f"the client certificate is no SVID: {exc}") from None
        if sid.trust_domain != self._security.trust_domain:
            raise _Refused(403, f"{sid} is not of trust domain {self._security.trust_domain}")
        if not self._allowed(sid):
            raise _Refused(403, f"{sid} may not read this")

    def _answer(self, head: bytes) -> tuple[int, bytes, str, bool]:
        """The status, body and content type for a request head, and whether to send the body."""
        try:
            line = head.split(b"\r\n", 1)[0].decode("ascii")
            method, target, version = line.split(" ")
        except (UnicodeDecodeError, ValueError):
            raise _Refused(400, "malformed request line") from None
        if not version.startswith("HTTP/1."):
            raise _Refused(505, f"{version[:16]!r} is not HTTP/1.x")
        if method not in ("GET", "HEAD"):
            raise _Refused(405, f"method {method[:16]!r}")
        route = self._routes.get(target.split("?", 1)[0])
        if route is None:
            raise _Refused(404, f"no {target[:64]!r} here")
        try:
            body, content_type = route()
        except Exception as exc:
            self.log.error("route failed", path=target[:64], error=repr(exc))
            raise _Refused(500, "could not answer") from None
        return 200, body, content_type, method == "GET"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._serving) >= MAX_HTTP_CONNECTIONS:
            self.log.warning("too many connections: one closed", limit=MAX_HTTP_CONNECTIONS)
            writer.close()
            return
        self._serving.add(writer)
        status, body, content_type, send_body = 500, b"", "text/plain; charset=utf-8", True
        try:
            try:
                async with asyncio.timeout(HTTP_READ_TIMEOUT):
                    if self._security.enabled:
                        try:
                            context = self._tls()
                        except NsmError as exc:  # no SVID yet (the daemon is starting)
                            self.log.debug("no identity yet", error=exc.message)
                            return
                        await writer.start_tls(context)
                        self._check_peer(writer)
                    head = await reader.readuntil(b"\r\n\r\n")
                status, body, content_type, send_body = self._answer(head)
            except _Refused as refused:
                status, body = refused.status, f"{refused}\n".encode()
                if status == 403:
                    self.log.warning("denied", reason=str(refused))
            except asyncio.LimitOverrunError:
                status, body = 431, f"request head over {MAX_HTTP_HEAD} bytes\n".encode()
            except (asyncio.IncompleteReadError, TimeoutError, ConnectionError, OSError) as exc:
                self.log.debug("client dropped", error=repr(exc))
                return
            writer.write(f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
                         f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                         f"Connection: close\r\n\r\n".encode() + (body if send_body else b""))
            with contextlib.suppress(ConnectionError, OSError):
                async with asyncio.timeout(HTTP_READ_TIMEOUT):
                    await writer.drain()
        except TimeoutError:
            pass
        except Exception as exc:  # a client must never take the daemon down
            self.log.error("http connection failed", error=repr(exc))
        finally:
            self._serving.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(HTTP_READ_TIMEOUT):
                    await writer.wait_closed()
