"""Archive-wide gauges for the metrics endpoint: tiers, lifecycle backlog, replica health.

Counts that come from the index (placements and bytes per tier, the lifecycle
backlog) are refreshed by one background thread every
``telemetry.stats_interval_seconds`` (they can cost a scan on a large index), and
scrapes read the last values; per-store health (free bytes, writable) is read at
scrape time, it costs a ``statvfs``.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING, Iterable

from vna.errors import VnaError
from vna.index.base import IndexStats
from vna.storage.filesystem import FilesystemBlobStore
from vna.telemetry import Attributes

if TYPE_CHECKING:
    from vna.archive import Archive

__all__ = ["ArchiveGauges"]

log = logging.getLogger(__name__)

#: lifecycle candidates counted at most (the gauge then reads this value)
BACKLOG_CAP = 10000


class ArchiveGauges:
    """Registers the gauges on ``archive.telemetry`` and keeps their index-derived values fresh."""

    def __init__(self, archive: Archive) -> None:
        self.archive = archive
        self.stats: IndexStats | None = None
        self.backlog: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        tel = archive.telemetry
        if not tel.enabled:
            return
        tel.gauge("vna.tier.placements", "{placement}", "copies per tier and state (from the index)", self._placements)
        tel.gauge("vna.tier.bytes", "By", "bytes at rest per tier (from the index)", self._tier_bytes)
        tel.gauge("vna.index.instances", "{instance}", "instances in the catalogue", self._instances)
        tel.gauge("vna.lifecycle.backlog", "{study}", f"studies due for migration now (counted up to {BACKLOG_CAP})",
                  self._backlog)
        tel.gauge("vna.store.free", "By", "free bytes on each filesystem replica", self._store_free)
        tel.gauge("vna.store.writable", "1", "1 while a filesystem replica's directory is writable",
                  self._store_writable)
        if archive.cfg.telemetry.stats_interval_seconds > 0:
            self._thread = threading.Thread(target=self._loop, name="vna-gauges", daemon=True)
            self._thread.start()

    def refresh(self) -> None:
        """Read the index counts (and the lifecycle backlog when lifecycle is enabled) once."""
        try:
            self.stats = self.archive.index.stats()
            if self.archive.cfg.lifecycle.enabled:
                self.backlog = len(self.archive.migrator().plan(limit=BACKLOG_CAP))
        except VnaError as exc:
            log.warning("metrics: index counts not refreshed: %s", exc)

    def close(self) -> None:
        """Stop the refresher."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.refresh()
            self._stop.wait(self.archive.cfg.telemetry.stats_interval_seconds)

    # -- callbacks (scrape time) ------------------------------------------------
    def _placements(self) -> Iterable[tuple[float, Attributes]]:
        if self.stats is None:
            return []
        return [(float(n), {"tier": tier, "state": state})
                for tier, t in self.stats.tiers.items() for state, n in t.by_state.items()]

    def _tier_bytes(self) -> Iterable[tuple[float, Attributes]]:
        if self.stats is None:
            return []
        return [(float(t.stored_bytes), {"tier": tier}) for tier, t in self.stats.tiers.items()]

    def _instances(self) -> Iterable[tuple[float, Attributes]]:
        return [] if self.stats is None else [(float(self.stats.instances), {})]

    def _backlog(self) -> Iterable[tuple[float, Attributes]]:
        return [] if self.backlog is None else [(float(self.backlog), {})]

    def _local_stores(self) -> Iterable[tuple[str, str]]:
        for accessor in self.archive.tiers.values():
            for store in accessor.stores:
                if isinstance(store, FilesystemBlobStore):
                    yield store.store_id, str(store.root)

    def _store_free(self) -> Iterable[tuple[float, Attributes]]:
        out: list[tuple[float, Attributes]] = []
        for store_id, root in self._local_stores():
            try:
                st = os.statvfs(root)
            except OSError:
                continue
            out.append((float(st.f_bavail * st.f_frsize), {"store": store_id}))
        return out

    def _store_writable(self) -> Iterable[tuple[float, Attributes]]:
        return [(1.0 if os.path.isdir(root) and os.access(root, os.W_OK) else 0.0, {"store": store_id})
                for store_id, root in self._local_stores()]
