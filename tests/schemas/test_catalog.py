"""A bad catalog stops start-up with a message naming the field and the fix."""

import copy
from pathlib import Path

import pytest

from schemas.catalog import CatalogError, load_catalog, parse_catalog
from tests.support.events import CATALOG

ROOT = Path(__file__).resolve().parents[2]


def broken(edit):
    cat = copy.deepcopy(CATALOG)
    edit(cat)
    return cat


@pytest.mark.parametrize(
    ("edit", "fragments"),
    [
        (lambda c: c["tenants"][0].update(plan="gold"), ["$.tenants[0].plan", "no plan 'gold'"]),
        (lambda c: c["meters"][1].pop("value_path"), ["$.meters[1].value_path", "needs a value_path"]),
        (lambda c: c["meters"][3].pop("unique_path"), ["$.meters[3].unique_path"]),
        (lambda c: c["meters"].append(dict(c["meters"][0])), ["$.meters[5].slug", "declared twice"]),
        (lambda c: c["plans"][0]["meters"]["tokens"]["price"]["tiers"].reverse(), ["tiers[0].up_to"]),
        (lambda c: c["plans"][0]["meters"]["calls"]["price"].update(unit_price="-1"), ["calls.price.unit_price", "non-negative"]),
        (lambda c: c["plans"][0]["meters"]["calls"]["price"].update(model="flat"), ["'flat'", "price.model", "per_unit, graduated"]),
        (
            lambda c: c["plans"][0]["meters"]["calls"]["thresholds"].append({"fraction": "0.5", "absolute": 4}),
            ["thresholds[4]", "exactly one of"],
        ),
        (
            lambda c: c["plans"][0]["meters"].update(ghost={"product_code": "X", "price": {"model": "per_unit", "unit_price": 1}}),
            ["meters.ghost", "no meter 'ghost'"],
        ),
        (lambda c: c["plans"][0].update(currency="usd"), ["$.plans[0].currency"]),
        (
            lambda c: c["tenants"][1]["plan_changes"][0].update(effective_from="2026-03-20T00:00:00"),
            ["plan_changes[0].effective_from", "time zone"],
        ),
        (lambda c: c["tenants"][0].update(colour="blue"), ["colour"]),
    ],
)
def test_bad_catalog_names_the_field(edit, fragments):
    with pytest.raises(CatalogError) as e:
        parse_catalog(broken(edit))
    for f in fragments:
        assert f in str(e.value)


def test_bad_file_names_the_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("meters: [\n")
    with pytest.raises(CatalogError, match=r"c\.yaml is not valid YAML"):
        load_catalog(p)
    with pytest.raises(CatalogError, match="TALLYFLOW_CATALOG"):
        load_catalog(tmp_path / "missing.yaml")


def test_example_catalog_is_valid():
    cat = load_catalog(ROOT / "examples" / "catalog.yaml")
    assert len(cat.tenants) == 1000 and {p.id for p in cat.plans} == {"starter", "pro", "enterprise"}


def test_a_live_reload_keeps_versions_and_refuses_what_would_break_state():
    from operators.catalog_index import CatalogIndex, successor

    old = CatalogIndex.build(parse_catalog(CATALOG))
    # A new tenant and a plan dropped from the file: the version stays known to the process.
    grown = copy.deepcopy(CATALOG)
    grown["tenants"].append({**grown["tenants"][0], "tenant_id": "newco"})
    grown["plans"] = [p for p in grown["plans"] if p["id"] != "plus"]
    grown["tenants"] = [{**t, "plan_changes": []} for t in grown["tenants"]]
    new = successor(old, parse_catalog(grown))
    assert "newco" in new.tenants and "plus:v2" in new.plans_by_version
    # A version edited in place, or a tenant removed, is refused with the way out named.
    edited = copy.deepcopy(CATALOG)
    edited["plans"][0]["meters"]["calls"]["included"] = 5
    with pytest.raises(CatalogError, match="version 2 and move tenants"):
        successor(old, parse_catalog(edited))
    gone = copy.deepcopy(CATALOG)
    gone["tenants"] = gone["tenants"][1:]
    with pytest.raises(CatalogError, match="effective_until"):
        successor(old, parse_catalog(gone))


def test_a_json_catalog_loads_directly_and_names_a_bad_field(tmp_path):
    import orjson
    import yaml

    good = yaml.safe_load((ROOT / "examples" / "catalog.yaml").read_text())
    path = tmp_path / "c.json"
    path.write_bytes(orjson.dumps(good, default=str))
    assert len(load_catalog(path).tenants) == len(good["tenants"])
    good["tenants"][3]["plan"] = 7
    path.write_bytes(orjson.dumps(good, default=str))
    with pytest.raises(CatalogError, match=r"tenants\[3\]\.plan"):
        load_catalog(path)
