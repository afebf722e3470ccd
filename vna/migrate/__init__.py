"""Migration from legacy DIMSE archives: plan (C-FIND), run (C-MOVE/C-GET, verify), status and report."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vna.config import Config
    from vna.migrate.ledger import MigrationLedger

__all__ = ["open_ledger"]


def open_ledger(cfg: Config) -> MigrationLedger:
    """The migration ledger beside the configured index (tables created if absent)."""
    ledger: MigrationLedger
    if cfg.index.backend == "cassandra":
        from vna.migrate.ledger_cassandra import CassandraLedger

        ledger = CassandraLedger(cfg.index.cassandra)
    else:
        from vna.migrate.ledger import SqliteLedger

        ledger = SqliteLedger(cfg.resolve(cfg.index.sqlite_path))
    ledger.migrate()
    return ledger
