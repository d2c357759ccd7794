"""Coverage-guided fuzzing of validation and rating with atheris: `make fuzz` (longer runs:
`make fuzz FUZZ_SECONDS=3600`). Any input must end as accepted events or dead letters: an
exception escaping, a conservation gap or an `internal_error` dead letter is a finding.

The seeded in-process fuzz test (tests/unit/test_fuzz.py) runs in `make test`; this one
explores further, guided by which branches each input reaches.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from operators.validate import Validator  # noqa: F401  (instrumented for coverage)
    from tests.operators.test_fuzz import seeds
    from tests.support.events import Harness

HARNESS = Harness()


def one_input(data: bytes) -> None:
    h = HARNESS
    dead = len(h.dead)
    h.feed(data)
    if h.stats.conservation_gap():
        raise AssertionError(f"conservation gap {h.stats.conservation_gap()} after {data[:200]!r}")
    bugs = [d.message for d in h.dead[dead:] if d.reason == "internal_error"]
    if bugs:
        raise AssertionError(bugs[0])
    if len(h.engine.tenants) > 1000:  # keep memory flat over long runs
        HARNESS.__init__()  # type: ignore[misc]


def main() -> None:
    corpus = sys.argv[-1] if len(sys.argv) > 1 and not sys.argv[-1].startswith("-") else None
    if corpus:
        import pathlib

        d = pathlib.Path(corpus)
        d.mkdir(parents=True, exist_ok=True)
        for i, s in enumerate(seeds()):
            (d / f"seed-{i}").write_bytes(s)
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
