"""Bytewax recovery stores, set up by the project rather than by hand.

Each dataflow keeps its own recovery directory (TALLYFLOW_RECOVERY_DIR); the processes of
one dataflow's cluster share it (Bytewax resumes only when the cluster as a whole sees every
partition, so a scale-down must not strand some on a vanished pod's volume).
`tallyflow rate|deliver` initialises the partitions on first start and passes `-r/-s` to
bytewax.run; `tallyflow recovery init` does the same explicitly, e.g. from an init container.
"""

from __future__ import annotations

import fcntl
from pathlib import Path

from bytewax.recovery import init_db_dir

from runtime.settings import ProcessSettings


def ensure_partitions(directory: str | Path, count: int) -> bool:
    """Create `count` empty recovery partitions unless some exist; True if created. Existing
    partitions are never touched: they hold the state to resume from."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    # All pods of a StatefulSet share one recovery volume and start together: one creates.
    with (d / ".init.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if any(d.glob("part-*.sqlite3")):
            return False
        init_db_dir(d, count)  # type: ignore[no-untyped-call]
        return True


def bytewax_args(p: ProcessSettings, argv: list[str]) -> list[str]:
    """The recovery options for bytewax.run that `argv` does not already give."""
    if not p.recovery_dir or any(a in ("-r", "--recovery-directory") or a.startswith("--recovery-directory=") for a in argv):
        return []
    ensure_partitions(p.recovery_dir, p.recovery_partitions)
    return ["-r", p.recovery_dir, "-s", str(p.snapshot_interval_seconds), "-b", str(p.backup_interval_seconds)]
