"""SPIFFE IDs: parsing, and the IDs the mesh's own daemons carry.

An ID is ``spiffe://<trust domain>/<path>``. The mesh's infrastructure has IDs of a fixed shape
(so that authorization can tell a node's manager or forwarder from a workload, with SPIRE, a
``ClusterSPIFFEID`` template produces them):

- the registry: ``spiffe://<td>/nsm/registry``
- on node N: ``spiffe://<td>/nsm/node/<N>/manager``, ``.../forwarder``, ``.../cni-agent``

Every other ID is a workload (clients and endpoints; on Kubernetes
``spiffe://<td>/ns/<namespace>/pod/<pod>`` or ``.../sa/<service account>``).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from nsm.errors import InvalidArgument

SCHEME = "spiffe://"
#: Trust domain of the built-in CA unless configured (``--trust-domain``).
DEFAULT_TRUST_DOMAIN = "nsm.lab"
#: Longest SPIFFE ID accepted (the SPIFFE spec's URI limit).
MAX_ID = 2048

_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]{1,255}$")
_SEGMENT = re.compile(r"^[A-Za-z0-9._-]+$")

#: Roles of the mesh's own daemons.
REGISTRY = "registry"
MANAGER = "manager"
FORWARDER = "forwarder"
CNI_AGENT = "cni-agent"
NODE_ROLES = (MANAGER, FORWARDER, CNI_AGENT)


@dataclass(frozen=True)
class SpiffeId:
    trust_domain: str
    path: str  # "" or "/a/b"

    def __str__(self) -> str:
        return f"{SCHEME}{self.trust_domain}{self.path}"

    @property
    def role(self) -> str | None:
        """``registry``, ``manager``, ``forwarder`` or ``cni-agent`` for the mesh's own daemons;
        None for a workload."""
        parts = self.path.split("/")
        if parts[1:] == ["nsm", REGISTRY]:
            return REGISTRY
        if len(parts) == 5 and parts[1:3] == ["nsm", "node"] and parts[4] in NODE_ROLES:
            return parts[4]
        return None

    @property
    def node(self) -> str | None:
        """The node of a node daemon's ID (manager, forwarder, CNI agent), else None."""
        if self.role in NODE_ROLES:
            return self.path.split("/")[3]
        return None


#: Longest DNS name (RFC 1035).
MAX_DNS_NAME = 253
#: A DNS name of lower-case labels (what a Kubernetes node name is).
_DNS = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")


def identity_name(spiffe_id: str | SpiffeId, server_name: str) -> str | None:
    """The DNS name that stands for ``spiffe_id`` under ``server_name``; None when it would be
    too long for DNS:

    - a node daemon (``spiffe://<td>/nsm/node/<N>/<role>``, ``N`` a DNS name):
      ``<role>.<N>.<server_name>`` (a SPIRE ``ClusterSPIFFEID`` can template it:
      ``<role>.{{ .PodSpec.NodeName }}.{{ .TrustDomain }}``);
    - any other identity: ``id-<first 160 bits of sha256(ID), hex>.<server_name>``.

    Distinct identities never share a name (a role label never starts with ``id-``). The
    built-in CA puts it in every SVID beside ``server_name``. A client that expects a server to
    be ``spiffe_id`` asks for this name instead of ``server_name``: grpcio's hostname check then
    proves, within the TLS handshake, that the server holds the key of a certificate of the
    trust domain issued for ``spiffe_id``, with no round trip of its own
    (:mod:`nsm.security.prove`). So no SVID may carry another identity's name, nor a wildcard
    under ``server_name``."""
    text = str(spiffe_id)
    try:
        sid = spiffe_id if isinstance(spiffe_id, SpiffeId) else parse_id(text)
    except InvalidArgument:
        sid = None
    node = sid.node if sid is not None else None
    if sid is not None and node is not None and _DNS.match(node):
        name = f"{sid.role}.{node}.{server_name}"
    else:
        name = f"id-{hashlib.sha256(text.encode()).hexdigest()[:40]}.{server_name}"
    return name if len(name) <= MAX_DNS_NAME else None


def check_trust_domain(text: str) -> str:
    if not isinstance(text, str) or not _TRUST_DOMAIN.match(text):
        raise InvalidArgument(f"trust domain {str(text)[:60]!r} is not a valid SPIFFE trust domain "
                              "(lower-case letters, digits, '.', '-', '_')")
    return text


def parse_id(text: str) -> SpiffeId:
    """Parse a SPIFFE ID; InvalidArgument when it is not one."""
    if not isinstance(text, str) or len(text) > MAX_ID or not text.startswith(SCHEME):
        raise InvalidArgument(f"{str(text)[:80]!r} is not a SPIFFE ID (spiffe://trust-domain/path)")
    rest = text[len(SCHEME):]
    td, slash, path = rest.partition("/")
    check_trust_domain(td)
    if slash:
        segments = path.split("/")
        if any(not _SEGMENT.match(s) or s in (".", "..") for s in segments):
            raise InvalidArgument(f"SPIFFE ID {text[:80]!r} has an empty or invalid path segment")
        return SpiffeId(td, "/" + path)
    return SpiffeId(td, "")


def _segment(text: str, what: str) -> str:
    if not _SEGMENT.match(text or "") or text in (".", ".."):
        raise InvalidArgument(f"{what} {text[:60]!r} cannot be part of a SPIFFE ID")
    return text


def registry_id(trust_domain: str) -> str:
    return f"{SCHEME}{check_trust_domain(trust_domain)}/nsm/{REGISTRY}"


def node_id(trust_domain: str, node: str, role: str) -> str:
    """The ID of a node daemon (``role`` one of :data:`NODE_ROLES`) on ``node``."""
    if role not in NODE_ROLES:
        raise InvalidArgument(f"{role!r} is not a node role ({', '.join(NODE_ROLES)})")
    return f"{SCHEME}{check_trust_domain(trust_domain)}/nsm/node/{_segment(node, 'node name')}/{role}"


def workload_id(trust_domain: str, name: str, namespace: str = "default") -> str:
    """A workload's ID in the Kubernetes shape ``spiffe://<td>/ns/<namespace>/pod/<name>``."""
    return (f"{SCHEME}{check_trust_domain(trust_domain)}/ns/{_segment(namespace, 'namespace')}"
            f"/pod/{_segment(name, 'workload name')}")
