"""The SPIFFE IDs the security tests use (trust domain ``nsm.lab``)."""

from __future__ import annotations

from nsm.security.ids import node_id, workload_id

TD = "nsm.lab"
MGR1 = node_id(TD, "node1", "manager")
FWD1 = node_id(TD, "node1", "forwarder")
MGR2 = node_id(TD, "node2", "manager")
FWD2 = node_id(TD, "node2", "forwarder")
NSC = workload_id(TD, "nsc-1")
NSE = workload_id(TD, "nse-1")
EVIL = workload_id(TD, "evil")
