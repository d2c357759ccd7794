"""Adapters that talk to the outside world (CRM, customer-success tool, ERP).

The rating dataflow's outputs are Kafka topics (an outbox); delivery to HTTP endpoints is
the "Delivery" milestone and lives here.
"""
