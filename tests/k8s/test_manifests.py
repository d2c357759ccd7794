"""The Kubernetes manifests and the Dockerfile, checked offline (no cluster, no Docker).

Every overlay in k8s/overlays is rendered with `kubectl kustomize`; built-in kinds are
validated against the Kubernetes JSON schemas in strict mode (unknown fields fail), the
CRD kinds (KEDA, Prometheus Operator) are checked for the structure we rely on, and the
invariants a Bytewax cluster on StatefulSets needs are asserted on the rendered objects,
as are those of the stateless HTTP API (`tallyflow api`, a Deployment behind a Service).
The opt-in components (k8s/components/tryton-erp: Tryton as the ERP and its invoice-status
poller) are rendered the way k8s/README.md says to enable them, on a copy of k8s/, and
checked with the same tests.
"""

import base64
import json
import re
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from runtime.settings import DATAFLOW_SECRETS, FILE_FIELDS, FLAT, KAFKA_PREFIX, PREFIX, load_settings
from schemas.catalog import load_catalog
from serving.auth import Tokens
from tallyflow.cli import parser as cli_parser
from tests.support.k8s import render

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
# The oldest Kubernetes minor we support and the newest the schemas know.
K8S_VERSIONS = ("1.30", kubernetes_validate.latest_version())
CRD_KINDS = {"ScaledObject", "TriggerAuthentication", "ServiceMonitor", "PodMonitor"}
IMAGE = "ghcr.io/tallyflow/tallyflow"
DATAFLOWS = {
    "tallyflow-rating": ["rate"],
    "tallyflow-alerts": ["deliver", "alerts"],
    "tallyflow-erp": ["deliver", "erp"],
    "tallyflow-status": ["deliver", "status"],
}
WORKLOAD_KINDS = {"StatefulSet", "Deployment", "Job"}
# Secrets that an overlay expects to be created out of band (k8s/README.md says how).
OUT_OF_BAND_SECRETS = {"prod": {"tallyflow-credentials", "tallyflow-kafka"}}
RECOVERY_MOUNT = "/var/lib/tallyflow/recovery"
CATALOG_MOUNT = "/etc/tallyflow/catalog"
SECRETS_MOUNT = "/etc/tallyflow/secrets"
CLUSTER_PORT, METRICS_PORT = 2101, 9100
API = "tallyflow-api"
API_PORT = 8080
API_TOKENS_KEY = "api_tokens.yaml"  # the key of the credentials Secret the API mounts
API_CLIENT_LABEL = "tallyflow.dev/api-client"
# Tryton as the ERP (components/tryton-erp) and its invoice-status poller, `tallyflow erp-status`.
TRYTON = "tryton-erp"
POLLER = "tallyflow-erp-status"
TRYTON_PASSWORD_KEY = "tryton_password"
TRYTON_PORTS = (443, 8000)  # Tryton behind TLS; trytond's own port
# An overlay that opts into a component, as k8s/README.md says: the component under
# `components:`, and these settings among the overlay's tallyflow-settings literals.
OPT_INS = {
    f"prod+{TRYTON}": (
        "prod",
        TRYTON,
        {
            "TALLYFLOW_TRYTON_URL": "https://tryton.example.com",
            "TALLYFLOW_TRYTON_DATABASE": "tallyflow",
            "TALLYFLOW_TRYTON_USER": "tallyflow",
        },
    ),
}
PROD_RENDERS = ["prod", *(name for name, (base, _, _) in OPT_INS.items() if base == "prod")]
# librdkafka sasl.mechanism -> the KEDA kafka trigger's `sasl`
KEDA_SASL = {
    "PLAIN": "plaintext",
    "SCRAM-SHA-256": "scram_sha256",
    "SCRAM-SHA-512": "scram_sha512",
    "OAUTHBEARER": "oauthbearer",
    "GSSAPI": "gssapi",
}


# --- rendering and lookups ---------------------------------------------------------------


@pytest.fixture(scope="session")
def rendered(tmp_path_factory):
    """Render by name: an overlay, or an overlay with a component opted into (OPT_INS),
    edited as k8s/README.md says in a copy of k8s/ (relative paths kept)."""
    cache = {}

    def get(name):
        if name not in OPT_INS:
            return render(name)
        if name not in cache:
            base, component, settings = OPT_INS[name]
            root = tmp_path_factory.mktemp(re.sub(r"\W", "-", name)) / "k8s"
            shutil.copytree(K8S, root)
            path = root / "overlays" / base / "kustomization.yaml"
            k = yaml.safe_load(path.read_text())
            k.setdefault("components", []).append(f"../../components/{component}")
            (gen,) = [g for g in k.get("configMapGenerator", []) if g["name"] == "tallyflow-settings"]
            gen.setdefault("literals", []).extend(f"{key}={value}" for key, value in settings.items())
            path.write_text(yaml.safe_dump(k, sort_keys=False))
            cache[name] = render(path.parent)
        return cache[name]

    return get


@pytest.fixture(params=[*OVERLAYS, *OPT_INS])
def overlay(request):
    return request.param


@pytest.fixture
def docs(overlay, rendered):
    return rendered(overlay)


def out_of_band(overlay):
    """The Secrets `overlay` (or the overlay an opt-in builds on) expects to exist already."""
    return OUT_OF_BAND_SECRETS.get(OPT_INS[overlay][0] if overlay in OPT_INS else overlay, set())


def of_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def named(docs, kind, name):
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert found, f"no {kind} {name} in the render"
    return found[0]


def workloads(docs):
    return [d for d in docs if d["kind"] in WORKLOAD_KINDS]


def pod_spec(workload):
    return workload["spec"]["template"]["spec"]


def pod_labels(workload):
    return workload["spec"]["template"]["metadata"].get("labels", {})


def all_containers(spec):
    return [*spec.get("initContainers", []), *spec["containers"]]


def split_image(image):
    """(repository, tag, digest) of an image reference; tag and digest may be empty."""
    ref, _, digest = image.partition("@")
    slash = ref.rfind("/")
    repo, _, tag = ref.rpartition(":") if ":" in ref[slash + 1 :] else (ref, "", "")
    return repo, tag, digest


def ours(container):
    return split_image(container["image"])[0] == IMAGE


def dataflows(docs):
    sts = [d for d in of_kind(docs, "StatefulSet") if any(ours(c) for c in pod_spec(d)["containers"])]
    assert {d["metadata"]["name"] for d in sts} == set(DATAFLOWS)
    return sts


def main_container(sts):
    (c,) = [c for c in pod_spec(sts)["containers"] if c["name"] == "tallyflow"]
    return c


def api(docs):
    """The API Deployment: `tallyflow api` in our image."""
    deployment = named(docs, "Deployment", API)
    assert main_container(deployment)["args"] == ["api"] and ours(main_container(deployment))
    return deployment


def dataflow_scalers(docs):
    """The KEDA ScaledObjects of the dataflows (StatefulSets); the API's is checked on its own."""
    return [so for so in of_kind(docs, "ScaledObject") if so["spec"]["scaleTargetRef"].get("kind") == "StatefulSet"]


def pollers(docs):
    """Every workload of our image that runs `tallyflow erp-status` (the Tryton poller)."""
    return [w for w in our_workloads(docs) if any((c.get("args") or [None])[0] == "erp-status" for c in all_containers(pod_spec(w)))]


def long_running(docs):
    """The workloads that run the app as a long-lived process: the dataflows, the API, the poller."""
    return [*dataflows(docs), api(docs), *pollers(docs)]


def our_workloads(docs):
    """Every workload with a container of our image (also the dev sandbox and topics Job)."""
    return [w for w in workloads(docs) if any(ours(c) for c in all_containers(pod_spec(w)))]


