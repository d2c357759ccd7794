"""Live catalog reloads: a changed catalog file is loaded, checked and swapped in without a
restart; a bad one is refused and the catalog in use stays."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from operators.catalog_index import CatalogIndex, successor
from operators.stats import Stats
from schemas.catalog import CatalogError, load_catalog

log = logging.getLogger(__name__)


def file_stamp(path: str | Path) -> tuple[int, int]:
    """What tells a changed catalog file: its modification time and size ((0, 0) while absent)."""
    try:
        st = os.stat(path)
    except OSError:
        return (0, 0)
    return (st.st_mtime_ns, st.st_size)


class CatalogWatch:
    """Reloads the catalog file when it changes, without a restart.

    A thread looks at the file every `every_s` and loads and checks a changed one; the
    worker swaps it in before its next batch (nothing needs a catalog between batches). A
    reload that fails its checks is logged and counted, and the catalog in use stays; a bad
    file at start-up stops the process instead (`load_catalog` in build_flow)."""

    def __init__(self, path: str, index: CatalogIndex, every_s: float, stats: Stats) -> None:
        self.path = Path(path)
        self.index = index
        self.every_s = every_s
        self.stats = stats
        self.listeners: list[Callable[[CatalogIndex], None]] = []
        self._ready: CatalogIndex | None = None
        self._lock = threading.Lock()
        self._latest = index
        self._stamp = self._stat()
        if every_s:
            threading.Thread(target=self._watch, name="catalog-watch", daemon=True).start()

    def _stat(self) -> tuple[int, int]:
        return file_stamp(self.path)

    def _watch(self) -> None:
        while True:
            time.sleep(self.every_s)  # the polling period of the file, not a synchronisation
            stamp = self._stat()
            if stamp == self._stamp:
                continue
            self._stamp = stamp
            try:
                new = successor(self._latest, load_catalog(self.path))
            except CatalogError as e:
                self.stats.catalog_reload_errors += 1
                log.error("catalog %s changed but cannot be used, keeping the one in use: %s", self.path, e)
                continue
            with self._lock:
                self._latest = self._ready = new
            self.stats.catalog_reloads += 1
            log.warning(
                "catalog %s reloaded: %d tenants, %d pricing versions",
                self.path,
                len(self._latest.tenants),
                len(self._latest.plans_by_version),
            )

    def poll(self) -> None:
        """On the worker, before a batch: swap in a reloaded catalog, if any."""
        if self._ready is None:
            return
        with self._lock:
            new, self._ready = self._ready, None
        if new is not None:
            self.index = new
            for fn in self.listeners:
                fn(new)
