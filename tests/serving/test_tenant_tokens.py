"""Tokens bound to tenants (issue 18, item 7): a token naming the tenants it serves reads and
posts for those only; any other is 403 before anything is looked up or produced."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import jsonschema
import orjson
import pytest
import yaml

from runtime.kafka import read_topic
from runtime.settings import ConfigError, Settings
from serving.app import BATCH
from serving.auth import Tokens
from tests.serving.conftest import ACME, LATE, READER, bearer
from tests.support.events import ev


def load(tmp_path: Path, **entry: object) -> Tokens:
    f = tmp_path / "tokens.yaml"
    f.write_text(yaml.safe_dump({"clients": [{"name": "portal", "token": "t" * 20, "scopes": ["read"], **entry}]}))
    return Tokens.load(str(f))


def test_the_token_file_names_exact_tenants_and_prefixes(tmp_path: Path) -> None:
    client = load(tmp_path, tenants=["t-1", "eu-*"]).client("Bearer " + "t" * 20)
    assert client is not None and client.bound
    assert [client.serves(t) for t in ("t-1", "t-10", "eu-", "eu-42", "us-1", "")] == [True, False, True, True, False, False]
    everyone = load(tmp_path).client("Bearer " + "t" * 20)  # no `tenants`: every tenant, as before
    assert everyone is not None and not everyone.bound and everyone.serves("anyone")
    for bad, why in (([], "an empty list serves no tenant"), (["a*b"], "'a*b' is not a tenant id or a prefix"), ([""], "'' is not")):
        with pytest.raises(ConfigError, match=r"clients\[0\]\.tenants \(portal\): " + why.replace("*", r"\*")):
            load(tmp_path, tenants=bad)
    with pytest.raises(ConfigError, match=r"clients\[0\]\.tenants"):
        load(tmp_path, tenants="t-1")  # one id, not a list


def test_a_bound_token_reads_its_tenants_only(api: Callable[..., httpx.Client]) -> None:
    c = api()

    def status(token: str, path: str) -> int:
        return c.get(path, headers={"Authorization": f"Bearer {token}"}).status_code

    assert status(ACME, "/v1/tenants/acme/usage") == 200 and status(ACME, "/v1/tenants/acme/entitlements/calls") == 200
    assert status(ACME, "/v1/tenants/bolt/usage") == 403 and status(ACME, "/v1/tenants/bolt/entitlements/calls") == 403
    r = c.get("/v1/tenants/ghost/usage", headers={"Authorization": f"Bearer {ACME}"})
    assert r.status_code == 403 and r.json() == {"error": "this token does not serve tenant 'ghost'"}  # not 404: nothing to probe
    assert c.get("/tenants/acme", auth=("me", ACME)).status_code == 200
    page = c.get("/tenants/bolt", auth=("me", ACME))
    assert page.status_code == 403 and "does not serve tenant" in page.text
    assert status(LATE, "/v1/tenants/late-co/usage") == 200 and status(LATE, "/v1/tenants/acme/usage") == 403  # a prefix
    assert status(READER, "/v1/tenants/bolt/usage") == 200  # an unbound token, as before


def test_a_bound_token_posts_for_its_tenants_only_and_nothing_else_is_sent(api: Callable[..., httpx.Client], small: Settings) -> None:
    c = api()
    mine = [ev("acme", id=f"a{i}") for i in range(3)]
    batch = b"[" + b",".join([mine[0], ev("bolt", id="b1"), mine[1], ev("nobody", id="x1")]) + b"]"
    r = c.post("/v1/events", content=batch, headers=bearer(ACME, BATCH))
    assert r.status_code == 403 and r.json()["index"] == 1 and "does not serve tenant 'bolt'" in r.json()["error"]
    spec = orjson.loads(c.get("/openapi.json").content)
    jsonschema.validate(r.json(), {"$ref": "#/components/schemas/Forbidden", "components": spec["components"]})
    one = c.post("/v1/events", content=ev("bolt", id="b2"), headers=bearer(ACME))
    assert one.status_code == 403 and one.json()["index"] == 0
    # An array posted as one event is read as a batch by the validator: its events are checked too.
    nested = c.post("/v1/events", content=b"[" + mine[2] + b"," + ev("bolt", id="b3") + b"]", headers=bearer(ACME))
    assert nested.status_code == 403 and nested.json()["index"] == 0
    assert read_topic(small.kafka.brokers, small.topics.input) == []  # nothing of the refused requests was sent
    ok = c.post("/v1/events", content=b"[" + b",".join(mine[:2]) + b"]", headers=bearer(ACME, BATCH))
    assert ok.status_code == 202, ok.text
    assert sorted(read_topic(small.kafka.brokers, small.topics.input)) == sorted(mine[:2])
