"""msgspec types for every contract Tallyflow reads or writes (SPEC §2)."""
