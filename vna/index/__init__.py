"""The Index port (catalogue + placement ledger) and its adapters."""

from __future__ import annotations

from vna.config import Config
from vna.index.base import Index, IndexStats

__all__ = ["Index", "IndexStats", "open_index"]


def open_index(cfg: Config) -> Index:
    """Open the configured index backend (migrating the schema if configured)."""
    if cfg.index.backend == "cassandra":
        from vna.index.cassandra import CassandraIndex

        index: Index = CassandraIndex(cfg.index.cassandra)
    else:
        from vna.index.sqlite import SqliteIndex

        index = SqliteIndex(cfg.resolve(cfg.index.sqlite_path))
    if cfg.index.migrate_on_start:
        index.migrate()
    return index
