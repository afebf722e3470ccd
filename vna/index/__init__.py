"""The Index port (catalogue + placement ledger) and its adapters."""

from __future__ import annotations

import logging
import time

from vna.config import Config
from vna.errors import IndexUnavailable
from vna.index.base import Index, IndexStats

__all__ = ["Index", "IndexStats", "open_index"]

log = logging.getLogger(__name__)

#: attempts at the start-up schema check before IndexUnavailable is raised (a busy node may drop a connection)
MIGRATE_ATTEMPTS = 3


def open_index(cfg: Config) -> Index:
    """Open the configured index backend (migrating the schema if configured)."""
    if cfg.index.backend == "cassandra":
        from vna.index.cassandra import CassandraIndex

        index: Index = CassandraIndex(cfg.index.cassandra)
    else:
        from vna.index.sqlite import SqliteIndex

        index = SqliteIndex(cfg.resolve(cfg.index.sqlite_path))
    if cfg.index.migrate_on_start:
        for attempt in range(1, MIGRATE_ATTEMPTS + 1):
            try:
                index.migrate()
                break
            except IndexUnavailable as exc:
                if attempt == MIGRATE_ATTEMPTS:
                    index.close()
                    raise
                log.warning("index schema check failed (attempt %d of %d), retrying: %s", attempt,
                            MIGRATE_ATTEMPTS, exc)
                time.sleep(2.0 * attempt)
    return index
