"""ConfigMaps through kubernetes-asyncio: the adapter behind `kube2ipvs publish-config`.

Objects stay the API's JSON (`_preload_content=False`): what is read is written back whole, so
fields this client's models do not know survive a replace. Failures are translated into the two
errors `publish.py` owns: `KubeAccessError` (no usable kubeconfig, the server cannot be reached or
does not answer in time) and `KubeStatusError` (the server answered with an error Status).

Cancellation closes the in-flight request; `connect` closes the client on the way out.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from kubernetes_asyncio import client
from kubernetes_asyncio.client import ApiClient
from kubernetes_asyncio.client.exceptions import ApiException

from kube2ipvs.kubeclient import KubeConfigError, load_api_client
from kube2ipvs.publish import JSON, KubeAccessError, KubeStatusError


async def _load_client(kubeconfig: str | None, context: str | None) -> ApiClient:
    """Found as kubectl finds it (`kube2ipvs.kubeclient`); its errors as KubeAccessError."""
    try:
        return await load_api_client(kubeconfig, context=context)
    except KubeConfigError as exc:
        raise KubeAccessError(str(exc)) from None


class KubeConfigMaps:
    """`ConfigMapAPI` over a kubernetes-asyncio client; every request bounded by `timeout` seconds."""

    def __init__(self, api_client: ApiClient, *, timeout: float) -> None:
        self._api = client.CoreV1Api(api_client)
        self._timeout = timeout
        self.server: str = str(api_client.configuration.host)

    async def get(self, namespace: str, name: str) -> JSON | None:
        status, doc = await self._request(self._api.read_namespaced_config_map, name, namespace)
        if status == 404:
            return None
        return self._checked(status, doc)

    async def create(self, namespace: str, body: JSON) -> JSON:
        return self._checked(*await self._request(self._api.create_namespaced_config_map, namespace, body))

    async def replace(self, namespace: str, name: str, body: JSON) -> JSON:
        return self._checked(*await self._request(self._api.replace_namespaced_config_map, name, namespace, body))

    async def _request(self, method: Callable[..., Awaitable[Any]], /, *args: Any) -> tuple[int, object]:
        try:
            response = await method(*args, _preload_content=False, _request_timeout=self._timeout)
            if not isinstance(response, aiohttp.ClientResponse):
                raise TypeError(f"kubernetes_asyncio returned {type(response).__name__}, not the raw response")
            try:
                raw = await response.read()
            finally:
                response.release()
        except TimeoutError:
            raise KubeAccessError(f"the Kubernetes API server at {self.server} did not answer within "
                                  f"{self._timeout:g} s") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise KubeAccessError(f"cannot reach the Kubernetes API server at {self.server}: "
                                  f"{' '.join(str(exc).split()) or type(exc).__name__}") from None
        except ApiException as exc:
            raise KubeStatusError(int(exc.status or 0), str(exc.reason or ""), str(exc.body or "")) from None
        try:
            doc: object = json.loads(raw)
        except ValueError:
            doc = raw.decode("utf-8", "replace")
        return response.status, doc

    @staticmethod
    def _checked(status: int, doc: object) -> JSON:
        if 200 <= status < 300 and isinstance(doc, dict):
            return doc
        if isinstance(doc, dict):
            raise KubeStatusError(status, str(doc.get("reason") or ""), str(doc.get("message") or ""))
        text = doc if isinstance(doc, str) else ""
        raise KubeStatusError(status, "" if 200 <= status < 300 else "Error",
                              " ".join(text.split())[:200] or "the response is not a JSON object")


@asynccontextmanager
async def connect(kubeconfig: str | None, context: str | None, *, timeout: float) -> AsyncIterator[KubeConfigMaps]:
    api_client = await _load_client(kubeconfig, context)
    try:
        yield KubeConfigMaps(api_client, timeout=timeout)
    finally:
        await api_client.close()
