"""Integrity: the scrubber detects (and quarantines), the repairer rebuilds and re-replicates,
the orphan finder reports blobs and rows that do not match; reports answer "how much was
verified when, and what is damaged or at risk". Detection and repair are separate jobs.

Names are imported lazily so that registering the ``vna integrity`` verbs costs nothing.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vna.archive import Archive
    from vna.integrity.orphans import OrphanFinder
    from vna.integrity.repair import Repairer
    from vna.integrity.report import instance_fixity, integrity_report, study_fixity
    from vna.integrity.scrubber import CheckResult, Outcome, RateLimiter, Scrubber, ScrubReport, VerifyLevel
    from vna.jobs import Daemon

__all__ = [
    "VerifyLevel",
    "Outcome",
    "CheckResult",
    "RateLimiter",
    "ScrubReport",
    "Scrubber",
    "Repairer",
    "OrphanFinder",
    "integrity_report",
    "study_fixity",
    "instance_fixity",
    "daemons",
]

_LAZY = {
    "VerifyLevel": "scrubber", "Outcome": "scrubber", "CheckResult": "scrubber", "RateLimiter": "scrubber",
    "ScrubReport": "scrubber", "Scrubber": "scrubber", "Repairer": "repair", "OrphanFinder": "orphans",
    "integrity_report": "report", "study_fixity": "report", "instance_fixity": "report",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def daemons(archive: "Archive") -> "list[Daemon]":
    """The integrity daemons enabled in ``[integrity]`` (for ``vna serve``); not started."""
    from vna.integrity.repair import Repairer
    from vna.integrity.scrubber import Scrubber
    from vna.jobs import Daemon

    ic = archive.cfg.integrity
    out: list[Daemon] = []
    if ic.scrub_enabled:
        scrubber = Scrubber(archive.index, archive.tiers, level=ic.verify_level,
                            objects_per_second=ic.objects_per_second, bytes_per_second=ic.bytes_per_second)
        out.append(Daemon(scrubber, ic.scrub_interval_seconds, ic.batch_limit, telemetry=archive.telemetry))
    if ic.repair_enabled:
        repairer = Repairer(archive.index, archive.tiers, archive.cfg.resolve("spool/integrity"),
                            stale_pending_seconds=ic.stale_pending_seconds, sites=archive.sites)
        out.append(Daemon(repairer, ic.repair_interval_seconds, ic.batch_limit, telemetry=archive.telemetry))
    return out
