"""The Index port: the catalogue (query attributes) and the placement ledger.

Contract (every adapter, checked by ``tests/contracts/test_index.py``):

- ``register`` is atomic: the instance version, its catalogue rows and all its
  placements become visible together or not at all. Registering an existing
  ``(sop_uid, version)`` raises StateConflict and changes nothing.
- Placement state changes are compare-and-set (``transition``).
- ``find`` applies :mod:`vna.index.query` semantics exactly, whatever the
  adapter pushes down; it yields rows lazily.
- Backend failures raise IndexUnavailable; nothing else escapes.
"""

from __future__ import annotations

import datetime as _dt
import math
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Mapping, Protocol, Sequence

from vna.domain import InstanceRecord, Placement, PlacementState, QueryLevel, Tier, site_of
from vna.index.query import Condition

__all__ = ["Index", "IndexStats", "TierStats", "StudySummary", "AbandonedRegistration", "QueueEntry",
           "lifecycle_queue", "lifecycle_queues", "queue_due", "study_date_epoch", "copy_log", "copy_logs",
           "log_due", "LOG_STEP"]

#: seconds of change time per entry of a copy log (a study changed within one step has one entry)
LOG_STEP = 60.0


def lifecycle_queue(site: str) -> str:
    """The work queue of the lifecycle job of ``site``: studies that may hold a hot copy there."""
    return f"hot:{site}"


def lifecycle_queues(placements: Iterable[Placement]) -> set[str]:
    """The lifecycle queues a study enters when these placements are written (one per site with a hot copy)."""
    return {lifecycle_queue(site_of(p.store_id)) for p in placements if p.tier is Tier.HOT}


def copy_log(site: str) -> str:
    """The log of ``site``'s holdings: studies by the time one of their instances got a verified copy there."""
    return f"held:{site}"


def copy_logs(placements: Iterable[Placement]) -> set[str]:
    """The copy logs a study enters when these placements are written or become OK (one per site)."""
    return {copy_log(site_of(p.store_id)) for p in placements if p.state is PlacementState.OK}


def log_due(changed_at: float) -> float:
    """The copy-log key of a change: its time, down to a multiple of ``LOG_STEP``."""
    return math.floor(changed_at / LOG_STEP) * LOG_STEP


def queue_due(received_at: float, attrs: Mapping[str, object]) -> float:
    """The lifecycle queue key of an instance: a time its study's age cannot precede under any
    ``lifecycle.age_basis``: 00:00 UTC of its reception day, or of its StudyDate if earlier (so the
    instances of a study received on one day share one entry)."""
    received = math.floor(received_at / 86400.0) * 86400.0
    day = study_date_epoch(str(attrs.get("StudyDate", "")))
    return received if day is None else min(received, day)


def study_date_epoch(value: str) -> float | None:
    """00:00 UTC of a StudyDate (its first 8 characters, YYYYMMDD), None if it is not one."""
    try:
        d = _dt.datetime.strptime(value.strip()[:8], "%Y%m%d").replace(tzinfo=_dt.timezone.utc)
    except ValueError:
        return None
    return d.timestamp()


@dataclass(frozen=True, order=True)
class QueueEntry:
    """One entry of a study work queue (ordered by ``due``, then study UID)."""

    due: float
    study_uid: str
    queue: str


@dataclass(frozen=True)
class StudySummary:
    """What the lifecycle manager needs to decide about one study."""

    study_uid: str
    study_date: str
    modalities: tuple[str, ...]
    source_aes: tuple[str, ...]
    last_received: float
    last_access: float | None
    held: bool
    instances: int


@dataclass(frozen=True)
class TierStats:
    """Placement counts and bytes for one tier."""

    placements: int = 0
    stored_bytes: int = 0
    by_state: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class IndexStats:
    """Counts for ``vna index stats``."""

    patients: int
    studies: int
    series: int
    instances: int
    content_bytes: int
    tiers: dict[str, TierStats]


@dataclass(frozen=True)
class AbandonedRegistration:
    """A registration begun and never committed with its bytes (its writer died or gave up).

    Invisible to every reader; its rows wait for :meth:`Index.clean_abandoned`.
    """

    sop_uid: str
    version: int
    content_sha256: str
    study_uid: str
    started_at: float


