"""Named network namespaces without the ``ip`` command and without forking.

For the lab (emulated nodes and pods), the demo and the tests; the forwarder only uses the small
primitives :func:`open_netns` and :func:`entered_netns` (through :mod:`nsm.kernel.netlink`).
Costs here: create 0.7 ms, delete 0.05 ms (the kernel destroys the namespace in the background),
``run_in_netns`` 0.5 ms (a fresh thread).

A named namespace is what ``ip netns add`` makes: an empty file ``/var/run/netns/<name>`` with the
namespace bind-mounted on it, inside a directory that is a shared mount point (so that mounts made in
other mount namespaces are seen). :func:`create_netns` makes it from a short-lived thread that
``unshare(CLONE_NEWNET)``s: unsharing the network namespace affects only the calling thread, never
the rest of the process. Python 3.11 has no ``os.setns``/``os.unshare``: libc's are used via ctypes.

Threads and namespaces: a thread that ``setns``'d somewhere keeps seeing its *own* namespace under
``/proc/thread-self`` and ``/proc/sys/net``, but ``/proc/net`` (= ``/proc/self/net``) and ``/sys/class/net``
still show the main thread's. Sockets (netlink included) belong to the namespace of the thread that
created them, for their whole life.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import os
import re
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from nsm.errors import AlreadyExists, Internal, InvalidArgument, NotFound, PermissionDenied
from nsm.mechanisms import inode_url as url_inode_url
from nsm.mechanisms import netns_inode as url_netns_inode
from nsm.mechanisms import netns_path as url_netns_path

T = TypeVar("T")

#: Where iproute2 keeps named namespaces (a symlink to /run/netns on most systems).
NETNS_RUN_DIR = "/var/run/netns"

CLONE_NEWNET = 0x40000000
MS_BIND = 0x1000
MS_REC = 0x4000
MS_SHARED = 1 << 20
MNT_DETACH = 0x2
_NSFS_MAGIC = 0x6E736673
_SIOCGIFINDEX = 0x8933
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_SIOCETHTOOL = 0x8946
_ETHTOOL_GLINK = 0x0A
#: Interface flags as ``SIOCGIFFLAGS`` reports them (its low 16 bits).
IFF_UP = 0x1
IFF_RUNNING = 0x40  # set by the kernel exactly when operstate is UP or UNKNOWN (carrier on)

_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,200}$")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)
_libc.unshare.argtypes = (ctypes.c_int,)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_void_p)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
_libc.fstatfs.argtypes = (ctypes.c_int, ctypes.c_void_p)


def _oserror(what: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


def setns(fd: int, nstype: int = CLONE_NEWNET) -> None:
    """Move the *calling thread* into the namespace open at ``fd`` (libc ``setns``)."""
    if _libc.setns(fd, nstype) != 0:
        raise _oserror("setns")


def unshare(flags: int) -> None:
    """libc ``unshare`` for the calling thread."""
    if _libc.unshare(flags) != 0:
        raise _oserror("unshare")


def _mount(source: str | None, target: str, fstype: str | None, flags: int) -> None:
    if _libc.mount(source.encode() if source else None, target.encode(),
                   fstype.encode() if fstype else None, flags, None) != 0:
        raise _oserror(f"mount {target}")


def _umount2(target: str, flags: int) -> None:
    if _libc.umount2(target.encode(), flags) != 0:
        raise _oserror(f"umount {target}")


def netns_path(name_or_path: str) -> str:
    """``/var/run/netns/<name>`` for a name; an absolute path is returned unchanged."""
    if name_or_path.startswith("/"):
        return name_or_path
    if not _NAME.match(name_or_path) or name_or_path in (".", ".."):
        raise InvalidArgument(f"network namespace name {name_or_path!r} is not valid")
    return os.path.join(NETNS_RUN_DIR, name_or_path)


def own_netns() -> str:
    """This process's network namespace, as a path other processes of its PID namespace can
    open (those of others: :func:`own_netns_url`)."""
    return f"/proc/{os.getpid()}/ns/net"


def own_netns_url() -> str:
    """How this process names its own network namespace to others: by identity
    (``inode://<dev>/<ino>``), which means the same to a reader in another PID namespace (a
    pod's PIDs mean nothing to the node's forwarder)."""
    return url_inode_url(netns_id(own_netns()))


def parse_netns(value: str | None) -> str:
    """The path :func:`resolve_netns` names, without checking that it exists (for callers that
    look again and again, to whom a namespace that disappears is news, not bad input). An
    ``inode://<dev>/<ino>`` URL is this process's own namespace when it is (:func:`own_netns`),
    else it is looked for (:class:`NetnsFinder`; NotFound when nothing holds it)."""
    if not value:
        return own_netns()
    ident = url_netns_inode(value)
    if ident is not None:
        return own_netns() if _stat_ident(own_netns()) == ident else NetnsFinder().path(ident)
    if value.startswith("file:"):
        return url_netns_path(value)
    return netns_path(value)


def resolve_netns(value: str | None) -> str:
    """The path of an existing network namespace named on a command line or in an API: a name
    under /var/run/netns, an absolute path, a ``file://`` URL, or nothing (this process's own).
    Raises NotFound when it does not exist and InvalidArgument when it is not a namespace."""
    path = parse_netns(value)
    os.close(open_netns(path))
    return path


def open_netns(path: str) -> int:
    """Open a network namespace file (``O_RDONLY|O_CLOEXEC``, never ``O_CREAT``) and check that it
    really is a network namespace. Raises NotFound or InvalidArgument."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"network namespace {path} does not exist") from None
    except IsADirectoryError:
        raise InvalidArgument(f"{path} is a directory, not a network namespace") from None
    except OSError as exc:
        raise InvalidArgument(f"cannot open network namespace {path}: {exc.strerror}") from None
    try:
        _check_netns_fd(fd, path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_netns_fd(fd: int, path: str) -> None:
    # NS_GET_NSTYPE (_IO(0xb7, 0x3)) answers CLONE_NEWNET for a network namespace; other files
    # (an unmounted leftover under /var/run/netns, a regular file) fail with ENOTTY.
    try:
        nstype = fcntl.ioctl(fd, 0xB703)
    except OSError:
        nstype = -1
    if nstype != CLONE_NEWNET:
        raise InvalidArgument(f"{path} is not a network namespace")


def fs_type(fd: int) -> int:
    """The filesystem magic of the file open at ``fd`` (``fstatfs``'s ``f_type``)."""
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit Linux
    if _libc.fstatfs(fd, buf) != 0:
        raise _oserror("fstatfs")
    return int(ctypes.c_long.from_buffer(buf).value)


#: A namespace's identity: (st_dev, st_ino) of its nsfs file.
NetnsId = tuple[int, int]


@dataclass(frozen=True)
class CheckedNetns:
    """A namespace a caller named, opened once and checked (:meth:`NodeNetns.open`): later
    work uses ``fd`` (or compares ``ident``), never the path again, so a path that changes
    meanwhile cannot redirect it. Close it with :meth:`close`."""

    path: str
    fd: int
    ident: NetnsId

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


class NetnsFinder:
    """Paths of network namespaces named by identity (``inode://<dev>/<ino>``:
    :func:`nsm.mechanisms.inode_url`), for a node daemon that sees every process of its node
    (the forwarder: hostPID on Kubernetes). A pod's own process names its namespace that way
    because its PIDs mean nothing outside its PID namespace, so no pod needs hostPID.

    A namespace is found as a name under ``/var/run/netns`` or as ``/proc/<pid>/ns/net`` of a
    process inside it, and remembered (checked again at each use: the process may have gone,
    and another been found). NotFound when no name and no process holds it. Only where to look
    is decided here; what may be done there is :class:`NodeNetns`'s and the proofs' to decide.

    A search lists the names and processes (no stat), looks the identity up among what each
    entry held when last looked at (confirmed by a stat), then stats the entries not looked at
    yet (a new pod's name or process) until it is found; only when that fails is every entry
    looked at again. So a new pod's namespace costs a listing and a few stats, not one stat per
    pod and process of the node. :meth:`prime` looks at every entry once, at start.
    """

    def __init__(self, *, proc: str = "/proc", run_dir: str = NETNS_RUN_DIR, keep: int = 1024) -> None:
        self.proc, self.run_dir, self.keep = proc, run_dir, keep
        self._known: dict[NetnsId, str] = {}
        #: Entries of the listings (those gone are dropped now and then), and the identity each
        #: held when last looked at (None: not a namespace then).
        self._seen: dict[str, NetnsId | None] = {}

    def path(self, ident: NetnsId) -> str:
        """A path of the namespace ``ident`` (NotFound if none)."""
        known = self._known.get(ident)
        if known is not None and _stat_ident(known) == ident:
            return known
        found = self._scan(ident)
        if found is None:
            self._known.pop(ident, None)
            raise NotFound(f"network namespace inode://{ident[0]}/{ident[1]} does not exist "
                           "(no name and no process of this node holds it)")
        if len(self._known) >= self.keep:
            self._known.clear()
        self._known[ident] = found
        return found

    def resolve(self, url: str, *, exists: bool = True) -> str:
        """The path of the namespace an ``inodeURL`` names (a path, or by inode): NotFound when
        it does not exist (a path is not looked at unless ``exists``: the caller opens it)."""
        ident = url_netns_inode(url)
        if ident is None:
            path = url_netns_path(url)
            if exists and not os.path.exists(path):
                raise NotFound(f"network namespace {path} does not exist")
            return path
        return self.path(ident)

    def prime(self) -> None:
        """Look at every entry now (at start, before serving): the namespaces that exist already
        (the pods of a node this daemon restarts on) are then found with one stat each."""
        for path in self._listing():
            self._seen[path] = _stat_ident(path)

    def _listing(self) -> list[str]:
        candidates: list[str] = []
        with contextlib.suppress(OSError):
            candidates += [e.path for e in os.scandir(self.run_dir)]
        with contextlib.suppress(OSError):
            candidates += [f"{e.path}/ns/net" for e in os.scandir(self.proc) if e.name.isdigit()]
        return candidates

    def _scan(self, ident: NetnsId) -> str | None:
        candidates = self._listing()
        seen = self._seen
        if len(seen) > 2 * len(candidates) + 64:  # entries gone since: forget them, now and then
            seen = self._seen = {p: seen[p] for p in candidates if p in seen}
        for path, held in seen.items():  # what held it when last looked at
            if held == ident and _stat_ident(path) == ident:
                return path
        for path in candidates:  # entries not looked at yet (a new pod's), until found
            if path not in seen:
                held = seen[path] = _stat_ident(path)
                if held == ident:
                    return path
        for path in candidates:  # an entry now holds another namespace than when last seen
            held = seen[path] = _stat_ident(path)
            if held == ident:
                return path
        return None


def _stat_ident(path: str) -> NetnsId | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class NodeNetns:
    """What a node daemon (the forwarder) may be asked to program: a network namespace that is
    not the node's. Made once at start: it remembers the identities of its own network
    namespace (``/proc/self/ns/net``: the node's, where the forwarder runs) and of PID 1's
    (``/proc/1/ns/net``: the host's, also when the node is emulated), and :meth:`open` refuses
    them and anything that is not a network namespace."""

    def __init__(self, *, refused: dict[NetnsId, str] | None = None) -> None:
        self.refused: dict[NetnsId, str] = {}
        for path, what in (("/proc/1/ns/net", "PID 1's network namespace"),
                           ("/proc/self/ns/net", "the node's own network namespace")):
            try:
                st = os.stat(path)
            except OSError:  # pragma: no cover - no /proc, or PID 1 hidden from us
                continue
            self.refused[(st.st_dev, st.st_ino)] = what
        self.refused.update(refused or {})

    def open(self, path: str) -> CheckedNetns:
        """Open ``path`` once (``O_RDONLY|O_CLOEXEC|O_NOCTTY``, never ``O_CREAT``) and check the
        file itself: on nsfs, ``NS_GET_NSTYPE`` = ``CLONE_NEWNET``, and not one of the refused
        namespaces. NotFound when it does not exist; PermissionDenied, with the reason, for
        anything else."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
        except FileNotFoundError:
            raise NotFound(f"network namespace {path} does not exist") from None
        except OSError as exc:
            raise PermissionDenied(f"{path} cannot be opened as a network namespace: "
                                   f"{exc.strerror}") from None
        try:
            ident = self.check(fd, path)
        except BaseException:
            os.close(fd)
            raise
        return CheckedNetns(path=path, fd=fd, ident=ident)

    def check(self, fd: int, path: str) -> NetnsId:
        """The checks of :meth:`open` on an open file; its identity."""
        try:
            on_nsfs = fs_type(fd) == _NSFS_MAGIC
        except OSError:
            on_nsfs = False
        if not on_nsfs:
            raise PermissionDenied(f"{path} is not a namespace file (not on nsfs)")
        try:
            nstype = fcntl.ioctl(fd, 0xB703)  # NS_GET_NSTYPE
        except OSError:
            nstype = -1
        if nstype != CLONE_NEWNET:
            raise PermissionDenied(f"{path} is not a network namespace")
        st = os.fstat(fd)
        ident = (st.st_dev, st.st_ino)
        what = self.refused.get(ident)
        if what is not None:
            raise PermissionDenied(f"{path} is {what}: a forwarder programs only pods' "
                                   "namespaces")
        return ident


def netns_id(path: str) -> tuple[int, int]:
    """(device, inode) identifying the namespace at ``path`` (NotFound if missing)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise NotFound(f"network namespace {path} does not exist") from None
    return st.st_dev, st.st_ino


@contextlib.contextmanager
def entered_netns(fd: int) -> Iterator[None]:
    """Run a *synchronous* block with the calling thread inside the namespace open at ``fd``, then
    return to the thread's original namespace. Never ``await`` inside: another coroutine would run
    in the wrong namespace."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns(fd)
        try:
            yield
        finally:
            try:
                setns(own)
            except OSError as exc:  # pragma: no cover - the thread would be stranded
                raise SystemExit(f"FATAL: cannot return to own network namespace: {exc}") from exc
    finally:
        os.close(own)


def _ensure_run_dir() -> None:
    """Create NETNS_RUN_DIR and make it a shared mount point, as iproute2 does."""
    os.makedirs(NETNS_RUN_DIR, mode=0o755, exist_ok=True)
    dfd = os.open(NETNS_RUN_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(dfd, fcntl.LOCK_EX)  # concurrent creators (xdist workers) bind only once
        try:
            _mount(None, NETNS_RUN_DIR, "none", MS_SHARED | MS_REC)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            # Not a mount point yet: bind it onto itself, then make it shared.
            _mount(NETNS_RUN_DIR, NETNS_RUN_DIR, "none", MS_BIND | MS_REC)
            _mount(None, NETNS_RUN_DIR, "none", MS_SHARED | MS_REC)
    finally:
        os.close(dfd)


def _run_in_thread(fn: Callable[[], T]) -> T:
    result: list[Any] = []

    def target() -> None:
        try:
            result.append((True, fn()))
        except BaseException as exc:  # handed to the caller
            result.append((False, exc))

    thread = threading.Thread(target=target, name="nsm-netns", daemon=True)
    thread.start()
    thread.join()
    ok, value = result[0]
    if ok:
        return value  # type: ignore[no-any-return]
    raise value


def _ifreq(fd: int, request: int, name: str, fmt: str) -> int | None:
    req = struct.pack(f"16s{fmt}", name.encode(), 0).ljust(40, b"\0")  # struct ifreq
    try:
        return int(struct.unpack_from(f"16s{fmt}", fcntl.ioctl(fd, request, req))[1])
    except OSError as exc:
        if exc.errno == errno.ENODEV:
            return None
        raise


def interface_index(fd: int, name: str) -> int | None:
    """The index of interface ``name`` in the namespace of the socket ``fd`` (``SIOCGIFINDEX``:
    an ioctl, no round trip, < 1 µs); None if there is no such interface. Any socket will do:
    a socket belongs to the namespace it was created in."""
    return _ifreq(fd, _SIOCGIFINDEX, name, "i")


def interface_flags(fd: int, name: str) -> int | None:
    """The flags (``IFF_UP``, ``IFF_RUNNING``, …) of interface ``name`` in the namespace of the
    socket ``fd`` (``SIOCGIFFLAGS``); None if there is no such interface."""
    return _ifreq(fd, _SIOCGIFFLAGS, name, "H")


def interface_carrier(fd: int, name: str) -> bool | None:
    """Whether interface ``name`` (in the namespace of the socket ``fd``) has carrier *now*, as its
    driver says (``ETHTOOL_GLINK``; for a veth: both ends up). ``IFF_RUNNING`` follows carrier
    through the kernel's linkwatch, which takes up to a second to notice a loss. None when the
    driver cannot tell or there is no such interface."""
    value = ctypes.create_string_buffer(struct.pack("II", _ETHTOOL_GLINK, 0), 8)
    req = struct.pack("16sP", name.encode(), ctypes.addressof(value)).ljust(40, b"\0")
    try:
        fcntl.ioctl(fd, _SIOCETHTOOL, req)
    except OSError as exc:
        if exc.errno in (errno.ENODEV, errno.EOPNOTSUPP):
            return None
        raise
    return bool(struct.unpack("II", value.raw)[1])


def _set_lo_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        flags = interface_flags(s.fileno(), "lo") or 0
        fcntl.ioctl(s.fileno(), _SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | IFF_UP))


def create_netns(name: str, *, lo_up: bool = True) -> str:
    """Create the named network namespace and return its path (``/var/run/netns/<name>``).

    AlreadyExists if the name is taken. ``lo_up`` brings the loopback up (``ip netns add`` leaves
    it down). Nothing is left behind on failure."""
    path = netns_path(name)
    if not path.startswith(NETNS_RUN_DIR + "/"):
        raise InvalidArgument(f"create_netns takes a name, not the path {name!r}")
    _ensure_run_dir()
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0))
    except FileExistsError:
        raise AlreadyExists(f"network namespace {path} already exists") from None

    def make() -> None:
        unshare(CLONE_NEWNET)  # this thread only; it exits right after
        _mount("/proc/thread-self/ns/net", path, "none", MS_BIND)
        if lo_up:
            _set_lo_up()

    try:
        _run_in_thread(make)
    except BaseException as exc:
        _remove(path)
        if isinstance(exc, OSError):
            raise Internal(f"cannot create network namespace {path}: {exc}") from exc
        raise
    return path


def _remove(path: str) -> bool:
    mounted = True
    try:
        _umount2(path, MNT_DETACH)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOENT):
            raise Internal(f"cannot unmount network namespace {path}: {exc}") from exc
        mounted = False
    try:
        os.unlink(path)
    except FileNotFoundError:
        return mounted
    return True


def delete_netns(name: str) -> bool:
    """Delete a named namespace (unmount + unlink). Idempotent: False when it did not exist.

    The kernel destroys the namespace (and its interfaces) in the background once nothing else
    holds it: no process inside, no open fd, no socket created in it."""
    path = netns_path(name)
    if not path.startswith(NETNS_RUN_DIR + "/"):
        raise InvalidArgument(f"delete_netns takes a name, not the path {name!r}")
    return _remove(path)


def list_netns() -> list[str]:
    """Names of the named namespaces (sorted)."""
    try:
        return sorted(n for n in os.listdir(NETNS_RUN_DIR) if not n.startswith("."))
    except FileNotFoundError:
        return []


def netns_exists(name: str) -> bool:
    """Whether ``name`` (or a path) is a mounted network namespace."""
    try:
        fd = open_netns(netns_path(name))
    except (NotFound, InvalidArgument):
        return False
    os.close(fd)
    return True


def run_in_netns(path: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run the synchronous ``fn(*args, **kwargs)`` in a fresh thread that has entered the network
    namespace ``path`` (a path or a name); return its result or raise its exception. Sockets it
    creates belong to that namespace."""
    fd = open_netns(netns_path(path))

    def call() -> T:
        try:
            setns(fd)
        finally:
            os.close(fd)
        return fn(*args, **kwargs)

    return _run_in_thread(call)


async def arun_in_netns(path: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """:func:`run_in_netns` without blocking the event loop."""
    return await asyncio.to_thread(run_in_netns, path, fn, *args, **kwargs)
