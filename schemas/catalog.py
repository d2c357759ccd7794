"""The catalog: meters, plans with prices and thresholds, tenants (SPEC §2.2).

`load_catalog` validates structure with msgspec (which names the failing path) and then
the cross-references msgspec cannot see, so a bad catalog stops start-up with one
message naming the field and what to do about it.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Annotated, Literal

import msgspec
import yaml

from schemas.errors import TallyflowError

Slug = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9_.-]*$")]
NonNeg = Decimal  # msgspec cannot bound Decimals; check_catalog does
Aggregation = Literal["SUM", "COUNT", "MAX", "UNIQUE_COUNT", "LATEST", "AVG", "MIN"]
BillingPeriod = Literal["month", "day"]
Notify = Literal["crm", "success"]
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MAX_DIMENSIONS = 3
MAX_DIMENSION_VALUE = 64  # characters of one dimension value (a cell's `when` value too)
# A data path: dot-separated identifiers (the event decoder makes each one a struct field).
_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")

# ISO 4217 currencies whose minor unit is not 1/100. Here, below `operators`, because the
# catalog checks amounts against it and pricing rounds to it: one table for both.
_MINOR_UNITS = {"JPY": 0, "KRW": 0, "VND": 0, "CLP": 0, "ISK": 0, "BHD": 3, "KWD": 3, "OMR": 3, "JOD": 3, "TND": 3}


def quantum(currency: str) -> Decimal:
    """The currency's minor unit (0.01 for most, 1 for JPY, 0.001 for BHD): what money rounds to."""
    return Decimal(1).scaleb(-_MINOR_UNITS.get(currency, 2))


class CatalogError(TallyflowError):
    """A catalog that cannot be used; the message names the field and the fix."""


