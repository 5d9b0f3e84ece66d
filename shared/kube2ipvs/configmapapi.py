"""ConfigMaps through kubernetes-asyncio: the adapter behind `kube2ipvs publish-config`.

Objects stay the API's JSON (`_preload_content=False`): what is read is written back whole, so
fields this client's models do not know survive a replace. Failures are translated into the two
errors `publish.py` owns: `KubeAccessError` (no usable kubeconfig, the server cannot be reached or
does not answer in time) and `KubeStatusError` (the server answered with an error Status).

Cancellation closes the in-flight request; `connect` closes the client on the way out.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client import ApiClient
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config import ConfigException

from kube2ipvs.publish import JSON, KubeAccessError, KubeStatusError


async def _load_client(kubeconfig: str | None, context: str | None) -> ApiClient:
    """Found as kubectl finds it: `kubeconfig`, else `$KUBECONFIG`, else ~/.kube/config, else in-cluster."""
    configuration = client.Configuration()
    source = kubeconfig or os.environ.get("KUBECONFIG", "")
    default = Path.home() / ".kube" / "config"
    if not source and default.is_file():
        source = str(default)
    try:
        if source:
            paths = [p for p in source.split(os.pathsep) if p]
            if not any(Path(p).expanduser().is_file() for p in paths):
                raise KubeAccessError(f"kubeconfig not found: {source}")
            await config.load_kube_config(config_file=source, context=context,
                                          client_configuration=configuration, persist_config=False)
        elif os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        else:
            raise KubeAccessError("no kubeconfig (--kubeconfig, $KUBECONFIG, ~/.kube/config) and not running in a pod")
    # A malformed kubeconfig fails in many ways inside the loader (YAML errors, TypeError on a
    # document that is not a mapping, ...): each is the file's fault, reported in one line.
    except (ConfigException, yaml.YAMLError, OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise KubeAccessError(f"cannot load the cluster configuration from {source or 'the pod'}: {detail}") from None
    return ApiClient(configuration=configuration)


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