def selects(selector, labels):
    """Kubernetes label selector semantics for matchLabels / matchExpressions."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        has, value = e["key"] in labels, labels.get(e["key"])
        ok = {
            "In": has and value in e.get("values", []),
            "NotIn": not has or value not in e.get("values", []),
            "Exists": has,
            "DoesNotExist": not has,
        }[e["operator"]]
        if not ok:
            return False
    return True


def env_map(container):
    return {e["name"]: e for e in container.get("env", [])}


def effective_env(container, docs):
    """Literal values the container sees: envFrom ConfigMaps, then env (which wins)."""
    env = {}
    for src in container.get("envFrom", []):
        if "configMapRef" in src:
            env.update(named(docs, "ConfigMap", src["configMapRef"]["name"]).get("data", {}))
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


def app_settings(container, docs):
    """The app's Settings from the container's environment (secret files are not read)."""
    return load_settings({k: v for k, v in effective_env(container, docs).items() if not k.endswith("_FILE")})


def settings_name(docs):
    """The name of the settings ConfigMap the rating container loads."""
    rating = named(docs, "StatefulSet", "tallyflow-rating")
    (ref,) = [s["configMapRef"]["name"] for s in main_container(rating).get("envFrom", []) if "configMapRef" in s]
    return ref


def settings_of(docs):
    return named(docs, "ConfigMap", settings_name(docs))["data"]


def mounts(container):
    return {m["mountPath"]: m for m in container.get("volumeMounts", [])}


def volumes(spec):
    return {v["name"]: v for v in spec.get("volumes", [])}


def flag(args, name):
    return int(args[args.index(name) + 1])


# --- schemas -----------------------------------------------------------------------------


def test_overlays_render_and_cover_dev_and_prod():
    assert {"dev", "prod"} <= set(OVERLAYS)
    for o in OVERLAYS:
        assert render(o), f"{o} renders nothing"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_builtin_kinds_validate_strictly_against_the_kubernetes_schemas(docs, version):
    errors = []
    for d in docs:
        if d["kind"] in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(d, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{d['kind']}/{d['metadata']['name']} at {'/'.join(map(str, e.path))}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            errors.append(f"{d['kind']}/{d['metadata']['name']}: {e.message} (a CRD? then check its structure here)")
    assert not errors, "\n".join(errors)


def test_names_stay_literal():
    """The app derives Bytewax process ids and peer addresses from the literal names."""
    for path in K8S.rglob("kustomization.yaml"):
        text = path.read_text()
        assert not re.search(r"^\s*name(Prefix|Suffix)\s*:", text, re.M), f"{path} renames resources"
    for o in OVERLAYS:
        assert {d["metadata"]["name"] for d in of_kind(render(o), "StatefulSet")} >= set(DATAFLOWS)


# --- the Bytewax cluster -----------------------------------------------------------------


def test_statefulsets_form_a_bytewax_cluster(docs):
    for sts in dataflows(docs):
        name, spec = sts["metadata"]["name"], sts["spec"]
        assert spec["podManagementPolicy"] == "Parallel", f"{name}: OrderedReady deadlocks the cluster start"
        assert "volumeClaimTemplates" not in spec, f"{name}: per-pod volumes strand recovery partitions"
        assert selects(spec["selector"], pod_labels(sts))
        c = main_container(sts)
        assert len(pod_spec(sts)["containers"]) == 1
        assert c["args"] == DATAFLOWS[name], f"{name} runs {c['args']}"
        assert not {"-w", "--workers-per-process"} & set(c["args"]), "one Bytewax worker per pod"
        env = env_map(c)
        assert env["BYTEWAX_STATEFULSET_NAME"]["value"] == name
        assert env["BYTEWAX_POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports == {"cluster": CLUSTER_PORT, "metrics": METRICS_PORT}
        assert int(env["TALLYFLOW_CLUSTER_PORT"]["value"]) == CLUSTER_PORT
        assert int(env["TALLYFLOW_METRICS_PORT"]["value"]) == METRICS_PORT
        # The app writes the hostfile at start: it must be on a writable volume.
        hostfile = env["BYTEWAX_HOSTFILE_PATH"]["value"]
        mount = [m for p, m in mounts(c).items() if hostfile.startswith(p.rstrip("/") + "/")]
        assert mount and not mount[0].get("readOnly"), f"{name}: {hostfile} is not on a writable mount"
        assert "emptyDir" in volumes(pod_spec(sts))[mount[0]["name"]]

        svc = named(docs, "Service", spec["serviceName"])
        assert svc["spec"].get("clusterIP") == "None", f"{name}: the governing Service must be headless"
        assert svc["spec"].get("publishNotReadyAddresses") is True, f"{name}: peers must resolve before they are ready"
        assert selects({"matchLabels": svc["spec"]["selector"]}, pod_labels(sts))
        svc_ports = {p["name"]: (p["port"], p.get("targetPort", p["port"])) for p in svc["spec"]["ports"]}
        for port_name, number in (("cluster", CLUSTER_PORT), ("metrics", METRICS_PORT)):
            assert svc_ports[port_name][0] == number
            assert svc_ports[port_name][1] in (port_name, number)


def patience(probe):
    """Seconds of failures before a probe gives up."""
    return probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)


def test_probes_use_the_metrics_endpoints_and_are_not_aggressive(docs):
    for sts in dataflows(docs):
        c = main_container(sts)
        for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            get = c[probe]["httpGet"]
            assert get["path"] == path and get["port"] in ("metrics", METRICS_PORT), f"{probe} of {sts['metadata']['name']}"
        # Start-up loads the catalog and resumes from recovery; a sink in backpressure is not a hang.
        assert patience(c["startupProbe"]) >= 120
        assert patience(c["livenessProbe"]) >= 60


def test_recovery_store_is_one_shared_claim_per_dataflow(docs):
    dirs, claims = set(), set()
    scaled = {s["spec"]["scaleTargetRef"]["name"] for s in dataflow_scalers(docs)}
    for sts in dataflows(docs):
        name, spec = sts["metadata"]["name"], pod_spec(sts)
        (init,) = [c for c in spec.get("initContainers", []) if c["name"] == "recovery-init"]
        assert init["args"] == ["recovery", "init"] and init["image"] == main_container(sts)["image"]
        rec_dir = env_map(main_container(sts))["TALLYFLOW_RECOVERY_DIR"]["value"]
        assert env_map(init)["TALLYFLOW_RECOVERY_DIR"]["value"] == rec_dir
        assert rec_dir.startswith(RECOVERY_MOUNT + "/")
        assert init.get("envFrom") == main_container(sts).get("envFrom"), "init reads the same settings"
        for c in (init, main_container(sts)):
            m = mounts(c)[RECOVERY_MOUNT]
            assert not m.get("readOnly") and "subPath" not in m
        claim = volumes(spec)[mounts(init)[RECOVERY_MOUNT]["name"]]["persistentVolumeClaim"]["claimName"]
        assert claim == f"{name}-recovery"
        pvc = named(docs, "PersistentVolumeClaim", claim)
        if sts["spec"].get("replicas", 1) > 1 or name in scaled:
            assert "ReadWriteMany" in pvc["spec"]["accessModes"], f"{name} runs several pods on one claim: needs ReadWriteMany"
        dirs.add(rec_dir)
        claims.add(claim)
    assert len(dirs) == len(claims) == len(DATAFLOWS), "each dataflow needs its own recovery store"


def test_replica_counts_fit_recovery_and_topic_partitions(docs):
    partitions = int(settings_of(docs)["TALLYFLOW_RECOVERY_PARTITIONS"])
    replicas = {d["metadata"]["name"]: d["spec"].get("replicas", 1) for d in dataflows(docs)}
    assert max(replicas.values()) <= partitions
    for so in dataflow_scalers(docs):
        input_partitions = int(so["metadata"]["annotations"]["tallyflow.io/input-topic-partitions"])
        assert so["spec"]["minReplicaCount"] >= 1
        assert so["spec"]["maxReplicaCount"] <= min(partitions, input_partitions), "more workers than partitions"
    for job in of_kind(docs, "Job"):
        args = job["spec"]["template"]["spec"]["containers"][0]["args"]
        if args[0] == "topics":
            assert replicas["tallyflow-rating"] <= flag(args, "--partitions")
            assert max(replicas["tallyflow-alerts"], replicas["tallyflow-erp"]) <= flag(args, "--output-partitions")
            for so in dataflow_scalers(docs):
                assert so["spec"]["maxReplicaCount"] <= flag(args, "--partitions")


# --- pods: security, resources, images, references ----------------------------------------


def test_every_container_has_requests_and_limits(docs):
    for w in workloads(docs):
        for c in all_containers(pod_spec(w)):
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res.get(kind, {})), f"{w['metadata']['name']}/{c['name']} lacks {kind}"


def test_containers_run_unprivileged(docs):
    for w in workloads(docs):
        spec = pod_spec(w)
        pod_sc = spec.get("securityContext", {})
        assert (pod_sc.get("seccompProfile") or {}).get("type") == "RuntimeDefault", w["metadata"]["name"]
        for c in all_containers(spec):
            where = f"{w['metadata']['name']}/{c['name']}"
            sc = {**pod_sc, **c.get("securityContext", {})}
            assert sc.get("runAsNonRoot") is True and sc.get("runAsUser", 0) > 0, where
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"] and not sc["capabilities"].get("add"), where
            if ours(c):
                assert sc.get("readOnlyRootFilesystem") is True, where
                assert (sc["runAsUser"], sc.get("runAsGroup")) == (10001, 10001), where
                assert mounts(c).get("/tmp"), f"{where}: a read-only root needs a writable /tmp"
        if any(ours(c) for c in spec["containers"]):
            assert spec.get("enableServiceLinks") is False, "Service links inject TALLYFLOW_*_SERVICE_HOST variables"


def test_one_pinned_image_for_every_tallyflow_container(docs):
    images = {c["image"] for w in workloads(docs) for c in all_containers(pod_spec(w)) if ours(c)}
    assert len(images) == 1, images
    (image,) = images
    _, tag, digest = split_image(image)
    assert (tag and tag != "latest") or digest.startswith("sha256:"), f"{image}: pin a tag or a digest"


def test_referenced_configmaps_secrets_and_claims_exist(overlay, docs):
    present = {(d["kind"], d["metadata"]["name"]) for d in docs}
    oob = out_of_band(overlay)
    missing = []

    def need(kind, name):
        if (kind, name) not in present and not (kind == "Secret" and name in oob):
            missing.append(f"{kind} {name}")

    for w in workloads(docs):
        spec = pod_spec(w)
        for v in spec.get("volumes", []):
            if "configMap" in v:
                need("ConfigMap", v["configMap"]["name"])
            if "secret" in v:
                need("Secret", v["secret"]["secretName"])
            if "persistentVolumeClaim" in v:
                need("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"])
        for c in all_containers(spec):
            for src in c.get("envFrom", []):
                if "configMapRef" in src:
                    need("ConfigMap", src["configMapRef"]["name"])
                if "secretRef" in src:
                    need("Secret", src["secretRef"]["name"])
            for e in c.get("env", []):
                ref = e.get("valueFrom", {})
                if "configMapKeyRef" in ref:
                    need("ConfigMap", ref["configMapKeyRef"]["name"])
                if "secretKeyRef" in ref:
                    need("Secret", ref["secretKeyRef"]["name"])
        if spec.get("serviceAccountName"):
            need("ServiceAccount", spec["serviceAccountName"])
    for ta in of_kind(docs, "TriggerAuthentication"):
        for ref in ta["spec"].get("secretTargetRef", []):
            need("Secret", ref["name"])
    assert not missing, missing
    assert not {("Secret", s) for s in oob} & present, "an out-of-band Secret must not be rendered"


def test_catalog_is_a_live_directory_mount(docs):
    catalog = named(docs, "ConfigMap", "tallyflow-catalog")  # no hash suffix: edits reach running pods
    assert catalog["data"]["catalog.yaml"] == (K8S / "base" / "catalog.yaml").read_text()
    # ConfigMaps hold at most 1 MiB; client-side apply copies the object into a 256 KiB annotation.
    assert len(json.dumps(catalog)) < 256 * 1024
    # The settings keep their hash suffix: a change renames the ConfigMap and rolls the pods.
    assert re.fullmatch(r"tallyflow-settings-[a-z0-9]{10}", settings_name(docs))
    for w in long_running(docs):
        spec = pod_spec(w)
        for c in all_containers(spec):
            m = mounts(c)[CATALOG_MOUNT]
            assert "subPath" not in m, "subPath mounts never see ConfigMap updates"
            assert volumes(spec)[m["name"]]["configMap"]["name"] == "tallyflow-catalog"
            path = env_map(c)["TALLYFLOW_CATALOG"]["value"]
            assert path.rsplit("/", 1) == [CATALOG_MOUNT, "catalog.yaml"]


def test_credentials_are_mounted_files_readable_by_the_pod_only(overlay, docs):
    for sts in dataflows(docs):
        spec = pod_spec(sts)
        for c in all_containers(spec):
            m = mounts(c)[SECRETS_MOUNT]
            assert m.get("readOnly") is True
            secret = volumes(spec)[m["name"]]["secret"]
            assert secret["defaultMode"] == 0o440
            assert secret["secretName"].startswith("tallyflow-credentials")
            env = env_map(c)
            for field in DATAFLOW_SECRETS:
                assert env[f"{PREFIX}{field.upper()}_FILE"]["value"] == f"{SECRETS_MOUNT}/{field}"
                assert f"{PREFIX}{field.upper()}" not in env, "secrets come from files, not from the manifest"
            if not out_of_band(overlay):
                data = named(docs, "Secret", secret["secretName"]).get("data", {})
                assert set(DATAFLOW_SECRETS) <= set(data), "the Secret lacks a key the app reads"


def test_settings_are_names_the_app_reads_and_load(docs):
    """load_settings ignores unknown TALLYFLOW_* names, so a typo would pass silently."""
    known = {PREFIX + f.upper() for f in FLAT if f != "kafka"}
    known |= {f"{PREFIX}{f.upper()}_FILE" for f in FILE_FIELDS}
    for w in our_workloads(docs):
        for c in all_containers(pod_spec(w)):
            if not ours(c):
                continue
            names = set(effective_env(c, docs)) | set(env_map(c))
            unknown = sorted(n for n in names if n.startswith(PREFIX) and n not in known and not n.startswith(KAFKA_PREFIX))
            assert not unknown, f"{w['metadata']['name']}/{c['name']}: settings the app does not read: {unknown}"
            app_settings(c, docs)  # raises ConfigError naming a bad value
    for sts in dataflows(docs):
        c = main_container(sts)
        env = effective_env(c, docs)
        s = app_settings(c, docs)
        assert (s.process.metrics_port, s.process.cluster_port) == (METRICS_PORT, CLUSTER_PORT)
        assert s.process.recovery_dir == env["TALLYFLOW_RECOVERY_DIR"] and s.process.log_format == "json"


# --- disruption, network and RBAC ------------------------------------------------------------


def test_pdbs_allow_one_disruption_of_each_dataflow(docs):
    pdbs = of_kind(docs, "PodDisruptionBudget")
    for pdb in pdbs:
        covered = [w["metadata"]["name"] for w in workloads(docs) if selects(pdb["spec"]["selector"], pod_labels(w))]
        assert len(covered) == 1, f"{pdb['metadata']['name']} covers {covered}"
        # Not-ready pods may still be evicted: an outage elsewhere must not block node drains.
        assert pdb["spec"].get("unhealthyPodEvictionPolicy") == "AlwaysAllow", pdb["metadata"]["name"]
    for sts in dataflows(docs):
        mine = [p for p in pdbs if selects(p["spec"]["selector"], pod_labels(sts))]
        assert len(mine) == 1, sts["metadata"]["name"]
        assert mine[0]["spec"].get("maxUnavailable") == 1 and "minAvailable" not in mine[0]["spec"]
        others = [d for d in dataflows(docs) if d is not sts]
        assert not any(selects(mine[0]["spec"]["selector"], pod_labels(o)) for o in others), "a PDB spans dataflows"


def port_allowed(rule, port, protocol="TCP"):
    ports = rule.get("ports")
    return not ports or any(p.get("port") == port and p.get("protocol", "TCP") == protocol for p in ports)


def peer_selects(peers, labels):
    """Whether a from/to list admits pods with `labels` in the same namespace."""
    if peers is None:
        return True
    return any("podSelector" in p and "namespaceSelector" not in p and selects(p["podSelector"], labels) for p in peers)


def policies_for(docs, labels, direction):
    key = direction.lower()
    return [
        r
        for np in of_kind(docs, "NetworkPolicy")
        if selects(np["spec"]["podSelector"], labels) and direction in np["spec"].get("policyTypes", [])
        for r in np["spec"].get(key, [])
    ]


def egress_allowed(docs, labels, port, target_labels=None, protocol="TCP"):
    """target_labels None: an endpoint outside the namespace, reachable by rules without `to`."""
    for r in policies_for(docs, labels, "Egress"):
        if port_allowed(r, port, protocol) and ("to" not in r or (target_labels is not None and peer_selects(r["to"], target_labels))):
            return True
    return False


def endpoints(settings):
    """(host, port) of every endpoint the settings point at."""
    out = [(h.rsplit(":", 1)[0], int(h.rsplit(":", 1)[1])) for h in settings["TALLYFLOW_BROKERS"].split(",")]
    for key in ("TALLYFLOW_REDIS_URL", "TALLYFLOW_CRM_URL", "TALLYFLOW_SUCCESS_URL", "TALLYFLOW_ERP_URL"):
        u = urlsplit(settings[key])
        out.append((u.hostname, u.port or {"https": 443, "http": 80, "redis": 6379, "rediss": 6379}[u.scheme]))
    return out


def test_network_policies_select_pods_and_allow_what_the_dataflows_need(docs):
    pods = [pod_labels(w) for w in workloads(docs)]
    for np in of_kind(docs, "NetworkPolicy"):
        assert any(selects(np["spec"]["podSelector"], p) for p in pods), f"{np['metadata']['name']} selects no pod"
    # Every pod of the render (dataflows, API, Jobs, the dev stack) is isolated both ways.
    for w in workloads(docs):
        types = {
            t
            for np in of_kind(docs, "NetworkPolicy")
            if selects(np["spec"]["podSelector"], pod_labels(w))
            for t in np["spec"].get("policyTypes", [])
        }
        assert {"Ingress", "Egress"} <= types, (
            f"{w['kind']}/{w['metadata']['name']}: not isolated for {sorted({'Ingress', 'Egress'} - types)}"
        )
    flows = dataflows(docs)
    for sts in flows:
        labels, name = pod_labels(sts), sts["metadata"]["name"]
        deny = [
            np
            for np in of_kind(docs, "NetworkPolicy")
            if selects(np["spec"]["podSelector"], labels)
            and set(np["spec"].get("policyTypes", [])) == {"Ingress", "Egress"}
            and not np["spec"].get("ingress")
            and not np["spec"].get("egress")
        ]
        assert deny, f"{name}: no default-deny policy"
        # Bytewax traffic: with its own pods, and with no other dataflow's pods.
        ingress = policies_for(docs, labels, "Ingress")
        assert any(port_allowed(r, CLUSTER_PORT) and "from" in r and peer_selects(r["from"], labels) for r in ingress)
        assert egress_allowed(docs, labels, CLUSTER_PORT, labels)
        for other in flows:
            if other is not sts:
                assert not any(port_allowed(r, CLUSTER_PORT) and peer_selects(r.get("from"), pod_labels(other)) for r in ingress), (
                    f"{other['metadata']['name']} may reach {name}'s cluster port"
                )
        monitoring = [
            r
            for r in ingress
            if port_allowed(r, METRICS_PORT)
            and any(p.get("namespaceSelector", {}).get("matchLabels") == {"kubernetes.io/metadata.name": "monitoring"} for p in r["from"])
        ]
        assert monitoring, f"{name}: Prometheus cannot scrape"
        assert egress_allowed(docs, labels, 53, protocol="UDP") and egress_allowed(docs, labels, 443) and egress_allowed(docs, labels, 6443)
        # Every endpoint of the settings: in-namespace Services by their pods, others by port.
        services = {s["metadata"]["name"]: s for s in of_kind(docs, "Service")}
        for host, port in endpoints(effective_env(main_container(sts), docs)):
            svc = services.get(host)
            if svc is None:
                assert egress_allowed(docs, labels, port), f"{name} cannot reach {host}:{port}"
                continue
            (sp,) = [p for p in svc["spec"]["ports"] if p["port"] == port]
            targets = [w for w in workloads(docs) if selects({"matchLabels": svc["spec"]["selector"]}, pod_labels(w))]
            assert targets, f"Service {host} selects no pod"
            target_port = sp.get("targetPort", port)
            if isinstance(target_port, str):
                (target_port,) = [
                    p["containerPort"]
                    for c in pod_spec(targets[0])["containers"]
                    for p in c.get("ports", [])
                    if p.get("name") == target_port
                ]
            assert egress_allowed(docs, labels, target_port, pod_labels(targets[0])), f"{name} cannot reach {host}:{port}"


def test_pods_may_read_their_statefulset_and_nothing_else(docs):
    flows = dataflows(docs)
    accounts = {pod_spec(s).get("serviceAccountName") for s in flows}
    assert accounts == {"tallyflow"}
    assert all(pod_spec(s).get("automountServiceAccountToken") is True for s in flows)
    bindings = [
        b for b in of_kind(docs, "RoleBinding") if any(s["kind"] == "ServiceAccount" and s["name"] == "tallyflow" for s in b["subjects"])
    ]
    namespaces = {d["metadata"].get("namespace") for d in flows}
    granted = set()
    for b in bindings:
        assert all(s.get("namespace") in namespaces for s in b["subjects"] if s["kind"] == "ServiceAccount")
        role = named(docs, b["roleRef"]["kind"], b["roleRef"]["name"])
        for rule in role["rules"]:
            assert set(rule["verbs"]) <= {"get", "list", "watch"}, "read-only"
            if "apps" in rule["apiGroups"] and "statefulsets" in rule["resources"] and "get" in rule["verbs"]:
                granted |= set(rule.get("resourceNames") or DATAFLOWS)
    assert set(DATAFLOWS) <= granted
    # The API never calls the Kubernetes API: no token in its pods, and no grant to its account.
    spec = pod_spec(api(docs))
    assert spec.get("automountServiceAccountToken") is False
    assert spec.get("serviceAccountName") not in (None, "default", "tallyflow"), "an account of its own"
    assert not any(
        s["kind"] == "ServiceAccount" and s["name"] == spec["serviceAccountName"]
        for b in of_kind(docs, "RoleBinding")
        for s in b["subjects"]
    )


# --- the HTTP API ------------------------------------------------------------------------------


def container_port(workload, port):
    """The container port number a Service's or probe's `port` / `targetPort` names."""
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for c in pod_spec(workload)["containers"] for p in c.get("ports", []) if p.get("name") == port]
    return number


def test_api_deployment_service_hpa_and_pdb_agree(docs):
    deployment = api(docs)
    name, spec, labels = deployment["metadata"]["name"], deployment["spec"], pod_labels(deployment)
    assert selects(spec["selector"], labels)
    assert len(pod_spec(deployment)["containers"]) == 1
    c = main_container(deployment)
    assert {(p["name"], p["containerPort"]) for p in c["ports"]} == {("http", API_PORT)}
    # Where it listens: all interfaces, from the Deployment's own env (the dataflows do not listen).
    assert env_map(c)["TALLYFLOW_API_HOST"]["value"] == "0.0.0.0"
    assert not {"TALLYFLOW_API_HOST", "TALLYFLOW_API_PORT"} & set(settings_of(docs)), "API settings belong on the Deployment"
    s = app_settings(c, docs)
    assert (s.api.host, s.api.port) == ("0.0.0.0", API_PORT)
    # Stateless: nothing persistent, and no pod of another workload behind its selector.
    assert not any("persistentVolumeClaim" in v for v in pod_spec(deployment).get("volumes", []))
    others = [w for w in workloads(docs) if w is not deployment]
    assert not any(selects(spec["selector"], pod_labels(o)) for o in others)

    svc = named(docs, "Service", API)
    assert svc["spec"].get("type", "ClusterIP") == "ClusterIP" and svc["spec"].get("clusterIP") != "None"
    assert selects({"matchLabels": svc["spec"]["selector"]}, labels)
    assert not any(selects({"matchLabels": svc["spec"]["selector"]}, pod_labels(o)) for o in others)
    (port,) = svc["spec"]["ports"]
    assert (port["name"], port["port"], port.get("protocol", "TCP")) == ("http", 80, "TCP")
    assert container_port(deployment, port.get("targetPort", port["port"])) == API_PORT

    # Scaled by one autoscaler: KEDA on its request rate where KEDA is (components/autoscaling),
    # else the base HPA on CPU; two would fight over the count.
    hpas = [h for h in of_kind(docs, "HorizontalPodAutoscaler") if h["spec"]["scaleTargetRef"]["name"] == name]
    keda = [so for so in of_kind(docs, "ScaledObject") if so["spec"]["scaleTargetRef"]["name"] == name]
    assert len(hpas) + len(keda) == 1, "the API needs exactly one autoscaler"
    assert "cpu" in c["resources"]["requests"], "CPU utilization is relative to the request"
    if hpas:
        (hpa,) = hpas
        assert hpa["apiVersion"] == "autoscaling/v2" and hpa["metadata"]["name"] == name
        ref, bounds = hpa["spec"]["scaleTargetRef"], (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"])
        (metric,) = hpa["spec"]["metrics"]
        assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
        assert metric["resource"]["target"] == {"type": "Utilization", "averageUtilization": 70}
        behavior = hpa["spec"]["behavior"]
    else:
        (so,) = keda
        assert so["apiVersion"] == "keda.sh/v1alpha1"
        ref, bounds = so["spec"]["scaleTargetRef"], (so["spec"]["minReplicaCount"], so["spec"]["maxReplicaCount"])
        behavior = so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        assert_api_scales_on_request_rate(so, docs)
    assert (ref["apiVersion"], ref["kind"]) == ("apps/v1", "Deployment")
    assert bounds == (2, 10)
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 60
    # The autoscaler owns the count: a replicas field would reset a scaled-out API on every apply.
    assert "replicas" not in spec or bounds[0] <= spec["replicas"] <= bounds[1]

    (pdb,) = [p for p in of_kind(docs, "PodDisruptionBudget") if selects(p["spec"]["selector"], labels)]
    assert pdb["metadata"]["name"] == name and pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    budget = pdb["spec"]
    assert budget.get("maxUnavailable") == 1 or (budget.get("minAvailable") == 1 and "maxUnavailable" not in budget)

    # Replicas land on different nodes when they can, without ever staying pending for it.
    spread = pod_spec(deployment)["topologySpreadConstraints"]
    assert any(t["topologyKey"] == "kubernetes.io/hostname" and selects(t["labelSelector"], labels) for t in spread)
    assert all(t["whenUnsatisfiable"] == "ScheduleAnyway" for t in spread)


def assert_api_scales_on_request_rate(so, docs):
    """KEDA's triggers for the API: read queries per second over its pods (a Prometheus query
    of the API's own counter), per replica, and CPU for ingest; Prometheus scrapes the pods."""
    triggers = {t["type"]: t for t in so["spec"]["triggers"]}
    assert set(triggers) == {"prometheus", "cpu"}
    meta = triggers["prometheus"]["metadata"]
    assert re.fullmatch(r'sum\(rate\(tallyflow_api_queries_total\{pod=~"tallyflow-api-\.\+"\}\[\dm\]\)\)', meta["query"]), meta["query"]
    assert urlsplit(meta["serverAddress"]).scheme in ("http", "https") and int(meta["threshold"]) > 0
    assert triggers["cpu"]["metricType"] == "Utilization" and int(triggers["cpu"]["metadata"]["value"]) == 70
    (monitor,) = of_kind(docs, "PodMonitor")
    assert selects(monitor["spec"]["selector"], pod_labels(api(docs)))


