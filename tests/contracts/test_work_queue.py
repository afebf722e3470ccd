"""Study work queues and copy logs of the Index port (``queued`` / ``requeue`` / ``job_cursor``), on every
adapter, and the jobs that read them (lifecycle, cross-site copy): each must select exactly what a scan of
every study selects.

The Cassandra adapter runs against the real node of ``tests/cassandra_node.py``.
"""

from __future__ import annotations

import datetime as dt
import shutil
import time
from dataclasses import replace as dc_replace
from pathlib import Path
from typing import Any

import pytest

from vna.codec import IdentityCodec
from vna.config import ColdTierConfig, CopyRule, FederationConfig, LifecycleConfig, SiteConfig
from vna.domain import PlacementState, Tier
from vna.federation.copy import LOG_SETTLE, CopyJob
from vna.federation.sites import Sites
from vna.index.base import Index, QueueEntry, StudySummary, copy_log, lifecycle_queue, queue_due
from vna.index.cassandra import CassandraIndex
from vna.index.sqlite import SqliteIndex
from vna.lifecycle.migrator import Migrator
from vna.lifecycle.rules import evaluate
from vna.services.retrieve import RetrieveService
from vna.storage.accessor import TierAccessor
from vna.storage.filesystem import FilesystemBlobStore

from tests.contracts.test_index import backend, index, make_placement, make_record  # noqa: F401

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
DAY = 86400.0
NOW = 1_750_000_000.0
OLD = NOW - 800 * DAY  # older than a year
RECENT = NOW - 10 * DAY
FAR = time.time() + 10**6  # a requeue "after" every write of the test
NEVER = 0.0  # a requeue before every write of the test


