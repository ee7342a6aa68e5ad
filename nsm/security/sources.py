"""Where a process's SVID comes from, and how it is renewed.

- :class:`CaSource`: issued by the built-in CA (:mod:`nsm.security.ca`), renewed at half its life;
- :class:`FilesSource`: PEM files (certificate chain, key, bundle) written and rotated by
  cert-manager's csi-driver-spiffe (``tls.crt``, ``tls.key``, ``ca.crt``) or spiffe-helper
  (``svid.pem``, ``svid_key.pem``, ``svid_bundle.pem``), reloaded when they change;
- :class:`WorkloadApiSource`: the SPIFFE Workload API (a SPIRE agent's socket) through py-spiffe,
  which streams rotations.

Every source gives the current :class:`~nsm.security.svid.Svid` and calls its subscribers on
the event loop when it changes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes

from nsm.errors import FailedPrecondition, NsmError
from nsm.log import get_logger
from nsm.security.ca import DEFAULT_SVID_TTL, CertificateAuthority
from nsm.security.svid import Svid, now

log = get_logger("nsm.security")

#: File names of the two layouts :class:`FilesSource` reads from a directory.
FILE_LAYOUTS: tuple[tuple[str, str, str], ...] = (
    ("svid.pem", "svid_key.pem", "svid_bundle.pem"),  # spiffe-helper
    ("tls.crt", "tls.key", "ca.crt"),  # cert-manager csi-driver-spiffe
)
#: How often :class:`FilesSource` looks whether its files changed.
FILES_POLL = 1.0


class SvidSource:
    """The current SVID and who wants to hear of the next one."""

    def __init__(self) -> None:
        self._svid: Svid | None = None
        self._subscribers: list[Callable[[Svid], None]] = []

    @property
    def svid(self) -> Svid:
        if self._svid is None:
            raise FailedPrecondition("no SVID yet: the identity source is not started")
        return self._svid

    def subscribe(self, callback: Callable[[Svid], None]) -> Callable[[], None]:
        """Call ``callback(svid)`` on every rotation; returns the unsubscribe."""
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback) if callback in self._subscribers else None

    def _set(self, svid: Svid) -> None:
        current = self._svid
        if current is not None and current.chain == svid.chain and current.bundle == svid.bundle:
            return  # the same SVID again (files touched, the Workload API resending): no rotation
        first = current is None
        self._svid = svid
        if not first:
            log.info("SVID rotated", spiffe_id=svid.id, expires=f"{svid.expires:%Y-%m-%dT%H:%M:%SZ}")
            for callback in list(self._subscribers):
                callback(svid)

    async def start(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        """Stop renewing."""


class _Renewing(SvidSource):
    """A source with a background task of its own."""

    def __init__(self) -> None:
        super().__init__()
        self._task: asyncio.Task[None] | None = None

    def _run(self, coro: Any, name: str) -> None:
        self._task = asyncio.get_running_loop().create_task(coro, name=name)

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class CaSource(_Renewing):
    """An SVID issued by the built-in CA kept in ``ca_dir`` (created when absent), renewed when
    half its life is gone."""

    def __init__(self, ca: CertificateAuthority | str | Path, spiffe_id: str, *, trust_domain: str,
                 ttl: float = DEFAULT_SVID_TTL, dns_names: tuple[str, ...] = (), create: bool = True) -> None:
        super().__init__()
        self._ca_arg = ca
        self.trust_domain = trust_domain
        self.spiffe_id = spiffe_id
        self.ttl = ttl
        self.dns_names = dns_names
        self.ca: CertificateAuthority | None = ca if isinstance(ca, CertificateAuthority) else None
        #: Whether a missing CA directory is made (a daemon), or refused (a probe).
        self.create = create

    def _issue(self) -> Svid:
        assert self.ca is not None
        return self.ca.issue(self.spiffe_id, ttl=self.ttl, dns_names=self.dns_names)

    async def start(self) -> None:
        if self.ca is None:
            assert not isinstance(self._ca_arg, CertificateAuthority)
            self.ca = await asyncio.to_thread(CertificateAuthority.open, self._ca_arg, self.trust_domain,
                                              create=self.create)
        self._set(self._issue())
        self._run(self._renew(), f"svid-renew:{self.spiffe_id}")

    async def _renew(self) -> None:
        while True:
            left = (self.svid.expires - now()).total_seconds()
            await asyncio.sleep(max(0.05, left / 2))
            self._set(self._issue())


def files_in(directory: str | Path) -> tuple[Path, Path, Path]:
    """The (certificate, key, bundle) paths of the layout found in ``directory``."""
    base = Path(directory)
    for names in FILE_LAYOUTS:
        paths = tuple(base / n for n in names)
        if all(p.exists() for p in paths):
            return paths  # type: ignore[return-value]
    layouts = "; ".join(", ".join(n) for n in FILE_LAYOUTS)
    raise FailedPrecondition(f"no SVID files in {base} (looked for {layouts})")


class FilesSource(_Renewing):
    """An SVID read from PEM files, read again when one of them changes (a writer replacing the
    files one at a time may leave a moment where they do not match: that read is skipped and
    the next poll tries again)."""

    def __init__(self, cert: str | Path, key: str | Path, bundle: str | Path, *,
                 poll: float = FILES_POLL, trust_domain: str | None = None) -> None:
        super().__init__()
        self.paths = (Path(cert), Path(key), Path(bundle))
        self.poll = poll
        #: When given, files holding an SVID of another trust domain are refused.
        self.trust_domain = trust_domain
        self._stamp: tuple[tuple[int, int, int], ...] = ()
        #: The stamp of the last set that could not be used (not read again until it changes).
        self._failed: tuple[tuple[int, int, int], ...] = ()

    @classmethod
    def directory(cls, directory: str | Path, *, poll: float = FILES_POLL,
                  trust_domain: str | None = None) -> FilesSource:
        return cls(*files_in(directory), poll=poll, trust_domain=trust_domain)

    def _stat(self) -> tuple[tuple[int, int, int], ...]:
        out = []
        for p in self.paths:
            st = p.stat()
            out.append((st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(out)

    def _read(self) -> Svid:
        try:
            cert, key, bundle = (p.read_bytes() for p in self.paths)
        except OSError as exc:
            raise FailedPrecondition(f"cannot read SVID file {exc.filename}: {exc.strerror}") from exc
        svid = Svid.from_pem(cert, key, bundle)
        if self.trust_domain is not None and svid.trust_domain != self.trust_domain:
            raise FailedPrecondition(f"{self.paths[0]} holds an SVID of {svid.id}, not of trust "
                                     f"domain {self.trust_domain}")
        return svid

    async def start(self) -> None:
        self._stamp = await asyncio.to_thread(self._stat_or_empty)
        self._set(await asyncio.to_thread(self._read))
        self._run(self._watch(), f"svid-files:{self.paths[0]}")

    def _stat_or_empty(self) -> tuple[tuple[int, int, int], ...]:
        try:
            return self._stat()
        except OSError:
            return ()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll)
            stamp = self._stat_or_empty()
            if not stamp or stamp in (self._stamp, self._failed):
                continue
            # Whatever the files hold, the watch goes on: a set being rewritten (or one that is
            # not an SVID at all) is skipped, and the next change is read again.
            try:
                svid = self._read()
            except NsmError as exc:
                self._failed = stamp
                log.info("SVID files not usable (yet)", path=str(self.paths[0]), error=exc.message)
                continue
            except Exception as exc:
                self._failed = stamp
                log.warning("SVID files not usable", path=str(self.paths[0]), error=repr(exc))
                continue
            self._stamp = stamp
            self._set(svid)


class WorkloadApiSource(SvidSource):
    """The SVID (and bundle) of the SPIFFE Workload API at ``socket`` (``unix:///path``), as
    py-spiffe's ``X509Source`` streams them (its own thread; each update is handed to the event
    loop). An SVID of another trust domain than ``trust_domain`` is refused."""

    def __init__(self, socket: str, *, trust_domain: str, timeout: float = 10.0) -> None:
        super().__init__()
        self.socket = socket
        self.trust_domain = trust_domain
        self.timeout = timeout
        self._source: Any = None
        self._callback: Callable[[], None] | None = None

    def _convert(self, source: Any) -> Svid:
        # One coherent snapshot of the SVID and the bundles (``X509Source.svid`` and a bundle
        # asked for after it could come from two updates; ``.svid`` is deprecated too).
        context = source.get_x509_context()
        svid = context.default_svid
        bundle = context.x509_bundle_set.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
        authorities = sorted(bundle.x509_authorities if bundle is not None else (),
                             key=lambda c: c.fingerprint(hashes.SHA256()))
        if not authorities:
            raise FailedPrecondition(f"the Workload API at {self.socket} sent no trust bundle for "
                                     f"{svid.spiffe_id}")
        out = Svid(tuple(svid.cert_chain), svid.private_key, tuple(authorities))
        if out.trust_domain != self.trust_domain:
            raise FailedPrecondition(f"the Workload API at {self.socket} gives {out.id}, not an "
                                     f"SVID of trust domain {self.trust_domain}")
        return out

    async def start(self) -> None:
        from spiffe import X509Source  # imported only where a SPIRE agent is used

        loop = asyncio.get_running_loop()
        try:
            source = await asyncio.to_thread(
                X509Source, socket_path=self.socket, timeout_in_seconds=self.timeout)
        except Exception as exc:  # py-spiffe raises its own error types
            raise FailedPrecondition(f"SPIFFE Workload API at {self.socket}: {exc}") from exc
        try:
            first = self._convert(source)
        except BaseException:
            await asyncio.to_thread(source.close)
            raise
        self._source = source
        self._set(first)

        def changed() -> None:  # in py-spiffe's thread
            try:
                svid = self._convert(source)
            except Exception as exc:  # an unusable update: keep the current SVID
                message = exc.message if isinstance(exc, NsmError) else repr(exc)
                log.warning("Workload API sent an unusable SVID", error=message)
                return
            with contextlib.suppress(RuntimeError):  # the loop is closed: we are done anyway
                loop.call_soon_threadsafe(self._set, svid)

        self._callback = changed
        source.subscribe_for_updates(changed)
        changed()  # an update that came before the subscription (the same SVID is no rotation)

    async def close(self) -> None:
        source, self._source = self._source, None
        callback, self._callback = self._callback, None
        if source is not None:
            if callback is not None:
                source.unsubscribe_for_updates(callback)
            await asyncio.to_thread(source.close)
