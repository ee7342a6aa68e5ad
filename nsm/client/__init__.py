"""The network service client: the client chain (:mod:`nsm.client.chain`) and its healing
(:mod:`nsm.client.heal`), the :class:`~nsm.client.sdk.Client` SDK over it, and ``nsm nsc``."""

from __future__ import annotations

from nsm.client.begin import Events, Kind
from nsm.client.chain import Connections, client_chain, new_request
from nsm.client.connect import close_once, request_once
from nsm.client.heal import Heal, HealOptions, KernelProbe, Probe, Verdict
from nsm.client.hooks import Hook
from nsm.client.notify import State, StateChange
from nsm.client.sdk import Client

__all__ = ["Client", "Connections", "Events", "Heal", "HealOptions", "Hook", "KernelProbe", "Kind",
           "Probe", "State", "StateChange", "Verdict", "client_chain", "close_once", "new_request",
           "request_once"]