def _date(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y%m%d")


def _store(index: Index, sop: str, study: str, at: float, copies: list[tuple[str, Tier]], *,
           modality: str = "CT", study_date: str | None = None, version: int = 1, series: str | None = None) -> None:
    attrs = {"Modality": modality, "StudyDate": _date(at) if study_date is None else study_date}
    index.register(make_record(sop, series or f"{study}.1", study, attrs=attrs, received_at=at, version=version),
                   [make_placement(sop, store=s, tier=t, version=version) for s, t in copies])


def _migrated(index: Index, sop: str) -> None:
    """A finished migration of one instance at site A: a cold copy, the hot ones retired and purged."""
    index.add_placements([make_placement(sop, store="cold@A", tier=Tier.COLD)])
    for p in index.placements(sop):
        if p.tier is Tier.HOT and p.store_id.endswith("@A"):
            assert index.transition(p, PlacementState.TO_DELETE)
            assert index.delete_placement(dc_replace(p, state=PlacementState.TO_DELETE))


def load(index: Index) -> None:
    """Studies of sites A and B, one per case the lifecycle rules and the queue distinguish."""
    HA = [("hot-1@A", Tier.HOT), ("hot-2@A", Tier.HOT)]
    _store(index, "1.1.1", "1.1", OLD, HA)                                   # due
    _store(index, "1.1.2", "1.1", OLD + 60, HA)
    _store(index, "1.2.1", "1.2", OLD, HA, modality="MR")                    # modality not selected (CT rule)
    _store(index, "1.3.1", "1.3", RECENT, HA)                                # too recent on every basis
    _store(index, "1.4.1", "1.4", OLD, HA)                                   # held
    index.set_hold("1.4", True, "litigation")
    _store(index, "1.5.1", "1.5", OLD, HA)                                   # migrated: nothing hot left
    _migrated(index, "1.5.1")
    _store(index, "1.6.1", "1.6", OLD, [("hot-1@B", Tier.HOT)])              # site B only
    _store(index, "1.7.1", "1.7", OLD, [("hot-1@B", Tier.HOT)])              # DR copy into A later
    index.add_placements([make_placement("1.7.1", store="hot-1@A", tier=Tier.HOT)])
    _store(index, "1.8.1", "1.8", RECENT, HA, study_date=_date(OLD))         # a prior: old StudyDate, received now
    _store(index, "1.9.1", "1.9", OLD, HA)                                   # re-registered recently
    _store(index, "1.9.1", "1.9", RECENT, HA, version=2)
    _store(index, "1.10.1", "1.10", OLD, [("cold@A", Tier.COLD)])            # cold only
    _store(index, "1.11.1", "1.11", OLD, HA, study_date="garbage")           # no usable StudyDate
    index.record_access("1.2", RECENT)


def migrator(index: Index, tmp_path: Path, basis: str) -> Migrator:
    codec = IdentityCodec()
    hot = TierAccessor(Tier.HOT, [FilesystemBlobStore(f"hot-{n}@A", tmp_path / f"hot{n}") for n in (1, 2)], 2, codec)
    cold = TierAccessor(Tier.COLD, [FilesystemBlobStore("cold@A", tmp_path / "cold")], 1, codec)
    tiers = {Tier.HOT: hot, Tier.COLD: cold}
    rules = LifecycleConfig(enabled=True, min_age_days=365, age_basis=basis, modalities=("CT",))
    return Migrator(index, hot, cold, RetrieveService(index, tiers, tmp_path / "spool", site="A"), rules,
                    ColdTierConfig(encode_workers=1))


def scan(m: Migrator, now: float) -> tuple[set[str], set[str]]:
    """(due, held): the selection of the job before the queues, by a scan of every study."""
    due, held = set(), set()
    for study in m.index.iter_studies():
        if evaluate(study, m.rules, now).migrate and m._has_hot(study.study_uid):
            due.add(study.study_uid)
        elif (study.held and evaluate(dc_replace(study, held=False), m.rules, now).migrate
              and m._has_hot(study.study_uid)):
            held.add(study.study_uid)
    return due, held


def selected(m: Migrator, now: float) -> tuple[set[str], set[str]]:
    held: list[StudySummary] = []
    due = [s.study_uid for s in m.due(now, held=held)]
    assert len(due) == len(set(due)), due
    return set(due), {s.study_uid for s in held}


# -- the queues ---------------------------------------------------------------------------
def test_registrations_and_copies_queue_the_studies_with_a_hot_copy_per_site(index: Index) -> None:
    load(index)
    a = {e.study_uid: e.due for e in index.queued(lifecycle_queue("A"))}
    b = {e.study_uid for e in index.queued(lifecycle_queue("B"))}
    assert set(a) == {"1.1", "1.2", "1.3", "1.4", "1.5", "1.7", "1.8", "1.9", "1.11"}  # 1.5: until the job looks
    assert b == {"1.6", "1.7"}
    assert a["1.8"] == queue_due(RECENT, {"StudyDate": _date(OLD)}) < OLD  # the earlier of StudyDate and reception
    assert a["1.7"] <= OLD  # the copy's entry: due by the instance, not by the copy's time
    assert index.queued(lifecycle_queue("C")) == []


def test_queued_pages_in_due_order_up_to_a_cutoff(index: Index) -> None:
    dues = [OLD + n * 0.37 * DAY for n in range(40)]  # many days, several entries on some
    for n, t in enumerate(dues):
        _store(index, f"2.{n}.1", f"2.{n}", t, [("hot-1@A", Tier.HOT)], study_date="")
    q = lifecycle_queue("A")
    want = sorted(QueueEntry(queue_due(t, {}), f"2.{n}", q) for n, t in enumerate(dues))
    assert index.queued(q) == want
    pages: list[QueueEntry] = []
    after = None
    while page := index.queued(q, after=after, limit=7):
        pages += page
        after = page[-1]
    assert pages == want
    cutoff = want[25].due
    assert index.queued(q, upto=cutoff) == [e for e in want if e.due <= cutoff]
    assert index.queued(q, upto=cutoff, after=want[10], limit=5) == want[11:16]


def test_requeue_moves_or_removes_an_entry_but_keeps_one_written_since(index: Index) -> None:
    # requeue keeps the entries written up to queue_margin before seen_at: an index with a short one
    idx: Index = SqliteIndex(index.path, busy_timeout=1.0, queue_rewrite=1.0) \
        if isinstance(index, SqliteIndex) else CassandraIndex(index.cfg, stale_claim_after=4.0)
    try:
        _store(idx, "3.1.1", "3.1", OLD, [("hot-1@A", Tier.HOT)], study_date="")
        _store(idx, "3.2.1", "3.2", OLD + DAY, [("hot-1@A", Tier.HOT)], study_date="")
        q = lifecycle_queue("A")
        e1, e2 = idx.queued(q)
        idx.requeue(e1, None, seen_at=NEVER)  # written after the caller looked: kept
        idx.requeue(e2, NOW, seen_at=NEVER)
        assert idx.queued(q)[:2] == [e1, e2]
        time.sleep(idx.queue_margin + 0.5)
        seen_at = time.time()
        idx.requeue(e1, None, seen_at=seen_at)
        idx.requeue(e2, NOW, seen_at=seen_at)
        assert idx.queued(q) == [QueueEntry(NOW, "3.2", q)]
        assert idx.queued(q, upto=NOW - 1) == []
        # a new copy of the removed study queues it again, under the entry's key too
        _store(idx, "3.1.2", "3.1", OLD + 5, [("hot-1@A", Tier.HOT)], study_date="")
        assert idx.queued(q) == [e1, QueueEntry(NOW, "3.2", q)]
    finally:
        idx.close()


# -- the lifecycle job: the queue selects what the scan selects --------------------------------
@pytest.mark.parametrize("basis", ["ingest", "study_date", "last_access"])
def test_lifecycle_selection_from_the_queue_equals_the_scan(index: Index, tmp_path: Path, basis: str) -> None:
    load(index)
    m = migrator(index, tmp_path, basis)
    for now in (NOW, NOW, NOW + 400 * DAY):  # twice: after the job moved and removed entries; then later
        want = scan(m, now)
        assert want[0] and selected(m, now) == want, (now, want)
    # changes after the job looked: a migration, new instances into a study out of the queue and an old one
    _migrated(index, "1.1.1")
    _migrated(index, "1.1.2")
    _store(index, "1.5.2", "1.5", OLD + 10, [("hot-1@A", Tier.HOT)], series="1.5.2")
    _store(index, "1.10.2", "1.10", RECENT, [("hot-2@A", Tier.HOT)])
    index.set_hold("1.4", False)
    for now in (NOW, NOW + 400 * DAY, NOW + 1000 * DAY):
        assert selected(m, now) == scan(m, now), now


def test_sqlite_schema_v4_database_queues_its_studies_on_upgrade(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite"
    shutil.copy(FIXTURES / "index-v3.sqlite", path)  # schema v3, hot copies on store hot-a (site "local")
    idx = SqliteIndex(path)
    try:
        assert idx.migrate() == 5
        studies = {r[0] for r in idx._read("SELECT StudyInstanceUID FROM studies")}
        assert studies and {e.study_uid for e in idx.queued(lifecycle_queue("local"))} == studies
        assert {e.study_uid for e in idx.queued(copy_log("local"))} == studies  # every study held there
    finally:
        idx.close()


def test_cassandra_keyspace_before_schema_v8_queues_its_studies_on_upgrade(cassandra_index: Any,
                                                                          cassandra_admin: Any) -> None:
    load(cassandra_index)
    ks = cassandra_index.cfg.keyspace
    for table in ("study_queue", "study_queue_buckets"):
        cassandra_admin.execute(f"TRUNCATE {ks}.{table}")  # as a v7 keyspace has (no queues)
    cassandra_admin.execute(f"DELETE FROM {ks}.schema_version WHERE version = 8")
    assert cassandra_index.queued(lifecycle_queue("A")) == []
    assert cassandra_index.migrate() == 8
    assert {e.study_uid for e in cassandra_index.queued(lifecycle_queue("A"))} == \
        {"1.1", "1.2", "1.3", "1.4", "1.7", "1.8", "1.9", "1.11"}  # 1.5 has no hot copy left
    assert {e.study_uid for e in cassandra_index.queued(copy_log("B"))} == {"1.6", "1.7"}


# -- the cross-site copy job: the copy log selects what the scan selects --------------------------
def copy_job(index: Index, tmp_path: Path, rules: tuple[CopyRule, ...]) -> CopyJob:
    """The copy job of site B; site A's endpoint answers nothing (its copies fail, and are parked)."""
    fed = FederationConfig(site=(SiteConfig(id="A", grpc_endpoint="127.0.0.1:9", token="t"),), copy=rules,
                           health_timeout=0.2)
    hot = TierAccessor(Tier.HOT, [FilesystemBlobStore("hot-1@B", tmp_path / "hotB")], 1, IdentityCodec())
    return CopyJob(index, hot, Sites("B", fed), fed, tmp_path / "spool")


def copy_scan(job: CopyJob) -> set[tuple[str, str]]:
    """(study, instance) the job copied before the copy log, by a scan of every study."""
    out = set()
    for rule in job.rules:
        before = job._clock() - rule.min_age_days * DAY if rule.min_age_days else None
        for study in job.index.iter_studies(received_before=before):
            if not rule.modalities or set(rule.modalities) & set(study.modalities):
                out |= {(study.study_uid, inst.sop_uid) for inst in job._todo(rule, study.study_uid)}
    return out


def copy_selected(job: CopyJob) -> set[tuple[str, str]]:
    report = job.run_once(dry_run=True)
    return {(d["study"], d["sop_uid"]) for d in report.details}


def load_sites(index: Index, t: float) -> None:
    A = [("hot-1@A", Tier.HOT)]
    _store(index, "5.1.1", "5.1", t - 800 * DAY, A)                         # to copy
    _store(index, "5.1.2", "5.1", t - 790 * DAY, A, modality="MR", series="5.1.2")  # not selected by the CT rule
    _store(index, "5.2.1", "5.2", t - 800 * DAY, A)                         # copied already
    index.add_placements([make_placement("5.2.1", store="hot-1@B")])
    _store(index, "5.3.1", "5.3", t - 5 * DAY, A)                           # too recent for the 30-day rule
    _store(index, "5.4.1", "5.4", t - 800 * DAY, [("hot-1@B", Tier.HOT)])   # B's own
    _store(index, "5.5.1", "5.5", t - 800 * DAY, A + [("hot-1@B", Tier.HOT)])  # at both
    _store(index, "5.6.1", "5.6", t - 800 * DAY, [("hot-1@A", Tier.HOT)], modality="US")
    index.register(make_record("5.7.1", "5.7.1", "5.7", attrs={"Modality": "CT"}, received_at=t - 700 * DAY),
                   [make_placement("5.7.1", store="hot-1@A", state=PlacementState.MISSING)])  # no OK copy at A


@pytest.mark.parametrize("rules", [(CopyRule("A", modalities=("CT",), min_age_days=30),),
                                   (CopyRule("A"), CopyRule("A", modalities=("US",)))], ids=["ct-30d", "any+us"])
def test_copy_selection_from_the_log_equals_the_scan(index: Index, tmp_path: Path,
                                                     rules: tuple[CopyRule, ...]) -> None:
    t = time.time()
    load_sites(index, t)
    job = copy_job(index, tmp_path, rules)
    want = copy_scan(job)
    assert want and copy_selected(job) == want
    assert all(index.job_cursor(job.route(r)) is None for r in rules)  # a dry run moves no cursor
    report = job.run_once()  # site A does not answer: every copy fails, its study is parked
    assert report.failures == report.examined >= len(want) and report.done == 0  # one per rule and instance
    assert {(d["study"], d["sop_uid"]) for d in report.details} == want
    assert all(index.job_cursor(job.route(r)) is None for r in rules)  # the log's last LOG_SETTLE s is read again
    assert copy_selected(job) == copy_scan(job) == want
    # changes since: an instance copied here, a new one at A into a parked study, a copy at A becoming OK,
    # a study A got from elsewhere
    index.add_placements([make_placement("5.1.1", store="hot-2@B")])
    _store(index, "5.1.3", "5.1", t - 600 * DAY, [("hot-1@A", Tier.HOT)], series="5.1.3")
    p = next(p for p in index.placements("5.7.1") if p.store_id == "hot-1@A")
    assert index.transition(p, PlacementState.OK)
    _store(index, "5.8.1", "5.8", t - 900 * DAY, [("hot-1@C", Tier.HOT)])
    index.add_placements([make_placement("5.8.1", store="hot-1@A")])
    # now, then once every log entry is older than LOG_SETTLE (the cursors pass them), then when the
    # too recent study is old enough
    for later in (time.time(), time.time() + 2 * LOG_SETTLE, time.time() + 40 * DAY):
        job._clock = lambda later=later: later
        want = copy_scan(job)
        assert copy_selected(job) == want, later
        job.run_once()
        assert copy_selected(job) == copy_scan(job) == want, later
        assert ("5.1", "5.1.1") not in want and ("5.7", "5.7.1") in want and ("5.8", "5.8.1") in want
    assert all(index.job_cursor(job.route(r)) is not None for r in rules)
