"""The pod's side in the Kubernetes API, for the CNI agent (``nsm cni-agent --kubernetes``).

- What a pod asks for: its annotation ``networkservicemesh.io`` (the reference NSM's syntax:
  ``kernel://<service>[@domain]/<ifname>[?label=value&...]``, comma-separated), read with the
  pod's namespace and name from ``CNI_ARGS`` (``K8S_POD_NAMESPACE``, ``K8S_POD_NAME``).
- What it got: the annotation ``networkservicemesh.io/network-status``, a JSON array of entries
  in the format of Multus's ``k8s.v1.cni.cncf.io/network-status`` (``name``, ``interface``,
  ``ips``, ``mac``, ``mtu``, ``default``, ``dns``), written after ADD (a JSON merge patch) and
  removed at DEL.

The client is lightkube's ``AsyncClient`` (asyncio, httpx), imported only when the API is used;
credentials: ``kubeconfig`` when given, else the in-cluster service account, else
``$KUBECONFIG`` or ``~/.kube/config``. Failures are :class:`~nsm.errors.NsmError`\\ s: a pod
that does not exist is NotFound, anything else Unavailable.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from nsm.cni.attachments import Link
from nsm.errors import NotFound, NsmError, Unavailable

ANNOTATION = "networkservicemesh.io"
STATUS_ANNOTATION = "networkservicemesh.io/network-status"


def network_status(links: Sequence[Link]) -> list[dict[str, Any]]:
    """Multus's network-status entries of the links."""
    return [{"name": f"{ANNOTATION}/{link.service}", "interface": link.ifname,
             "ips": [a.split("/")[0] for a in link.addresses], "mac": link.mac or "",
             **({"mtu": link.mtu} if link.mtu else {}), "default": False, "dns": {}}
            for link in links]


class PodApi:
    """Pods' annotations through the API server of ``kubeconfig`` (see the module)."""

    def __init__(self, *, kubeconfig: str | None = None, timeout: float = 5.0) -> None:
        import httpx2
        from lightkube import AsyncClient, KubeConfig

        config = KubeConfig.from_file(kubeconfig) if kubeconfig else KubeConfig.from_env()
        self._client = AsyncClient(config=config, timeout=httpx2.Timeout(timeout), trust_env=False)

    async def _call(self, what: str, method: str, *args: Any, **kwargs: Any) -> Any:
        from lightkube import ApiError
        from lightkube.resources.core_v1 import Pod

        try:
            return await getattr(self._client, method)(Pod, *args, **kwargs)
        except ApiError as exc:
            code = getattr(exc.status, "code", None)
            cls: type[NsmError] = NotFound if code == 404 else Unavailable
            raise cls(f"{what}: the Kubernetes API answered {code}: {exc.status.message}") from None
        except Exception as exc:  # httpx's transport errors, timeouts, bad answers
            raise Unavailable(f"{what}: the Kubernetes API cannot be reached: {exc!r}") from None

    async def requested(self, namespace: str, name: str) -> str | None:
        """The pod's ``networkservicemesh.io`` annotation (None when it has none)."""
        pod = await self._call(f"pod {namespace}/{name}", "get", name, namespace=namespace)
        annotations = (pod.metadata.annotations if pod.metadata is not None else None) or {}
        return annotations.get(ANNOTATION)

    async def report(self, namespace: str, name: str, links: Sequence[Link] | None) -> None:
        """Write the network-status annotation (remove it when ``links`` is None)."""
        from lightkube.types import PatchType

        value = json.dumps(network_status(links)) if links is not None else None
        await self._call(f"annotating pod {namespace}/{name}", "patch", name,
                         {"metadata": {"annotations": {STATUS_ANNOTATION: value}}},
                         namespace=namespace, patch_type=PatchType.MERGE)

    async def close(self) -> None:
        await self._client.close()
