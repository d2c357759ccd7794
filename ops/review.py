"""`tallyflow review`: the lines and credit records held before the ERP (SPEC §10.1), and a
person's decision on them.

    tallyflow review list [--tenant T] [--json]
    tallyflow review approve ID... | --tenant T  --by NAME --why TEXT
    tallyflow review reject  ID... | --tenant T  --by NAME --why TEXT

Held items are on `usage.review` (written by `tallyflow deliver erp`); decisions are audit
records on `usage.audit` (who, when, why, and the item itself), which the ERP delivery reads:
an approved item is posted (once: the delivery ledger knows its id), a rejected one parked on
`usage.exceptions`. An id that is unknown, or already decided, is an error naming it and
nothing is decided; a Redis lock per id keeps two people from deciding one item at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from decimal import Decimal

import msgspec

from runtime.settings import load_settings
from state.review import ACTIONS, Refused, decide, load


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("action", choices=["list", "approve", "reject"], help="list what waits; approve or reject items")
    ap.add_argument("ids", nargs="*", help="review ids (a line's line_id, a credit record's record_id), as `list` shows them")
    ap.add_argument("--tenant", default=None, help="list: this tenant's; approve/reject: every item of this tenant that waits")
    ap.add_argument("--by", default="", help="who decides (kept in the audit record)")
    ap.add_argument("--why", default="", help="why (kept in the audit record)")
    ap.add_argument("--json", action="store_true", help="print JSON for machines")


def run(a: argparse.Namespace) -> int:
    s = load_settings()
    desk = load(s)
    if a.action == "list":
        items = desk.pending(a.tenant)
        if a.json:
            print(json.dumps({"pending": [msgspec.to_builtins(h) | {"item": json.loads(bytes(h.item))} for h in items]}, indent=2))
            return 0
        if not items:
            print("nothing waits for review" + (f" for tenant '{a.tenant}'" if a.tenant else ""))
            return 0
        totals: dict[str, Decimal] = {}
        for h in items:
            totals[h.currency] = totals.get(h.currency, Decimal(0)) + (h.amount if h.kind == "line" else Decimal(0))
        print(f"{len(items)} item(s) wait for review, lines {', '.join(f'{c} {v:,}' for c, v in sorted(totals.items()))}:")
        print("  review id                             tenant        period   kind    amount          reason")
        for h in items:
            amount = f"{h.currency} {h.amount:,}"
            print(f"  {h.review_id:<36}  {h.tenant_id:<12}  {h.period or '':<7}  {h.kind:<6}  {amount:<14}  {h.reason}")
        return 0
    try:
        decisions = decide(s, desk, a.action, a.ids, a.tenant, a.by, a.why)
    except Refused as e:
        print(f"tallyflow review {a.action}: {e}", file=sys.stderr)
        return e.code
    verb = ACTIONS[a.action]
    where = "posted to the ERP by tallyflow deliver erp" if a.action == "approve" else f"parked on {s.topics.exceptions}"
    if a.json:
        print(json.dumps({verb: [d.review_id for d in decisions]}))
    else:
        print(f"{verb} {len(decisions)} item(s) by {a.by}: they are {where} next; the audit records are on {s.topics.audit}")
    return 0
