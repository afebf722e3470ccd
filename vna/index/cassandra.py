"""CassandraIndex: the cluster / multi-site index on Apache Cassandra 5.0 with SAI.

Behaves exactly like :class:`vna.index.sqlite.SqliteIndex` behind the Index port
(one contract suite runs on both); only the storage differs. Schema:
``vna/index/cql/*.cql`` (versions 1-3 as in SQLite; 4, the study summary, and 5, the
registration candidates, are Cassandra's own).

Data model
    ``studies`` (one row per study, patient attributes denormalised, SAI on
    patient_id, accession_number, study_day, study_date_odd, modalities,
    name_p1/name_p3/name_family/name_fg), ``studies_by_patient`` (PATIENT-level grouping),
    ``series`` and ``instances`` (one partition per study, the instance rows
    clustered by series, SOP UID and *version*), ``instance_versions`` (commit
    record and locator by SOP UID), ``placements`` (partition = SOP UID,
    clustering version, store_id), ``registrations`` and ``registration_decisions``
    (schema v5, below), ``leases``, ``schema_version``.

Registration (schema v5): no Paxos unless two writers disagree
    Rows of one attempt: ``registrations`` (sop_uid, version, content_sha256,
    writer), the *candidate*; ``instance_versions`` (sop_uid, version), the
    *commit*, written once, complete = true; placements, catalogue rows.
    1. *Candidate* (plain write, state ``writing``), with the study-summary mark.
    2. *Read* the version's candidates, commit row and placements (concurrently).
       A commit (or a ``committed`` candidate) -> StateConflict. No live
       candidate with other bytes -> *fast path*: go on. Else the *contended
       path* below.
    3. *Rows* (plain, idempotent upserts, concurrently): the placements (one
       single-partition batch; rows other bytes left on stores we lack are
       deleted), and the catalogue batch (study, studies_by_patient, series,
       the instance-version row).
    4. *Commit*: one unlogged batch on the SOP UID's partition: the
       instance_versions row (complete) and our candidate marked ``committed``.
    Readers require the commit exactly as before (``get_instance`` the newest
    complete version; ``placements`` complete versions only; ``find`` an
    instance row only if it is that of the newest complete version), and it is
    written only after every row it points to, so visibility stays
    all-or-nothing. A retry, or a second front-end with the same bytes,
    writes the same rows (its own candidate, same digest) and converges: a
    re-send after a crash is stored at once, whatever the dead writer left.
    A placement a dead writer of the same bytes left stays (its blob holds
    those bytes); rows of other bytes are never visible (removed by the
    committer or by :meth:`CassandraIndex.clean_abandoned`).
    *Why at most one set of bytes commits a version* (consistency =
    LOCAL_QUORUM: a write acknowledged before a read starts is seen by it).
    Let W_a and W_b write candidates with bytes a != b. Each reads after its
    own write completed; whichever read started later sees the other's
    candidate. So at most one of them takes the fast path, and the other sees
    its candidate. A writer that saw other bytes (a *seer*) never takes the
    fast path: it marks its candidate ``contended`` and waits until every live
    candidate it sees is contended (a fast writer never marks: it commits,
    and the seer then gets StateConflict) or gone or stale. Then no fast
    writer can appear any more (a newcomer sees the seers' candidates, hence
    becomes a seer), and the seers decide by one LWT (``registration_decisions``
    INSERT IF NOT EXISTS, LOCAL_SERIAL); losers withdraw their candidates and
    get StateConflict. Liveness: a seer waits at most ``contention_wait``,
    then StateConflict (ingest retries, then answers a transient failure).
    *Stale*: a writer never writes rows or commits later than half of
    ``stale_claim_after`` after it started (:meth:`_check_deadline`), so a
    candidate older than ``stale_claim_after`` (front-end clocks within the
    other half of each other) is ignored, its decision may be taken over by
    LWT, and its leftovers are abandoned: listed by
    :meth:`abandoned_registrations` and removed by :meth:`clean_abandoned`
    (deletes ``USING TIMESTAMP`` of its age limit, so a re-send begun after it
    keeps its rows). Only a crashed writer of *other* bytes delays a re-send,
    by at most ``stale_claim_after``, and never as a duplicate.
    *Stalled writer* (a writer past its deadline check whose commit lands after
    ``stale_claim_after``, so a rival of other bytes ignored its candidate and
    took the version over): every row two attempts can share (instance_versions,
    placements and their removals, the instance row) is written ``USING
    TIMESTAMP`` of the attempt's start (its candidate's ``started_at``). A rival
    that deems W dead read more than ``stale_claim_after`` after W began, and
    began at most ``stale_claim_after/2`` before that read (else its own deadline
    stops it), so with clocks within ``stale_claim_after/2`` its timestamps
    exceed W's and every cell it writes wins over W's, whatever order they land
    in: the later attempt's rows are the version, whole. W acknowledges at
    once only if its commit was acknowledged within ``stale_claim_after/2`` of
    its start: then a rival's decision read
    (on a local quorum, begun after the commit by the clock bound) sees the
    commit and yields. A later commit is *confirmed* (:meth:`_confirm`): W reads
    the version's commit and candidates; a commit of other bytes means a later
    writer won (W retracts its placement and instance rows ``USING TIMESTAMP``
    of its start, which leaves the winner's, withdraws its candidate, and gets
    StateConflict); a candidate of other bytes begun after W's may still commit
    over W (it read before W's commit landed), so W waits up to
    ``contention_wait`` for it to withdraw (it reads W's commit and yields) or
    to win; undecided -> IndexUnavailable (retry; W's commit may stand, and the
    re-send then finds it). Otherwise W removes placement rows of other bytes an
    earlier-started writer landed late (older than W's) and acknowledges. The
    janitor deletes leftovers ``USING TIMESTAMP`` of its age limit, so a live
    writer keeps its rows.
    Cost of the common case: four sequential round trips of plain writes and
    reads (candidate; read; rows; commit), no Paxos. The candidate, rows and
    commit writes of concurrent registrations share unlogged batches (group
    commit, :mod:`vna.index.cassandra_group`); concurrent registrations into
    one study share one summary token per front-end (:meth:`_mark_shared`).
    *Per datacenter*: LOCAL_QUORUM / LOCAL_SERIAL make the argument hold among
    the front-ends of one datacenter; front-ends in two datacenters storing
    other bytes under one new UID at the same moment could both commit (as
    with the v4 LWT claim at LOCAL_SERIAL). Use QUORUM / SERIAL (config
    ``consistency`` / ``serial_consistency``) where that must hold across
    datacenters, at the price of a cross-DC round trip per step. An
    acknowledged registration is on a local quorum: it survives the loss of
    any minority of the local replicas (RF 3: one node).
    Placements are written plainly by registration (before the commit) and
    only by LWT afterwards (transitions, repairs, purge): Paxos timestamps
    then follow the plain write's client timestamp by far more than clock skew.
    Upgrade: run every front-end at v5 before ``vna index migrate`` to v5;
    schema-v4 claims left incomplete are listed and cleaned like candidates.
    Known deviation from SQLite: the study/series attribute upserts of step 3
    are not undone when a re-registration into an existing study fails; the
    study keeps the attribute values the failed instance carried.

Pushdown (always a superset; every candidate is checked with
:func:`vna.index.query.matches_all`, so results equal SQLite's)
    StudyInstanceUID single/list -> partition reads; SOPInstanceUID (IMAGE) ->
    instance_versions; SeriesInstanceUID (SERIES/IMAGE) -> SAI on series;
    PatientID single/list -> the ``studies_by_patient`` partitions of the IDs
    (primary and Other Patient IDs, schema v7; identity conditions are matched
    jointly by :func:`vna.index.query.matches_all`);
    otherwise one SAI query on ``studies`` ANDing: AccessionNumber EQ,
    StudyDate EQ / range on a ``date`` column (plus a query
    for unparsable StudyDates), ModalitiesInStudy / Modality ``CONTAINS``,
    PatientName by casefolded family-name prefix (1 or 3 characters), whole
    family name, or family name + the given name's first character (schema v3;
    ASCII literal prefixes only). One list condition fans out into one EQ query per
    item (deduplicated without memory). Without any, a paged scan. PATIENT
    rows group ``studies_by_patient`` by (PatientID, IssuerOfPatientID) and aggregate like SQLite (``max`` over
    the studies its WHERE clause keeps: :func:`_sqlite_where`). SAI returns
    token order, so row order is unspecified (SQLite sorts PATIENT rows only).
    STUDY rows take their computed keys from the study row's summary (schema
    v4) when it is valid, so they read nothing else. Otherwise, and at the
    other levels, computed keys and visibility need each study's partitions
    plus its instances' instance_versions and placements partitions:
    candidates are detailed in batches of 32 studies with two waves of IN
    queries, several batches at once on worker threads
    (:meth:`CassandraIndex._rows`).

Study summary (schema v4)
    ``studies.sum_*``: NumberOfStudyRelatedInstances/Series, ModalitiesInStudy
    and InstanceAvailability of the visible instances, valid iff ``sum_of`` is
    set and the token sets ``sum_pending`` and ``sum_done`` are empty. Every
    change that can alter them is bracketed by a unique token (plain writes:
    added to sum_pending before, moved to sum_done after); a summary is stored
    only by an LWT conditional on the stamp and the done set read before the
    partitions were read, and on an empty pending set, and it removes the done
    tokens it saw. So a valid summary is exact; a writer that died mid-change
    leaves its study answered from the partitions until its token is older
    than ``stale_claim_after``. Argument: the comment above
    :meth:`CassandraIndex._mark`. Each front-end re-summarises the studies it
    changed 0.5 s after their last change (a refresher thread); readers store
    what they computed. Cost: a registration adds two plain writes on its study
    row (and on the old version's study for a re-registration, after a read of
    instance_versions); so does a placement change that alters availability
    (after a read of its instance_versions row); one LWT per re-summarised study.
    Front-ends older than v4 do not mark: run every front-end at v4 before
    ``vna index migrate`` to v4, else their changes leave summaries wrong.

Job operations (schema v2)
    ``add_placements`` is one Paxos round per instance (atomic per instance;
    across instances a conflict removes the rows already added, best effort).
    ``replace_placement``/``delete_placement``/``transition`` are LWT; retiring a
    copy (TO_DELETE) is a conditional batch that also asserts another OK copy,
    so two copies cannot be retired concurrently. ``iter_placements`` uses SAI
    on tier/state/store_id and hides uncommitted versions (SAI on
    ``registrations.state``, and on ``complete`` for schema-v4 claims);
    ``iter_studies`` scans every study with its partitions (operator commands
    only: ``vna lifecycle`` reads its work queue). Both order in
    memory (a heap of ``limit`` when given). ``record_access`` writes with
    ``USING TIMESTAMP`` = the access time, so the newest access wins without a
    read; holds are a plain table.

Work queues (schema v8, the Index port's ``queued`` / ``requeue``)
    The lifecycle job of a site reads the studies that may hold a hot copy
    there (queue ``hot:<site>``), by due time up to its cutoff, instead of
    every study. Table ``study_queue``: partition (queue, day of ``due``),
    clustering (due, study_uid); ``study_queue_buckets``: partition queue,
    clustering day, the days that may hold entries. *Why buckets, not SAI*:
    at 10 billion instances over 10 sites (about 10^8 studies, each in the
    queue of every site holding a hot copy) a queue must be read in due
    order, a page at a time, from the oldest entry; SAI answers in token
    order over every node and a range on ``due`` would touch the whole queue
    per page. A day partition holds the studies of one site and day (a few
    thousand at the sizes above, more on a day a backlog of priors lands,
    whose StudyDate sets their due day: still bounded by that day's ingest),
    a page is one clustering slice on one replica set, and the day list
    (at most one row per calendar day with studies) makes empty days cost
    nothing. Writers: the registration's rows batch and ``add_placements``
    (before its rows) write the entry and its day row, plain and idempotent
    (the same study and due rewrite the same row). Only the job removes or
    moves entries (``requeue``), and a day row leaves the list when a read
    finds the day empty, each by a delete ``USING TIMESTAMP`` of the
    reader's clock before it read, less ``stale_claim_after``: a write the
    reader may have missed (one that landed after its read, from a writer
    whose rows and commit follow its entry within ``stale_claim_after/2``,
    clocks within the other half) has a later timestamp and stays. Cost per
    registration: two plain rows in its existing batch. Duplicate entries
    of a study (several due times) are allowed; the job handles a study once
    per pass and removes the extra entries.

``stats()`` reads the counter ledger (schema v6, :mod:`vna.index.cassandra_counters`):
per-change idempotent delta rows written in the commit's batch (after the LWT for
placement transitions), rolled up into per-shard totals under a lease; a read is
the totals plus the pending deltas. ``recount()`` is the full scan, for operators.

Every driver error maps to IndexUnavailable through :func:`_unavailable`.
"""

from __future__ import annotations

import datetime
import heapq
import json
import logging
import math
import re
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Any, Callable, Iterable, Iterator, Sequence

from cassandra import ConsistencyLevel, DriverException
from cassandra.auth import PlainTextAuthProvider
from cassandra.cluster import (EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, NoHostAvailable, ResponseFuture,
                               Session)
from cassandra.concurrent import execute_concurrent_with_args
from cassandra.connection import ConnectionException
from cassandra.policies import DCAwareRoundRobinPolicy, TokenAwarePolicy
from cassandra.query import BatchStatement, BatchType, PreparedStatement, SimpleStatement, dict_factory
from cassandra.util import unix_time_from_uuid1

from vna.config import CassandraConfig
from vna.domain import InstanceRecord, Placement, PlacementState, QueryLevel, Tier
from vna.errors import ConfigError, IndexUnavailable, InvalidInput, StateConflict
from vna.index.base import (AbandonedRegistration, IndexStats, QueueEntry, StudySummary, TierStats, copy_logs,
                            lifecycle_queues, log_due, queue_due)
from vna.index.cassandra_counters import CassandraCounters
from vna.index.cassandra_group import WriteGroups
from vna.index.query import (COMPUTED_KEYS, IDENTITY_KEYS, LEVEL_KEYS, MAX_OTHER_IDS, OTHER_IDS_KEY, Condition,
                             MatchKind, decode_other_ids, encode_other_ids, identities, matches_all)

__all__ = ["CassandraIndex"]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 8
_MIGRATIONS = {1: "cql/001_initial.cql", 2: "cql/002_lifecycle.cql", 3: "cql/003_name_keys.cql",
               4: "cql/004_study_summary.cql", 5: "cql/005_registrations.cql", 6: "cql/006_counters.cql",
               7: "cql/007_patient_identity.cql", 8: "cql/008_work_queue.cql"}
