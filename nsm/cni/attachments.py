"""What the node agent holds per pod, and how it is written down: pure data, no I/O but the
state directory's files.

- :func:`parse_requests`: the services a pod asks for, in the pod annotation's syntax
  ``kernel://<service>[@domain]/<ifname>[?label=value&...]`` (comma-separated, or a list).
- :class:`Attachment`: one CNI attachment (container id, ``CNI_IFNAME``, network name) and its
  :class:`Link`\\ s, one NSM connection each, with a connection id derived from the attachment
  and the interface name (:func:`connection_id`): stable, so a restarted agent finds every
  connection again by id and adopts it.
- :class:`StateDir`: one JSON file per attachment, written atomically (temporary file, fsync,
  rename), read back at start.
- :func:`add_result`: ``prevResult`` passed through with the attachment's interfaces (with
  ``sandbox``), addresses and routes appended, in the config's version's shape (0.3.x and 0.4.0
  addresses carry ``version``).
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from nsm.cni.spec import INVALID_CONFIG, CniError, version_at_least
from nsm.errors import InvalidArgument
from nsm.mechanisms import validate_ifname
from nsm.names import check_name

SCHEME = "kernel"
#: Interface names given to requests that name none (in chained mode): nsm-1, nsm-2, ...
DEFAULT_IFNAME = "nsm-{}"


@dataclass(frozen=True)
class ServiceRequest:
    """One ``kernel://service[@domain]/ifname?labels`` request."""

    url: str
    service: str
    ifname: str
    labels: tuple[tuple[str, str], ...] = ()


def _split(value: Any) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise CniError(INVALID_CONFIG, "services must be a list of kernel://<service>/<ifname> "
                                       f"strings, not {value!r}"[:300])
    return [part.strip() for item in items for part in item.split(",") if part.strip()]


def parse_request(text: str, default_ifname: str) -> ServiceRequest:
    """One request (CniError 7 when malformed)."""
    try:
        parts = urlsplit(text)
        if parts.scheme != SCHEME:
            raise InvalidArgument(f"the scheme must be {SCHEME}://")
        service = unquote(parts.netloc)
        check_name(service, "network service")
        ifname = unquote(parts.path.strip("/")) or default_ifname
        validate_ifname(ifname, "interface name")
        labels = tuple(parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query)))
        for key, _ in labels:
            check_name(key, "label name")
    except (InvalidArgument, ValueError) as exc:
        message = exc.message if isinstance(exc, InvalidArgument) else str(exc)
        raise CniError(INVALID_CONFIG, f"bad network service request {text!r}: {message}",
                       "expected kernel://<service>[@domain]/<ifname>[?label=value&...]") from None
    return ServiceRequest(text, service, ifname, labels)


def parse_requests(value: Any, *, cni_ifname: str, delegate: bool) -> list[ServiceRequest]:
    """The config's ``services`` (a list of requests, each may hold several comma-separated).
    A request without an interface name gets ``CNI_IFNAME`` when the plugin is a delegate (not
    chained) and asks for one service, else ``nsm-<n>``. CniError 7 when malformed, empty, or
    two requests name the same interface."""
    texts = _split(value)
    if not texts:
        raise CniError(INVALID_CONFIG, "the config asks for no network service (services is empty)")
    out = []
    for n, text in enumerate(texts, 1):
        default = cni_ifname if delegate and len(texts) == 1 else DEFAULT_IFNAME.format(n)
        out.append(parse_request(text, default))
    names = [r.ifname for r in out]
    for name in names:
        if names.count(name) > 1:
            raise CniError(INVALID_CONFIG, f"two network service requests name interface {name}")
    return out


def connection_id(agent: str, container_id: str, cni_ifname: str, ifname: str) -> str:
    """The stable connection id of one link of an attachment."""
    digest = hashlib.sha256("\0".join((container_id, cni_ifname, ifname)).encode()).hexdigest()
    return f"{agent}-{digest[:20]}"


@dataclass
class Link:
    """One NSM interface in a pod (one connection)."""

    service: str
    ifname: str
    conn_id: str
    labels: dict[str, str] = field(default_factory=dict)
    url: str = ""
    ifindex: int | None = None
    mac: str | None = None
    mtu: int | None = None
    addresses: list[str] = field(default_factory=list)
    routes: list[tuple[str, str | None]] = field(default_factory=list)
    #: Last state of the connection (established, refreshed, down, healed, failed, adopting).
    state: str = "requested"