def test_api_probes_hit_health_endpoints_on_the_container_port(docs):
    deployment = api(docs)
    c = main_container(deployment)
    for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = c[probe]["httpGet"]
        assert get["path"] == path and container_port(deployment, get["port"]) == API_PORT, probe
        assert get.get("scheme", "HTTP") == "HTTP"
    assert patience(c["startupProbe"]) >= 60
    assert patience(c["livenessProbe"]) >= 60, "a busy replica is not a hung one"
    assert c["livenessProbe"].get("timeoutSeconds", 1) >= 3


def test_api_tokens_file_is_mounted_from_the_credentials_secret(overlay, docs, tmp_path):
    deployment = api(docs)
    spec, c = pod_spec(deployment), main_container(deployment)
    env = env_map(c)
    path = env["TALLYFLOW_API_TOKENS_FILE"]["value"]
    assert not {"TALLYFLOW_API_TOKENS", "TALLYFLOW_API_TOKENS_FILE"} & set(settings_of(docs))
    # The path is a file of a read-only Secret volume mount: <mountPath>/<item path or key>.
    (mount,) = [m for p, m in mounts(c).items() if path.startswith(p.rstrip("/") + "/")]
    assert mount.get("readOnly") is True and "subPath" not in mount
    secret = volumes(spec)[mount["name"]]["secret"]
    assert secret["secretName"].startswith("tallyflow-credentials") and secret["defaultMode"] == 0o440
    items = {i["path"]: i["key"] for i in secret.get("items", [])}
    relative = path[len(mount["mountPath"].rstrip("/")) + 1 :]
    key = items[relative] if items else relative
    assert key == API_TOKENS_KEY
    # Only the API's key: the dataflows' sink credentials stay out of the API's pods.
    assert set(items.values()) == {API_TOKENS_KEY}
    if not out_of_band(overlay):
        data = named(docs, "Secret", secret["secretName"]).get("data", {})
        assert key in data, "the Secret lacks the API's tokens file"
        # The file loads as the API loads it, with at least one client that may ingest.
        f = tmp_path / API_TOKENS_KEY
        f.write_bytes(base64.b64decode(data[key]))
        tokens = Tokens.load(str(f))
        assert any("ingest" in client.scopes for client in tokens.by_digest.values())


