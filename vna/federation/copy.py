"""Cross-site disaster-recovery copies, and keeping a local copy of an instance fetched from another site.

:class:`CopyJob` runs at the *destination* site: for each ``[[federation.copy]]``
rule it selects the studies of the rule's ``from_site`` (modalities, age,
explicit study list), fetches every instance that site holds and this site does
not over gRPC (verified against the index's digest and size), writes it to
this site's hot tier (create-new, quorum), and records the new placements with
``add_placements``. DR copies are kept under the blob key prefix
``dr/<from_site>/`` so they can be counted (``vna sites status``). The job is
bounded (``limit`` instances), idempotent (an instance with any placement at
this site is skipped) and kill-safe (blob first, row second; an unrecorded blob
is an orphan the orphan finder reports, never a half-recorded copy).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import uuid
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterator

from vna.config import CopyRule, FederationConfig
from vna.domain import InstanceRecord, Placement, PlacementState, site_of
from vna.errors import IntegrityError, NotFound, SiteUnavailable, StateConflict, StorageError
from vna.federation.sites import Sites
from vna.index.base import Index
from vna.jobs import NO_PROGRESS, JobReport, Progress, count_left
from vna.storage.accessor import TierAccessor, site_of_tiers

__all__ = ["CopyJob", "add_local_copy", "DR_PREFIX", "CACHE_PREFIX"]

log = logging.getLogger(__name__)

#: instances counted at most past a run's limit (each costs index reads) when telling how many are left
_LEFT_INSTANCES = 1000

#: Blob key prefix of disaster-recovery copies (``dr/<from_site>/<study>/<series>/...``).
DR_PREFIX = "dr"
#: Blob key prefix of copies kept after a cross-site retrieve (``cache_remote``).
CACHE_PREFIX = "remote"


def add_local_copy(index: Index, hot: TierAccessor, inst: InstanceRecord, path: Path, *,
                   prefix: str = CACHE_PREFIX) -> list[Placement]:
    """Write a verified file of ``inst`` to every hot replica and record the placements.

    ``path`` must hold bytes already verified against ``inst``'s digest; keys
    go under ``prefix/`` (none when empty). Blob
    first, rows second: if the index refuses (StateConflict: a copy on one of
    these stores is already recorded) or fails, the new blobs are removed and
    the error raised. Raises QuorumNotMet, StateConflict, IndexUnavailable.
    """
    key = f"{inst.study_uid}/{inst.series_uid}/{inst.sop_uid}.v{inst.version}.{uuid.uuid4().hex[:12]}.dcm"
    key = f"{prefix}/{key}" if prefix else key
    writes = hot.write_file(key, path, inst.content_sha256, inst.content_size)
    placements = hot.placements(writes, sop_uid=inst.sop_uid, version=inst.version,
                                content_sha256=inst.content_sha256, content_size=inst.content_size)
    try:
        index.add_placements(placements)
    except BaseException:
        hot.delete_all(key, [w.store_id for w in writes if w.ok])
        raise
    return placements


class CopyJob:
    """Pulls the studies the copy rules select from their owning sites (see the module docstring)."""

    name = "federation.copy"

    def __init__(self, index: Index, hot: TierAccessor, sites: Sites, fed: FederationConfig, spool_dir: Path, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.index = index
        self.hot = hot
        self.site = site_of_tiers({hot.tier: hot})
        self.sites = sites
        self.rules = fed.copy
        self.spool_dir = spool_dir
        self._clock = clock

    def _studies(self, rule: CopyRule) -> Iterator[str]:
        if rule.study_uids:
            yield from rule.study_uids
            return
        before = self._clock() - rule.min_age_days * 86400.0 if rule.min_age_days else None
        wanted = set(rule.modalities)
        for study in self.index.iter_studies(received_before=before):
            if wanted and not wanted & set(study.modalities):
                continue
            yield study.study_uid

    def _todo(self, rule: CopyRule, study_uid: str) -> Iterator[InstanceRecord]:
        """Instances of the study held (OK) at the rule's site and not at all at this one."""
        for inst in self.index.study_instances(study_uid):
            if rule.modalities and inst.attrs.get("Modality", "") not in rule.modalities:
                continue
            rows = self.index.placements(inst.sop_uid, inst.version)
            if any(site_of(p.store_id) == self.site for p in rows):
                continue
            if any(site_of(p.store_id) == rule.from_site and p.state is PlacementState.OK for p in rows):
                yield inst

    def _work(self) -> Iterator[tuple[CopyRule, Any, str, InstanceRecord]]:
        """(rule, client of its site, study, instance) for every instance the rules want copied here."""
        for rule in self.rules:
            client = self.sites.get(rule.from_site)
            if client is None:
                continue
            for study_uid in self._studies(rule):
                for inst in self._todo(rule, study_uid):
                    yield rule, client, study_uid, inst

    def run_once(self, limit: int | None = None, dry_run: bool = False,
                 progress: Progress = NO_PROGRESS) -> JobReport:
        """Copy at most ``limit`` instances. ``failures``: instances not copied (site down, bad bytes).

        A run that stops at ``limit`` counts the instances it left, up to a bound.
        """
        report = JobReport(job=self.name, dry_run=dry_run, limit_setting="federation.copy_batch_limit")
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        work = self._work()
        progress.begin("copying instances", limit, "instances")
        for rule, client, study_uid, inst in islice(work, limit):
            progress.advance()
            report.examined += 1
            detail: dict[str, Any] = {"study": study_uid, "sop_uid": inst.sop_uid, "version": inst.version,
                                      "from_site": rule.from_site, "bytes": inst.content_size}
            report.details.append(detail)
            if dry_run:
                detail["outcome"] = "would copy"
                report.bytes += inst.content_size
                continue
            if not client.healthy():
                detail["outcome"] = "failed"
                detail["error"] = f"site {rule.from_site} is unreachable"
                report.failures += 1
                continue
            self._copy(client, rule, inst, report, detail)
        if limit is not None and report.examined >= limit:
            left, capped = count_left(work, max(limit, _LEFT_INSTANCES))
            if left:
                report.stopped_at_limit(left, capped)
        return report

    def _copy(self, client: Any, rule: CopyRule, inst: InstanceRecord, report: JobReport,
              detail: dict[str, Any]) -> None:
        fd, name = tempfile.mkstemp(dir=self.spool_dir, suffix=".dcm")
        os.close(fd)
        path = Path(name)
        try:
            client.fetch(inst.sop_uid, path, content_sha256=inst.content_sha256, size=inst.content_size)
            placements = add_local_copy(self.index, self.hot, inst, path, prefix=f"{DR_PREFIX}/{rule.from_site}")
        except StateConflict:
            detail["outcome"] = "skipped"
            detail["reason"] = "a copy at this site was recorded concurrently"
            return
        except (SiteUnavailable, NotFound, IntegrityError, StorageError) as exc:
            detail["outcome"] = "failed"
            detail["error"] = str(exc)
            report.failures += 1
            log.error("%s: cannot copy %s from site %s: %s", self.name, inst.sop_uid, rule.from_site, exc)
            return
        finally:
            path.unlink(missing_ok=True)
        report.done += 1
        report.bytes += inst.content_size
        detail["outcome"] = "copied"
        detail["stores"] = ",".join(p.store_id for p in placements if p.state is PlacementState.OK)
        log.info("%s: copied %s v%d from site %s", self.name, inst.sop_uid, inst.version, rule.from_site)
