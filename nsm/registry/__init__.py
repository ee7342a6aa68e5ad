"""The NSM registry: network services and endpoints, with expiry and watches.

- :mod:`nsm.registry.matching` — pure query and endpoint-selection rules;
- :mod:`nsm.registry.store` / :mod:`nsm.registry.memory` — the storage interface (records with
  revisions, compare-and-set, expiry, watches) and the in-memory store;
- :mod:`nsm.registry.server` — :class:`Registry` and its gRPC servicers;
- :mod:`nsm.registry.authz` — who may register and unregister what (owners, managers' nodes,
  forwarder records, URLs proven to belong to their registrant);
- :mod:`nsm.registry.client` — :class:`RegistryClient` (the one way to the registry, for every
  role) and :class:`NseRefresher` (keeps an endpoint or forwarder, and its services, registered);
- :mod:`nsm.registry.main` — the daemon and :class:`RegistryDaemon`.
"""

from __future__ import annotations

from nsm.registry.client import NseRefresher, RegistryClient, Watch
from nsm.registry.matching import match_ns, match_nse, select_endpoints
from nsm.registry.server import Registry

__all__ = [
    "NseRefresher",
    "Registry",
    "RegistryClient",
    "Watch",
    "match_ns",
    "match_nse",
    "select_endpoints",
]
