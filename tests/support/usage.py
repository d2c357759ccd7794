"""Reading the read model straight from Redis."""

from __future__ import annotations

from operators.catalog_index import CatalogIndex
from operators.usage import derive
from runtime.settings import Settings
from schemas.catalog import load_catalog
from schemas.usage import TenantUsage
from state.read_model import documents


def read_model(s: Settings) -> dict[tuple[str, str], TenantUsage]:
    """Every document under the settings' prefix, by (tenant, period), as the API derives it."""
    cat = CatalogIndex.build(load_catalog(s.process.catalog))
    return {(f.tenant_id, f.period): derive(cat, f) for _, f in documents(s.stores)}


def counts(s: Settings) -> dict[tuple[str, str], int]:
    """Each document's accepted-event count, by (tenant, period)."""
    return {(d.tenant_id, d.period): n for n, d in documents(s.stores)}