_QUEUE_BUCKET = 86400.0  # seconds of due time per work-queue partition (one day)
_FETCH_SIZE = 500
_IN_CHUNK = 100  # partition keys per IN query (a guardrail may warn beyond)
_DETAIL_BATCH = 32  # candidate studies whose partitions find() reads together
_DETAIL_AHEAD = 4  # batches of one find() detailed concurrently
_DETAIL_WORKERS = 8  # threads detailing batches, shared by every find()
_SUMMARY_DELAY = 0.5  # seconds a registered study waits before this front-end re-summarises it (coalesces bursts)
_EMPTY_PATIENT = "\x00"  # partition keys may not be empty; PatientID "" is grouped under this
_KEYSPACE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,47}$")
_DC_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")

#: Every foreign exception the driver raises for an unreachable / failing cluster.
_DRIVER_ERRORS: tuple[type[BaseException], ...] = (DriverException, NoHostAvailable, ConnectionException, OSError)

Row = dict[str, Any]

# DICOM keyword -> CQL column, per table (the schema file must agree).
_PATIENT_COLS = {
    "PatientName": "patient_name", "PatientID": "patient_id", "IssuerOfPatientID": "issuer_of_patient_id",
    "PatientBirthDate": "patient_birth_date", "PatientSex": "patient_sex",
}
_STUDY_COLS = _PATIENT_COLS | {
    "StudyDate": "study_date", "StudyTime": "study_time", "AccessionNumber": "accession_number",
    "StudyID": "study_id", "StudyDescription": "study_description",
    "ReferringPhysicianName": "referring_physician_name",
}
_SERIES_COLS = {
    "Modality": "modality", "SeriesNumber": "series_number", "SeriesDescription": "series_description",
    "BodyPartExamined": "body_part_examined", "SeriesDate": "series_date", "SeriesTime": "series_time",
}
_INSTANCE_COLS = {
    "InstanceNumber": "instance_number", "ContentDate": "content_date", "ContentTime": "content_time",
    "NumberOfFrames": "number_of_frames", "Rows": "image_rows", "Columns": "image_columns",
}
# Keys of the SqliteIndex rows at each level (stored part), so rows compare equal.
_STUDY_ROW_KEYS = frozenset({"StudyInstanceUID", *_STUDY_COLS, "updated_at", "last_access", OTHER_IDS_KEY})
_SERIES_ROW_KEYS = frozenset({"SeriesInstanceUID", "StudyInstanceUID", *_SERIES_COLS})
_INSTANCE_ROW_KEYS = frozenset({
    "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "version", "SOPClassUID", *_INSTANCE_COLS,
    "TransferSyntaxUID", "content_sha256", "content_size", "received_at", "source_ae",
})
_PLACEMENT_COLS = (
    "sop_uid", "version", "store_id", "tier", "blob_key", "codec", "content_sha256", "content_size",
    "stored_sha256", "stored_size", "state", "created_at", "verified_at", "byte_offset", "byte_length",
)
_VERSION_COLS = (
    "sop_uid", "version", "series_uid", "study_uid", "sop_class_uid", "transfer_syntax_uid",
    "content_sha256", "content_size", "received_at", "source_ae", "attrs",
)


def _unavailable(exc: BaseException, what: str) -> IndexUnavailable:
    """The one mapping of driver errors into the vna error tree."""
    return IndexUnavailable(f"Cassandra index: {what} failed: {type(exc).__name__}: {exc}")


def connect(cfg: CassandraConfig, what: str = "Cassandra index") -> tuple[Cluster, Session]:
    """A cluster and session for ``cfg`` (local-DC token-aware, its consistency levels, dict rows).

    Raises ConfigError for a bad keyspace name or consistency level and
    IndexUnavailable (naming ``what``) when no host answers. The caller shuts the cluster down.
    """
    if not _KEYSPACE_RE.match(cfg.keyspace):
        raise ConfigError(f"index.cassandra.keyspace {cfg.keyspace!r} is not a valid keyspace name")
    try:
        consistency = ConsistencyLevel.name_to_value[cfg.consistency.upper()]
        serial = ConsistencyLevel.name_to_value[cfg.serial_consistency.upper()]
    except KeyError as exc:
        raise ConfigError(f"unknown Cassandra consistency level {exc.args[0]!r}") from None
    profile = ExecutionProfile(
        load_balancing_policy=TokenAwarePolicy(DCAwareRoundRobinPolicy(local_dc=cfg.local_dc)),
        consistency_level=consistency,
        serial_consistency_level=serial,
        request_timeout=cfg.request_timeout,
        row_factory=dict_factory,
    )
    auth = PlainTextAuthProvider(username=cfg.username, password=cfg.password) if cfg.username else None
    cluster = Cluster(
        contact_points=list(cfg.contact_points),
        port=cfg.port,
        execution_profiles={EXEC_PROFILE_DEFAULT: profile},
        auth_provider=auth,
        connect_timeout=min(10.0, cfg.request_timeout),
        control_connection_timeout=min(10.0, cfg.request_timeout),
        max_schema_agreement_wait=30,
    )
    try:
        return cluster, cluster.connect()
    except _DRIVER_ERRORS as exc:
        cluster.shutdown()
        raise IndexUnavailable(f"{what}: connect to {','.join(cfg.contact_points)}:{cfg.port} failed: "
                               f"{type(exc).__name__}: {exc}") from exc


def _s(value: Any) -> str:
    return "" if value is None else str(value)


def _fold(text: str) -> str:
    """Casefold consistent with ``re.IGNORECASE`` for ASCII patterns (dotted/dotless i fold to i)."""
    return text.replace("\u0130", "i").replace("\u0131", "i").casefold()


def _family_key(name: str) -> str:
    return re.split(r"[\^=]", _fold(name.strip(" \x00")), maxsplit=1)[0]


def _name_keys(name: str) -> tuple[str | None, str | None]:
    """(name_family, name_fg) of a stored PatientName: the casefolded family name, and the
    casefolded name up to the first character after the family name's ``^`` (None if absent)."""
    folded = _fold(name.strip(" \x00"))
    m = re.search(r"[\^=]", folded)
    family = folded[: m.start()] if m else folded
    fg = folded[: m.start() + 2] if m and m.group() == "^" and len(folded) > m.start() + 1 else None
    return family or None, fg


def _parse_da(value: str) -> datetime.date | None:
    key = value.replace(".", "").strip()
    if re.fullmatch(r"\d{8}", key):
        try:
            return datetime.date(int(key[:4]), int(key[4:6]), int(key[6:]))
        except ValueError:
            return None
    return None


def _study_day(value: str) -> tuple[datetime.date | None, bool]:
    """(date for SAI, odd) — odd: non-empty but not a parsable DA, found by a separate query."""
    v = value.strip(" \x00")
    if not v:
        return None, False
    day = _parse_da(v)
    return day, day is None


def _sqlite_like(pattern: str, value: str) -> bool:
    """SQLite ``LIKE`` (ASCII-only case folding) of a DICOM ``*``/``?`` pattern."""
    def low(s: str) -> str:
        return "".join(chr(ord(c) + 32) if "A" <= c <= "Z" else c for c in s)

    rx = "".join(".*" if ch == "*" else "." if ch == "?" else re.escape(low(ch)) for ch in pattern)
    return re.fullmatch(rx, low(value), re.DOTALL) is not None


def _sqlite_where(c: Condition, value: str) -> bool:
    """SqliteIndex's SQL pre-filter on a studies column, for PATIENT-level grouping.

    SQLite aggregates (max) the patient attributes over the studies that pass its
    WHERE clause, so which studies feed the aggregate depends on that pre-filter;
    mirrored here so PATIENT rows are identical when studies disagree.
    """
    if c.kind is MatchKind.SINGLE and c.vr not in ("PN", "TM", "IS", "DS", "US", "DT"):
        return value == c.values[0]
    if c.kind is MatchKind.SINGLE and c.vr == "PN":
        return _sqlite_like(c.values[0], value)
    if c.kind is MatchKind.LIST and c.vr in ("UI", "CS", "LO", "SH", "AE", "DA"):
        return value in c.values
    if c.kind is MatchKind.WILDCARD and c.vr != "TM":
        return _sqlite_like(c.values[0], value)
    if c.kind is MatchKind.RANGE and c.vr == "DA":
        low, high = c.values
        return value != "" and (not low or value >= low.replace(".", "")) and (
            not high or value <= high.replace(".", ""))
    return True


def _name_pushdown(c: Condition) -> tuple[str, str] | None:
    """(column, value) of a family-name prefix every PatientName matching ``c`` has."""
    if c.kind is MatchKind.SINGLE:
        literal, exact = c.values[0], True
    elif c.kind is MatchKind.WILDCARD:
        pattern = c.values[0]
        cut = min((i for i in (pattern.find("*"), pattern.find("?")) if i >= 0), default=len(pattern))
        literal, exact = pattern[:cut], False
    else:
        return None
    if not literal.isascii():
        return None
    q = _fold(literal)
    m = re.search(r"[\^=]", q)
    if m and m.group() == "^" and len(q) > m.start() + 1:
        return "name_fg", q[: m.start() + 2]  # family name and the given name's first character
    if m:
        family, exact = q[: m.start()], True
    else:
        family = q
    if exact:
        return ("name_family", family) if family else None
    if len(family) >= 3:
        return "name_p3", family[:3]
    if family:
        return "name_p1", family[:1]
    return None


@dataclass(frozen=True)
class _Query:
    """One SAI query on ``studies`` (a conjunction) and a memoryless de-duplication rule."""

    clauses: tuple[str, ...]
    params: tuple[Any, ...]
    skip: Callable[[Row], bool] | None = None


@dataclass
class _SharedMark:
    """A study-summary token shared by this front-end's concurrent registrations into one study."""

    token: uuid.UUID
    refs: int = 0
    ok: bool = False
    written: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class _Current:
    """The newest complete version of an instance."""

    version: int
    study_uid: str
    series_uid: str


@dataclass(frozen=True)
class _Inst:
    """One visible instance row of a study partition."""

    row: Row
    online: bool
    nearline: bool


