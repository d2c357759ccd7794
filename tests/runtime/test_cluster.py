"""The StatefulSet cluster plumbing: ordinals, the address list, and the Kubernetes API call
(against a real HTTP server on loopback that answers as the API server does)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from runtime.cluster import ClusterError, KubeApi, ResizeWatch, addresses, ordinal, prepare


class _Api:
    """Answers GET /apis/apps/v1/namespaces/<ns>/statefulsets/<name> with `replicas`."""

    def __init__(self) -> None:
        self.replicas: dict[str, int] = {}
        self.status = 200
        self.seen: list[tuple[str, str | None]] = []
        api = self

        class H(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                api.seen.append((self.path, self.headers.get("Authorization")))
                name = self.path.rsplit("/", 1)[-1]
                body = json.dumps({"kind": "StatefulSet", "spec": {"replicas": api.replicas.get(name, 1)}}).encode()
                self.send_response(api.status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def api() -> Iterator[_Api]:
    a = _Api()
    yield a
    a.server.shutdown()


def test_ordinal_is_the_pod_name_suffix_and_rejects_strangers() -> None:
    assert ordinal("tallyflow-rating-11", "tallyflow-rating") == 11
    with pytest.raises(ClusterError, match="not a pod of StatefulSet"):
        ordinal("tallyflow-erp-0", "tallyflow-rating")


def test_addresses_go_through_the_headless_service() -> None:
    assert addresses("tallyflow-rating", "prod", 2, 2101) == [
        "tallyflow-rating-0.tallyflow-rating.prod.svc:2101",
        "tallyflow-rating-1.tallyflow-rating.prod.svc:2101",
    ]


def _env(tmp_path: Path, pod: str = "tallyflow-rating-1") -> dict[str, str]:
    return {
        "BYTEWAX_POD_NAME": pod,
        "BYTEWAX_STATEFULSET_NAME": "tallyflow-rating",
        "BYTEWAX_HOSTFILE_PATH": str(tmp_path / "run" / "hostfile"),
        "POD_NAMESPACE": "prod",
    }


def test_prepare_writes_the_hostfile_for_the_current_replica_count(api: _Api, tmp_path: Path) -> None:
    api.replicas["tallyflow-rating"] = 3
    env = _env(tmp_path)
    assert prepare(env, 2101, KubeApi(api.url, token="t0ken")) == 3
    lines = Path(env["BYTEWAX_HOSTFILE_PATH"]).read_text().split()
    assert lines == addresses("tallyflow-rating", "prod", 3, 2101)
    assert api.seen == [("/apis/apps/v1/namespaces/prod/statefulsets/tallyflow-rating", "Bearer t0ken")]


def test_prepare_outside_kubernetes_leaves_the_given_hostfile_alone(tmp_path: Path) -> None:
    env = _env(tmp_path)
    with pytest.raises(ClusterError, match="does not exist, and there is no Kubernetes API"):
        prepare(env, 2101)  # rather than a traceback from bytewax.run
    hostfile = Path(env["BYTEWAX_HOSTFILE_PATH"])
    hostfile.parent.mkdir(parents=True)
    hostfile.write_text("127.0.0.1:1\n127.0.0.1:2\n")
    assert prepare(env, 2101) is None  # no service account here: whoever started us wrote it
    assert hostfile.read_text() == "127.0.0.1:1\n127.0.0.1:2\n"


def test_a_pod_beyond_the_replica_count_refuses_to_join(api: _Api, tmp_path: Path) -> None:
    api.replicas["tallyflow-rating"] = 2
    with pytest.raises(ClusterError, match="beyond the StatefulSet's 2 replica"):
        prepare(_env(tmp_path, "tallyflow-rating-2"), 2101, KubeApi(api.url))


def test_a_forbidden_api_names_the_missing_grant(api: _Api, tmp_path: Path) -> None:
    api.status = 403
    with pytest.raises(ClusterError, match="grant the pod's service account `get` on statefulsets"):
        prepare(_env(tmp_path), 2101, KubeApi(api.url))


def test_the_watch_notices_a_new_replica_count(api: _Api) -> None:
    api.replicas["tallyflow-rating"] = 2
    w = ResizeWatch(KubeApi(api.url), "prod", "tallyflow-rating", size=2, every_s=30)
    assert w.changed() is None
    api.replicas["tallyflow-rating"] = 4  # kubectl scale, or KEDA
    assert w.changed() == 4
    api.status = 500  # an API hiccup is not a resize
    assert w.changed() is None


def test_a_rotated_service_account_token_is_read_again(api: _Api, tmp_path: Path) -> None:
    """Projected tokens rotate under a running pod; a cached one would start failing with 401."""
    token = tmp_path / "token"
    token.write_text("first\n")
    kube = KubeApi(api.url, token_file=token)
    api.replicas["tallyflow-rating"] = 2
    kube.replicas("prod", "tallyflow-rating")
    token.write_text("second\n")
    kube.replicas("prod", "tallyflow-rating")
    assert [auth for _, auth in api.seen] == ["Bearer first", "Bearer second"]
