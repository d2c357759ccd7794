"""Destinations: every place Tallyflow delivers to (the Kafka outbox, the CRM, the
customer-success tool, the ERP) behind one protocol (`sinks.base`)."""
