"""The migration ledger port: plans and progress of migrations, stored beside the index.

A study of a source is in one state: ``planned`` (to pull), ``done`` (pulled
and verified) or ``failed`` (the last attempt did not verify; retried after
``next_attempt_at`` until ``max_attempts``). A worker holds a study through a
lease (owner, expiry), renewed while it works on the study; a lease whose
owner process is dead on this host, or whose expiry has passed, may be taken
over. Counters per (source, state) are
kept incrementally with every transition, so ``status`` reads no study rows.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

from vna.errors import IndexUnavailable, LeaseHeld

__all__ = ["STATES", "StudyPlan", "Outcome", "Counts", "MigrationLedger", "SqliteLedger", "new_owner",
           "owner_dead"]

STATES = ("planned", "done", "failed")


@dataclass
class StudyPlan:
    """One study a source listed, with what it said the study holds."""

    source: str
    study_uid: str
    study_date: str = ""
    expected_series: int = -1       # -1: the source did not say
    expected_instances: int = -1
    state: str = "planned"
    attempts: int = 0
    archived_instances: int = 0
    bytes: int = 0
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    status: int = -1                # DIMSE status of the last failed operation (-1: none)
    comment: str = ""
    next_attempt_at: float = 0.0
    done_at: float = 0.0


@dataclass
class Outcome:
    """What one attempt at a study ended in."""

    verified: bool
    expected_instances: int
    archived_instances: int
    bytes: int
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    status: int = -1
    comment: str = ""


@dataclass
class Counts:
    """Counters of one (source, state): studies, expected instances, archived instances, bytes."""

    studies: int = 0
    instances: int = 0
    archived: int = 0
    bytes: int = 0


class MigrationLedger(Protocol):
    """Where plans and progress live (atomic per call; safe from several processes)."""

    def migrate(self) -> None:
        """Create the ledger's tables (idempotent)."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...

    def add_planned(self, plans: Sequence[StudyPlan]) -> int:
        """Record studies a plan found; a study already known keeps its state. Returns how many were new."""
        ...

    def claim(self, source: str, owner: str, ttl: float, now: float, limit: int,
              max_attempts: int) -> list[StudyPlan]:
        """Lease up to ``limit`` due studies (planned, or failed and due for a retry) to ``owner``."""
        ...

    def renew(self, source: str, study_uid: str, owner: str, ttl: float, now: float) -> bool:
        """Extend ``owner``'s lease on the study to ``now + ttl``; False (nothing changed) when ``owner``
        no longer holds it."""
        ...

    def finish(self, source: str, study_uid: str, owner: str, outcome: Outcome, now: float,
               retry_at: float) -> str:
        """Record an attempt's outcome and drop the lease; returns the new state.

        ``done`` only when ``outcome.verified``. Raises LeaseHeld when ``owner``
        no longer holds the lease (another worker took the study over).
        """
        ...

    def get(self, source: str, study_uid: str) -> StudyPlan | None:
        """One study's row, or None."""
        ...

    def counts(self, source: str) -> dict[str, Counts]:
        """The counters of each state of ``source`` (no scan of study rows)."""
        ...

    def times(self, source: str) -> tuple[float, float]:
        """(first done_at, last done_at) of the source (0.0 when none)."""
        ...

    def sources(self) -> list[str]:
        """Sources that have a plan."""
        ...

    def studies(self, source: str, state: str | None = None) -> Iterator[StudyPlan]:
        """Every study of a source (of one state): a batch listing for reports, not a request path."""
        ...


def new_owner() -> str:
    """A lease owner id for this process: host, pid and a random part."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def owner_dead(owner: str) -> bool:
    """True if ``owner`` is a process of this host that no longer runs."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def row_plan(r: Any) -> StudyPlan:
    """A StudyPlan from a mapping row with the ledger's column names."""
    return StudyPlan(
        source=r["source"], study_uid=r["study_uid"], study_date=r["study_date"] or "",
        expected_series=r["expected_series"], expected_instances=r["expected_instances"], state=r["state"],
        attempts=r["attempts"], archived_instances=r["archived_instances"], bytes=r["bytes"],
        missing=json.loads(r["missing"] or "[]"), extra=json.loads(r["extra"] or "[]"), status=r["status"],
        comment=r["comment"] or "", next_attempt_at=r["next_attempt_at"], done_at=r["done_at"])


