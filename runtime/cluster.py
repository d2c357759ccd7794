"""A dataflow's Bytewax cluster in a Kubernetes StatefulSet, one worker per pod.

Bytewax fixes the cluster when it starts: every process gets the address list, and its own
index comes from its pod name (`BYTEWAX_POD_NAME` minus `BYTEWAX_STATEFULSET_NAME-`).
Kubernetes changes the replica count under running pods (`kubectl scale`, KEDA), and Bytewax
rescales only by stop-and-resume from recovery. So, in a pod:

* before `bytewax.run` starts, the address list is written to `BYTEWAX_HOSTFILE_PATH` from
  the StatefulSet's *current* `spec.replicas` (read from the Kubernetes API), one line per
  ordinal `<sts>-<i>.<sts>.<namespace>.svc:<port>` through the headless Service;
* while running, `ResizeWatch` compares that count with the StatefulSet's every
  `cluster_check_seconds`; on a change every pod exits, Kubernetes starts them again, and
  they resume from the recovery store as a cluster of the new size.

Outside Kubernetes (tests, other orchestrators) the hostfile or `BYTEWAX_ADDRESSES` is
whatever the starter provides, and nothing is watched.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import httpx

from schemas.errors import TallyflowError

log = logging.getLogger(__name__)
SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class ClusterError(TallyflowError):
    """The pod cannot learn its cluster; the message says what to grant or set."""


class KubeApi:
    """The one call this needs: a StatefulSet's desired replica count."""

    def __init__(self, base_url: str, token: str = "", verify: str | bool = True, token_file: Path | None = None) -> None:
        self.token, self.token_file = token, token_file
        self.client = httpx.Client(base_url=base_url, verify=verify, timeout=10)

    @classmethod
    def in_cluster(cls, env: Mapping[str, str]) -> KubeApi | None:
        """The API server as seen from a pod (service account token and CA); None elsewhere."""
        host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT", "443")
        token = SA_DIR / "token"
        if not host or not token.exists():
            return None
        host = f"[{host}]" if ":" in host else host
        return cls(f"https://{host}:{port}", verify=str(SA_DIR / "ca.crt"), token_file=token)

    def _headers(self) -> dict[str, str]:
        """Projected service-account tokens rotate (hourly by default): read it per request."""
        token = self.token_file.read_text().strip() if self.token_file is not None else self.token
        return {"Authorization": f"Bearer {token}"} if token else {}

    def replicas(self, namespace: str, statefulset: str) -> int:
        path = f"/apis/apps/v1/namespaces/{namespace}/statefulsets/{statefulset}"
        try:
            r = self.client.get(path, headers=self._headers())
        except httpx.TransportError as e:
            raise ClusterError(f"cannot reach the Kubernetes API for {path}: {e}") from None
        if r.status_code in (401, 403):
            raise ClusterError(
                f"the Kubernetes API refused GET {path} ({r.status_code}); grant the pod's service account "
                "`get` on statefulsets (k8s/base/rbac.yaml)"
            )
        if r.status_code != 200:
            raise ClusterError(f"GET {path}: {r.status_code} {r.text[:200]}")
        return int(r.json()["spec"]["replicas"])

    def close(self) -> None:
        self.client.close()


def ordinal(pod: str, statefulset: str) -> int:
    prefix = statefulset + "-"
    if not pod.startswith(prefix) or not pod[len(prefix) :].isdigit():
        raise ClusterError(f"BYTEWAX_POD_NAME={pod!r} is not a pod of StatefulSet {statefulset!r} (<name>-<ordinal>)")
    return int(pod[len(prefix) :])


def addresses(statefulset: str, namespace: str, replicas: int, port: int) -> list[str]:
    """Each pod's stable DNS name through the headless Service named like the StatefulSet."""
    return [f"{statefulset}-{i}.{statefulset}.{namespace}.svc:{port}" for i in range(replicas)]


def namespace(env: Mapping[str, str]) -> str:
    ns = env.get("POD_NAMESPACE")
    if ns:
        return ns
    f = SA_DIR / "namespace"
    if f.exists():
        return f.read_text().strip()
    raise ClusterError("POD_NAMESPACE is not set; give the container env POD_NAMESPACE from fieldRef metadata.namespace")


def prepare(env: Mapping[str, str], port: int, api: KubeApi | None = None) -> int | None:
    """In a StatefulSet pod: write the hostfile for the current replica count and return the
    count; None when not in Kubernetes or not asked to (no BYTEWAX_HOSTFILE_PATH)."""
    path, sts, pod = env.get("BYTEWAX_HOSTFILE_PATH"), env.get("BYTEWAX_STATEFULSET_NAME"), env.get("BYTEWAX_POD_NAME")
    if not (path and sts and pod):
        return None
    api = api or KubeApi.in_cluster(env)
    if api is None:
        if not Path(path).exists():
            raise ClusterError(
                f"BYTEWAX_HOSTFILE_PATH={path} does not exist, and there is no Kubernetes API to write it from; "
                "write the address list there (one host:port per line) or unset it"
            )
        return None
    try:
        ns = namespace(env)
        n = api.replicas(ns, sts)
    finally:
        api.close()
    me = ordinal(pod, sts)
    if me >= n:
        raise ClusterError(f"{pod} is beyond the StatefulSet's {n} replica(s); it is being removed")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(addresses(sts, ns, n, port)) + "\n")
    log.info("bytewax cluster of %d process(es), this is process %d", n, me, extra={"replicas": n, "process_id": me})
    return n


class ResizeWatch:
    """Stops the process when its StatefulSet's replica count differs from the cluster it
    started in, so that all pods restart and resume from recovery as one cluster again."""

    def __init__(self, api: KubeApi, namespace: str, statefulset: str, size: int, every_s: float) -> None:
        self.api = api
        self.namespace = namespace
        self.statefulset = statefulset
        self.size = size
        self.every_s = every_s

    @classmethod
    def start(cls, env: Mapping[str, str], every_s: float) -> ResizeWatch | None:
        path, sts = env.get("BYTEWAX_HOSTFILE_PATH"), env.get("BYTEWAX_STATEFULSET_NAME")
        api = KubeApi.in_cluster(env)
        if not (every_s and path and sts and api and Path(path).exists()):
            return None
        size = sum(1 for line in Path(path).read_text().splitlines() if line.strip())
        w = cls(api, namespace(env), sts, size, every_s)
        threading.Thread(target=w._run, name="resize-watch", daemon=True).start()
        return w

    def changed(self) -> int | None:
        """The new replica count if it differs from this cluster's size."""
        try:
            n = self.api.replicas(self.namespace, self.statefulset)
        except Exception as e:  # whatever the API answered, the watch must go on
            log.warning("cannot check the cluster size: %s", e)
            return None
        return n if n != self.size else None

    def _run(self) -> None:
        while True:
            time.sleep(self.every_s)  # the polling period of the API, not a synchronisation
            n = self.changed()
            if n is not None:
                log.warning(
                    "StatefulSet %s now has %d replicas, this cluster %d: stopping to resume from recovery with the new size",
                    self.statefulset,
                    n,
                    self.size,
                    extra={"replicas": n, "cluster_size": self.size},
                )
                logging.shutdown()
                os._exit(0)  # as a crash would: the recovery store and the register make the replay harmless