@dataclass
class Attachment:
    """One CNI attachment: (container id, ``CNI_IFNAME``) of network ``network``."""

    container_id: str
    cni_ifname: str
    network: str
    netns: str
    #: (st_dev, st_ino) of the namespace at ADD: a namespace re-created at the same path is not it.
    netns_id: tuple[int, int]
    cni_version: str
    links: list[Link] = field(default_factory=list)
    pod: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str]:
        return (self.container_id, self.cni_ifname)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Attachment:
        data = dict(obj)
        links = [Link(**{**link, "routes": [tuple(r) for r in link.get("routes", [])]})
                 for link in data.pop("links", [])]
        data["netns_id"] = tuple(data["netns_id"])
        return cls(**data, links=links)

    def summary(self) -> dict[str, Any]:
        """What a listing shows of it."""
        return {"containerID": self.container_id, "ifname": self.cni_ifname, "network": self.network,
                "netns": self.netns, "pod": self.pod,
                "links": [{"ifname": lk.ifname, "service": lk.service, "id": lk.conn_id,
                           "state": lk.state, "ifindex": lk.ifindex, "addresses": lk.addresses}
                          for lk in self.links]}


class StateDir:
    """One ``<digest>.json`` per attachment under ``path`` (mode 0700)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def create(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.path, 0o700)

    def file(self, key: tuple[str, str]) -> Path:
        return self.path / f"{hashlib.sha256(chr(0).join(key).encode()).hexdigest()[:32]}.json"

    def save(self, att: Attachment) -> None:
        target = self.file(att.key)
        tmp = target.with_suffix(f".tmp{os.getpid()}")
        data = json.dumps(att.to_json(), indent=1).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)

    def remove(self, key: tuple[str, str]) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.file(key).unlink()

    def load(self) -> tuple[list[Attachment], list[str]]:
        """Every attachment written down, and what could not be read (those files are removed)."""
        found, bad = [], []
        for path in sorted(self.path.glob("*.json")):
            try:
                found.append(Attachment.from_json(json.loads(path.read_text())))
            except (OSError, ValueError, TypeError, KeyError) as exc:
                bad.append(f"{path.name}: {exc}")
                with contextlib.suppress(OSError):
                    path.unlink()
        for tmp in self.path.glob("*.tmp*"):
            with contextlib.suppress(OSError):
                tmp.unlink()
        return found, bad


def _family(address: str) -> str:
    return str(ipaddress.ip_interface(address).version)


def add_result(prev: Mapping[str, Any] | None, links: Sequence[Link], *, netns: str,
               version: str) -> dict[str, Any]:
    """ADD's result: ``prev`` (or an empty result) with ``links`` appended (see the module)."""
    out: dict[str, Any] = dict(prev or {})
    out["cniVersion"] = version
    interfaces = list(out.get("interfaces") or [])
    ips = list(out.get("ips") or [])
    routes = list(out.get("routes") or [])
    for link in links:
        iface: dict[str, Any] = {"name": link.ifname, "sandbox": netns}
        if link.mac:
            iface["mac"] = link.mac
        if link.mtu and version == "1.1.0":
            iface["mtu"] = link.mtu
        interfaces.append(iface)
        for address in link.addresses:
            ip: dict[str, Any] = {"address": address, "interface": len(interfaces) - 1}
            if not version_at_least(version, "1.0.0"):  # 0.3.x and 0.4.0
                ip["version"] = _family(address)
            ips.append(ip)
        for dst, gw in link.routes:
            routes.append({"dst": dst, **({"gw": gw} if gw else {})})
    out["interfaces"] = interfaces
    if ips:
        out["ips"] = ips
    if routes:
        out["routes"] = routes
    return out


def valid_attachments(config: Mapping[str, Any]) -> set[tuple[str, str]]:
    """GC's attachments still in use (either key; CniError 7 when malformed)."""
    keep: set[tuple[str, str]] = set()
    for key in ("cni.dev/valid-attachments", "cni.dev/attachments"):
        value = config.get(key)
        if value is None:
            continue
        if not isinstance(value, list):
            raise CniError(INVALID_CONFIG, f"{key} must be a list")
        for item in value:
            if (not isinstance(item, dict) or not isinstance(item.get("containerID"), str)
                    or not isinstance(item.get("ifname"), str)):
                raise CniError(INVALID_CONFIG, f"{key} holds {item!r}, not {{containerID, ifname}}")
            keep.add((item["containerID"], item["ifname"]))
    return keep