class Index(Protocol):
    """Catalogue and placement ledger."""

    def migrate(self) -> int:
        """Create or upgrade the schema idempotently; return the schema version."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...

    def release_thread(self) -> None:
        """Release what the calling thread holds (a connection of its own); its next call reopens it.

        Called when an association's thread is done, so that resources do not wait for the garbage collector.
        """
        ...

    def get_instance(self, sop_uid: str) -> InstanceRecord | None:
        """The current (newest) version of an instance, or None."""
        ...

    def register(self, record: InstanceRecord, placements: Sequence[Placement]) -> None:
        """Atomically record an instance version, its catalogue rows and placements."""
        ...

    def placements(self, sop_uid: str, version: int | None = None) -> list[Placement]:
        """Placements of one version (default: the current one)."""
        ...

    def placements_many(self, sop_uids: Sequence[str]) -> dict[str, list[Placement]]:
        """Placements of the current version of each instance, by SOP Instance UID, in a bounded number of
        backend round trips whatever the number of UIDs (as :meth:`placements` each); an instance that is
        not registered (or not visible) maps to an empty list."""
        ...

    def transition(
        self,
        placement: Placement,
        new_state: PlacementState,
        *,
        verified_at: float | None = None,
    ) -> bool:
        """Set ``new_state`` iff the stored state still equals ``placement.state``.

        Moving a placement to TO_DELETE is refused (returns False) unless another
        placement of the same instance version is OK.
        """
        ...

    def find(
        self, level: QueryLevel, conditions: Sequence[Condition], *, limit: int | None = None
    ) -> Iterator[dict[str, str]]:
        """Matching rows at ``level`` with every key of that level and above, computed keys included."""
        ...

    # -- placement ledger (jobs) --------------------------------------------
    def add_placements(self, placements: Sequence[Placement]) -> None:
        """Record new copies (e.g. PENDING cold copies) of registered instance versions.

        Raises StateConflict (and records none) if any (sop_uid, version, store_id) exists.
        """
        ...

    def replace_placement(self, old: Placement, new: Placement) -> bool:
        """Replace a copy's row iff its stored state and blob key still equal ``old``'s.

        Same (sop_uid, version, store_id). Used to finish a PENDING copy (digests,
        OK) and to repair a damaged copy under a new blob key. Moving to
        TO_DELETE follows the rule of :meth:`transition`.
        """
        ...

    def delete_placement(self, placement: Placement) -> bool:
        """Remove the row iff it is still TO_DELETE with the same blob key (purge: blob first, row second)."""
        ...

    def iter_placements(
        self,
        *,
        tier: Tier | None = None,
        states: Sequence[PlacementState] | None = None,
        store_id: str | None = None,
        limit: int | None = None,
    ) -> Iterator[Placement]:
        """Placements of current and old versions, never-verified first, then oldest ``verified_at``."""
        ...

    # -- studies (lifecycle) ---------------------------------------------------
    def study_instances(self, study_uid: str) -> list[InstanceRecord]:
        """The current version of every instance of the study (sorted by series, SOP UID)."""
        ...

    def iter_studies(self, *, received_before: float | None = None, limit: int | None = None) -> Iterator[StudySummary]:
        """Studies (optionally only those whose newest instance arrived before the time), oldest first."""
        ...

    def study_summary(self, study_uid: str) -> StudySummary | None:
        """The summary of one study (as :meth:`iter_studies` gives it), None if it has no visible instance."""
        ...

    # -- study work queues (jobs) ----------------------------------------------
    # A queue lists studies a job may have work on, by due time; the index adds
    # entries when it writes placements (``register`` and ``add_placements`` put
    # a study in ``lifecycle_queue(site)`` of every site with a hot copy in them,
    # due ``queue_due`` of the instance); only the job removes or moves them
    # (``requeue``), after it has seen the study has nothing to do before then.
    # A *copy log* (``copy_log(site)``) is a queue nobody removes from: a study
    # enters it, due ``log_due(now)``, whenever one of its instances gets an OK
    # copy at the site (``register``, ``add_placements``, and ``transition`` /
    # ``replace_placement`` to OK); readers keep a cursor (``job_cursor``).
    def queued(self, queue: str, *, upto: float | None = None, after: QueueEntry | None = None,
               limit: int = 1000) -> list[QueueEntry]:
        """At most ``limit`` entries of ``queue`` due at or before ``upto``, strictly after ``after``,
        in (due, study UID) order. A study may have several entries (at different due times)."""
        ...

    @property
    def queue_margin(self) -> float:
        """See :meth:`requeue`."""
        ...

    def enqueue(self, entry: QueueEntry) -> None:
        """Add ``entry`` (a job parking a study in a queue of its own); idempotent."""
        ...

    def requeue(self, entry: QueueEntry, due: float | None, *, seen_at: float) -> None:
        """Move ``entry`` to ``due`` (remove it when None), unless it was written again after ``seen_at``
        (the caller's clock before it read the study): a change since then keeps its entry (so does any
        write within the adapter's ``queue_margin`` seconds before ``seen_at``; a kept entry may be
        moved anyway, leaving both)."""
        ...

    def job_cursor(self, name: str) -> QueueEntry | None:
        """The entry a job's pass over a queue last finished (None: from the start)."""
        ...

    def set_job_cursor(self, name: str, entry: QueueEntry) -> None:
        """Record how far the job ``name`` has read."""
        ...

    def record_access(self, study_uid: str, when: float) -> None:
        """Note that the study was read (for ``age_basis = "last_access"``)."""
        ...

    def set_hold(self, study_uid: str, held: bool, reason: str = "") -> None:
        """Place or lift a legal hold: a held study is never migrated or deleted."""
        ...

    def is_held(self, study_uid: str) -> bool:
        """True if the study is under legal hold."""
        ...

    def stats(self) -> IndexStats:
        """Counts and bytes per tier. Cheap: no scan of the catalogue where the adapter maintains them."""
        ...

    def recount(self) -> tuple[IndexStats, IndexStats]:
        """(maintained, recounted): a full recount, which also repairs maintained counters.
        O(catalogue): for operators (``vna index stats --recount``), never on a request path."""
        ...

    def abandoned_registrations(self, *, older_than: float | None = None,
                                limit: int | None = None) -> list[AbandonedRegistration]:
        """Registrations begun at least ``older_than`` seconds ago (adapter default when None) and never
        committed with their bytes, oldest first. Always empty where registration is one transaction."""
        ...

    def clean_abandoned(self, *, older_than: float | None = None, limit: int | None = None) -> int:
        """Remove the leftovers of abandoned registrations (at most ``limit``); idempotent. Returns how many."""
        ...

    def acquire_lease(self, name: str, owner: str, ttl: float) -> bool:
        """Take or renew the named lease for ``ttl`` seconds; False if another owner holds it."""
        ...

    def release_lease(self, name: str, owner: str) -> None:
        """Release the lease if ``owner`` holds it."""
        ...