class CassandraIndex:
    """Index on a Cassandra 5.0 cluster (SAI), one datacenter per site.

    Connects in the constructor (IndexUnavailable if no host answers). Thread-safe.
    ``stale_claim_after``: seconds after which an uncommitted registration is
    abandoned (its writer gives up at half of it); ``contention_wait``: seconds a
    registration waits for another writer of other bytes before StateConflict.
    """

    def __init__(self, cfg: CassandraConfig, *, stale_claim_after: float = 300.0,
                 contention_wait: float = 2.0) -> None:
        self.cfg = cfg
        self.stale_claim_after = stale_claim_after
        self.contention_wait = contention_wait
        self._ks = cfg.keyspace
        self._prepared: dict[str, PreparedStatement] = {}
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None  # find(): batches detailed ahead (_rows)
        # studies this front-end changed, -> when to re-summarise them (_refresh_loop)
        self._resummarise: dict[str, float] = {}
        self._resummarise_cv = threading.Condition()
        self._refresher: threading.Thread | None = None
        self._closed = False
        self._open_marks: dict[str, _SharedMark] = {}  # study -> this front-end's registrations' token
        self._cluster, self._session = connect(cfg)
        self._session.default_fetch_size = _FETCH_SIZE
        self._groups = WriteGroups(self._session)  # registrations' plain writes, group-committed
        self._counters = CassandraCounters(self._session, self._ks, self._prep, concurrency=cfg.concurrency,
                                           lease=self.acquire_lease)  # stats() without scans (schema v6)

    # -- plumbing ------------------------------------------------------------
    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except _DRIVER_ERRORS as exc:
            raise _unavailable(exc, what) from exc

    def _t(self, table: str) -> str:
        return f"{self._ks}.{table}"

    def _prep(self, cql: str) -> PreparedStatement:
        stmt = self._prepared.get(cql)
        if stmt is None:
            stmt = self._session.prepare(cql)
            with self._lock:
                self._prepared[cql] = stmt
        return stmt

    def _exec(self, cql: str, params: Sequence[Any] = ()) -> Any:
        return self._session.execute(self._prep(cql), tuple(params))

    def _concurrent(self, cql: str, params: Sequence[tuple[Any, ...]]) -> list[list[Row]]:
        """Run one prepared statement for many parameter tuples; all rows of each, in order."""
        if not params:
            return []
        results = execute_concurrent_with_args(
            self._session, self._prep(cql), params, concurrency=max(1, self.cfg.concurrency),
            raise_on_first_error=True)
        return [list(result) for _ok, result in results]

    def release_thread(self) -> None:
        """Nothing is per thread: the driver's session is shared."""

    def close(self) -> None:
        with self._resummarise_cv:
            self._closed = True
            refresher, self._refresher = self._refresher, None
            self._resummarise.clear()  # left invalid: answered from their partitions, re-summarised by readers
            self._resummarise_cv.notify_all()
        if refresher is not None:
            refresher.join()
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
        self._groups.close()
        self._counters.close()
        self._cluster.shutdown()

    def datacenters(self, probe_timeout: float = 1.0) -> dict[str, dict[str, list[str]]]:
        """Index replication health: the cluster's nodes per datacenter, ``up`` or ``down``.

        A node is up if its CQL port accepts a connection from here within
        ``probe_timeout`` (the driver holds no pool to other datacenters, so its
        own view of them can be stale). For ``vna sites status``.
        """
        import socket

        out: dict[str, dict[str, list[str]]] = {}
        for host in self._cluster.metadata.all_hosts():
            addr = str(host.broadcast_rpc_address or host.address)
            port = int(getattr(host, "broadcast_rpc_port", None) or self.cfg.port)
            try:
                socket.create_connection((addr, port), timeout=probe_timeout).close()
                state = "up"
            except OSError:
                state = "down"
            out.setdefault(str(host.datacenter), {"up": [], "down": []})[state].append(addr)
        return out

    # -- schema --------------------------------------------------------------
    def _migration(self, name: str) -> list[str]:
        ddl = resources.files("vna.index").joinpath(name).read_text()
        statements = [s.strip() for s in re.sub(r"--[^\n]*", "", ddl).split(";") if s.strip()]
        return [s.replace("{keyspace}", self._ks) for s in statements]

    def migrate(self) -> int:
        migrations = {version: self._migration(name) for version, name in sorted(_MIGRATIONS.items())}
        indexes = {m.group(1) for statements in migrations.values() for s in statements
                   if (m := re.match(r"CREATE INDEX IF NOT EXISTS (\w+)", s))}
        replication = {"class": "NetworkTopologyStrategy"}
        for dc, rf in self.cfg.replication_map.items():
            if not _DC_RE.match(dc):
                raise ConfigError(f"index.cassandra.replication: bad datacenter name {dc!r}")
            replication[dc] = str(rf)
        repl = ", ".join(f"'{k}': '{v}'" for k, v in replication.items())
        with self._errors("migrate"):
            self._ddl(f"CREATE KEYSPACE IF NOT EXISTS {self._ks} WITH replication = {{{repl}}}")
            self._ddl(f"CREATE TABLE IF NOT EXISTS {self._t('schema_version')} "
                      "(version int PRIMARY KEY, applied_at double)")
            rows = self._session.execute(f"SELECT version FROM {self._t('schema_version')}")
            applied = {int(r["version"]) for r in rows}  # one row per version: a gap is applied too
            for version, statements in migrations.items():
                if version in applied:
                    continue
                for stmt in statements:  # every statement is idempotent (IF [NOT] EXISTS)
                    self._ddl(stmt)
                self._wait_for_indexes(indexes & {m.group(1) for s in statements
                                                  if (m := re.match(r"CREATE INDEX IF NOT EXISTS (\w+)", s))})
                if version == 3:
                    self._backfill_name_keys()
                if version == 4:
                    self._backfill_summaries()
                if version == 6:
                    self._counters.recount(repair=True)  # totals of what v5 and older wrote
                if version == 8:
                    self._backfill_queues()
                self._session.execute(
                    f"INSERT INTO {self._t('schema_version')} (version, applied_at) VALUES (%s, %s)",
                    (version, time.time()))
            self._wait_for_indexes(indexes)
        return SCHEMA_VERSION

    def _backfill_name_keys(self) -> None:
        """Schema v3: name_family / name_fg of the studies written before it (idempotent).

        Passes over the studies until one finds nothing to fix, so a registration
        that changed a study's PatientName between our read and our write is caught
        by the next pass (front-ends normally start after ``vna index migrate``).
        """
        t = self._t("studies")
        update = self._prep(f"UPDATE {t} SET name_family = ?, name_fg = ? WHERE study_uid = ?")

        def write(todo: list[tuple[str | None, str | None, str]]) -> None:
            execute_concurrent_with_args(self._session, update, todo, concurrency=max(1, self.cfg.concurrency),
                                         raise_on_first_error=True)

        for _pass in range(5):
            fixed = 0
            todo: list[tuple[str | None, str | None, str]] = []
            for r in self._session.execute(SimpleStatement(
                    f"SELECT study_uid, patient_name, name_family, name_fg FROM {t}", fetch_size=_FETCH_SIZE)):
                keys = _name_keys(_s(r["patient_name"]))
                if (r["name_family"], r["name_fg"]) != keys:
                    todo.append((*keys, r["study_uid"]))
                if len(todo) >= _FETCH_SIZE:
                    write(todo)
                    fixed += len(todo)
                    todo = []
            if todo:
                write(todo)
                fixed += len(todo)
            if not fixed:
                return
            log.info("schema v3: name keys of %d studies backfilled", fixed)
        raise IndexUnavailable("Cassandra index: schema v3 name-key backfill did not settle")

    def _backfill_queues(self) -> None:
        """Schema v8: queue every study with a hot copy, and log every study with an OK copy, written
        before it (idempotent; one scan of the placement ledger, an operator's upgrade step)."""
        done = 0
        todo: list[Placement] = []

        def flush() -> None:
            nonlocal done
            versions = self._concurrent(
                f"SELECT study_uid, received_at, attrs FROM {self._t('instance_versions')} "
                "WHERE sop_uid = ? AND version = ?", [(p.sop_uid, p.version) for p in todo])
            for p, rows in zip(todo, versions):
                if rows:
                    r = rows[0]
                    self._groups.write(
                        self._enqueue(lifecycle_queues([p]), queue_due(float(r["received_at"]),
                                                                       json.loads(r["attrs"] or "{}")), r["study_uid"])
                        + self._enqueue(copy_logs([p]), log_due(float(r["received_at"])), r["study_uid"]))
                    done += 1
            todo.clear()

        for r in self._session.execute(SimpleStatement(
                f"SELECT * FROM {self._t('placements')}", fetch_size=_FETCH_SIZE)):
            p = self._placement(r)
            if lifecycle_queues([p]) or copy_logs([p]):
                todo.append(p)
            if len(todo) >= _FETCH_SIZE:
                flush()
        flush()
        if done:
            log.info("schema v8: %d copies queued for the lifecycle and copy jobs", done)

    def _backfill_summaries(self) -> None:
        """Schema v4: summarise every study written before it (idempotent, resumable).

        Uses the reader's protocol (:meth:`_refresh`), so a registration running
        meanwhile is never hidden: its study is left unsummarised, not wrong.
        """
        uids: list[str] = []
        done = 0
        for r in self._session.execute(SimpleStatement(
                f"SELECT study_uid FROM {self._t('studies')}", fetch_size=_FETCH_SIZE)):
            uids.append(r["study_uid"])
            if len(uids) >= _DETAIL_BATCH:
                self._refresh(uids)
                done += len(uids)
                uids = []
        if uids:
            self._refresh(uids)
            done += len(uids)
        if done:
            log.info("schema v4: summaries of %d studies backfilled", done)

    # -- study summary (schema v4) ---------------------------------------------
    # A STUDY-level C-FIND answers ModalitiesInStudy, NumberOfStudyRelated{Series,
    # Instances} and InstanceAvailability from columns of the study row (sum_*)
    # when they are valid; otherwise from the study's partitions, as every level
    # did before (and then tries to store them). The summary is a cache of a
    # function of the study's partitions, guarded so it is never valid and wrong.
    # Valid iff sum_of is set and sum_pending and sum_done are empty.
    #
    # Writers bracket every change C that can alter it (a commit, which may also
    # take an instance out of the study of its previous version; a placement
    # change to or from OK; OK placements added) with _mark / _settle, two plain
    # writes (no Paxos, so concurrent writers of one study never contend):
    #   1. add a fresh token t to sum_pending,
    #   2. C,
    #   3. in one mutation: add t to sum_done, remove t from sum_pending (the same
    #      client's later timestamp, so the removal wins over step 1).
    #   A writer that fails or dies after 1 leaves t pending: the study is read
    #   from its partitions until a reader moves tokens older than
    #   stale_claim_after to sum_done (the registration-claim assumption: no
    #   writer lives that long), by which time C has happened or never will.
    # Readers (find, the refresher, the migration) read the study row
    # (stamp s, pending P, done D), and only if P is empty: read the partitions,
    # compute S, and write by LWT
    #   SET S, sum_of = fresh, sum_done = sum_done - D
    #   IF sum_of = s AND sum_done = D AND sum_pending = null
    # Why valid implies exact: take a summary write that succeeded (row read at
    # time r, applied at time w) and any change C of writer W with token t.
    #   - t added before r: P was empty at r, so step 3 was applied before r,
    #     so C finished before r, and our partition reads (after r, LOCAL_QUORUM
    #     like C's writes) include C.
    #   - step 3 between r and w: t is in sum_done at w (only a summary write
    #     removes it, and any other summary write since r changed sum_of), so
    #     sum_done != D and nothing is written.
    #   - t added before w, step 3 after w: t is in sum_pending at w: no write.
    #   - t added at or after w: the row is invalid from then on (t pending,
    #     then done) until a later summary write, which covers C by case 1.
    # Tokens are unique and only added by writers; sum_of only changes by LWT,
    # so Paxos orders the summary writes whatever the clocks. Removing a token
    # is the only timestamp race: a removal that loses to a skewed clock leaves
    # the token, hence the study invalid (slow, not wrong).
    def _mark_shared(self, study_uids: Iterable[str]) -> list[tuple[str, _SharedMark]]:
        """Step 1 for registrations: join this front-end's open token of each study, or add one.

        Concurrent registrations into one study share one token (two writes per
        burst instead of two per instance): the token is pending before any
        joiner's change (joiners wait for its write) and settled after the last
        one (:meth:`_settle_shared`). Raises driver errors (then nothing is joined).
        """
        joined: list[tuple[str, _SharedMark]] = []
        created: list[tuple[str, _SharedMark]] = []
        with self._lock:
            for uid in dict.fromkeys(u for u in study_uids if u):
                m = self._open_marks.get(uid)
                if m is None:
                    m = self._open_marks[uid] = _SharedMark(uuid.uuid1())
                    created.append((uid, m))
                m.refs += 1
                joined.append((uid, m))
        stmt = self._prep(f"UPDATE {self._t('studies')} SET sum_pending = sum_pending + ? WHERE study_uid = ?")
        try:
            futures = [self._session.execute_async(stmt, ({m.token}, uid)) for uid, m in created]
            ok = True
            try:
                for f in futures:
                    f.result()
            except BaseException:
                ok = False
                raise
            finally:
                for _uid, m in created:
                    m.ok = ok
                    m.written.set()
            for uid, m in joined:
                m.written.wait()
                if not m.ok:
                    raise IndexUnavailable(f"Cassandra index: could not mark study {uid} as changing")
        except BaseException:
            self._settle_shared(joined)
            raise
        return joined

    def _settle_shared(self, joined: Sequence[tuple[str, _SharedMark]]) -> None:
        """Step 3 for registrations: leave the shared tokens; the last one out settles them."""
        last: dict[uuid.UUID, list[str]] = {}
        with self._lock:
            for uid, m in joined:
                m.refs -= 1
                if m.refs == 0:
                    if self._open_marks.get(uid) is m:
                        del self._open_marks[uid]
                    if m.ok:
                        last.setdefault(m.token, []).append(uid)
        for token, uids in last.items():
            self._settle((token, uids))

    def _mark(self, study_uids: Iterable[str]) -> tuple[uuid.UUID, list[str]]:
        """Step 1: a fresh token added to the studies' pending set; (token, studies) for _settle."""
        uids = list(dict.fromkeys(u for u in study_uids if u))
        token = uuid.uuid1()
        stmt = self._prep(f"UPDATE {self._t('studies')} SET sum_pending = sum_pending + ? WHERE study_uid = ?")
        for f in [self._session.execute_async(stmt, ({token}, u)) for u in uids]:
            f.result()
        return token, uids

    def _settle(self, mark: tuple[uuid.UUID, list[str]]) -> bool:
        """Step 3 after the change; then re-summarise the studies soon.

        A driver error leaves the token pending (the study is read from its
        partitions until the token is stale) and is logged; False then.
        """
        token, uids = mark
        if not uids:
            return True
        done = self._prep(f"UPDATE {self._t('studies')} SET sum_done = sum_done + ?, "
                          "sum_pending = sum_pending - ? WHERE study_uid = ?")
        try:
            for f in [self._session.execute_async(done, ({token}, {token}, u)) for u in uids]:
                f.result()
        except _DRIVER_ERRORS as exc:
            log.warning("study summary of %s left pending after a change (%s: %s); "
                        "those studies are answered from their partitions until it is stale",
                        ",".join(uids), type(exc).__name__, exc)
            return False
        self._refresh_soon(uids)
        return True

    @contextmanager
    def _changing(self, study_uids: Iterable[str]) -> Iterator[None]:
        """Bracket a change to what the studies' summaries summarise (_mark, the change, _settle).

        If the change raises, the token stays pending (the change may have applied)."""
        mark = self._mark(study_uids)
        yield
        self._settle(mark)

    def _studies_of(self, sop_uid: str, version: int | None = None) -> list[str]:
        """Studies of the SOP instance's versions (of ``version`` only, when given)."""
        rows = self._exec(f"SELECT version, study_uid FROM {self._t('instance_versions')} WHERE sop_uid = ?",
                          (sop_uid,))
        return list(dict.fromkeys(r["study_uid"] for r in rows if version is None or r["version"] == version))

    @staticmethod
    def _summary(raw: Row) -> dict[str, str] | None:
        """The stored computed STUDY keys of a study row, or None unless valid."""
        if raw.get("sum_of") is None or raw.get("sum_pending") or raw.get("sum_done"):
            return None
        return {
            "ModalitiesInStudy": _s(raw["sum_modalities"]),
            "NumberOfStudyRelatedSeries": _s(raw["sum_series"]),
            "NumberOfStudyRelatedInstances": _s(raw["sum_instances"]),
            "InstanceAvailability": _s(raw["sum_availability"]),
        }

    def _store_summaries(self, raws: Sequence[Row], computed: dict[str, dict[str, str]]) -> None:
        """Write each study's summary iff nothing changed since its row ``raw`` was read.

        ``computed``: the computed keys from partitions read after ``raws`` (a
        study missing from it has no visible instance). Best effort: a lost
        race or a driver error leaves the study unsummarised (logged).
        """
        t = self._t("studies")
        cas = self._prep(
            f"UPDATE {t} SET sum_of = ?, sum_done = sum_done - ?, sum_instances = ?, sum_series = ?, "
            "sum_modalities = ?, sum_availability = ? WHERE study_uid = ? "
            "IF sum_of = ? AND sum_done = ? AND sum_pending = null")
        drop = self._prep(f"UPDATE {t} SET sum_done = sum_done + ?, sum_pending = sum_pending - ? "
                          "WHERE study_uid = ?")
        stale_before = time.time() - self.stale_claim_after
        futures: list[ResponseFuture] = []
        for raw in raws:
            uid, pending = raw["study_uid"], raw.get("sum_pending")
            if pending:
                old = {tok for tok in pending if unix_time_from_uuid1(tok) < stale_before}
                if old:  # writers that died mid-change; the next reader summarises
                    log.warning("dropping %d stale study-summary token(s) of %s", len(old), uid)
                    futures.append(self._session.execute_async(drop, (old, old, uid)))
                continue
            c = computed.get(uid) or _study_computed([], {})
            done = set(raw.get("sum_done") or ())
            futures.append(self._session.execute_async(cas, (
                uuid.uuid1(), done, int(c["NumberOfStudyRelatedInstances"]), int(c["NumberOfStudyRelatedSeries"]),
                c["ModalitiesInStudy"], c["InstanceAvailability"], uid, raw.get("sum_of"), done)))
        for f in futures:
            try:
                f.result()
            except _DRIVER_ERRORS as exc:
                log.warning("could not store a study summary (%s: %s); it is computed again next time",
                            type(exc).__name__, exc)

    def _refresh(self, study_uids: Sequence[str]) -> None:
        """Summarise the studies whose summary is not valid (reader protocol)."""
        raws = [r for r in self._studies_by_uid(study_uids) if self._summary(r) is None]
        todo = [r["study_uid"] for r in raws if not r.get("sum_pending")]
        computed: dict[str, dict[str, str]] = {}
        if todo:
            series_futures = self._start_series(todo)
            insts_by = self._instances_many(todo, None, True)
            series_by = self._series_of(series_futures)
            computed = {uid: _study_computed(insts, series_by.get(uid, {})) for uid, insts in insts_by.items()}
        self._store_summaries(raws, computed)

    def _refresh_soon(self, study_uids: Iterable[str]) -> None:
        """Re-summarise the studies on the refresher thread _SUMMARY_DELAY after their last change here."""
        with self._resummarise_cv:
            if self._closed:
                return
            due = time.monotonic() + _SUMMARY_DELAY
            for uid in study_uids:
                self._resummarise[uid] = due
            if self._refresher is None:
                self._refresher = threading.Thread(target=self._refresh_loop, name="vna-cass-summary", daemon=True)
                self._refresher.start()
            self._resummarise_cv.notify()

    def _refresh_loop(self) -> None:
        while True:
            with self._resummarise_cv:
                while True:
                    if self._closed:
                        return
                    now = time.monotonic()
                    due = [u for u, t in self._resummarise.items() if t <= now][:_DETAIL_BATCH]
                    if due:
                        break
                    wait = min(self._resummarise.values(), default=now + 60.0) - now
                    self._resummarise_cv.wait(timeout=max(0.01, wait))
                for uid in due:
                    del self._resummarise[uid]
            try:
                self._refresh(due)
            except _DRIVER_ERRORS as exc:
                log.warning("re-summarising %d studies failed (%s: %s); readers will", len(due),
                            type(exc).__name__, exc)

    def _ddl(self, cql: str) -> None:
        rs = self._session.execute(SimpleStatement(cql))
        if not rs.response_future.is_schema_agreed:
            raise IndexUnavailable(f"Cassandra index: no schema agreement after: {cql[:80]}")

    def _wait_for_indexes(self, names: set[str]) -> None:
        """Poll every live node of the local DC until each SAI index is queryable."""
        deadline = time.monotonic() + max(60.0, self.cfg.request_timeout)
        query = "SELECT index_name, is_queryable FROM system_views.sai_column_indexes WHERE keyspace_name = %s"
        while True:
            pending: set[str] = set()
            for host in self._cluster.metadata.all_hosts():
                if not host.is_up or host.datacenter != self.cfg.local_dc:
                    continue  # remote DCs are not connected; their front-ends wait there
                rows = self._session.execute(query, (self._ks,), host=host)
                pending |= names - {r["index_name"] for r in rows if r["is_queryable"]}
            if not pending:
                return
            if time.monotonic() > deadline:
                raise IndexUnavailable(f"Cassandra index: SAI indexes not queryable: {sorted(pending)}")
            time.sleep(0.2)

    # -- instances -----------------------------------------------------------
    def _versions(self, sop_uid: str) -> list[Row]:
        return list(self._exec(f"SELECT * FROM {self._t('instance_versions')} WHERE sop_uid = ?", (sop_uid,)))

    def get_instance(self, sop_uid: str) -> InstanceRecord | None:
        with self._errors("get_instance"):
            rows = self._versions(sop_uid)
        for r in rows:  # newest first (clustering order)
            if r["complete"]:
                return self._record(r)
        return None

    @staticmethod
    def _record(r: Row) -> InstanceRecord:
        return InstanceRecord(
            sop_uid=r["sop_uid"], series_uid=r["series_uid"], study_uid=r["study_uid"],
            sop_class_uid=r["sop_class_uid"], transfer_syntax_uid=r["transfer_syntax_uid"],
            version=int(r["version"]), content_sha256=r["content_sha256"],
            content_size=int(r["content_size"]), received_at=float(r["received_at"]),
            source_ae=_s(r["source_ae"]), attrs=json.loads(r["attrs"] or "{}"),
        )

    # -- registration (schema v5) ------------------------------------------------
    def register(self, record: InstanceRecord, placements: Sequence[Placement]) -> None:
        for p in placements:
            if p.sop_uid != record.sop_uid or p.version != record.version:
                raise InvalidInput(f"placement {p.store_id} is for {p.sop_uid} v{p.version}, "
                                   f"not {record.sop_uid} v{record.version}")
        by_store = list({p.store_id: p for p in placements}.values())  # last wins, like INSERT OR REPLACE
        with self._errors("register"):
            # the commit may take the instance out of the study of an older version
            prior = self._versions(record.sop_uid) if record.version > 1 else []
            earlier = list(dict.fromkeys(r["study_uid"] for r in prior))
            previous = next((int(r["content_size"]) for r in prior
                             if r["complete"] and int(r["version"]) < record.version), None)
            writer, stamp, t0, marks = self._begin(record, by_store, [record.study_uid, *earlier])
            try:
                self._check_deadline(record, t0)
                self._finish(record, writer, stamp, t0, [p.store_id for p in by_store],
                             self._counters.commit_statements(record, by_store, previous))
            finally:
                self._settle_shared(marks)  # a failure here only leaves the summary pending (logged)
        self._counters.start()  # this front-end writes deltas: it takes part in rolling them up
        if record.version > 1:
            self._late_mark(record, [uid for uid, _m in marks])

    def _begin(self, record: InstanceRecord, placements: Sequence[Placement],
               studies: Sequence[str] = ()) -> tuple[uuid.UUID, int, float, list[tuple[str, _SharedMark]]]:
        """Everything of a registration but its commit: candidate, decision, rows.

        Returns (writer id, write timestamp (µs, the candidate's started_at),
        monotonic start, summary marks to settle). Raises
        StateConflict (the version exists, or another writer with other bytes
        may still commit it; the candidate is withdrawn) and driver errors (the
        candidate stays: abandoned once stale, see :meth:`clean_abandoned`).
        """
        writer, started, t0 = uuid.uuid4(), time.time(), time.monotonic()
        stamp = int(started * 1_000_000)  # every shared row of this attempt is written at it
        marks = self._mark_shared(studies or [record.study_uid])
        try:
            self._groups.write([(self._prep(
                f"INSERT INTO {self._t('registrations')} (sop_uid, version, content_sha256, writer, study_uid, "
                "series_uid, started_at, state) VALUES (?, ?, ?, ?, ?, ?, ?, 'writing')"),
                (record.sop_uid, record.version, record.content_sha256, writer, record.study_uid,
                 record.series_uid, started))])
            foreign = self._decide(record, writer, started)
            self._check_deadline(record, t0)
            self._write_rows(record, placements, foreign, stamp)
        except StateConflict:
            self._withdraw(record, writer)
            self._settle_shared(marks)
            raise
        except BaseException:
            self._settle_shared(marks)
            raise
        return writer, stamp, t0, marks

    def _check_deadline(self, record: InstanceRecord, t0: float) -> None:
        """A writer past half of ``stale_claim_after`` never writes rows or commits: others may deem it dead."""
        if time.monotonic() - t0 > self.stale_claim_after / 2:
            raise IndexUnavailable(f"Cassandra index: registration of {record.sop_uid} version {record.version} "
                                   "took too long; retry")

    def _state_of(self, record: InstanceRecord) -> tuple[list[Row], Row | None, list[Row]]:
        """(candidates, commit row or None, placement rows) of the record's version.

        Two concurrent reads; the placements are read only when rows of other
        bytes may exist (a candidate with other bytes, or a schema-v4 claim).
        """
        key = (record.sop_uid, record.version)
        futures = [self._session.execute_async(self._prep(cql), key) for cql in (
            f"SELECT content_sha256, writer, state, started_at FROM {self._t('registrations')} "
            "WHERE sop_uid = ? AND version = ?",
            f"SELECT complete, content_sha256, study_uid, series_uid FROM {self._t('instance_versions')} "
            "WHERE sop_uid = ? AND version = ?")]
        cands, versions = (list(f.result()) for f in futures)
        commit = next((v for v in versions if v["complete"]), None)
        if commit is None and any(c["state"] == "committed" for c in cands):
            commit = {"complete": True}  # its instance_versions row is on its way (same mutation)
        placed: list[Row] = []
        if commit is None and (versions or any(c["content_sha256"] != record.content_sha256 for c in cands)):
            placed = list(self._exec(f"SELECT store_id, content_sha256 FROM {self._t('placements')} "
                                     "WHERE sop_uid = ? AND version = ?", key))
        return cands, commit, placed

    def _decide(self, record: InstanceRecord, writer: uuid.UUID, started: float) -> list[str]:
        """May this writer write the version's rows? Returns the stores of foreign rows to remove.

        Fast path (no Paxos): no live candidate with other bytes. Otherwise mark
        ours contended, wait until every live other candidate is contended too
        (none can take the fast path any more), and decide by LWT. Raises
        StateConflict if the version is committed, the decision went to another
        writer, or the others did not settle within ``contention_wait``.
        """
        mine = record.content_sha256
        contended = False
        deadline = time.monotonic() + self.contention_wait
        delay = 0.01
        while True:
            cands, commit, placed = self._state_of(record)
            if commit is not None:
                raise StateConflict(f"instance {record.sop_uid} version {record.version} exists")
            fresh = time.time() - self.stale_claim_after
            live = [c for c in cands if c["writer"] != writer and float(c["started_at"] or 0) > fresh]
            foreign = [r["store_id"] for r in placed if r["content_sha256"] != mine]
            if not contended and all(c["content_sha256"] == mine for c in live):
                return foreign
            if not contended:
                self._exec(f"UPDATE {self._t('registrations')} SET state = 'contended' WHERE sop_uid = ? "
                           "AND version = ? AND content_sha256 = ? AND writer = ?",
                           (record.sop_uid, record.version, mine, writer))
                contended = True
                continue
            if all(c["state"] == "contended" for c in live):
                self._decision(record, writer)
                return foreign
            if time.monotonic() > deadline:
                raise StateConflict(f"instance {record.sop_uid} version {record.version} is being registered "
                                    "with other content by another writer")
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

    def _decision(self, record: InstanceRecord, writer: uuid.UUID) -> None:
        """Win the contended version by LWT (or take over a stale winner's decision); else StateConflict."""
        t = self._t("registration_decisions")
        now = time.time()
        res = self._exec(f"INSERT INTO {t} (sop_uid, version, content_sha256, writer, decided_at) "
                         "VALUES (?, ?, ?, ?, ?) IF NOT EXISTS",
                         (record.sop_uid, record.version, record.content_sha256, writer, now))
        if res.was_applied:
            return
        cur = res.one()
        if cur["writer"] == writer:
            return
        if float(cur["decided_at"]) < now - self.stale_claim_after:
            res = self._exec(f"UPDATE {t} SET content_sha256 = ?, writer = ?, decided_at = ? "
                             "WHERE sop_uid = ? AND version = ? IF writer = ?",
                             (record.content_sha256, writer, now, record.sop_uid, record.version, cur["writer"]))
            if res.was_applied:
                log.warning("took over the abandoned decision of %s version %d", record.sop_uid, record.version)
                return
        raise StateConflict(f"instance {record.sop_uid} version {record.version}: another writer won")

    def _write_rows(self, record: InstanceRecord, placements: Sequence[Placement], foreign: Sequence[str],
                    stamp: int | None = None) -> None:
        """Placements, the catalogue rows and the removal of placement rows other bytes left on stores
        we lack: plain, idempotent writes in a shared batch (the commit follows only its success).

        The placement and instance rows (and the removals) are written ``USING TIMESTAMP stamp``
        (the attempt's, default now), so a later-started writer's rows win whenever ours land."""
        stamp = int(time.time() * 1_000_000) if stamp is None else stamp
        batch = self._catalogue(record, stamp)
        stmt = self._prep(
            f"INSERT INTO {self._t('placements')} ({', '.join(_PLACEMENT_COLS)}) "
            f"VALUES ({', '.join('?' for _ in _PLACEMENT_COLS)}) USING TIMESTAMP ?")
        for p in placements:
            batch.append((stmt, (
                p.sop_uid, p.version, p.store_id, p.tier.value, p.blob_key, p.codec, p.content_sha256,
                p.content_size, p.stored_sha256, p.stored_size, p.state.value, p.created_at, p.verified_at,
                p.offset, p.length, stamp)))
        batch += self._enqueue(lifecycle_queues(placements), queue_due(record.received_at, record.attrs),
                               record.study_uid)
        batch += self._enqueue(copy_logs(placements), log_due(time.time()), record.study_uid)
        mine = {p.store_id for p in placements}
        drop = self._prep(f"DELETE FROM {self._t('placements')} USING TIMESTAMP ? "
                          "WHERE sop_uid = ? AND version = ? AND store_id = ?")
        for store in foreign:
            if store not in mine:
                batch.append((drop, (stamp, record.sop_uid, record.version, store)))
        self._groups.write(batch)

    def _finish(self, record: InstanceRecord, writer: uuid.UUID, stamp: int, t0: float,
                stores: Sequence[str], counted: Sequence[tuple[PreparedStatement, tuple[Any, ...]]] = ()) -> None:
        """Commit, then make sure the commit stands before the caller acknowledges (see "Stalled writer").

        ``t0``: the attempt's monotonic start; a commit acknowledged after half of
        ``stale_claim_after`` is confirmed by :meth:`_confirm`. ``counted``: the counter
        deltas of the commit (its batch). Raises StateConflict
        (a later-started writer of other bytes took the version over; our rows are
        retracted) and IndexUnavailable (undecided: retry).
        """
        try:
            self._commit(record, writer, stamp, counted)
        except _DRIVER_ERRORS:
            if not self._committed_as(record):  # the answer was lost, not the write?
                raise
        if time.monotonic() - t0 > self.stale_claim_after / 2:
            self._confirm(record, writer, stamp, stores)

    def _confirm(self, record: InstanceRecord, writer: uuid.UUID, stamp: int, stores: Sequence[str]) -> None:
        """After a late commit: acknowledge only if no later-started writer of other bytes can still win."""
        key = (record.sop_uid, record.version)
        mine = record.content_sha256
        deadline = time.monotonic() + self.contention_wait
        delay = 0.01
        while True:
            futures = [self._session.execute_async(self._prep(cql), key) for cql in (
                f"SELECT content_sha256, writer, state, started_at FROM {self._t('registrations')} "
                "WHERE sop_uid = ? AND version = ?",
                f"SELECT complete, content_sha256 FROM {self._t('instance_versions')} "
                "WHERE sop_uid = ? AND version = ?",
                f"SELECT store_id, content_sha256 FROM {self._t('placements')} WHERE sop_uid = ? AND version = ?")]
            cands, versions, placed = (list(f.result()) for f in futures)
            commit = next((v for v in versions if v["complete"]), None)
            if commit is None or commit["content_sha256"] != mine:
                self._retract(record, writer, stamp, stores)
                raise StateConflict(f"instance {record.sop_uid} version {record.version} was taken over by a "
                                    "later writer with other content while this one stalled")
            threats = [c for c in cands if c["content_sha256"] != mine
                       and int(float(c["started_at"] or 0) * 1_000_000) > stamp]
            if not threats:
                strays = [r["store_id"] for r in placed if r["content_sha256"] != mine]
                if strays:  # rows an earlier-started writer of other bytes landed late: older than ours
                    drop = self._prep(f"DELETE FROM {self._t('placements')} USING TIMESTAMP ? "
                                      "WHERE sop_uid = ? AND version = ? AND store_id = ?")
                    self._concurrent_write(drop, [(stamp, *key, s) for s in strays])
                return
            if time.monotonic() > deadline:
                raise IndexUnavailable(f"Cassandra index: registration of {record.sop_uid} version "
                                       f"{record.version} stalled and another writer may still take it over; retry")
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

    def _retract(self, record: InstanceRecord, writer: uuid.UUID, stamp: int, stores: Sequence[str]) -> None:
        """Remove what a writer that lost the version wrote, ``USING TIMESTAMP`` of its attempt: rows
        of the later-started winner carry later timestamps and stay; then its candidate."""
        key = (record.sop_uid, record.version)
        drop = self._prep(f"DELETE FROM {self._t('placements')} USING TIMESTAMP ? "
                          "WHERE sop_uid = ? AND version = ? AND store_id = ?")
        self._concurrent_write(drop, [(stamp, *key, s) for s in stores])
        self._exec(f"DELETE FROM {self._t('instances')} USING TIMESTAMP ? WHERE study_uid = ? AND series_uid = ? "
                   "AND sop_uid = ? AND version = ?", (stamp, record.study_uid, record.series_uid, *key))
        self._withdraw(record, writer)

    def _concurrent_write(self, stmt: PreparedStatement, params: Sequence[tuple[Any, ...]]) -> None:
        if params:
            execute_concurrent_with_args(self._session, stmt, params, concurrency=max(1, self.cfg.concurrency),
                                         raise_on_first_error=True)

    def _commit(self, record: InstanceRecord, writer: uuid.UUID, stamp: int | None = None,
                counted: Sequence[tuple[PreparedStatement, tuple[Any, ...]]] = ()) -> None:
        """The moment the version appears: its instance_versions row (complete) and our candidate
        marked committed, one mutation of the SOP UID's partitions (no Paxos). The version row is
        written ``USING TIMESTAMP stamp`` (the attempt's): a later-started writer's commit wins."""
        stamp = int(time.time() * 1_000_000) if stamp is None else stamp
        values = (
            record.sop_uid, record.version, record.series_uid, record.study_uid, record.sop_class_uid,
            record.transfer_syntax_uid, record.content_sha256, record.content_size, record.received_at,
            record.source_ae, json.dumps(record.attrs),
        )
        self._groups.write([
            (self._prep(f"INSERT INTO {self._t('instance_versions')} ({', '.join(_VERSION_COLS)}, complete, "
                        f"claim_id, claimed_at) VALUES ({', '.join('?' for _ in _VERSION_COLS)}, true, ?, ?) "
                        "USING TIMESTAMP ?"),
             (*values, writer, time.time(), stamp)),
            (self._prep(f"UPDATE {self._t('registrations')} SET state = 'committed' WHERE sop_uid = ? "
                        "AND version = ? AND content_sha256 = ? AND writer = ?"),
             (record.sop_uid, record.version, record.content_sha256, writer)), *counted])

    def _committed_as(self, record: InstanceRecord) -> bool:
        """After an unanswered commit: is the version committed with these bytes?"""
        try:
            row = self._exec(f"SELECT complete, content_sha256 FROM {self._t('instance_versions')} "
                             "WHERE sop_uid = ? AND version = ?", (record.sop_uid, record.version)).one()
        except _DRIVER_ERRORS:
            return False
        return bool(row and row["complete"] and row["content_sha256"] == record.content_sha256)

    def _withdraw(self, record: InstanceRecord, writer: uuid.UUID) -> None:
        """Best effort: remove our candidate (we wrote no rows), so others need not wait for it to be stale."""
        try:
            self._exec(f"DELETE FROM {self._t('registrations')} WHERE sop_uid = ? AND version = ? "
                       "AND content_sha256 = ? AND writer = ?",
                       (record.sop_uid, record.version, record.content_sha256, writer))
        except _DRIVER_ERRORS as exc:
            log.warning("could not withdraw a registration candidate of %s (%s); it goes stale",
                        record.sop_uid, exc)

    def _late_mark(self, record: InstanceRecord, marked: Sequence[str]) -> None:
        """Re-registration: a lower version committed concurrently into a study we did not mark
        may just have lost the instance to our commit; invalidate that study's summary now."""
        try:
            missed = [u for u in self._studies_of(record.sop_uid) if u not in marked]
            if missed:
                self._settle(self._mark(missed))
        except _DRIVER_ERRORS as exc:
            log.warning("could not re-check the studies of %s after its registration (%s: %s)",
                        record.sop_uid, type(exc).__name__, exc)

    def _insert_placements(self, placements: Sequence[Placement]) -> bool:
        """Insert rows of ONE partition (sop_uid) in one Paxos round; False (nothing written) if any exists."""
        if not placements:
            return True
        stmt = self._prep(
            f"INSERT INTO {self._t('placements')} ({', '.join(_PLACEMENT_COLS)}) "
            f"VALUES ({', '.join('?' for _ in _PLACEMENT_COLS)}) IF NOT EXISTS")
        batch = BatchStatement(batch_type=BatchType.LOGGED)
        for p in placements:
            batch.add(stmt, (
                p.sop_uid, p.version, p.store_id, p.tier.value, p.blob_key, p.codec, p.content_sha256,
                p.content_size, p.stored_sha256, p.stored_size, p.state.value, p.created_at, p.verified_at,
                p.offset, p.length))
        return bool(self._session.execute(batch).was_applied)

    def _write_catalogue(self, record: InstanceRecord) -> None:
        self._session.execute(self._catalogue_batch(record))

    def _catalogue_batch(self, record: InstanceRecord) -> BatchStatement:
        """The catalogue statements in one unlogged batch."""
        batch = BatchStatement(batch_type=BatchType.UNLOGGED)
        for stmt, params in self._catalogue(record):
            batch.add(stmt, params)
        return batch

    def _catalogue(self, record: InstanceRecord,
                   stamp: int | None = None) -> list[tuple[PreparedStatement, tuple[Any, ...]]]:
        """The study, studies_by_patient, series and instance rows of a registration (plain upserts;
        the instance row ``USING TIMESTAMP stamp`` when given)."""
        a = record.attrs
        study = {col: a.get(kw, "") for kw, col in _STUDY_COLS.items()}
        if not study["issuer_of_patient_id"]:
            del study["issuer_of_patient_id"]  # unknown, not none: the study keeps the issuer it has
        other = self._new_other_ids(record.study_uid, a.get(OTHER_IDS_KEY, ""))
        family = _family_key(study["patient_name"])
        name_family, name_fg = _name_keys(study["patient_name"])
        day, odd = _study_day(study["study_date"])
        modality = a.get("Modality", "").strip(" \x00")
        sets = ", ".join(f"{c} = ?" for c in study)
        add = ", modalities = modalities + ?" if modality else ""
        add += ", other_ids = other_ids + ?" if other else ""
        # no batchlog: the commit follows only once every row is written
        batch: list[tuple[PreparedStatement, tuple[Any, ...]]] = []
        batch.append((self._prep(
            f"UPDATE {self._t('studies')} SET {sets}, updated_at = ?, name_p1 = ?, name_p3 = ?, "
            f"name_family = ?, name_fg = ?, study_day = ?, study_date_odd = ?{add} WHERE study_uid = ?"),
            (*study.values(), record.received_at, family[:1] or None, family[:3] or None, name_family, name_fg,
             day, odd,
             *([{modality}] if modality else []), *([set(other)] if other else []), record.study_uid)))
        keys = dict.fromkeys([study["patient_id"] or _EMPTY_PATIENT,
                              *(pid for pid, _issuer in decode_other_ids("\n".join(other)))])
        for key in keys:  # the primary PatientID, and each other one (schema v7)
            batch.append((self._prep(
                f"INSERT INTO {self._t('studies_by_patient')} (patient_key, study_uid) VALUES (?, ?)"),
                (key, record.study_uid)))
        series = {col: a.get(kw, "") for kw, col in _SERIES_COLS.items()}
        batch.append((self._prep(
            f"INSERT INTO {self._t('series')} (study_uid, series_uid, {', '.join(series)}) "
            f"VALUES (?, ?, {', '.join('?' for _ in series)})"),
            (record.study_uid, record.series_uid, *series.values())))
        inst: dict[str, Any] = {col: a.get(kw, "") for kw, col in _INSTANCE_COLS.items()}
        inst |= {
            "sop_class_uid": record.sop_class_uid, "transfer_syntax_uid": record.transfer_syntax_uid,
            "content_sha256": record.content_sha256, "content_size": record.content_size,
            "received_at": record.received_at, "source_ae": record.source_ae,
        }
        batch.append((self._prep(
            f"INSERT INTO {self._t('instances')} (study_uid, series_uid, sop_uid, version, {', '.join(inst)}) "
            f"VALUES (?, ?, ?, ?, {', '.join('?' for _ in inst)}) USING TIMESTAMP ?"),
            (record.study_uid, record.series_uid, record.sop_uid, record.version, *inst.values(),
             int(time.time() * 1_000_000) if stamp is None else stamp)))
        return batch

    def _new_other_ids(self, study_uid: str, encoded: str) -> list[str]:
        """The items of ``encoded`` (Other Patient IDs of an instance) to add to the study's set: the union
        over its instances is bounded by MAX_OTHER_IDS (one primary-key read, only when the instance has
        any; concurrent registrations may each add up to the bound)."""
        items = encoded.split("\n") if encoded else []
        if not items:
            return []
        rows = list(self._exec(f"SELECT other_ids FROM {self._t('studies')} WHERE study_uid = ?", (study_uid,)))
        held = set(rows[0]["other_ids"] or ()) if rows else set()
        return [i for i in items if i not in held][:max(0, MAX_OTHER_IDS - len(held))]

    def _serial(self, cql: str, params: Sequence[Any]) -> Any:
        bound = self._prep(cql).bind(tuple(params))
        bound.consistency_level = ConsistencyLevel.name_to_value[self.cfg.serial_consistency.upper()]
        return bound

    @staticmethod
    def _placement(r: Row) -> Placement:
        return Placement(
            sop_uid=r["sop_uid"], version=int(r["version"]), tier=Tier(r["tier"]), store_id=r["store_id"],
            blob_key=r["blob_key"], codec=r["codec"], content_sha256=r["content_sha256"],
            content_size=int(r["content_size"]), stored_sha256=r["stored_sha256"],
            stored_size=int(r["stored_size"]), state=PlacementState(r["state"]),
            created_at=float(r["created_at"]), verified_at=r["verified_at"],
            offset=r["byte_offset"], length=r["byte_length"],
        )

    def placements(self, sop_uid: str, version: int | None = None) -> list[Placement]:
        with self._errors("placements"):
            complete = [int(r["version"]) for r in self._versions(sop_uid) if r["complete"]]
            if version is None:
                if not complete:
                    return []
                version = complete[0]
            elif version not in complete:
                return []
            rows = self._exec(f"SELECT * FROM {self._t('placements')} WHERE sop_uid = ? AND version = ?",
                              (sop_uid, version))
            return [self._placement(r) for r in rows]

    def placements_many(self, sop_uids: Sequence[str]) -> dict[str, list[Placement]]:
        """One wave of IN queries: the instances' instance_versions and placements partitions together
        (placements of every version are read and those not of the current complete version dropped)."""
        out: dict[str, list[Placement]] = {uid: [] for uid in sop_uids}
        if not out:
            return out
        with self._errors("placements_many"):
            versions = self._start_in(
                f"SELECT sop_uid, version, complete FROM {self._t('instance_versions')} WHERE sop_uid IN ?", out)
            placements = self._start_in(f"SELECT * FROM {self._t('placements')} WHERE sop_uid IN ?", out)
            current: dict[str, int] = {}
            for v in self._rows_of(versions):   # newest version first within each partition
                if v["complete"] and v["sop_uid"] not in current:
                    current[v["sop_uid"]] = int(v["version"])
            for r in self._rows_of(placements):
                if current.get(r["sop_uid"]) == int(r["version"]):
                    out[r["sop_uid"]].append(self._placement(r))
        return out

    def transition(
        self, placement: Placement, new_state: PlacementState, *, verified_at: float | None = None
    ) -> bool:
        p = placement
        t = self._t("placements")
        key = "WHERE sop_uid = ? AND version = ? AND store_id = ?"
        sets, set_params = ("state = ?, verified_at = ?", (new_state.value, verified_at)) \
            if verified_at is not None else ("state = ?", (new_state.value,))
        update = f"UPDATE {t} SET {sets} {key} IF state = ? AND blob_key = ?"
        params = (*set_params, p.sop_uid, p.version, p.store_id, p.state.value, p.blob_key)
        with self._errors("transition"), self._changing(
                self._studies_of(p.sop_uid, p.version)
                if _flags(p.state, p.tier) != _flags(new_state, p.tier) else ()):
            self._log_ok(p, replace(p, state=new_state))
            if new_state is not PlacementState.TO_DELETE:
                ok = bool(self._exec(update, params).was_applied)
            else:
                ok = self._guarded(p, update, params)
        if ok:
            self._counters.placements_changed([p], [replace(p, state=new_state)])
        return ok

    def _guarded(self, p: Placement, update: str, params: Sequence[Any]) -> bool:
        """Apply a conditional update of ``p``'s row that retires it (TO_DELETE).

        One Paxos round on the instance's partition also asserts that another copy
        of this version is still OK, so two copies cannot both be retired.
        """
        t = self._t("placements")
        for _attempt in range(3):
            rows = list(self._session.execute(self._serial(
                f"SELECT store_id, state, blob_key FROM {t} WHERE sop_uid = ? AND version = ?",
                (p.sop_uid, p.version))))
            mine = [r for r in rows if r["store_id"] == p.store_id]
            if not mine or mine[0]["state"] != p.state.value or mine[0]["blob_key"] != p.blob_key:
                return False
            others = [r["store_id"] for r in rows if r["store_id"] != p.store_id and r["state"] == "OK"]
            if not others:
                return False
            batch = BatchStatement(batch_type=BatchType.LOGGED)
            batch.add(self._prep(update), tuple(params))
            batch.add(self._prep(f"UPDATE {t} SET guarded_at = ? "
                                 "WHERE sop_uid = ? AND version = ? AND store_id = ? IF state = 'OK'"),
                      (time.time(), p.sop_uid, p.version, others[0]))
            if self._session.execute(batch).was_applied:
                return True
        return False

    # -- placement ledger (jobs) ------------------------------------------------
    def add_placements(self, placements: Sequence[Placement]) -> None:
        """Insert the rows, one Paxos round per instance.

        Atomic per instance; across instances a conflict removes the rows already
        added (best effort, while they are unchanged) before StateConflict.
        """
        keys = [(p.sop_uid, p.version, p.store_id) for p in placements]
        if len(set(keys)) != len(keys):
            raise StateConflict("add_placements: the same placement twice")
        groups: dict[str, list[Placement]] = {}
        for p in placements:
            groups.setdefault(p.sop_uid, []).append(p)
        added: list[Placement] = []
        ok = dict.fromkeys((p.sop_uid, p.version) for p in placements if p.state is PlacementState.OK)
        with self._errors("add_placements"), self._changing(
                u for sop, version in ok for u in self._studies_of(sop, version)):
            queued = [p for p in placements if lifecycle_queues([p]) or copy_logs([p])]
            versions = self._concurrent(
                f"SELECT study_uid, received_at, attrs FROM {self._t('instance_versions')} "
                "WHERE sop_uid = ? AND version = ?", [(p.sop_uid, p.version) for p in queued])
            now = log_due(time.time())
            entries = [stmt for p, rows in zip(queued, versions) if rows
                       for stmt in self._enqueue(lifecycle_queues([p]), queue_due(
                           float(rows[0]["received_at"]), json.loads(rows[0]["attrs"] or "{}")), rows[0]["study_uid"])
                       + self._enqueue(copy_logs([p]), now, rows[0]["study_uid"])]
            if entries:  # before the rows: a job that sees no hot copy yet keeps an entry written since
                self._groups.write(entries)
            try:
                for sop, group in groups.items():
                    if not self._insert_placements(group):
                        raise StateConflict(f"a placement of {sop} already exists")
                    added.extend(group)
            except BaseException:
                self._remove_unchanged(added)
                raise
        self._counters.placements_changed([], added)

    def _remove_unchanged(self, placements: Sequence[Placement]) -> None:
        for p in placements:
            try:
                self._exec(f"DELETE FROM {self._t('placements')} WHERE sop_uid = ? AND version = ? "
                           "AND store_id = ? IF state = ? AND blob_key = ?",
                           (p.sop_uid, p.version, p.store_id, p.state.value, p.blob_key))
            except _DRIVER_ERRORS as exc:
                log.warning("could not remove placement of %s on %s after a failed add (%s)",
                            p.sop_uid, p.store_id, exc)

    def replace_placement(self, old: Placement, new: Placement) -> bool:
        if (old.sop_uid, old.version, old.store_id) != (new.sop_uid, new.version, new.store_id):
            raise ValueError("replace_placement keeps (sop_uid, version, store_id)")
        update = (
            f"UPDATE {self._t('placements')} SET tier = ?, blob_key = ?, codec = ?, content_sha256 = ?, "
            "content_size = ?, stored_sha256 = ?, stored_size = ?, state = ?, created_at = ?, verified_at = ?, "
            "byte_offset = ?, byte_length = ? WHERE sop_uid = ? AND version = ? AND store_id = ? "
            "IF state = ? AND blob_key = ?")
        params = (new.tier.value, new.blob_key, new.codec, new.content_sha256, new.content_size,
                  new.stored_sha256, new.stored_size, new.state.value, new.created_at, new.verified_at,
                  new.offset, new.length, old.sop_uid, old.version, old.store_id, old.state.value, old.blob_key)
        with self._errors("replace_placement"), self._changing(
                self._studies_of(old.sop_uid, old.version)
                if _flags(old.state, old.tier) != _flags(new.state, new.tier) else ()):
            self._log_ok(old, new)
            if new.state is PlacementState.TO_DELETE and old.state is not PlacementState.TO_DELETE:
                ok = self._guarded(old, update, params)
            else:
                ok = bool(self._exec(update, params).was_applied)
        if ok:
            self._counters.placements_changed([old], [new])
        return ok

    def _log_ok(self, old: Placement, new: Placement) -> None:
        """A copy about to become OK puts its study in its site's copy log (before the change: a reader
        that misses the change finds the entry)."""
        if new.state is PlacementState.OK and old.state is not PlacementState.OK:
            stmts = [stmt for study in self._studies_of(new.sop_uid, new.version)
                     for stmt in self._enqueue(copy_logs([new]), log_due(time.time()), study)]
            if stmts:
                self._groups.write(stmts)

    def delete_placement(self, placement: Placement) -> bool:
        p = placement
        with self._errors("delete_placement"):
            ok = bool(self._exec(
                f"DELETE FROM {self._t('placements')} WHERE sop_uid = ? AND version = ? AND store_id = ? "
                "IF state = 'TO_DELETE' AND blob_key = ?", (p.sop_uid, p.version, p.store_id, p.blob_key)
            ).was_applied)
        if ok:
            self._counters.placements_changed([p], [])
        return ok

    def _uncommitted(self) -> list[Row]:
        """Candidates not committed (in flight or abandoned; few) and schema-v4 claims never completed."""
        rows = [r for state in ("writing", "contended") for r in self._exec(
            f"SELECT * FROM {self._t('registrations')} WHERE state = ?", (state,))]
        for r in self._exec(f"SELECT sop_uid, version, content_sha256, study_uid, series_uid, claimed_at, claim_id "
                            f"FROM {self._t('instance_versions')} WHERE complete = ?", (False,)):
            rows.append({**r, "started_at": r["claimed_at"], "writer": r["claim_id"], "state": "claim"})
        return rows

    def _commits(self, keys: Iterable[tuple[str, int]]) -> dict[tuple[str, int], Row]:
        """The complete instance_versions rows of these (sop_uid, version)."""
        distinct = list(dict.fromkeys(keys))
        results = self._concurrent(
            f"SELECT sop_uid, version, complete, content_sha256, study_uid, series_uid "
            f"FROM {self._t('instance_versions')} WHERE sop_uid = ? AND version = ?", distinct)
        return {k: rows[0] for k, rows in zip(distinct, results) if rows and rows[0]["complete"]}

    def _hidden_versions(self) -> set[tuple[str, int]]:
        """(sop_uid, version) of uncommitted registrations (few: in flight or abandoned)."""
        pending = {(r["sop_uid"], int(r["version"])) for r in self._uncommitted()}
        return pending - set(self._commits(pending))

    def abandoned_registrations(self, *, older_than: float | None = None,
                                limit: int | None = None) -> list[AbandonedRegistration]:
        """Registrations begun more than ``older_than`` seconds ago (default ``stale_claim_after``) whose
        version was never committed with their bytes: invisible leftovers for :meth:`clean_abandoned`."""
        age = self.stale_claim_after if older_than is None else older_than
        with self._errors("abandoned_registrations"):
            before = time.time() - age
            old = [r for r in self._uncommitted() if float(r["started_at"] or 0) <= before]
            commits = self._commits((r["sop_uid"], int(r["version"])) for r in old)
        out = [AbandonedRegistration(sop_uid=r["sop_uid"], version=int(r["version"]),
                                     content_sha256=_s(r["content_sha256"]), study_uid=_s(r["study_uid"]),
                                     started_at=float(r["started_at"] or 0))
               for r in old if _s((commits.get((r["sop_uid"], int(r["version"]))) or {}).get("content_sha256"))
               != _s(r["content_sha256"])]
        out.sort(key=lambda a: (a.started_at, a.sop_uid, a.version))
        return out[:limit] if limit is not None else out

    def clean_abandoned(self, *, older_than: float | None = None, limit: int | None = None) -> int:
        """Remove what registrations older than ``older_than`` (default ``stale_claim_after``) left
        uncommitted: their placement and instance rows unless the committed version owns them, then
        their candidate. Idempotent, bounded by ``limit``; returns the candidates removed.

        Row deletes carry ``USING TIMESTAMP`` of the age limit (v5 rows are written at their attempt's
        start), so a writer begun after it keeps its rows (clock skew aside); v4 claims' rows, written
        at write time, are deleted at the moment of the check.
        """
        age = self.stale_claim_after if older_than is None else older_than
        done = 0
        with self._errors("clean_abandoned"):
            before = time.time() - age
            old = [r for r in self._uncommitted() if float(r["started_at"] or 0) <= before]
            old.sort(key=lambda r: float(r["started_at"] or 0))
            for r in old[:limit] if limit is not None else old:
                if self._clean_one(r, before):
                    done += 1
        if done:
            log.info("removed %d abandoned registration(s)", done)
        return done

    def _clean_one(self, r: Row, before: float) -> bool:
        sop, version, sha = r["sop_uid"], int(r["version"]), _s(r["content_sha256"])
        now = time.time()
        stamp = int(now * 1_000_000)
        # v5 rows are written at their attempt's start: delete those of attempts begun by ``before``
        # only, so a live writer (begun later) keeps its rows whenever its candidate became visible
        rows_stamp = stamp if r["state"] == "claim" else int(before * 1_000_000)
        cands = self._exec(f"SELECT content_sha256, writer, started_at FROM {self._t('registrations')} "
                           "WHERE sop_uid = ? AND version = ?", (sop, version))
        if any(c["writer"] != r["writer"] and c["content_sha256"] == sha and float(c["started_at"] or 0) > before
               for c in cands):
            return False  # a live writer of the same bytes: its rows are those rows
        commit = self._commits([(sop, version)]).get((sop, version))
        committed_sha = _s(commit["content_sha256"]) if commit else None
        if committed_sha != sha:
            t = self._t("placements")
            for p in self._exec(f"SELECT store_id, content_sha256 FROM {t} WHERE sop_uid = ? AND version = ?",
                                (sop, version)):
                if p["content_sha256"] == sha:
                    self._exec(f"DELETE FROM {t} USING TIMESTAMP ? WHERE sop_uid = ? AND version = ? "
                               "AND store_id = ?", (rows_stamp, sop, version, p["store_id"]))
            if commit is None or (commit["study_uid"], commit["series_uid"]) != (r["study_uid"], r["series_uid"]):
                self._exec(f"DELETE FROM {self._t('instances')} USING TIMESTAMP ? WHERE study_uid = ? "
                           "AND series_uid = ? AND sop_uid = ? AND version = ?",
                           (rows_stamp, r["study_uid"], r["series_uid"], sop, version))
        if r["state"] == "claim":  # schema v4: an LWT claim, released by LWT
            if commit is None:
                self._exec(f"DELETE FROM {self._t('instance_versions')} WHERE sop_uid = ? AND version = ? "
                           "IF claim_id = ?", (sop, version, r["writer"]))
            return True
        self._exec(f"DELETE FROM {self._t('registrations')} USING TIMESTAMP ? WHERE sop_uid = ? AND version = ? "
                   "AND content_sha256 = ? AND writer = ?", (stamp, sop, version, sha, r["writer"]))
        return True


    def iter_placements(
        self,
        *,
        tier: Tier | None = None,
        states: Sequence[PlacementState] | None = None,
        store_id: str | None = None,
        limit: int | None = None,
    ) -> Iterator[Placement]:
        """SAI on tier/state/store_id, then an in-memory order (a heap of ``limit`` when given)."""
        clauses: list[str] = []
        params: list[Any] = []
        if tier is not None:
            clauses.append("tier = ?")
            params.append(tier.value)
        if store_id is not None:
            clauses.append("store_id = ?")
            params.append(store_id)
        wanted: list[str | None] = list(dict.fromkeys(s.value for s in states)) if states else [None]

        def rows(hidden: set[tuple[str, int]]) -> Iterator[Placement]:
            for state in wanted:
                where = clauses + (["state = ?"] if state is not None else [])
                cql = f"SELECT * FROM {self._t('placements')}" + (f" WHERE {' AND '.join(where)}" if where else "")
                for r in self._exec(cql, (*params, *([state] if state is not None else []))):
                    if (r["sop_uid"], int(r["version"])) not in hidden:
                        yield self._placement(r)

        def order(p: Placement) -> tuple[bool, float, str, int, str]:
            return (p.verified_at is not None, p.verified_at or 0.0, p.sop_uid, p.version, p.store_id)

        with self._errors("iter_placements"):
            found = rows(self._hidden_versions())
            selected = heapq.nsmallest(limit, found, key=order) if limit is not None else sorted(found, key=order)
            hidden = self._hidden_versions()  # claimed while we scanned
        yield from (p for p in selected if (p.sop_uid, p.version) not in hidden)

    # -- studies (lifecycle) -------------------------------------------------------
    def study_instances(self, study_uid: str) -> list[InstanceRecord]:
        with self._errors("study_instances"):
            insts = self._instances(study_uid, None, False)
            rows = self._concurrent(
                f"SELECT * FROM {self._t('instance_versions')} WHERE sop_uid = ? AND version = ?",
                [(i.row["sop_uid"], i.row["version"]) for i in insts])
        records = [self._record(r[0]) for r in rows if r]
        return sorted(records, key=lambda r: (r.series_uid, r.sop_uid))

    def _study_summary(self, raw: Row, held: bool) -> StudySummary | None:
        uid = raw["study_uid"]
        insts = self._instances(uid, None, False)
        if not insts:
            return None
        series = self._series_rows(uid)
        mods = {series[s]["Modality"] for s in {i.row["series_uid"] for i in insts} if s in series}
        return StudySummary(
            study_uid=uid, study_date=_s(raw["study_date"]), modalities=tuple(sorted(m for m in mods if m)),
            source_aes=tuple(sorted({_s(i.row["source_ae"]) for i in insts} - {""})),
            last_received=max(float(i.row["received_at"]) for i in insts), last_access=raw["last_access"],
            held=held, instances=len(insts))

    def iter_studies(self, *, received_before: float | None = None, limit: int | None = None) -> Iterator[StudySummary]:
        """A paged scan of every study with its partitions; sorted in memory (a heap of ``limit`` when given).
        O(catalogue): for operator commands that want every study (the jobs read work queues)."""
        def summaries(held: set[str]) -> Iterator[StudySummary]:
            for raw in self._exec(f"SELECT study_uid, study_date, last_access FROM {self._t('studies')}"):
                summary = self._study_summary(raw, raw["study_uid"] in held)
                if summary is not None and (received_before is None or summary.last_received < received_before):
                    yield summary

        def order(s: StudySummary) -> tuple[float, str]:
            return s.last_received, s.study_uid

        with self._errors("iter_studies"):
            held = {r["study_uid"] for r in self._exec(f"SELECT study_uid FROM {self._t('holds')}")}
            found = summaries(held)
            selected = heapq.nsmallest(limit, found, key=order) if limit is not None else sorted(found, key=order)
        yield from selected

    def study_summary(self, study_uid: str) -> StudySummary | None:
        with self._errors("study_summary"):
            raw = self._exec(f"SELECT study_uid, study_date, last_access FROM {self._t('studies')} "
                             "WHERE study_uid = ?", (study_uid,)).one()
            return None if raw is None else self._study_summary(raw, self.is_held(study_uid))

    # -- work queues (schema v8) ---------------------------------------------------
    def _enqueue(self, queues: Iterable[str], due: float,
                 study_uid: str) -> list[tuple[PreparedStatement, tuple[Any, ...]]]:
        """The statements that put the study in ``queues`` at ``due``: the entry and its day's bucket row."""
        bucket = math.floor(due / _QUEUE_BUCKET)
        out: list[tuple[PreparedStatement, tuple[Any, ...]]] = []
        for q in sorted(queues):
            out.append((self._prep(f"INSERT INTO {self._t('study_queue')} (queue, bucket, due, study_uid) "
                                   "VALUES (?, ?, ?, ?)"), (q, bucket, due, study_uid)))
            out.append((self._prep(f"INSERT INTO {self._t('study_queue_buckets')} (queue, bucket) VALUES (?, ?)"),
                        (q, bucket)))
        return out

    def queued(self, queue: str, *, upto: float | None = None, after: QueueEntry | None = None,
               limit: int = 1000) -> list[QueueEntry]:
        """The queue's day list from ``after``'s day to ``upto``'s, then a clustering slice of each day in
        order until ``limit``; a day found empty over its whole range leaves the day list (housekeeping,
        ``USING TIMESTAMP`` of the read less ``stale_claim_after``, so a day written since stays)."""
        lo = math.floor(after.due / _QUEUE_BUCKET) if after is not None else None
        hi = math.floor(upto / _QUEUE_BUCKET) if upto is not None else None
        out: list[QueueEntry] = []
        with self._errors("queued"):
            started = time.time()
            where = [w for w, v in (("bucket >= ?", lo), ("bucket <= ?", hi)) if v is not None]
            days = [int(r["bucket"]) for r in self._exec(
                f"SELECT bucket FROM {self._t('study_queue_buckets')} WHERE queue = ?"
                + "".join(f" AND {w}" for w in where), (queue, *(v for v in (lo, hi) if v is not None)))]
            for day in sorted(days):
                clauses: list[str] = []
                params: list[Any] = []
                if upto is not None and day == hi:
                    clauses.append("due <= ?")
                    params.append(upto)
                if after is not None and day == lo:
                    clauses.append("(due, study_uid) > (?, ?)")
                    params += [after.due, after.study_uid]
                rows = list(self._exec(
                    f"SELECT due, study_uid FROM {self._t('study_queue')} WHERE queue = ? AND bucket = ?"
                    + "".join(f" AND {c}" for c in clauses) + f" LIMIT {int(limit - len(out))}",
                    (queue, day, *params)))
                if not rows and not clauses:
                    self._exec(f"DELETE FROM {self._t('study_queue_buckets')} USING TIMESTAMP ? "
                               "WHERE queue = ? AND bucket = ?",
                               (max(1, int((started - self.queue_margin) * 1_000_000)), queue, day))
                out += [QueueEntry(float(r["due"]), r["study_uid"], queue) for r in rows]
                if len(out) >= limit:
                    break
        return out

    @property
    def queue_margin(self) -> float:
        """Seconds before ``seen_at`` within which ``requeue`` keeps an entry written (``stale_claim_after``)."""
        return self.stale_claim_after

    def enqueue(self, entry: QueueEntry) -> None:
        with self._errors("enqueue"):
            self._groups.write(self._enqueue([entry.queue], entry.due, entry.study_uid))

    def requeue(self, entry: QueueEntry, due: float | None, *, seen_at: float) -> None:
        """The old entry is deleted ``USING TIMESTAMP`` of ``seen_at`` less ``stale_claim_after``: an entry
        written later (a registration or copy the caller may not have seen) stays."""
        with self._errors("requeue"):
            stmts = self._enqueue([entry.queue], due, entry.study_uid) if due is not None else []
            stmts.append((self._prep(
                f"DELETE FROM {self._t('study_queue')} USING TIMESTAMP ? "
                "WHERE queue = ? AND bucket = ? AND due = ? AND study_uid = ?"),
                (max(1, int((seen_at - self.queue_margin) * 1_000_000)), entry.queue,
                 math.floor(entry.due / _QUEUE_BUCKET), entry.due, entry.study_uid)))
            self._groups.write(stmts)

    def job_cursor(self, name: str) -> QueueEntry | None:
        with self._errors("job_cursor"):
            r = self._exec(f"SELECT queue, due, study_uid FROM {self._t('job_cursors')} WHERE name = ?",
                           (name,)).one()
        return None if r is None else QueueEntry(float(r["due"]), r["study_uid"], r["queue"])

    def set_job_cursor(self, name: str, entry: QueueEntry) -> None:
        with self._errors("set_job_cursor"):
            self._exec(f"INSERT INTO {self._t('job_cursors')} (name, queue, due, study_uid) VALUES (?, ?, ?, ?)",
                       (name, entry.queue, entry.due, entry.study_uid))

    def record_access(self, study_uid: str, when: float) -> None:
        """The write timestamp is the access time, so the newest access wins (no read-modify-write)."""
        with self._errors("record_access"):
            t = self._t("studies")
            if self._exec(f"SELECT study_uid FROM {t} WHERE study_uid = ?", (study_uid,)).one() is None:
                return
            self._exec(f"UPDATE {t} USING TIMESTAMP ? SET last_access = ? WHERE study_uid = ?",
                       (max(0, int(when * 1_000_000)), when, study_uid))

    def set_hold(self, study_uid: str, held: bool, reason: str = "") -> None:
        t = self._t("holds")
        with self._errors("set_hold"):
            if held:
                self._exec(f"INSERT INTO {t} (study_uid, reason, created_at) VALUES (?, ?, ?)",
                           (study_uid, reason, time.time()))
            else:
                self._exec(f"DELETE FROM {t} WHERE study_uid = ?", (study_uid,))

    def is_held(self, study_uid: str) -> bool:
        with self._errors("is_held"):
            return self._exec(f"SELECT study_uid FROM {self._t('holds')} WHERE study_uid = ?",
                              (study_uid,)).one() is not None

    # -- query ---------------------------------------------------------------
    def find(
        self, level: QueryLevel, conditions: Sequence[Condition], *, limit: int | None = None
    ) -> Iterator[dict[str, str]]:
        conds = list(conditions)
        rows = self._patient_rows(conds) if level is QueryLevel.PATIENT else self._rows(level, conds)
        return self._limited(rows, limit)

    def _limited(self, rows: Iterator[dict[str, str]], limit: int | None) -> Iterator[dict[str, str]]:
        n = 0
        if limit is not None and limit <= 0:
            return
        try:
            for row in rows:
                yield row
                n += 1
                if limit is not None and n >= limit:  # same check as SqliteIndex
                    return
        except _DRIVER_ERRORS as exc:
            raise _unavailable(exc, "find") from exc

    # candidate studies ------------------------------------------------------
    def _study_queries(self, level: QueryLevel, conds: Sequence[Condition]) -> list[_Query]:
        """SAI pushdown: one conjunction, or the alternatives of one fanned-out condition."""
        clauses: list[str] = []
        params: list[Any] = []
        used: set[str] = set()
        fan: list[_Query] | None = None

        def eq(col: str, value: Any) -> None:
            used.add(col)
            clauses.append(f"{col} = ?")
            params.append(value)

        for c in conds:
            kw = c.keyword
            if kw == "AccessionNumber":
                col = _STUDY_COLS[kw]
                if col in used:
                    continue
                if c.kind is MatchKind.SINGLE:
                    eq(col, c.values[0])
                elif c.kind is MatchKind.LIST and fan is None:
                    used.add(col)
                    fan = [_Query((f"{col} = ?",), (v,)) for v in dict.fromkeys(c.values)]
            elif kw == "StudyDate" and "study_day" not in used:
                if c.kind is MatchKind.SINGLE and (day := _parse_da(c.values[0])) is not None:
                    eq("study_day", day)
                elif c.kind is MatchKind.LIST and fan is None:
                    days = [_parse_da(v) for v in c.values]
                    if all(d is not None for d in days):
                        used.add("study_day")
                        fan = [_Query(("study_day = ?",), (d,)) for d in dict.fromkeys(days)]
                elif c.kind is MatchKind.RANGE and fan is None:
                    low, high = (_parse_da(v) if v else None for v in c.values)
                    if low is not None or high is not None:
                        used.add("study_day")
                        rng = [(op, d) for op, d in ((">=", low), ("<=", high)) if d is not None]
                        fan = [_Query(tuple(f"study_day {op} ?" for op, _ in rng), tuple(d for _, d in rng)),
                               _Query(("study_date_odd = ?",), (True,))]
            elif kw in ("ModalitiesInStudy", "Modality") and "modalities" not in used:
                if c.kind is MatchKind.SINGLE:
                    used.add("modalities")
                    clauses.append("modalities CONTAINS ?")
                    params.append(c.values[0])
                elif c.kind is MatchKind.LIST and fan is None:
                    used.add("modalities")
                    items = list(dict.fromkeys(c.values))
                    fan = [_Query(("modalities CONTAINS ?",), (m,), _seen_modality(items[:i]))
                           for i, m in enumerate(items)]
            elif kw == "PatientName" and "name" not in used:
                push = _name_pushdown(c)
                if push is not None:
                    used.add("name")
                    eq(*push)
        if fan is None:
            return [_Query(tuple(clauses), tuple(params))]
        return [_Query((*clauses, *q.clauses), (*params, *q.params), q.skip) for q in fan]

    def _studies_where(self, queries: Sequence[_Query]) -> Iterator[Row]:
        for q in queries:
            where = f" WHERE {' AND '.join(q.clauses)}" if q.clauses else ""
            for r in self._exec(f"SELECT * FROM {self._t('studies')}{where}", q.params):
                if q.skip is None or not q.skip(r):
                    yield r

    def _studies_by_uid(self, uids: Iterable[str]) -> Iterator[Row]:
        """Study rows of ``uids`` (those that exist), in the given order; IN queries of _IN_CHUNK keys."""
        chunk: list[str] = []
        for uid in uids:
            chunk.append(uid)
            if len(chunk) >= _IN_CHUNK:
                yield from self._studies_in(chunk)
                chunk = []
        if chunk:
            yield from self._studies_in(chunk)

    def _studies_in(self, uids: Sequence[str]) -> Iterator[Row]:
        found = {r["study_uid"]: r for r in self._rows_of(
            self._start_in(f"SELECT * FROM {self._t('studies')} WHERE study_uid IN ?", uids))}
        return (found[u] for u in uids if u in found)

    def _candidate_studies(self, level: QueryLevel, conds: Sequence[Condition]) -> Iterator[Row]:
        def uids(keyword: str) -> list[str] | None:
            for c in conds:
                if c.keyword == keyword and c.kind in (MatchKind.SINGLE, MatchKind.LIST):
                    return list(dict.fromkeys(c.values))
            return None

        study_uids = uids("StudyInstanceUID")
        if study_uids is not None:
            return self._studies_by_uid(study_uids)
        sop_uids = uids("SOPInstanceUID") if level is QueryLevel.IMAGE else None
        if sop_uids is not None:
            found: dict[str, None] = {}
            for cur in self._current(sop_uids).values():
                if cur is not None:
                    found[cur.study_uid] = None
            return self._studies_by_uid(found)
        series_uids = uids("SeriesInstanceUID") if level in (QueryLevel.SERIES, QueryLevel.IMAGE) else None
        if series_uids is not None:
            found = {}
            for suid in series_uids:
                for r in self._exec(f"SELECT study_uid FROM {self._t('series')} WHERE series_uid = ?", (suid,)):
                    found[r["study_uid"]] = None
            return self._studies_by_uid(found)
        patient_ids = uids("PatientID")
        if patient_ids is not None:  # the studies that carry the ID, as primary or other ID (may be stale)
            return self._studies_by_uid(self._studies_of_patient_keys(patient_ids))
        return self._studies_where(self._study_queries(level, conds))

    def _studies_of_patient_keys(self, pids: Iterable[str]) -> dict[str, None]:
        """UIDs of the studies ``studies_by_patient`` lists under the PatientIDs (stale entries included)."""
        found: dict[str, None] = {}
        for pid in dict.fromkeys(pids):
            for r in self._exec(f"SELECT study_uid FROM {self._t('studies_by_patient')} WHERE patient_key = ?",
                                (pid or _EMPTY_PATIENT,)):
                found[r["study_uid"]] = None
        return found

    # per-study content --------------------------------------------------------
    def _current(self, sop_uids: Sequence[str]) -> dict[str, _Current | None]:
        """Newest complete version (and where it lives) of each SOP instance."""
        out: dict[str, _Current | None] = {}
        results = self._concurrent(
            f"SELECT version, study_uid, series_uid, complete FROM {self._t('instance_versions')} WHERE sop_uid = ?",
            [(s,) for s in sop_uids])
        for sop, rows in zip(sop_uids, results):
            done = [r for r in rows if r["complete"]]
            out[sop] = _Current(int(done[0]["version"]), done[0]["study_uid"], done[0]["series_uid"]) if done else None
        return out

    def _start_in(self, cql: str, keys: Iterable[Any]) -> list[ResponseFuture]:
        """Start ``cql`` (ending in ``IN ?``) for the distinct ``keys``, _IN_CHUNK keys per request."""
        distinct = list(dict.fromkeys(keys))
        stmt = self._prep(cql)
        return [self._session.execute_async(stmt, (distinct[i:i + _IN_CHUNK],))
                for i in range(0, len(distinct), _IN_CHUNK)]

    @staticmethod
    def _rows_of(futures: Sequence[ResponseFuture]) -> Iterator[Row]:
        """Every row of started queries, in order (later pages are fetched while iterating)."""
        for f in futures:
            yield from f.result()

    def _instances(
        self, study_uid: str, keep: Callable[[Row], bool] | None, need_availability: bool
    ) -> list[_Inst]:
        """Visible instance rows of a study (those ``keep`` accepts), with availability flags."""
        return self._instances_many([study_uid], keep, need_availability).get(study_uid, [])

    def _instances_many(
        self, study_uids: Sequence[str], keep: Callable[[Row], bool] | None, need_availability: bool
    ) -> dict[str, list[_Inst]]:
        """Visible instance rows of several studies, by study (those ``keep`` accepts), with availability.

        Two waves of IN queries whatever the number of studies and instances: the
        studies' instance partitions, then the instances' instance_versions and
        placements partitions together (placements of every version are read and
        the invisible ones dropped). A row whose instance is visible was written
        after its placements (registration order), so they are there to be read.
        """
        rows = [r for r in self._rows_of(self._start_in(
                    f"SELECT * FROM {self._t('instances')} WHERE study_uid IN ?", study_uids))
                if keep is None or keep(r)]
        sops = [r["sop_uid"] for r in rows]
        versions = self._start_in(
            f"SELECT sop_uid, version, study_uid, series_uid, complete FROM {self._t('instance_versions')} "
            "WHERE sop_uid IN ?", sops)
        placements = self._start_in(
            f"SELECT sop_uid, version, tier, state FROM {self._t('placements')} WHERE sop_uid IN ?",
            sops) if need_availability and sops else []
        current: dict[str, _Current] = {}
        for v in self._rows_of(versions):  # newest version first within each partition
            if v["complete"] and v["sop_uid"] not in current:
                current[v["sop_uid"]] = _Current(int(v["version"]), v["study_uid"], v["series_uid"])
        flags: dict[tuple[str, int], tuple[bool, bool]] = {}
        for p in self._rows_of(placements):
            key = (p["sop_uid"], int(p["version"]))
            online, nearline = flags.get(key, (False, False))
            ok = p["state"] == "OK"
            flags[key] = (online or (ok and p["tier"] in ("hot", "cache")), nearline or ok)
        out: dict[str, list[_Inst]] = {}
        for r in rows:
            cur = current.get(r["sop_uid"])
            if cur is None or cur.version != r["version"] or cur.study_uid != r["study_uid"] \
                    or cur.series_uid != r["series_uid"]:
                continue
            online, nearline = flags.get((r["sop_uid"], int(r["version"])), (False, False))
            out.setdefault(r["study_uid"], []).append(_Inst(r, online, nearline))
        return out

    def _series_rows(self, study_uid: str) -> dict[str, dict[str, str]]:
        return self._series_of(self._start_series([study_uid])).get(study_uid, {})

    def _start_series(self, study_uids: Sequence[str]) -> list[ResponseFuture]:
        return self._start_in(f"SELECT * FROM {self._t('series')} WHERE study_uid IN ?", study_uids)

    def _series_of(self, futures: Sequence[ResponseFuture]) -> dict[str, dict[str, dict[str, str]]]:
        """study UID -> series UID -> series row, from started series queries."""
        out: dict[str, dict[str, dict[str, str]]] = {}
        for r in self._rows_of(futures):
            row = {"SeriesInstanceUID": r["series_uid"], "StudyInstanceUID": r["study_uid"]}
            row |= {kw: _s(r[col]) for kw, col in _SERIES_COLS.items()}
            out.setdefault(r["study_uid"], {})[r["series_uid"]] = row
        return out

    # rows --------------------------------------------------------------------
    def _rows(self, level: QueryLevel, conds: list[Condition]) -> Iterator[dict[str, str]]:
        """Candidates in batches of _DETAIL_BATCH studies, whose partitions are read together.

        Full batches are detailed on the index's worker threads, up to _DETAIL_AHEAD
        at once, while this thread pages through the candidates; rows come out in
        candidate order. A result that fits one batch is detailed inline.
        """
        study_conds = [c for c in conds if c.keyword in _STUDY_ROW_KEYS]
        batch: list[tuple[dict[str, str], Row]] = []
        pending: deque[Future[list[dict[str, str]]]] = deque()

        def submit(items: list[tuple[dict[str, str], Row]]) -> None:
            pending.append(self._workers().submit(lambda: list(self._batch_rows(level, conds, items))))

        try:
            for raw in self._candidate_studies(level, conds):
                base = _study_row(raw)
                if not matches_all(study_conds, base):
                    continue
                batch.append((base, raw))
                if len(batch) >= _DETAIL_BATCH:
                    submit(batch)
                    batch = []
                    while len(pending) >= _DETAIL_AHEAD:
                        yield from pending.popleft().result()
            if batch and not pending:
                yield from self._batch_rows(level, conds, batch)
            elif batch:
                submit(batch)
            while pending:
                yield from pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()

    def _workers(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=_DETAIL_WORKERS, thread_name_prefix="vna-cass-find")
            return self._executor

    def _batch_rows(self, level: QueryLevel, conds: list[Condition],
                    items: list[tuple[dict[str, str], Row]]) -> Iterator[dict[str, str]]:
        if level is QueryLevel.STUDY:
            yield from self._study_batch_rows(conds, items)
            return
        bases = [base for base, _raw in items]
        series_conds = [c for c in conds if c.keyword in _STUDY_ROW_KEYS | _SERIES_ROW_KEYS]
        stored_conds = [c for c in conds if c.keyword in _STUDY_ROW_KEYS | _SERIES_ROW_KEYS | _INSTANCE_ROW_KEYS]
        uids = [b["StudyInstanceUID"] for b in bases]
        series_futures = self._start_series(uids)
        base_of = {b["StudyInstanceUID"]: b for b in bases}
        wanted: dict[str, dict[str, dict[str, str]]] = {}  # study -> series passing series_conds
        for uid, series in self._series_of(series_futures).items():
            if uid in base_of:
                wanted[uid] = {k: s for k, s in series.items() if matches_all(series_conds, base_of[uid] | s)}
        if level is QueryLevel.SERIES:
            insts_by = self._instances_many([u for u in uids if wanted.get(u)],
                                            lambda r: r["series_uid"] in wanted[r["study_uid"]], True)
            for base in bases:
                uid = base["StudyInstanceUID"]
                insts = insts_by.get(uid, [])
                for suid, s in wanted.get(uid, {}).items():
                    mine = [i for i in insts if i.row["series_uid"] == suid]
                    if not mine:
                        continue
                    row = base | s | {
                        "NumberOfSeriesRelatedInstances": str(len(mine)),
                        "InstanceAvailability": _availability(mine),
                    }
                    if matches_all(conds, row):
                        yield row
            return

        def keep(r: Row) -> bool:
            s = wanted[r["study_uid"]].get(r["series_uid"])
            return s is not None and matches_all(stored_conds, base_of[r["study_uid"]] | s | _instance_row(r))

        insts_by = self._instances_many([u for u in uids if wanted.get(u)], keep, True)
        for base in bases:
            uid = base["StudyInstanceUID"]
            for i in insts_by.get(uid, []):
                part = _instance_row(i.row)
                row = base | wanted[uid][i.row["series_uid"]] | part | {
                    "InstanceAvailability": _availability([i]),
                    "AvailableTransferSyntaxUID": part["TransferSyntaxUID"],
                }
                if matches_all(conds, row):
                    yield row

    def _study_batch_rows(self, conds: list[Condition],
                          items: list[tuple[dict[str, str], Row]]) -> Iterator[dict[str, str]]:
        """STUDY rows: computed keys from valid summaries, else from the partitions (then stored)."""
        summaries = {base["StudyInstanceUID"]: self._summary(raw) for base, raw in items}
        stale = [raw for base, raw in items if summaries[base["StudyInstanceUID"]] is None]
        computed: dict[str, dict[str, str]] = {}
        if stale:
            uids = [raw["study_uid"] for raw in stale]
            series_futures = self._start_series(uids)
            insts_by = self._instances_many(uids, None, True)
            series_by = self._series_of(series_futures)
            computed = {uid: _study_computed(insts, series_by.get(uid, {})) for uid, insts in insts_by.items()}
            self._store_summaries(stale, computed)
        for base, _raw in items:
            uid = base["StudyInstanceUID"]
            keys = summaries[uid] or computed.get(uid)
            if keys is None or keys["NumberOfStudyRelatedInstances"] in ("", "0"):
                continue
            row = base | keys
            if matches_all(conds, row):
                yield row

    def _patient_rows(self, conds: list[Condition]) -> Iterator[dict[str, str]]:
        """PATIENT rows: one per (PatientID, IssuerOfPatientID) of the studies, grouped by primary PatientID."""
        allowed = set(LEVEL_KEYS[QueryLevel.PATIENT]) | set(COMPUTED_KEYS[QueryLevel.PATIENT])
        if any(c.keyword not in allowed for c in conds):
            return  # the PATIENT row lacks that key: nothing can match (as in SQLite)
        pid_cond = next((c for c in conds if c.keyword == "PatientID"
                         and c.kind in (MatchKind.SINGLE, MatchKind.LIST)), None)
        pids: Iterable[str]
        if pid_cond is not None:  # the primary PatientIDs of the studies carrying one of the IDs
            listed = self._studies_of_patient_keys(pid_cond.values)
            pids = _unique(_s(raw["patient_id"]) for raw in self._studies_by_uid(listed))
        else:
            queries = self._study_queries(QueryLevel.PATIENT, conds)
            if any(q.clauses for q in queries):
                pids = _unique(_s(r["patient_id"]) for r in self._studies_where(queries))
            elif "IssuerOfPatientID" in (kws := {c.keyword for c in conds}) and "PatientID" not in kws:
                # no index serves it: every patient's studies would be read to answer a few
                raise InvalidInput("a PATIENT-level query by IssuerOfPatientID needs a PatientID or a "
                                   "PatientName on the Cassandra index")
            else:
                pids = (("" if r["patient_key"] == _EMPTY_PATIENT else r["patient_key"])
                        for r in self._exec(f"SELECT DISTINCT patient_key FROM {self._t('studies_by_patient')}"))
        for pid in pids:
            for row in self._patients_of(pid, conds):
                if matches_all(conds, row):
                    yield row

    def _patients_of(self, pid: str, conds: list[Condition]) -> list[dict[str, str]]:
        """The PATIENT rows of the studies whose primary PatientID is ``pid``, one per issuer.

        Aggregated like SqliteIndex: ``max`` over the studies its WHERE clause keeps
        (:func:`_sqlite_where`; identity conditions jointly on one identity of the
        study, as its ``patient_ids`` subquery), the other IDs of those studies.
        """
        uids = [r["study_uid"] for r in self._exec(
            f"SELECT study_uid FROM {self._t('studies_by_patient')} WHERE patient_key = ?",
            (pid or _EMPTY_PATIENT,))]
        raws = [raw for raw in self._studies_by_uid(uids)
                if _s(raw["patient_id"]) == pid]  # else another ID of the study, or a stale entry
        insts_by = self._instances_many([raw["study_uid"] for raw in raws], None, False)
        where = [c for c in conds if c.keyword in _PATIENT_COLS and c.keyword not in IDENTITY_KEYS]
        ident = [c for c in conds if c.keyword in IDENTITY_KEYS]

        def kept(s: dict[str, str]) -> bool:
            return all(_sqlite_where(c, s[c.keyword]) for c in where) and (not ident or any(
                all(_sqlite_where(c, (p if c.keyword == "PatientID" else i) or "") for c in ident)
                for p, i in identities(s)))

        groups: dict[str, list[Row]] = {}
        for raw in raws:
            groups.setdefault(_s(raw["issuer_of_patient_id"]), []).append(raw)
        out: list[dict[str, str]] = []
        for issuer, group in groups.items():
            visible: list[dict[str, str]] = []
            series: set[str] = set()
            instances = 0
            for raw in group:
                insts = insts_by.get(raw["study_uid"])
                if insts:
                    visible.append(_study_row(raw))
                    series |= {i.row["series_uid"] for i in insts}
                    instances += len(insts)
            passed = [s for s in visible if kept(s)]
            if not passed:
                continue
            row = {"PatientID": pid, "IssuerOfPatientID": issuer}
            row |= {kw: max(s[kw] for s in passed) for kw in LEVEL_KEYS[QueryLevel.PATIENT] if kw not in row}
            row[OTHER_IDS_KEY] = encode_other_ids(p for s in passed for p in decode_other_ids(s[OTHER_IDS_KEY]))
            row |= {
                "NumberOfPatientRelatedStudies": str(len(visible)),
                "NumberOfPatientRelatedSeries": str(len(series)),
                "NumberOfPatientRelatedInstances": str(instances),
            }
            out.append(row)
        return out

    # -- stats & leases --------------------------------------------------------
    def stats(self) -> IndexStats:
        """The maintained counters (:mod:`vna.index.cassandra_counters`): totals plus pending deltas,
        a read of its few shard partitions, not a scan."""
        with self._errors("stats"):
            return self._counters.read()

    def recount(self) -> tuple[IndexStats, IndexStats]:
        """(maintained, recounted) by a full scan; the maintained totals are repaired to the recount.
        O(catalogue): operators only, exact when no ingest is in flight."""
        with self._errors("recount"):
            return self._counters.recount(repair=True)

    def rollup_counters(self, *, margin: float | None = None) -> int:
        """Fold pending counter deltas into the totals now (the background roll-up does it anyway)."""
        with self._errors("rollup_counters"):
            return self._counters.rollup(margin=margin)

    def acquire_lease(self, name: str, owner: str, ttl: float) -> bool:
        t = self._t("leases")
        with self._errors("acquire_lease"):
            for _attempt in range(3):
                now = time.time()
                # The row's TTL only collects the row; expires_at decides. Cassandra counts
                # a TTL from the current whole second, so a row can vanish up to 1 s
                # early: the extra second keeps it for at least ``ttl``.
                seconds = math.ceil(ttl) + 1
                res = self._exec(f"INSERT INTO {t} (name, owner, expires_at) VALUES (?, ?, ?) "
                                 "IF NOT EXISTS USING TTL ?", (name, owner, now + ttl, seconds))
                if res.was_applied:
                    return True
                cur = res.one()
                if cur["owner"] != owner and float(cur["expires_at"]) > now:
                    return False
                res = self._exec(f"UPDATE {t} USING TTL ? SET owner = ?, expires_at = ? WHERE name = ? "
                                 "IF owner = ? AND expires_at = ?",
                                 (seconds, owner, now + ttl, name, cur["owner"], cur["expires_at"]))
                if res.was_applied:
                    return True
            return False

    def release_lease(self, name: str, owner: str) -> None:
        with self._errors("release_lease"):
            self._exec(f"DELETE FROM {self._t('leases')} WHERE name = ? IF owner = ?", (name, owner))