class Meter(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    slug: Slug
    event_type: str
    aggregation: Aggregation
    value_path: str | None = None
    unique_path: str | None = None
    # Data paths whose string values split the meter into cells (SPEC §9.1); SUM/COUNT only.
    dimensions: list[str] = []


class Tier(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    up_to: NonNeg | None
    unit_price: NonNeg
    flat_fee: NonNeg = Decimal(0)


class PerUnit(msgspec.Struct, tag="per_unit", tag_field="model", forbid_unknown_fields=True, frozen=True):
    unit_price: NonNeg


class Graduated(msgspec.Struct, tag="graduated", tag_field="model", forbid_unknown_fields=True, frozen=True):
    tiers: list[Tier]


class Volume(msgspec.Struct, tag="volume", tag_field="model", forbid_unknown_fields=True, frozen=True):
    tiers: list[Tier]


class Package(msgspec.Struct, tag="package", tag_field="model", forbid_unknown_fields=True, frozen=True):
    package_size: Decimal
    package_price: NonNeg


class Cell(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A matrix rule: the unit price of every cell whose dimension values include `when`."""

    when: dict[str, str]
    unit_price: NonNeg


class Matrix(msgspec.Struct, tag="matrix", tag_field="model", forbid_unknown_fields=True, frozen=True):
    """Each distinct combination of the meter's dimension values (a cell) is priced per unit
    on its own: the first matching rule's price, else `default_unit_price` (SPEC §9.1)."""

    cells: list[Cell] = []
    default_unit_price: NonNeg | None = None
    max_cells: Annotated[int, msgspec.Meta(ge=1)] = 1000  # per tenant, meter and period


class Percentage(msgspec.Struct, tag="percentage", tag_field="model", forbid_unknown_fields=True, frozen=True):
    """A fee per event on a SUM meter of money: `min(max(value x rate + fixed_fee, min_fee),
    max_fee)`, summed exactly over the period and rounded once (SPEC §9.2)."""

    rate: NonNeg
    fixed_fee: NonNeg = Decimal(0)
    min_fee: NonNeg | None = None
    max_fee: NonNeg | None = None


PriceModel = PerUnit | Graduated | Volume | Package | Matrix | Percentage


class Threshold(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A level as a fraction of `included` or an absolute quantity (exactly one)."""

    fraction: Decimal | None = None
    absolute: Decimal | None = None
    name: str | None = None
    sustained_periods: Annotated[int, msgspec.Meta(ge=2)] | None = None
    notify: list[Notify] = msgspec.field(default_factory=lambda: ["crm", "success"])

    @property
    def level(self) -> str:
        if self.name:
            return self.name
        base = f"{(self.fraction or 0) * 100:f}".rstrip("0").rstrip(".") + "%" if self.fraction else f"abs:{self.absolute}"
        return f"{base}x{self.sustained_periods}" if self.sustained_periods else base


class HardLimit(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Usage at which the entitlement API answers `has_access: false` (exactly one of a
    fraction of `included` or an absolute quantity). Without one, access is soft: usage past
    `included` is billed as overage and access stays open."""

    fraction: Decimal | None = None
    absolute: Decimal | None = None


class PlanMeter(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    product_code: str
    price: PriceModel
    included: NonNeg = Decimal(0)
    thresholds: list[Threshold] = []
    hard_limit: HardLimit | None = None


class SpendThreshold(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """An alert when the period's gross amount over all the plan's meters reaches `amount`
    (in the plan's currency), once per tenant and period (SPEC §9.4)."""

    amount: Decimal
    notify: list[Notify] = msgspec.field(default_factory=lambda: ["crm", "success"])

    @property
    def level(self) -> str:
        """The alert's level, the amount as written (`spend:100.00`): part of the alert id,
        so it must not change when the catalog is reloaded."""
        return f"spend:{self.amount}"


class Minimum(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A minimum commitment per billing period (SPEC §9.6): a period whose gross is below
    `amount` gets one true-up line of the difference, under `product_code`."""

    amount: Decimal
    product_code: str


class LegalEntity(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A company of the group that invoices its tenants (SPEC §10.2): the ERP books their
    lines and credits under `erp_company`, in `currency`."""

    id: Slug
    name: str
    currency: Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{3}$")]
    erp_company: str


class ReviewRules(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """What a person reviews before it is posted to the ERP (SPEC §10.1): a line whose amount
    is above its currency's limit, and every line of a tenant's period once the period's gross
    is above `period_gross_over_previous` times the previous period's (a spike). Tenants
    marked `review: true` have every line and draw reviewed."""

    line_amount_over: dict[Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{3}$")], Decimal] = {}
    period_gross_over_previous: Decimal | None = None


class Plan(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    id: Slug
    version: Annotated[int, msgspec.Meta(ge=1)]
    currency: Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{3}$")]
    meters: dict[str, PlanMeter]
    billing_period: BillingPeriod = "month"
    spend_thresholds: list[SpendThreshold] = []
    minimum: Minimum | None = None
    # Alerts as a prepaid grant is used up (fractions of the grant; SPEC §9.5).
    credit_thresholds: list[Decimal] = msgspec.field(default_factory=lambda: [Decimal("0.8"), Decimal(1)])

    @property
    def pricing_version(self) -> str:
        return f"{self.id}:v{self.version}"


class PlanChange(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    plan: str
    effective_from: datetime


class Tenant(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    tenant_id: Annotated[str, msgspec.Meta(min_length=1)]
    plan: str
    crm_account_id: str
    erp_customer_id: str
    contract_id: str
    legal_entity: str | None = None
    review: bool = False  # every line and draw of the tenant waits for a person before the ERP (SPEC §10.1)
    region: str | None = None
    effective_from: datetime | None = None
    effective_until: datetime | None = None
    plan_changes: list[PlanChange] = []


class Catalog(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    meters: list[Meter]
    plans: list[Plan]
    tenants: list[Tenant]
    review: ReviewRules | None = None
    entities: list[LegalEntity] = []  # with entities, every tenant names its `legal_entity`


def _utc(dt: datetime, where: str) -> datetime:
    if dt.tzinfo is None:
        raise CatalogError(f"{where}: '{dt.isoformat()}' has no time zone; write it as RFC 3339 with 'Z' or an offset")
    return dt.astimezone(UTC)


def check_catalog(cat: Catalog) -> None:
    """Cross-reference checks that the type system cannot express."""
    slugs: set[str] = set()
    for i, m in enumerate(cat.meters):
        where = f"$.meters[{i}]"
        if m.slug in slugs:
            raise CatalogError(f"{where}.slug: meter '{m.slug}' is declared twice; give each meter a unique slug")
        slugs.add(m.slug)
        if m.event_type.startswith("tallyflow."):
            raise CatalogError(f"{where}.event_type: '{m.event_type}' is Tallyflow's own (credit grants); use your product's type")
        if m.aggregation in ("SUM", "MAX", "LATEST", "AVG", "MIN") and not m.value_path:
            raise CatalogError(f"{where}.value_path: {m.aggregation} meter '{m.slug}' needs a value_path such as 'tokens'")
        if m.aggregation == "UNIQUE_COUNT" and not m.unique_path:
            raise CatalogError(f"{where}.unique_path: UNIQUE_COUNT meter '{m.slug}' needs a unique_path such as 'user_id'")
        for name, path in (("value_path", m.value_path), ("unique_path", m.unique_path)):
            if path is not None and not _PATH.fullmatch(path):
                raise CatalogError(f"{where}.{name}: '{path}' is not a data path; write dot-separated names such as 'usage.bytes'")
        _check_dimensions(m, where)
    _check_shared_fields(cat.meters)
    by_slug = {m.slug: m for m in cat.meters}
    plan_ids: set[str] = set()
    for i, p in enumerate(cat.plans):
        where = f"$.plans[{i}]"
        if p.id in plan_ids:
            raise CatalogError(f"{where}.id: plan '{p.id}' is declared twice; bump 'version' in place instead")
        plan_ids.add(p.id)
        for slug, pm in p.meters.items():
            mw = f"{where}.meters.{slug}"
            if slug not in slugs:
                raise CatalogError(f"{mw}: no meter '{slug}' is declared; add it under 'meters' or remove it here")
            _check_money(pm, mw)
            if isinstance(pm.price, Matrix):
                _check_matrix(pm, pm.price, by_slug[slug], mw)
            elif isinstance(pm.price, Percentage):
                _check_percentage(pm, pm.price, by_slug[slug], mw)
            if isinstance(pm.price, Graduated | Volume):
                _check_tiers(pm.price.tiers, f"{mw}.price.tiers")
            for j, th in enumerate(pm.thresholds):
                if (th.fraction is None) == (th.absolute is None):
                    raise CatalogError(f"{mw}.thresholds[{j}]: set exactly one of 'fraction' or 'absolute'")
                if th.fraction is not None and isinstance(pm.price, Matrix):
                    raise CatalogError(
                        f"{mw}.thresholds[{j}].fraction: matrix has no 'included' to take a fraction of; "
                        "use 'absolute' (measured on the meter's total over all cells)"
                    )
                if th.fraction is not None and pm.included == 0:
                    raise CatalogError(
                        f"{mw}.thresholds[{j}].fraction: 'included' is 0, so a fraction of it is meaningless; use 'absolute'"
                    )
            hl = pm.hard_limit
            if hl is not None:
                if (hl.fraction is None) == (hl.absolute is None):
                    raise CatalogError(f"{mw}.hard_limit: set exactly one of 'fraction' (of included) or 'absolute'")
                if hl.fraction is not None and pm.included == 0:
                    raise CatalogError(f"{mw}.hard_limit.fraction: 'included' is 0, so a fraction of it is meaningless; use 'absolute'")
                for name in ("fraction", "absolute"):
                    v = getattr(hl, name)
                    if v is not None:
                        _nonneg(v, f"{mw}.hard_limit.{name}", strict=True)
            levels = [th.level for th in pm.thresholds]
            if len(levels) != len(set(levels)):
                raise CatalogError(f"{mw}.thresholds: two thresholds share a level name; give one a distinct 'name'")
        _check_spend(p, where)
        _check_credits(p, where)
    tenant_ids: set[str] = set()
    for i, t in enumerate(cat.tenants):
        where = f"$.tenants[{i}]"
        if t.tenant_id in tenant_ids:
            raise CatalogError(f"{where}.tenant_id: tenant '{t.tenant_id}' is declared twice")
        tenant_ids.add(t.tenant_id)
        for field, pid in [("plan", t.plan)] + [(f"plan_changes[{j}].plan", c.plan) for j, c in enumerate(t.plan_changes)]:
            if pid not in plan_ids:
                raise CatalogError(f"{where}.{field}: no plan '{pid}' is declared; use one of {sorted(plan_ids)}")
        for field, dt in (("effective_from", t.effective_from), ("effective_until", t.effective_until)):
            if dt is not None:
                _utc(dt, f"{where}.{field}")
        for j, c in enumerate(t.plan_changes):
            _utc(c.effective_from, f"{where}.plan_changes[{j}].effective_from")
    _check_entities(cat)
    if cat.review is not None:
        for cur, limit in cat.review.line_amount_over.items():
            _nonneg(limit, f"$.review.line_amount_over.{cur}", strict=True)
        n = cat.review.period_gross_over_previous
        if n is not None and (not n.is_finite() or n <= 1):
            raise CatalogError(
                f"$.review.period_gross_over_previous: {n} would hold every period that merely grows; use a factor above 1, such as 3"
            )


def _check_entities(cat: Catalog) -> None:
    """Entities are unique; with any declared, each tenant belongs to one of them, and its
    plans are in that entity's currency (it invoices in it)."""
    entities: dict[str, LegalEntity] = {}
    companies: dict[str, str] = {}
    for i, e in enumerate(cat.entities):
        if e.id in entities:
            raise CatalogError(f"$.entities[{i}].id: entity '{e.id}' is declared twice; give each entity a unique id")
        if e.erp_company in companies:
            raise CatalogError(
                f"$.entities[{i}].erp_company: '{e.erp_company}' is already entity '{companies[e.erp_company]}''s; "
                "each entity posts under an ERP company of its own (merge the two entities, or name its own company)"
            )
        entities[e.id] = e
        companies[e.erp_company] = e.id
    currency = {p.id: p.currency for p in cat.plans}
    for i, t in enumerate(cat.tenants):
        where = f"$.tenants[{i}].legal_entity"
        if t.legal_entity is None:
            if entities:
                raise CatalogError(f"{where}: tenant '{t.tenant_id}' names no legal entity; set one of {sorted(entities)}")
            continue
        entity = entities.get(t.legal_entity)
        if entity is None:
            known = f"one of {sorted(entities)}" if entities else "an id declared under `entities:` (none is)"
            raise CatalogError(f"{where}: no entity '{t.legal_entity}' is declared; use {known}")
        for field, pid in [("plan", t.plan)] + [(f"plan_changes[{j}].plan", c.plan) for j, c in enumerate(t.plan_changes)]:
            if currency.get(pid) != entity.currency:
                raise CatalogError(
                    f"$.tenants[{i}].{field}: plan '{pid}' is in {currency.get(pid)} but entity '{entity.id}' invoices in "
                    f"{entity.currency}; "
                    "give the tenant a plan in its entity's currency, or move it to an entity in the plan's"
                )


MAX_NUMBER = Decimal(10**18)
MAX_DECIMALS = 12


def _nonneg(v: Decimal, where: str, strict: bool = False) -> None:
    """Non-negative (or positive), and within what rating computes exactly: at most 10^18
    with 12 decimal places (see operators/__init__.py)."""
    if not v.is_finite() or v < 0 or (strict and v == 0):
        raise CatalogError(f"{where}: {v} is not allowed; use a {'positive' if strict else 'non-negative'} number")
    exp = v.normalize().as_tuple().exponent
    if v > MAX_NUMBER or (isinstance(exp, int) and exp < -MAX_DECIMALS):
        raise CatalogError(f"{where}: {v} is out of range; use at most {MAX_NUMBER:,} with {MAX_DECIMALS} decimal places")


def _check_money(pm: PlanMeter, where: str) -> None:
    _nonneg(pm.included, f"{where}.included")
    model = pm.price
    if isinstance(model, PerUnit):
        _nonneg(model.unit_price, f"{where}.price.unit_price")
    elif isinstance(model, Package):
        _nonneg(model.package_size, f"{where}.price.package_size", strict=True)
        _nonneg(model.package_price, f"{where}.price.package_price")
    elif isinstance(model, Matrix):
        for j, c in enumerate(model.cells):
            _nonneg(c.unit_price, f"{where}.price.cells[{j}].unit_price")
        if model.default_unit_price is not None:
            _nonneg(model.default_unit_price, f"{where}.price.default_unit_price")
    elif isinstance(model, Percentage):
        for name in ("rate", "fixed_fee", "min_fee", "max_fee"):
            v = getattr(model, name)
            if v is not None:
                _nonneg(v, f"{where}.price.{name}")
    else:
        for j, t in enumerate(model.tiers):
            _nonneg(t.unit_price, f"{where}.price.tiers[{j}].unit_price")
            _nonneg(t.flat_fee, f"{where}.price.tiers[{j}].flat_fee")
    for j, th in enumerate(pm.thresholds):
        for name in ("fraction", "absolute"):
            v = getattr(th, name)
            if v is not None:
                _nonneg(v, f"{where}.thresholds[{j}].{name}", strict=True)


def _overlap(a: str, b: str) -> bool:
    """Two data paths that read the same field, or one inside the other."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def _check_dimensions(m: Meter, where: str) -> None:
    if not m.dimensions:
        return
    dw = f"{where}.dimensions"
    if m.aggregation not in ("SUM", "COUNT"):
        raise CatalogError(f"{dw}: {m.aggregation} meter '{m.slug}' cannot split into cells; only SUM and COUNT meters take dimensions")
    if len(m.dimensions) > MAX_DIMENSIONS:
        raise CatalogError(f"{dw}: meter '{m.slug}' names {len(m.dimensions)} dimensions; use at most {MAX_DIMENSIONS}")
    for j, d in enumerate(m.dimensions):
        if not _PATH.fullmatch(d):
            raise CatalogError(f"{dw}[{j}]: '{d}' is not a data path; write dot-separated names such as 'model' or 'request.region'")
        if m.value_path is not None and _overlap(d, m.value_path):
            raise CatalogError(f"{dw}[{j}]: '{d}' overlaps the meter's value_path '{m.value_path}'; a dimension must be another field")
        for k, e in enumerate(m.dimensions[:j]):
            if _overlap(d, e):
                raise CatalogError(f"{dw}[{j}]: '{d}' overlaps dimensions[{k}] '{e}'; name each field once")


def _check_shared_fields(meters: list[Meter]) -> None:
    """Meters of one event type read one decoded `data`: a field cannot be a dimension (a
    string) for one meter and a quantity, a unique value or an object for another."""
    reads: dict[str, list[tuple[int, str, str, str]]] = {}  # event type -> (meter index, slug, field, path)
    for i, m in enumerate(meters):
        fields = [(f"dimensions[{j}]", d) for j, d in enumerate(m.dimensions)]
        if m.aggregation == "UNIQUE_COUNT" and m.unique_path:
            fields.append(("unique_path", m.unique_path))
        elif m.aggregation != "COUNT" and m.value_path:
            fields.append(("value_path", m.value_path))
        reads.setdefault(m.event_type, []).extend((i, m.slug, f, p) for f, p in fields)
    for rs in reads.values():
        for n, (i, _slug, f, path) in enumerate(rs):
            for j, other, f2, path2 in rs[:n]:
                dim, dim2 = f.startswith("dim"), f2.startswith("dim")
                if i == j or not (dim or dim2) or not _overlap(path, path2) or (dim and dim2 and path == path2):
                    continue
                raise CatalogError(
                    f"$.meters[{i}].{f}: '{path}' overlaps {f2} '{path2}' of meter '{other}' (the same event type); "
                    "a field is either a dimension or a value, so read another field"
                )


def _check_matrix(pm: PlanMeter, model: Matrix, meter: Meter, where: str) -> None:
    dims = meter.dimensions
    if not dims:
        raise CatalogError(
            f"{where}.price: matrix prices each cell of the meter's dimensions, but meter '{meter.slug}' names none; "
            "add dimensions (such as [model]) to the meter"
        )
    if pm.included != 0:
        raise CatalogError(
            f"{where}.included: {pm.included} is not allowed with matrix; matrix prices each cell from its first unit; remove included"
        )
    if not model.cells and model.default_unit_price is None:
        raise CatalogError(f"{where}.price: a matrix needs 'cells', a 'default_unit_price' or both, or no event could be priced")
    for j, c in enumerate(model.cells):
        cw = f"{where}.price.cells[{j}].when"
        if not c.when:
            raise CatalogError(f"{cw}: empty; name at least one of the dimensions {dims} (default_unit_price prices the rest)")
        for dim, v in c.when.items():
            if dim not in dims:
                raise CatalogError(f"{cw}.{dim}: '{dim}' is not a dimension of meter '{meter.slug}'; use one of {dims}")
            if len(v) > MAX_DIMENSION_VALUE:
                raise CatalogError(f"{cw}.{dim}: the value has {len(v)} characters; dimension values have at most {MAX_DIMENSION_VALUE}")
        for k, earlier in enumerate(model.cells[:j]):
            if earlier.when.items() <= c.when.items():
                raise CatalogError(
                    f"{where}.price.cells[{j}]: never matches, as cells[{k}] matches every event it would and comes first; "
                    f"move it before cells[{k}] or remove it"
                )


def _check_percentage(pm: PlanMeter, model: Percentage, meter: Meter, where: str) -> None:
    if meter.aggregation != "SUM":
        raise CatalogError(
            f"{where}.price: percentage takes a fee on amounts, so it needs a SUM meter; meter '{meter.slug}' is {meter.aggregation}"
        )
    if pm.included != 0:
        raise CatalogError(f"{where}.included: {pm.included} is not allowed with percentage; every event pays its fee; remove included")
    if model.min_fee is not None and model.max_fee is not None and model.min_fee > model.max_fee:
        raise CatalogError(f"{where}.price.min_fee: {model.min_fee} is above max_fee {model.max_fee}; make min_fee at most max_fee")


def _check_credits(p: Plan, where: str) -> None:
    if p.minimum is not None:
        mw = f"{where}.minimum.amount"
        _nonneg(p.minimum.amount, mw, strict=True)
        q = quantum(p.currency)
        if p.minimum.amount != p.minimum.amount.quantize(q):
            raise CatalogError(f"{mw}: {p.minimum.amount} is finer than {p.currency}'s minor unit {q}; round it")
        if not p.minimum.product_code:
            raise CatalogError(f"{where}.minimum.product_code: name the ERP item the true-up line is billed under")
    for j, f in enumerate(p.credit_thresholds):
        if not (0 < f <= 1):
            raise CatalogError(f"{where}.credit_thresholds[{j}]: {f} is not a fraction of a grant in (0, 1]; write e.g. 0.8")


def _check_spend(p: Plan, where: str) -> None:
    q = quantum(p.currency)
    seen: dict[Decimal, int] = {}
    for j, st in enumerate(p.spend_thresholds):
        sw = f"{where}.spend_thresholds[{j}].amount"
        _nonneg(st.amount, sw, strict=True)
        if st.amount != st.amount.quantize(q):
            raise CatalogError(
                f"{sw}: {st.amount} is finer than {p.currency}'s minor unit {q}; round it to {st.amount.quantize(q, ROUND_HALF_UP)}"
            )
        if st.amount in seen:
            raise CatalogError(f"{sw}: {st.amount} is also spend_thresholds[{seen[st.amount]}]; give each spend threshold its own amount")
        seen[st.amount] = j


def _check_tiers(tiers: list[Tier], where: str) -> None:
    if not tiers:
        raise CatalogError(f"{where}: at least one tier is needed")
    prev = Decimal(-1)
    for j, tier in enumerate(tiers):
        last = j == len(tiers) - 1
        if tier.up_to is None and not last:
            raise CatalogError(f"{where}[{j}].up_to: only the last tier may be open-ended (up_to: null)")
        if tier.up_to is not None and tier.up_to <= prev:
            raise CatalogError(f"{where}[{j}].up_to: tiers must have strictly increasing 'up_to'")
        if last and tier.up_to is not None:
            raise CatalogError(f"{where}[{j}].up_to: the last tier must be open-ended (up_to: null) so every quantity has a price")
        if tier.up_to is not None:
            _nonneg(tier.up_to, f"{where}[{j}].up_to")
            prev = tier.up_to


def _invalid(e: msgspec.ValidationError) -> CatalogError:
    hint = ""
    if "price.model" in str(e) or "price`" in str(e):
        hint = "; price models are per_unit, graduated, volume, package, matrix and percentage"
    elif ".when" in str(e):
        hint = "; dimension values are strings: quote numbers, such as '1'"
    elif "aggregation" in str(e):
        hint = "; aggregations are SUM, COUNT, MAX, UNIQUE_COUNT, LATEST, AVG and MIN"
    return CatalogError(f"catalog is invalid: {e}{hint}")


def parse_catalog(raw: object) -> Catalog:
    try:
        cat = msgspec.convert(raw, Catalog, strict=False)
    except msgspec.ValidationError as e:
        raise _invalid(e) from None
    check_catalog(cat)
    return cat


def load_catalog(path: str | Path) -> Catalog:
    """Read a YAML or JSON catalog file; raise CatalogError with the field and the fix.

    JSON is decoded straight into the types (100,000 tenants in about half a second); YAML
    goes through libyaml first, several times slower for large catalogs."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise CatalogError(f"catalog file {p}: {e.strerror}; set TALLYFLOW_CATALOG to a readable file") from None
    try:
        if data.lstrip()[:1] == b"{":
            try:
                cat = msgspec.json.decode(data, type=Catalog, strict=False)
            except msgspec.ValidationError as e:
                raise _invalid(e) from None
            except msgspec.DecodeError as e:
                raise CatalogError(f"catalog file {p} is not valid JSON: {e}") from None
            check_catalog(cat)
            return cat
        try:
            # YAML is a superset of JSON; plain floats in YAML are converted exactly by msgspec.
            raw = yaml.load(data, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # libyaml: 8x faster
        except yaml.YAMLError as e:
            raise CatalogError(f"catalog file {p} is not valid YAML/JSON: {e}") from None
        return parse_catalog(raw)
    except CatalogError as e:
        raise CatalogError(f"{p}: {e}") from None
