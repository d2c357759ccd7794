"""Helpers shared by the usage and the alert ingest (plain functions, no Tryton models)."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

from sql import Column
from trytond import backend
from trytond.exceptions import UserError
from trytond.i18n import gettext
from trytond.model import fields
from trytond.model.exceptions import SQLConstraintError
from trytond.pool import Pool
from trytond.tools import grouped_slice
from trytond.transaction import Transaction, without_check_access

CREATED = "created"
EXISTING = "existing"
PERIOD_RE = re.compile(r"^\d{4}-(0[1-9]|1[0-2])$")


class Rejected(Exception):
    """A line of a batch cannot be stored; the message is returned as the line's outcome."""


def rejected(reason: str) -> str:
    return f"rejected: {reason}"


def company_id() -> int:
    company = Transaction().context.get("company")
    if not company:
        raise UserError(gettext("tallyflow.msg_no_company"))
    return int(company)


ERP_COMPANY = "erp_company"  # an item's legal entity's company, added by Tallyflow's adapter


def find_companies(items: Iterable[dict[str, Any]]) -> dict[str, int]:
    """The companies the items name in `erp_company` (SPEC §10.2: a legal entity's company),
    matched to the code of the company's party, else to its name when one company has it;
    only those the calling user may work for (its companies)."""
    pool = Pool()
    Company = pool.get("company.company")
    wanted = sorted({str(v) for i in items if (v := i.get(ERP_COMPANY))})
    if not wanted:
        return {}
    with without_check_access():
        companies = Company.search(["OR", ("party.code", "in", wanted), ("party.name", "in", wanted)])
    working = _working_in()
    allowed = {c.id for c in companies} if working is None else working
    found = {c.party.code: c.id for c in companies if c.party.code in wanted}
    by_name: dict[str, set[int]] = {}
    for c in companies:
        by_name.setdefault(c.party.name, set()).add(c.id)
    found.update({n: next(iter(ids)) for n, ids in by_name.items() if n in wanted and n not in found and len(ids) == 1})
    return {k: v for k, v in found.items() if v in allowed}


def item_company(item: dict[str, Any], default: int, companies: dict[str, int]) -> int:
    """The company an item is booked under: its `erp_company`'s, or the caller's (context)
    when it names none (a catalog without legal entities)."""
    name = item.get(ERP_COMPANY)
    if not name:
        return default
    company = companies.get(str(name))
    if company is None:
        raise Rejected(
            f"unknown ERP company {name}: create a company whose party has that code (or name), add it "
            "to the Tallyflow user's companies and set its company filter to All"
        )
    return company


def _working_in() -> set[int] | None:
    """The companies the calling user works in: its companies under its company filter, as
    Tryton's record rules see them (None for the root user, who is not restricted)."""
    if Transaction().user == 0:
        return None
    return set(Pool().get("res.user").get_companies())


def check_companies(companies: Iterable[int]) -> None:
    """Refuse to work in a company the user cannot (its companies with company filter "All":
    Tryton's record rules use those): better than invoicing some companies and not others."""
    pool = Pool()
    allowed = _working_in()
    for company in companies:
        if allowed is not None and company not in allowed:
            with without_check_access():
                name = pool.get("company.company")(company).rec_name
            raise UserError(gettext("tallyflow.msg_company_not_allowed", company=name))


def check_batch(batch: Any) -> list[dict[str, Any]]:
    if not isinstance(batch, list) or not all(isinstance(x, dict) for x in batch):
        raise UserError(gettext("tallyflow.msg_bad_batch"))
    return batch


def check_period(period: Any) -> str:
    if not isinstance(period, str) or not PERIOD_RE.match(period):
        raise UserError(gettext("tallyflow.msg_bad_period", period=period))
    return period


def text(item: dict[str, Any], key: str, *, required: bool = True) -> str | None:
    value = item.get(key)
    if value is None or value == "":
        if required:
            raise Rejected(f"missing {key}")
        return None
    if not isinstance(value, str):
        raise Rejected(f"{key} must be a string")
    return value


