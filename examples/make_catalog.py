"""Regenerate the example catalog: 3 plans, 7 meters, 1,000 tenants (the demo's catalog).

It lives in k8s/base/catalog.yaml (the ConfigMap of every overlay); examples/catalog.yaml
links to it, so the demo, the tests and the manifests share one file."""

from __future__ import annotations

from pathlib import Path

HEAD = """\
# Tallyflow example catalog (used by `make demo`). Regenerate: python examples/make_catalog.py
# Money is written as strings so it is exact; quantities may be numbers.
meters:
  - {slug: api_calls, event_type: api.request, aggregation: COUNT}
  - {slug: tokens, event_type: llm.tokens, aggregation: SUM, value_path: tokens}
  - {slug: storage_gb, event_type: storage.snapshot, aggregation: MAX, value_path: usage.gb}
  - {slug: active_users, event_type: user.active, aggregation: UNIQUE_COUNT, unique_path: user_id}
  - {slug: seats, event_type: seats.updated, aggregation: LATEST, value_path: seats}
  # Priced per model (matrix: one price per cell, one line per cell and window), and a fee
  # on each payment (percentage). See docs/pricing.md.
  - {slug: llm_tokens, event_type: llm.completion, aggregation: SUM, value_path: tokens, dimensions: [model]}
  - {slug: payments, event_type: payment.captured, aggregation: SUM, value_path: amount}

plans:
  - id: starter
    version: 1
    currency: USD
    spend_thresholds:
      - {amount: "1000.00", notify: [success]}
    meters:
      api_calls:
        included: 200
        product_code: SKU-API-CALLS
        price: {model: per_unit, unit_price: "0.0125"}
        thresholds:
          - {fraction: 0.8, notify: [success]}
          - {fraction: 1.0}
          - {fraction: 1.2}
          - {fraction: 1.0, sustained_periods: 2, name: expansion}
      tokens:
        included: 50000
        product_code: SKU-LLM-TOKENS
        price:
          model: graduated
          tiers:
            - {up_to: 100000, unit_price: "0.00004"}
            - {up_to: 500000, unit_price: "0.00003", flat_fee: "1.50"}
            - {up_to: null, unit_price: "0.000015"}
        thresholds:
          - {fraction: 0.8}
          - {fraction: 1.0}
      storage_gb:
        product_code: SKU-STORAGE
        included: 5
        price: {model: per_unit, unit_price: "0.25"}
      active_users:
        product_code: SKU-MAU
        included: 10
        price: {model: package, package_size: 10, package_price: "4.00"}
      seats:
        product_code: SKU-SEATS
        price: {model: per_unit, unit_price: "12.00"}
      llm_tokens:
        product_code: SKU-LLM-MODEL
        price:
          model: matrix
          cells:
            - {when: {model: large}, unit_price: "0.00006"}
            - {when: {model: vision}, unit_price: "0.00008"}
            - {when: {model: small}, unit_price: "0.00001"}
          default_unit_price: "0.00003"
        thresholds:
          - {absolute: 100000, name: llm-100k}
      payments:
        product_code: SKU-PAYMENTS
        price: {model: percentage, rate: "0.029", fixed_fee: "0.30", min_fee: "0.50", max_fee: "25.00"}
  - id: pro
    version: 1
    currency: USD
    minimum: {amount: "40.00", product_code: SKU-MINIMUM-COMMIT}  # a period billed below it is trued up
    spend_thresholds:
      - {amount: "2000.00"}
      - {amount: "5000.00", notify: [crm]}
    meters:
      api_calls:
        included: 1000
        product_code: SKU-API-CALLS
        price: {model: package, package_size: 100, package_price: "0.99"}
        thresholds:
          - {fraction: 0.8, notify: [success]}
          - {fraction: 1.0}
          - {absolute: 5000, name: heavy}
      tokens:
        included: 200000
        product_code: SKU-LLM-TOKENS
        price:
          model: volume
          tiers:
            - {up_to: 500000, unit_price: "0.00003"}
            - {up_to: null, unit_price: "0.00002"}
        thresholds:
          - {fraction: 0.8}
          - {fraction: 1.0}
          - {fraction: 1.2}
      storage_gb:
        product_code: SKU-STORAGE
        included: 50
        price: {model: per_unit, unit_price: "0.20"}
      active_users:
        product_code: SKU-MAU
        included: 50
        price: {model: per_unit, unit_price: "0.35"}
      seats:
        product_code: SKU-SEATS
        price: {model: per_unit, unit_price: "10.00"}
      llm_tokens:
        product_code: SKU-LLM-MODEL
        price:
          model: matrix
          cells:
            - {when: {model: large}, unit_price: "0.00005"}
            - {when: {model: vision}, unit_price: "0.00007"}
          default_unit_price: "0.00002"
      payments:
        product_code: SKU-PAYMENTS
        price: {model: percentage, rate: "0.025", fixed_fee: "0.25", max_fee: "20.00"}
  - id: enterprise
    version: 3
    currency: EUR
    meters:
      api_calls:
        included: 2000
        product_code: EU-API-CALLS
        price:
          model: graduated
          tiers:
            - {up_to: 10000, unit_price: "0.004"}
            - {up_to: null, unit_price: "0.002"}
        thresholds:
          - {fraction: 1.0}
      tokens:
        included: 1000000
        product_code: EU-LLM-TOKENS
        price: {model: per_unit, unit_price: "0.000011"}
        thresholds:
          - {fraction: 0.8}
          - {fraction: 1.0}
      storage_gb:
        product_code: EU-STORAGE
        included: 500
        price: {model: per_unit, unit_price: "0.18"}
      active_users:
        product_code: EU-MAU
        included: 500
        price: {model: volume, tiers: [{up_to: 1000, unit_price: "0.30"}, {up_to: null, unit_price: "0.25"}]}
      seats:
        product_code: EU-SEATS
        price: {model: per_unit, unit_price: "9.50"}
      llm_tokens:
        product_code: EU-LLM-MODEL
        price:
          model: matrix
          cells:
            - {when: {model: large}, unit_price: "0.00004"}
          default_unit_price: "0.000015"
      payments:
        product_code: EU-PAYMENTS
        price: {model: percentage, rate: "0.019", fixed_fee: "0.20"}

# Two companies of the group invoice the tenants (SPEC §10.2): the US one those on dollar
# plans, the German one those on the euro plan. The ERP books each tenant's lines under its
# entity's `erp_company` (in Tryton: the company whose party has that code).
entities:
  - {id: us, name: "Tallyflow Inc.", currency: USD, erp_company: TF-US}
  - {id: eu, name: "Tallyflow GmbH", currency: EUR, erp_company: TF-EU}

# Every 50th tenant upgrades from starter to pro at 23:50 on 31 October, in the middle of the demo.
tenants:
"""


def main() -> None:
    lines = [HEAD]
    for i in range(1, 1001):
        plan = "enterprise" if i % 10 == 0 else ("pro" if i % 10 in (3, 6, 9) else "starter")
        extra = ""
        if plan == "starter" and i % 50 == 1:
            extra = ", plan_changes: [{plan: pro, effective_from: '2026-10-31T23:50:00Z'}]"
        lines.append(
            f"  - {{tenant_id: t-{i:04d}, plan: {plan}, crm_account_id: CRM-{i:05d}, erp_customer_id: ERP-{i:05d}, "
            f"contract_id: C-{2026}-{i:04d}, legal_entity: {'eu' if plan == 'enterprise' else 'us'}{extra}}}\n"
        )
    (Path(__file__).resolve().parent.parent / "k8s" / "base" / "catalog.yaml").write_text("".join(lines))


if __name__ == "__main__":
    main()
