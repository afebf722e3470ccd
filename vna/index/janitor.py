"""The index janitor: abandoned registrations found and cleaned up (a Job).

A registration whose writer died before committing (a front-end killed
mid-ingest) leaves invisible rows in an index whose registration is not one
transaction (Cassandra). ``run_once`` lists those older than the adapter's
threshold (findings) and removes them (done) unless ``dry_run``; it is
bounded by ``limit``, idempotent and safe to kill. Their blobs, if any, are
orphans for the orphan sweep.
"""

from __future__ import annotations

import logging

from vna.index.base import Index
from vna.jobs import JobReport

__all__ = ["IndexJanitor"]

log = logging.getLogger(__name__)


class IndexJanitor:
    """Finds and removes abandoned registrations (:meth:`Index.clean_abandoned`)."""

    name = "index-janitor"

    def __init__(self, index: Index) -> None:
        self.index = index

    def run_once(self, limit: int | None = None, dry_run: bool = False) -> JobReport:
        """Report the abandoned registrations (at most ``limit``) and, unless ``dry_run``, clean them."""
        report = JobReport(self.name, dry_run=dry_run)
        found = self.index.abandoned_registrations(limit=limit)
        report.examined = report.findings = len(found)
        report.details = [{"sop_uid": a.sop_uid, "version": a.version, "started_at": a.started_at}
                          for a in found]
        if found and not dry_run:
            report.done = self.index.clean_abandoned(limit=limit)
            report.findings = max(0, len(found) - report.done)
        return report