def decimal(item: dict[str, Any], key: str) -> Decimal:
    """Exact decimal from a string, an int or a JSON-RPC Decimal; floats are refused."""
    value = item.get(key)
    if value is None or value == "":
        raise Rejected(f"missing {key}")
    if isinstance(value, bool) or not isinstance(value, (str, int, Decimal)):
        raise Rejected(f"{key} must be a decimal string, got {value!r}")
    try:
        result = Decimal(value)
    except InvalidOperation:
        raise Rejected(f"{key} is not a decimal: {value!r}") from None
    if not result.is_finite():
        raise Rejected(f"{key} is not finite: {value!r}")
    return result


def integer(item: dict[str, Any], key: str, default: int | None = None) -> int | None:
    value = item.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise Rejected(f"{key} must be an integer, got {value!r}")
    return value


def timestamp(item: dict[str, Any], key: str, *, required: bool = True) -> dt.datetime | None:
    """ISO 8601 to the naive UTC datetime Tryton stores."""
    value = text(item, key, required=required)
    if value is None:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise Rejected(f"{key} is not an ISO 8601 timestamp: {value!r}") from None
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(dt.UTC).replace(tzinfo=None)
    return parsed


def existing_keys(model: Any, column: str, keys: Sequence[str]) -> set[str]:
    """The subset of keys already stored in model.column, read with plain SQL (fast)."""
    table = model.__table__()
    col = Column(table, column)
    cursor = Transaction().connection.cursor()
    found: set[str] = set()
    for chunk in grouped_slice(keys, 500):
        cursor.execute(*table.select(col, where=fields.SQL_OPERATORS["in"](col, list(chunk))))
        found.update(key for (key,) in cursor)
    return found


def find_parties(codes: Iterable[str]) -> dict[str, Any]:
    """Parties by code, falling back to a party identifier with that code (so one party can
    be found by its ERP customer id and by its CRM account id)."""
    pool = Pool()
    Party = pool.get("party.party")
    Identifier = pool.get("party.identifier")
    wanted = sorted(set(codes))
    found: dict[str, Any] = {}
    for chunk in grouped_slice(wanted, 500):
        for party in Party.search([("code", "in", list(chunk))]):
            found[party.code] = party
    missing = [c for c in wanted if c not in found]
    for chunk in grouped_slice(missing, 500):
        matches: dict[str, set[Any]] = {}
        for identifier in Identifier.search([("code", "in", list(chunk)), ("party.active", "=", True)]):
            matches.setdefault(identifier.code, set()).add(identifier.party)
        found.update({code: next(iter(parties)) for code, parties in matches.items() if len(parties) == 1})
    return found


def new_items(
    model: Any, batch: list[dict[str, Any]], id_key: str, column: str = "external_id"
) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """The first half of every `ingest`: outcomes so far (an item without its id rejected, one
    already stored `existing`) and the items still to create, by id (a repeated id once)."""
    outcomes: dict[str, str] = {}
    items: dict[str, dict[str, Any]] = {}
    for index, item in enumerate(batch):
        key = item.get(id_key)
        if not isinstance(key, str) or not key:
            outcomes[f"#{index}"] = rejected(f"missing {id_key}")
        elif key not in items:
            items[key] = item
    existing = existing_keys(model, column, list(items))  # `column` holds the id
    outcomes.update(dict.fromkeys(existing, EXISTING))
    return outcomes, {k: v for k, v in items.items() if k not in existing}


def create_unique(model: Any, vlist: list[dict[str, Any]]) -> list[Any]:
    """Create records with the caller's create access but without the field read-only checks.

    If a concurrent transaction committed the same key after our existence check, the unique
    constraint fires (PostgreSQL: the INSERT waits for the other transaction, then fails).
    Raising DatabaseOperationalError makes the RPC dispatcher roll back and retry the whole
    call (up to [database] retry times), and the retry reports those keys as existing."""
    if not vlist:
        return []
    Pool().get("ir.model.access").check(model.__name__, "create")
    try:
        with without_check_access():  # our own values may fill fields that are read-only for users
            return list(model.create(vlist))
    except SQLConstraintError as exc:
        raise backend.DatabaseOperationalError(f"tallyflow: concurrent insert into {model.__name__}, retry") from exc
