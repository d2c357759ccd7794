"""What every Tallyflow process runs on: settings, Kafka and Redis clients, metrics, health,
logs, the Bytewax cluster in a StatefulSet, recovery stores, catalog reloads."""
