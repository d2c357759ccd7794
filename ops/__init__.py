"""Operations tools a person runs against a live pipeline: reconciliation, replay and
backfill, dead-letter drains."""
