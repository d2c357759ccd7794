"""A bad catalog stops start-up with a message naming the field and the fix."""

import copy
from pathlib import Path

import pytest

from schemas.catalog import CatalogError, load_catalog, parse_catalog
from tests.helpers import CATALOG

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
