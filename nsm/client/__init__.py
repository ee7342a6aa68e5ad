"""The network service client: the :class:`~nsm.client.sdk.Client` SDK and ``nsm nsc``."""

from __future__ import annotations

from nsm.client.sdk import Client, close_once, new_request, request_once

__all__ = ["Client", "close_once", "new_request", "request_once"]
