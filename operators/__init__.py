"""Framework-free business logic: validation, dedup, thresholds, windows, rating.

Nothing in this package imports Bytewax or Kafka, so every rule is unit-testable alone.

Importing it widens the process's Decimal context (also for threads started later): with
Python's default 28 digits, a period's sum of bounded quantities (`InputLimits`: up to
10^15 with 9 decimals) times a bounded price (`schemas.catalog`: up to 10^9 with 12
decimals) could be rounded silently. 80 digits hold every such sum and product exactly,
and Overflow / InvalidOperation stay trapped so nothing inexact passes unnoticed.
"""

import decimal as _decimal

DECIMAL_PRECISION = 80
_decimal.DefaultContext.prec = DECIMAL_PRECISION
_decimal.getcontext().prec = DECIMAL_PRECISION
