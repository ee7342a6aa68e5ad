"""The emulated cluster: nodes, pods and the mesh's daemons on one machine, in namespaces.

A :class:`Topology` *describes* a cluster (frozen dataclasses, nothing happens when one is made);
a :class:`Lab` *builds* it and tears it down::

    async with Lab(Topology.simple(2), prefix="demo") as lab:
        node1 = lab.node("node1")      # netns path, underlay ip, manager/forwarder URLs, daemons
        lab.pod("node1-pod1").netns    # a pod: just a namespace hanging off its node
        lab.registry_url               # unix socket URL, reachable from anywhere on this host

What gets built (``P`` is the prefix, names are predictable):

- ``P-fab``: the underlay switch, a namespace holding the bridge ``br0``;
- ``P-<node>`` per node: a veth ``eth0`` whose other end, named after the node, is a port of
  ``br0`` in ``P-fab``; underlay address ``172.30.0.<i>/24`` (the i-th node; every lab has its
  own isolated fabric, so labs never collide), MTU 1500, ``lo`` up, ``ip_forward=1`` in the node
  namespace only;
- processes running *inside* the node namespaces: the registry (on ``registry_node``) on
  ``tcp://<ip>:5000`` and a unix socket; on every node a manager (unix socket and
  ``tcp://<ip>:5001``, its registry proxy advertising that tcp URL for the node's endpoints) and
  a forwarder (unix socket); the topology's endpoints. Forwarders and endpoints register through
  their node's manager (unix socket); managers talk to the registry over the fabric;
- ``P-<pod>`` per pod and per endpoint (an endpoint's interfaces go into its own pod namespace).

Nothing is created in the root namespace: veth ends are created directly in their namespaces.
The daemons reach each other over the fabric (``tcp://`` URLs); the test process and the CLI,
which live in the root namespace, use the unix sockets (the filesystem is shared). Daemons run
the ``nsm`` package the lab was started from (it comes first on their ``PYTHONPATH``), with this
process's environment less its ``NSM_*`` variables; :meth:`Lab.add_daemon` starts more of them
in a node's namespace (a test's extra endpoint, say), stopped with the lab.

Teardown always runs (failure midway, Ctrl-C, cancellation): daemons get SIGTERM then SIGKILL,
any other process left inside the lab's namespaces is ended by pid, then the pod, node and fabric
namespaces are deleted (which deletes their links) and the work directory removed.
:func:`cleanup` does the same for a lab whose supervisor died, from the prefix and state file.

The modules, one concern each:

- :mod:`~nsm.lab.topology`: the description (``Topology``, ``NodeSpec``, ``PodSpec``,
  ``EndpointSpec``, ``MatchSpec``, ``ServiceSpec``);
- :mod:`~nsm.lab.builder`: ``Lab``, which builds and tears down;
- :mod:`~nsm.lab.processes`: daemons as processes (``Daemon``), processes by pid;
- :mod:`~nsm.lab.leftovers`: the state file and the removal of a lab's leftovers (``cleanup``);
- :mod:`~nsm.lab.cli`: ``nsm lab up|down|status``; :mod:`~nsm.lab.demo`: ``nsm demo``;
- :mod:`~nsm.lab.harness` and :mod:`~nsm.lab.traffic`: what tests and benchmarks do with a lab
  (waiting, leak checks, monitor snapshots, daemon logs; pings, scapy, TCP);
- :mod:`~nsm.lab.netns_exec`: how a daemon is started inside a namespace.

The public names are importable from here (``from nsm.lab import Lab, Topology``). They are
loaded on first use, so that ``python -m nsm.lab.netns_exec``, which every lab daemon starts
through, imports nothing it does not need.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nsm.lab.builder import (
        MANAGER_PORT,
        REGISTRY_PORT,
        Lab,
        LabEndpoint,
        LabNode,
        LabPod,
    )
    from nsm.lab.leftovers import (
        DEFAULT_STATE_DIR,
        CleanupReport,
        cleanup,
        lab_namespaces,
        read_state,
        state_path,
    )
    from nsm.lab.processes import (
        Daemon,
        end_processes_in,
        is_alive,
        pids_in_netns,
        wait_serving,
    )
    from nsm.lab.topology import (
        DEFAULT_MTU,
        DEFAULT_PREFIX,
        DEFAULT_SUBNET,
        EndpointSpec,
        MatchSpec,
        NodeSpec,
        PodSpec,
        ServiceSpec,
        Topology,
        validate_prefix,
    )

__all__ = [
    "DEFAULT_MTU", "DEFAULT_PREFIX", "DEFAULT_STATE_DIR", "DEFAULT_SUBNET", "MANAGER_PORT",
    "REGISTRY_PORT", "CleanupReport", "Daemon", "EndpointSpec", "Lab", "LabEndpoint", "LabNode",
    "LabPod", "MatchSpec", "NodeSpec", "PodSpec", "ServiceSpec", "Topology", "cleanup",
    "end_processes_in", "is_alive", "lab_namespaces", "pids_in_netns", "read_state", "state_path",
    "validate_prefix", "wait_serving",
]



def __getattr__(name: str) -> Any:
    """Import a public name's module on first use (see the module docstring)."""
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    for module in ("nsm.lab.topology", "nsm.lab.builder", "nsm.lab.processes", "nsm.lab.leftovers"):
        mod = importlib.import_module(module)
        if hasattr(mod, name):
            return getattr(mod, name)
    raise AttributeError(name)  # pragma: no cover - every name in __all__ is defined above
