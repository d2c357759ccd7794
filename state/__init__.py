"""Redis-held state that must outlive a window or a process: the long-horizon dedup store,
the emission register of rated lines, and the delivery ledger of acknowledged ids."""