_SCHEMA = """
CREATE TABLE IF NOT EXISTS migrate_study (
    source TEXT NOT NULL, study_uid TEXT NOT NULL, study_date TEXT NOT NULL DEFAULT '',
    expected_series INTEGER NOT NULL DEFAULT -1, expected_instances INTEGER NOT NULL DEFAULT -1,
    state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    archived_instances INTEGER NOT NULL DEFAULT 0, bytes INTEGER NOT NULL DEFAULT 0,
    missing TEXT NOT NULL DEFAULT '[]', extra TEXT NOT NULL DEFAULT '[]',
    status INTEGER NOT NULL DEFAULT -1, comment TEXT NOT NULL DEFAULT '',
    next_attempt_at REAL NOT NULL DEFAULT 0, done_at REAL NOT NULL DEFAULT 0,
    lease_owner TEXT NOT NULL DEFAULT '', lease_expires REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (source, study_uid)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS migrate_study_due ON migrate_study (source, state, next_attempt_at);
CREATE TABLE IF NOT EXISTS migrate_count (
    source TEXT NOT NULL, state TEXT NOT NULL, studies INTEGER NOT NULL DEFAULT 0,
    instances INTEGER NOT NULL DEFAULT 0, archived INTEGER NOT NULL DEFAULT 0, bytes INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (source, state)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS migrate_source (
    source TEXT PRIMARY KEY, first_done_at REAL NOT NULL DEFAULT 0, last_done_at REAL NOT NULL DEFAULT 0
);
"""


