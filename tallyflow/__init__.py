"""Tallyflow: usage telemetry from Kafka to alerts, rated usage and dead letters."""

__version__ = "0.1.0"