def test_api_network_policy_admits_clients_and_reaches_kafka_and_redis(docs):
    deployment = api(docs)
    labels = pod_labels(deployment)
    own = named(docs, "NetworkPolicy", API)
    assert selects(own["spec"]["podSelector"], labels) and set(own["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    # Ingress: labelled client pods of the namespace and Prometheus; no stray pod, no other port.
    client, stranger = {API_CLIENT_LABEL: "true", "app": "billing"}, {"app": "stranger"}
    assert ingress_allowed(docs, labels, API_PORT, client)
    assert not ingress_allowed(docs, labels, API_PORT, stranger), "any pod of the namespace may call the API"
    for other in workloads(docs):
        if other is not deployment and API_CLIENT_LABEL not in pod_labels(other):
            assert not ingress_allowed(docs, labels, API_PORT, pod_labels(other)), f"{other['metadata']['name']} may call the API"
    assert all(port_allowed(r, API_PORT) and r.get("ports") for r in own["spec"]["ingress"]), "only the API port"
    monitoring = [
        r
        for r in own["spec"]["ingress"]
        if any(p.get("namespaceSelector", {}).get("matchLabels") == {"kubernetes.io/metadata.name": "monitoring"} for p in r["from"])
    ]
    assert monitoring, "Prometheus cannot scrape the API"
    # Egress, by the API's own policy: DNS, and Kafka and Redis as the settings name them.
    own_only = [own]

    def own_egress(port, protocol="TCP"):
        return egress_allowed(own_only, labels, port, protocol=protocol)

    assert own_egress(53, "UDP") and own_egress(53)
    settings = effective_env(main_container(deployment), docs)
    services = {s["metadata"]["name"]: s for s in of_kind(docs, "Service")}
    brokers = [(h.rsplit(":", 1)[0], int(h.rsplit(":", 1)[1])) for h in settings["TALLYFLOW_BROKERS"].split(",")]
    redis = urlsplit(settings["TALLYFLOW_REDIS_URL"])
    for host, port in [*brokers, (redis.hostname, redis.port or 6379)]:
        assert own_egress(port), f"the API's policy does not allow {host}:{port}"
        svc = services.get(host)
        if svc is not None:  # an in-namespace Service (dev): its pods must let the API in
            (target,) = [w for w in workloads(docs) if selects({"matchLabels": svc["spec"]["selector"]}, pod_labels(w))]
            (sp,) = [p for p in svc["spec"]["ports"] if p["port"] == port]
            target_port = container_port(target, sp.get("targetPort", port))
            assert egress_allowed(docs, labels, target_port, pod_labels(target)), f"the API cannot reach {host}:{port}"
            assert ingress_allowed(docs, pod_labels(target), target_port, labels), f"{host} does not accept the API"


# --- Tryton as the ERP: the invoice-status poller (components/tryton-erp) ----------------------


def tryton_is_the_erp(docs):
    return settings_of(docs).get("TALLYFLOW_ERP_KIND", "http") == "tryton"


def test_the_status_poller_runs_exactly_where_tryton_is_the_erp(overlay, docs):
    """`erp-status` polls Tryton's invoices: it belongs with TALLYFLOW_ERP_KIND=tryton and
    nowhere else (an HTTP ERP tells the states through the API's webhook), and the ERP
    delivery then logs in to Tryton with the password from the credentials Secret."""
    tryton = tryton_is_the_erp(docs)
    if overlay in OPT_INS and OPT_INS[overlay][1] == TRYTON:
        assert tryton, "the tryton-erp component sets TALLYFLOW_ERP_KIND=tryton, and an overlay cannot undo it"
    assert [w["metadata"]["name"] for w in pollers(docs)] == ([POLLER] if tryton else [])
    if not tryton:
        return
    erp = named(docs, "StatefulSet", "tallyflow-erp")
    c = main_container(erp)
    path = env_map(c)["TALLYFLOW_TRYTON_PASSWORD_FILE"]["value"]
    (mount,) = [m for p, m in mounts(c).items() if path.startswith(p.rstrip("/") + "/")]
    secret = volumes(pod_spec(erp))[mount["name"]]["secret"]
    items = {i["path"]: i["key"] for i in secret.get("items", [])}
    relative = path[len(mount["mountPath"].rstrip("/")) + 1 :]
    assert secret["secretName"].startswith("tallyflow-credentials")
    assert (items[relative] if items else relative) == TRYTON_PASSWORD_KEY
    # Where Tryton is: set by the overlay, not the app's local default.
    assert app_settings(c, docs).tryton.url != load_settings({}).tryton.url, "set TALLYFLOW_TRYTON_URL in the overlay"


def test_status_poller_is_one_replica_that_never_overlaps(overlay, docs):
    for w in pollers(docs):
        name, spec, labels = w["metadata"]["name"], w["spec"], pod_labels(w)
        # One poller on one cursor: one replica, and a rollout stops the old pod first.
        assert w["kind"] == "Deployment" and spec["replicas"] == 1, f"{name}: exactly one poller"
        assert spec["strategy"] == {"type": "Recreate"}, f"{name}: a rolling update runs two pollers at once"
        assert not [h for h in of_kind(docs, "HorizontalPodAutoscaler") if h["spec"]["scaleTargetRef"]["name"] == name]
        assert not [so for so in of_kind(docs, "ScaledObject") if so["spec"]["scaleTargetRef"]["name"] == name]
        assert selects(spec["selector"], labels)
        assert not any(selects(spec["selector"], pod_labels(o)) for o in workloads(docs) if o is not w)
        # `tallyflow erp-status` (the image's entrypoint), polling: valid flags, never --once.
        assert len(pod_spec(w)["containers"]) == 1 and not pod_spec(w).get("initContainers")
        c = main_container(w)
        assert ours(c) and "command" not in c
        try:
            a = cli_parser().parse_args(c["args"])
        except SystemExit:
            pytest.fail(f"{name}: `tallyflow {' '.join(c['args'])}` does not parse")
        assert a.cmd == "erp-status" and not a.once and a.interval > 0, c["args"]
        # It serves no endpoint: no ports, probes, Service or scrape annotations to fake one.
        s = app_settings(c, docs)
        assert s.process.metrics_port == 0
        assert not c.get("ports") and not {"startupProbe", "livenessProbe", "readinessProbe"} & set(c)
        assert not [
            sv for sv in of_kind(docs, "Service") if sv["spec"].get("selector") and selects({"matchLabels": sv["spec"]["selector"]}, labels)
        ]
        assert "prometheus.io/scrape" not in (w["spec"]["template"]["metadata"].get("annotations") or {})
        assert not [pdb for pdb in of_kind(docs, "PodDisruptionBudget") if selects(pdb["spec"]["selector"], labels)]
        # It polls Tryton as the ERP; a stop lets the poll under way finish its Tryton call.
        assert s.erp.kind == "tryton"
        assert pod_spec(w)["terminationGracePeriodSeconds"] >= s.tryton.timeout_seconds
        # Its own account, without a token or a grant: it never calls the Kubernetes API.
        ps = pod_spec(w)
        assert ps.get("automountServiceAccountToken") is False
        assert ps.get("serviceAccountName") not in (None, "default", "tallyflow", API)
        assert named(docs, "ServiceAccount", ps["serviceAccountName"]).get("automountServiceAccountToken") is False
        assert not any(
            subject["kind"] == "ServiceAccount" and subject["name"] == ps["serviceAccountName"]
            for b in of_kind(docs, "RoleBinding")
            for subject in b["subjects"]
        )
        # Only the Tryton password of the credentials Secret, read from a file.
        path = env_map(c)["TALLYFLOW_TRYTON_PASSWORD_FILE"]["value"]
        assert "TALLYFLOW_TRYTON_PASSWORD" not in effective_env(c, docs)
        (mount,) = [m for p, m in mounts(c).items() if path.startswith(p.rstrip("/") + "/")]
        assert mount.get("readOnly") is True and "subPath" not in mount
        secret = volumes(ps)[mount["name"]]["secret"]
        assert secret["secretName"].startswith("tallyflow-credentials") and secret["defaultMode"] == 0o440
        items = {i["path"]: i["key"] for i in secret.get("items", [])}
        assert items == {path[len(mount["mountPath"].rstrip("/")) + 1 :]: TRYTON_PASSWORD_KEY}
        if not out_of_band(overlay):
            assert TRYTON_PASSWORD_KEY in named(docs, "Secret", secret["secretName"]).get("data", {})


def reaches(docs, labels, host, port):
    """Whether pods with `labels` may open host:port: by port for an endpoint outside the
    namespace; for an in-namespace Service, to its pods, which must also let them in."""
    svc = {s["metadata"]["name"]: s for s in of_kind(docs, "Service")}.get(host)
    if svc is None:
        return egress_allowed(docs, labels, port)
    (target,) = [w for w in workloads(docs) if selects({"matchLabels": svc["spec"]["selector"]}, pod_labels(w))]
    (sp,) = [p for p in svc["spec"]["ports"] if p["port"] == port]
    target_port = container_port(target, sp.get("targetPort", port))
    return egress_allowed(docs, labels, target_port, pod_labels(target)) and ingress_allowed(docs, pod_labels(target), target_port, labels)


def test_status_poller_reaches_kafka_redis_and_tryton_and_takes_no_connection(docs):
    for w in pollers(docs):
        labels = pod_labels(w)
        own = named(docs, "NetworkPolicy", POLLER)
        assert selects(own["spec"]["podSelector"], labels) and set(own["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        assert not own["spec"].get("ingress"), "the poller listens on nothing"
        # Its own policy states what it needs: DNS, and Kafka, Redis and Tryton as the settings
        # name them (Tryton on either port the component supports); all policies let it.
        settings = effective_env(main_container(w), docs)
        brokers = [(h.rsplit(":", 1)[0], int(h.rsplit(":", 1)[1])) for h in settings["TALLYFLOW_BROKERS"].split(",")]
        redis = urlsplit(settings["TALLYFLOW_REDIS_URL"])
        tryton = urlsplit(settings["TALLYFLOW_TRYTON_URL"])
        tryton_port = tryton.port or {"https": 443, "http": 80}[tryton.scheme]
        assert tryton_port in TRYTON_PORTS, f"{tryton.geturl()}: open its port in components/{TRYTON}"
        needed = [*brokers, (redis.hostname, redis.port or 6379), *((tryton.hostname, p) for p in TRYTON_PORTS)]
        for host, port in [("dns", 53), *needed]:
            assert egress_allowed([own], labels, port), f"the poller's policy does not allow {host}:{port}"
        assert egress_allowed([own], labels, 53, protocol="UDP")
        for host, port in needed:
            assert reaches(docs, labels, host, port), f"the poller cannot reach {host}:{port}"
        # The ERP delivery books the lines in Tryton: it reaches Tryton on the same ports.
        erp = pod_labels(named(docs, "StatefulSet", "tallyflow-erp"))
        for port in TRYTON_PORTS:
            assert reaches(docs, erp, tryton.hostname, port), f"tallyflow-erp cannot reach Tryton on {port}"
        # Nothing may connect to it: no policy admits any peer on any port beyond the
        # shared metrics port, where nothing listens in this pod.
        for r in policies_for(docs, labels, "Ingress"):
            assert r.get("ports") and all(p.get("port") == METRICS_PORT for p in r["ports"]), r


# --- CRDs: KEDA and the Prometheus Operator --------------------------------------------------


def test_keda_scales_the_rating_statefulset_on_its_consumer_lag(docs):
    settings = settings_of(docs)
    assert {so["spec"]["scaleTargetRef"]["name"] for so in of_kind(docs, "ScaledObject")} <= {"tallyflow-rating", API}
    for so in dataflow_scalers(docs):
        assert so["apiVersion"] == "keda.sh/v1alpha1"
        ref = so["spec"]["scaleTargetRef"]
        assert (ref.get("apiVersion"), ref.get("kind")) == ("apps/v1", "StatefulSet")
        target = named(docs, "StatefulSet", ref["name"])
        assert ref["name"] == "tallyflow-rating"
        behavior = so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 300, "every resize restarts the cluster"
        (trigger,) = so["spec"]["triggers"]
        meta = trigger["metadata"]
        assert trigger["type"] == "kafka"
        # The group the rating dataflow commits its read positions to (for lag tooling only).
        assert (
            meta["consumerGroup"]
            == f"{app_settings(main_container(target), docs).kafka.consumer_group_prefix}-rating"
            == "tallyflow-rating"
        )
        assert meta["topic"] == settings["TALLYFLOW_INPUT_TOPIC"]
        assert meta["bootstrapServers"] == settings["TALLYFLOW_BROKERS"]
        assert meta["allowIdleConsumers"] == "false" and int(meta["lagThreshold"]) > 0
        protocol = settings.get("TALLYFLOW_KAFKA_SECURITY_PROTOCOL", "PLAINTEXT").upper()
        assert (meta.get("tls") == "enable") == protocol.endswith("SSL")
        if protocol.startswith("SASL"):
            assert meta.get("sasl") == KEDA_SASL[settings["TALLYFLOW_KAFKA_SASL_MECHANISM"]]
            auth = named(docs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
            params = {e["parameter"] for e in auth["spec"].get("env", []) + auth["spec"].get("secretTargetRef", [])}
            assert {"username", "password"} <= params
            for e in auth["spec"].get("env", []):
                (c,) = [c for c in pod_spec(target)["containers"] if c["name"] == e["containerName"]]
                assert e["name"] in effective_env(c, docs), f"KEDA reads {e['name']}, which the container does not set"


def test_prometheus_operator_scrapes_every_dataflow(docs):
    for sm in of_kind(docs, "ServiceMonitor"):
        assert sm["apiVersion"] == "monitoring.coreos.com/v1"
        services = [s for s in of_kind(docs, "Service") if selects(sm["spec"]["selector"], s["metadata"].get("labels", {}))]
        assert {s["metadata"]["name"] for s in services} == {d["spec"]["serviceName"] for d in dataflows(docs)}
        for ep in sm["spec"]["endpoints"]:
            assert ep.get("path", "/metrics") == "/metrics"
            for s in services:
                assert ep["port"] in {p["name"] for p in s["spec"]["ports"]}, f"{s['metadata']['name']} has no port {ep['port']}"
    for sts in dataflows(docs):
        ann = sts["spec"]["template"]["metadata"].get("annotations", {})
        scrape = {k: ann.get(f"prometheus.io/{k}") for k in ("scrape", "port", "path")}
        assert scrape == {"scrape": "true", "port": str(METRICS_PORT), "path": "/metrics"}
    # The API serves /metrics on its only port: by annotation, and per pod where the operator is.
    deployment = api(docs)
    ann = deployment["spec"]["template"]["metadata"].get("annotations", {})
    scrape = {k: ann.get(f"prometheus.io/{k}") for k in ("scrape", "port", "path")}
    assert scrape == {"scrape": "true", "port": str(API_PORT), "path": "/metrics"}
    for pm in of_kind(docs, "PodMonitor"):
        assert pm["apiVersion"] == "monitoring.coreos.com/v1"
        assert [w["metadata"]["name"] for w in workloads(docs) if selects(pm["spec"]["selector"], pod_labels(w))] == [API]
        (ep,) = pm["spec"]["podMetricsEndpoints"]
        assert ep["path"] == "/metrics" and container_port(deployment, ep["port"]) == API_PORT


# --- the overlays ------------------------------------------------------------------------------


def test_dev_is_self_contained():
    docs = render("dev")
    (ns,) = of_kind(docs, "Namespace")
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {ns["metadata"]["name"]} == {"tallyflow-dev"}
    assert not [d for d in docs if d["kind"] in CRD_KINDS], "kind/minikube have no such CRDs"
    images = {c["image"] for w in workloads(docs) for c in all_containers(pod_spec(w))}
    assert {"apache/kafka:3.9.1", "redis:7.2-alpine"} <= images
    services = {s["metadata"]["name"] for s in of_kind(docs, "Service")}
    assert {"kafka", "redis", "sandbox"} <= services
    hosts = {h for h, _ in endpoints(settings_of(docs))}
    assert hosts <= services, f"dev settings point outside the namespace: {hosts - services}"
    sandbox = named(docs, "Deployment", "sandbox")
    assert pod_spec(sandbox)["containers"][0]["args"] == ["sandbox", "--host", "0.0.0.0", "--port", "8787"]
    topics = named(docs, "Job", "tallyflow-topics")
    assert pod_spec(topics)["containers"][0]["args"][0] == "topics"


def ingress_allowed(docs, labels, port, source_labels):
    return any(
        port_allowed(r, port) and "from" in r and peer_selects(r["from"], source_labels) for r in policies_for(docs, labels, "Ingress")
    )


def test_dev_stack_pods_accept_only_tallyflow_pods():
    """Kafka, Redis and the sandbox of the dev overlay sit behind default deny: only Tallyflow's
    pods reach them, each on its own port (a stray pod in the namespace reaches none)."""
    docs = render("dev")
    tallyflow = pod_labels(named(docs, "StatefulSet", "tallyflow-rating"))
    stranger = {"app": "stranger"}
    for name, port in (("kafka", 9092), ("redis", 6379), ("sandbox", 8787)):
        (w,) = [w for w in workloads(docs) if w["metadata"]["name"] == name]
        labels = pod_labels(w)
        deny = [
            np
            for np in of_kind(docs, "NetworkPolicy")
            if selects(np["spec"]["podSelector"], labels) and not np["spec"].get("ingress") and "Ingress" in np["spec"]["policyTypes"]
        ]
        assert deny, f"{name}: no default-deny policy"
        assert ingress_allowed(docs, labels, port, tallyflow), f"{name}: Tallyflow cannot reach port {port}"
        assert not ingress_allowed(docs, labels, port, stranger), f"{name}: any pod may reach port {port}"
        assert egress_allowed(docs, tallyflow, port, labels), f"Tallyflow may not send to {name}:{port}"


@pytest.mark.parametrize("name", PROD_RENDERS)
def test_prod_uses_external_endpoints_shared_rwx_storage_and_spreads_rating(rendered, name):
    docs = rendered(name)
    assert {d["metadata"].get("namespace") for d in docs} == {"tallyflow"}
    assert not of_kind(docs, "Namespace") and not of_kind(docs, "Secret")
    assert of_kind(docs, "ScaledObject") and of_kind(docs, "ServiceMonitor") and of_kind(docs, "PodMonitor")
    # The API scales on its request rate (KEDA), not on the base's CPU-only HPA.
    assert not of_kind(docs, "HorizontalPodAutoscaler")
    assert_api_scales_on_request_rate(named(docs, "ScaledObject", API), docs)
    settings = settings_of(docs)
    assert settings["TALLYFLOW_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert all(urlsplit(settings[k]).scheme == "https" for k in ("TALLYFLOW_CRM_URL", "TALLYFLOW_SUCCESS_URL", "TALLYFLOW_ERP_URL"))
    for sts in dataflows(docs):
        ref = env_map(main_container(sts))["TALLYFLOW_KAFKA_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == ("tallyflow-kafka", "password")
    for pvc in of_kind(docs, "PersistentVolumeClaim"):
        assert pvc["spec"]["accessModes"] == ["ReadWriteMany"] and pvc["spec"].get("storageClassName")
    rating = named(docs, "StatefulSet", "tallyflow-rating")
    # KEDA owns the count: a replicas field would reset it on every apply (a stop-and-resume).
    assert "replicas" not in rating["spec"]
    assert named(docs, "ScaledObject", "tallyflow-rating")["spec"]["minReplicaCount"] == 3
    spread = pod_spec(rating)["topologySpreadConstraints"]
    assert any(t["topologyKey"] == "kubernetes.io/hostname" and selects(t["labelSelector"], pod_labels(rating)) for t in spread)
    # A pod left pending for the sake of spreading stops the whole cluster.
    assert all(t["whenUnsatisfiable"] == "ScheduleAnyway" for t in spread)


def test_catalog_shipped_with_the_manifests_loads():
    cat = load_catalog(K8S / "base" / "catalog.yaml")
    assert cat.meters and cat.plans and cat.tenants


# --- the image ---------------------------------------------------------------------------------


def dockerfile():
    """(instruction, arguments) pairs, comments dropped and continuation lines joined."""
    lines = [line for line in (ROOT / "Dockerfile").read_text().splitlines() if not line.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", text, re.M)]


def test_dockerfile_is_multi_stage_non_root_and_runs_tallyflow():
    steps = dockerfile()
    froms = [i for i, (op, _) in enumerate(steps) if op == "FROM"]
    assert len(froms) >= 2, "multi-stage: build tools stay out of the runtime image"
    final = steps[froms[-1] :]
    args = {k: v for op, a in steps[: froms[0]] if op == "ARG" and "=" in a for k, v in [a.split("=", 1)]}
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], final[0][1].split()[0])
    assert base == "python:3.11-slim-bookworm"
    users = [a for op, a in final if op == "USER"]
    assert users, "the runtime stage must set USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) > 0 and (not gid or gid.isdigit()), f"USER {users[-1]}: numeric and not root (runAsNonRoot checks it)"
    pods = {pod_spec(w)["securityContext"]["runAsUser"] for o in OVERLAYS for w in our_workloads(render(o))}
    assert pods == {int(uid)}, "the pods run as the image's user"
    (entrypoint,) = [json.loads(a) for op, a in final if op == "ENTRYPOINT"]
    assert entrypoint == ["tallyflow"]
    exposed = {int(p.split("/")[0]) for op, a in final if op == "EXPOSE" for p in a.split()}
    assert {CLUSTER_PORT, METRICS_PORT} <= exposed
    installs = [a for op, a in steps if op == "RUN" and "pip install" in a]
    assert installs and not any(re.search(r"(\s-e\s|--editable|\[dev|\[local|\[.*(dev|local))", a) for a in installs), installs
    assert any(op == "COPY" and "--from=" in a and "/opt/venv" in a for op, a in final)


def test_dockerignore_keeps_the_context_small():
    ignored = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".venv", ".git", "tests"} <= ignored


@pytest.mark.parametrize("name", PROD_RENDERS)
def test_prod_gives_every_workload_that_talks_to_kafka_its_password(rendered, name):
    docs = rendered(name)
    workloads = [d for d in docs if d["kind"] in ("StatefulSet", "Deployment")]
    assert {d["metadata"]["name"] for d in workloads} >= {"tallyflow-api", "tallyflow-rating"}
    for d in workloads:
        env = {e["name"] for c in d["spec"]["template"]["spec"]["containers"] for e in c.get("env", [])}
        assert "TALLYFLOW_KAFKA_SASL_PASSWORD" in env, f"{d['metadata']['name']} cannot log in to Kafka in prod"