class SqliteLedger:
    """The ledger in SQLite: own tables and connection (per thread) on the index's file, WAL."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self.path = path
        self.timeout = timeout
        self._local = threading.local()

    def _db(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                db = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None,
                                     check_same_thread=False)
                db.row_factory = sqlite3.Row
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")
            except sqlite3.Error as exc:
                raise IndexUnavailable(f"migration ledger: cannot open {self.path}: {exc}") from exc
            self._local.db = db
        return db

    def _tx(self, fn: Any) -> Any:
        db = self._db()
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                out = fn(db)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return out
        except sqlite3.Error as exc:
            raise IndexUnavailable(f"migration ledger: {exc}") from exc

    def migrate(self) -> None:
        """Create the tables (idempotent)."""
        try:
            self._db().executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise IndexUnavailable(f"migration ledger: {exc}") from exc

    def close(self) -> None:
        """Close this thread's connection."""
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    @staticmethod
    def _count(db: sqlite3.Connection, source: str, state: str, sign: int, p: StudyPlan) -> None:
        db.execute("INSERT INTO migrate_count (source, state) VALUES (?, ?) ON CONFLICT DO NOTHING",
                   (source, state))
        db.execute("UPDATE migrate_count SET studies = studies + ?, instances = instances + ?, "
                   "archived = archived + ?, bytes = bytes + ? WHERE source = ? AND state = ?",
                   (sign, sign * max(p.expected_instances, 0), sign * p.archived_instances, sign * p.bytes,
                    source, state))

    def add_planned(self, plans: Sequence[StudyPlan]) -> int:
        """Insert new studies as planned (known ones are left as they are)."""
        def run(db: sqlite3.Connection) -> int:
            new = 0
            for p in plans:
                cur = db.execute(
                    "INSERT INTO migrate_study (source, study_uid, study_date, expected_series, expected_instances,"
                    " state) VALUES (?, ?, ?, ?, ?, 'planned') ON CONFLICT DO NOTHING",
                    (p.source, p.study_uid, p.study_date, p.expected_series, p.expected_instances))
                if cur.rowcount:
                    new += 1
                    self._count(db, p.source, "planned", 1, StudyPlan(p.source, p.study_uid,
                                                                       expected_instances=p.expected_instances))
                db.execute("INSERT INTO migrate_source (source) VALUES (?) ON CONFLICT DO NOTHING", (p.source,))
            return new
        return int(self._tx(run))

    def claim(self, source: str, owner: str, ttl: float, now: float, limit: int,
              max_attempts: int) -> list[StudyPlan]:
        """Lease due studies, oldest StudyDate first."""
        def run(db: sqlite3.Connection) -> list[StudyPlan]:
            out: list[StudyPlan] = []
            for state, extra in (("planned", ""), ("failed", " AND attempts < ?")):
                if len(out) >= limit:
                    break
                params: list[Any] = [source, state, now]
                if extra:
                    params.append(max_attempts)
                rows = db.execute(
                    "SELECT * FROM migrate_study WHERE source = ? AND state = ? AND next_attempt_at <= ?"
                    f"{extra} ORDER BY next_attempt_at, study_date, study_uid", params)
                for r in rows:
                    if len(out) >= limit:
                        break
                    if r["lease_owner"] and r["lease_expires"] > now and not owner_dead(r["lease_owner"]):
                        continue
                    db.execute("UPDATE migrate_study SET lease_owner = ?, lease_expires = ? "
                               "WHERE source = ? AND study_uid = ?", (owner, now + ttl, source, r["study_uid"]))
                    out.append(row_plan(r))
            return out
        return list(self._tx(run))

    def renew(self, source: str, study_uid: str, owner: str, ttl: float, now: float) -> bool:
        """Extend the lease if ``owner`` holds it."""
        def run(db: sqlite3.Connection) -> bool:
            cur = db.execute("UPDATE migrate_study SET lease_expires = ? WHERE source = ? AND study_uid = ? AND "
                             "lease_owner = ?", (now + ttl, source, study_uid, owner))
            return cur.rowcount == 1
        return bool(self._tx(run))

    def finish(self, source: str, study_uid: str, owner: str, outcome: Outcome, now: float,
               retry_at: float) -> str:
        """Record the outcome (done only if verified) and release the lease."""
        def run(db: sqlite3.Connection) -> str:
            r = db.execute("SELECT * FROM migrate_study WHERE source = ? AND study_uid = ?",
                           (source, study_uid)).fetchone()
            if r is None or r["lease_owner"] != owner:
                raise LeaseHeld(f"study {study_uid} of {source} is no longer leased to this worker")
            old = row_plan(r)
            new = _after(old, outcome, now, retry_at)
            db.execute(
                "UPDATE migrate_study SET state = ?, attempts = ?, expected_instances = ?, archived_instances = ?,"
                " bytes = ?, missing = ?, extra = ?, status = ?, comment = ?, next_attempt_at = ?, done_at = ?,"
                " lease_owner = '', lease_expires = 0 WHERE source = ? AND study_uid = ?",
                (new.state, new.attempts, new.expected_instances, new.archived_instances, new.bytes,
                 json.dumps(new.missing), json.dumps(new.extra), new.status, new.comment, new.next_attempt_at,
                 new.done_at, source, study_uid))
            self._count(db, source, old.state, -1, old)
            self._count(db, source, new.state, 1, new)
            if new.state == "done":
                db.execute("UPDATE migrate_source SET last_done_at = ?, first_done_at = CASE WHEN first_done_at = 0"
                           " THEN ? ELSE first_done_at END WHERE source = ?", (now, now, source))
            return new.state
        return str(self._tx(run))

    def get(self, source: str, study_uid: str) -> StudyPlan | None:
        """One study."""
        r = self._db().execute("SELECT * FROM migrate_study WHERE source = ? AND study_uid = ?",
                               (source, study_uid)).fetchone()
        return None if r is None else row_plan(r)

    def counts(self, source: str) -> dict[str, Counts]:
        """Counters per state."""
        rows = self._db().execute("SELECT * FROM migrate_count WHERE source = ?", (source,))
        out = {s: Counts() for s in STATES}
        for r in rows:
            out[r["state"]] = Counts(r["studies"], r["instances"], r["archived"], r["bytes"])
        return out

    def times(self, source: str) -> tuple[float, float]:
        """First and last done_at."""
        r = self._db().execute("SELECT * FROM migrate_source WHERE source = ?", (source,)).fetchone()
        return (0.0, 0.0) if r is None else (float(r["first_done_at"]), float(r["last_done_at"]))

    def sources(self) -> list[str]:
        """Sources with a plan."""
        return [r[0] for r in self._db().execute("SELECT source FROM migrate_source ORDER BY source")]

    def studies(self, source: str, state: str | None = None) -> Iterator[StudyPlan]:
        """Studies of a source (of one state), in study UID order."""
        if state is None:
            rows = self._db().execute("SELECT * FROM migrate_study WHERE source = ? ORDER BY study_uid", (source,))
        else:
            rows = self._db().execute("SELECT * FROM migrate_study WHERE source = ? AND state = ? "
                                      "ORDER BY study_uid", (source, state))
        for r in rows.fetchall():
            yield row_plan(r)


def _after(old: StudyPlan, o: Outcome, now: float, retry_at: float) -> StudyPlan:
    """The study's row after an attempt ended in ``o``."""
    verified = o.verified and not o.missing
    return StudyPlan(
        source=old.source, study_uid=old.study_uid, study_date=old.study_date, expected_series=old.expected_series,
        expected_instances=o.expected_instances if o.expected_instances >= 0 else old.expected_instances,
        state="done" if verified else "failed", attempts=old.attempts + 1, archived_instances=o.archived_instances,
        bytes=o.bytes, missing=list(o.missing), extra=list(o.extra), status=o.status, comment=o.comment,
        next_attempt_at=0.0 if verified else retry_at, done_at=now if verified else 0.0)


def monotonic_now() -> float:
    """Wall-clock seconds (leases and retries are compared across processes)."""
    return time.time()
