"""Catalogs for the local kit: the example's meters and plans with any number of tenants
(the production shape: many tenants referencing a few shared plans)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import yaml

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "catalog.yaml"


def tenant(i: int) -> dict[str, Any]:
    """The i-th tenant as the example has them: every 10th on enterprise (EUR), 3 in 10 on
    pro, the rest on starter; every 50th starter upgrades to pro mid-demo."""
    plan = "enterprise" if i % 10 == 0 else ("pro" if i % 10 in (3, 6, 9) else "starter")
    t: dict[str, Any] = {
        "tenant_id": f"t-{i:04d}",
        "plan": plan,
        "crm_account_id": f"CRM-{i:05d}",
        "erp_customer_id": f"ERP-{i:05d}",
        "contract_id": f"C-2026-{i:04d}",
    }
    if plan == "starter" and i % 50 == 1:
        t["plan_changes"] = [{"plan": "pro", "effective_from": "2026-10-31T23:50:00Z"}]
    return t


def scaled(tenants: int) -> dict[str, Any]:
    """The example catalog with `tenants` tenants."""
    base = yaml.load(EXAMPLE.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    return {"meters": base["meters"], "plans": base["plans"], "tenants": [tenant(i) for i in range(1, tenants + 1)]}


def write_json(path: Path, catalog: dict[str, Any]) -> Path:
    """JSON, which loads several times faster than YAML for large catalogs (any YAML loads too)."""
    path.write_bytes(orjson.dumps(catalog))
    return path