def _seen_modality(earlier: list[str]) -> Callable[[Row], bool]:
    """Skip a study an earlier CONTAINS query of the same fan-out already returned."""
    def skip(r: Row) -> bool:
        mods = r.get("modalities") or ()
        return any(m in mods for m in earlier)
    return skip


def _unique(values: Iterable[str]) -> Iterator[str]:
    seen: set[str] = set()
    for v in values:
        if v not in seen:
            seen.add(v)
            yield v


def _study_row(r: Row) -> dict[str, str]:
    row = {"StudyInstanceUID": str(r["study_uid"])}
    row |= {kw: _s(r[col]) for kw, col in _STUDY_COLS.items()}
    row["updated_at"] = _s(r["updated_at"])
    row["last_access"] = _s(r.get("last_access"))
    row[OTHER_IDS_KEY] = "\n".join(sorted(r.get("other_ids") or ()))
    return row


def _instance_row(r: Row) -> dict[str, str]:
    row = {
        "SOPInstanceUID": str(r["sop_uid"]), "SeriesInstanceUID": str(r["series_uid"]),
        "StudyInstanceUID": str(r["study_uid"]), "version": _s(r["version"]),
        "SOPClassUID": _s(r["sop_class_uid"]), "TransferSyntaxUID": _s(r["transfer_syntax_uid"]),
        "content_sha256": _s(r["content_sha256"]), "content_size": _s(r["content_size"]),
        "received_at": _s(r["received_at"]), "source_ae": _s(r["source_ae"]),
    }
    row |= {kw: _s(r[col]) for kw, col in _INSTANCE_COLS.items()}
    return row


def _flags(state: PlacementState, tier: Tier) -> tuple[bool, bool]:
    """What a placement contributes to InstanceAvailability: (online, nearline)."""
    ok = state is PlacementState.OK
    return ok and tier.value in ("hot", "cache"), ok


def _study_computed(insts: Sequence[_Inst], series: dict[str, dict[str, str]]) -> dict[str, str]:
    """The computed STUDY keys from a study's visible instances and its series rows."""
    visible_series = {i.row["series_uid"] for i in insts}
    mods = sorted({s["Modality"] for k, s in series.items() if k in visible_series and s["Modality"]})
    return {
        "ModalitiesInStudy": "\\".join(mods),
        "NumberOfStudyRelatedSeries": str(len(visible_series)),
        "NumberOfStudyRelatedInstances": str(len(insts)),
        "InstanceAvailability": _availability(insts),
    }


def _availability(insts: Sequence[_Inst]) -> str:
    if insts and all(i.online for i in insts):
        return "ONLINE"
    if insts and all(i.nearline for i in insts):
        return "NEARLINE"
    return "UNAVAILABLE"
