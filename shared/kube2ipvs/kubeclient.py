"""A kubernetes-asyncio ApiClient for the cluster, found the way kubectl finds it. Adapter.

One loader for every piece that talks to the API: the watcher, `publish-config` and `collect`.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client import ApiClient
from kubernetes_asyncio.config import ConfigException


class KubeConfigError(ValueError):
    """No usable cluster configuration: the message says which and why, in one line."""


async def load_api_client(kubeconfig: str | None = None, *, context: str | None = None) -> ApiClient:
    """An ApiClient for the cluster: the `kubeconfig` argument, else `$KUBECONFIG` (a
    `:`-separated list), else `~/.kube/config` when it exists, else the pod's service account
    (in-cluster). The caller closes the client."""
    configuration = client.Configuration()
    source = kubeconfig or os.environ.get("KUBECONFIG", "")
    default = Path.home() / ".kube" / "config"
    if not source and default.is_file():
        source = str(default)
    if source and not any(Path(p).expanduser().is_file() for p in source.split(os.pathsep) if p):
        raise KubeConfigError(f"kubeconfig not found: {source}")
    if not source and not os.environ.get("KUBERNETES_SERVICE_HOST"):
        raise KubeConfigError("no kubeconfig (--kubeconfig, $KUBECONFIG, ~/.kube/config) and not running in a pod")
    try:
        if source:
            await config.load_kube_config(config_file=source, context=context,
                                          client_configuration=configuration, persist_config=False)
        else:
            config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    # A malformed kubeconfig fails in many ways inside the loader (YAML errors, TypeError on a
    # document that is not a mapping, ...): each is the file's fault, reported in one line.
    except (ConfigException, yaml.YAMLError, OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise KubeConfigError(f"cannot load the cluster configuration from {source or 'the pod'}: {detail}") from None
    return ApiClient(configuration=configuration)
