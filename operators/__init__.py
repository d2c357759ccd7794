"""Framework-free business logic: validation, dedup, thresholds, windows, rating.

Nothing in this package imports Bytewax or Kafka, so every rule is unit-testable alone.
"""
