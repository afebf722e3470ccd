"""SqliteIndex: the embedded-default index (one file, WAL mode).

Each thread gets its own connection; writes run in ``BEGIN IMMEDIATE``
transactions with a busy timeout, so concurrent associations serialise their
registrations without failing. Before they begin, writers of this process
queue on a lock (the next is woken the moment the previous one commits) and
writers of other processes (``dicom.workers``) on an flock of ``<file>.wlock``
(retried every 0.5 ms), instead of polling in SQLite's busy handler (which
sleeps 1, 2, 5, 10... ms between attempts). Every wait is bounded by
``busy_timeout``; then IndexUnavailable. sqlite3 errors map to IndexUnavailable.

Patient identity (schema v4, ``docs/patient-identity.md``): ``patient_ids`` holds
every identity of every study (primary and Other Patient IDs), exactly the
current ones; PatientID / IssuerOfPatientID conditions are pushed down jointly
as one subquery on it. PATIENT rows group by (PatientID, IssuerOfPatientID).

Work queues (schema v5, the Index port's ``queued`` / ``requeue``): table
``study_queue`` keyed (queue, due, study), so a job reads a range of its
primary key in due order instead of every study. The registration and
``add_placements`` write entries in their transaction; ``written_at`` lets
``requeue`` leave an entry written after the job read the study (``queue_margin``).
``iter_studies`` (every study) is for operator commands only.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import threading
import time
import weakref
from contextlib import contextmanager
from dataclasses import replace
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Sequence

from vna.domain import InstanceRecord, Placement, PlacementState, QueryLevel, Tier, site_of
from vna.errors import IndexUnavailable, StateConflict
from vna.index.base import (AbandonedRegistration, IndexStats, QueueEntry, StudySummary, TierStats, copy_logs,
                            lifecycle_queues, log_due, queue_due)
from vna.index.query import (IDENTITY_KEYS, LEVEL_KEYS, OTHER_IDS_KEY, Condition, MatchKind, decode_other_ids,
                             encode_other_ids, matches_all, merge_other_ids)

__all__ = ["SqliteIndex"]

SCHEMA_VERSION = 5
_IN_CHUNK = 500   # UIDs per IN (...) list: below SQLITE_MAX_VARIABLE_NUMBER of older builds (999)
_MIGRATIONS = {1: "sql/001_initial.sql", 2: "sql/002_lifecycle.sql", 3: "sql/003_study_cover.sql",
               4: "sql/004_patient_identity.sql", 5: "sql/005_work_queue.sql"}

_TABLE = {
    QueryLevel.PATIENT: "st",
    QueryLevel.STUDY: "st",
    QueryLevel.SERIES: "se",
    QueryLevel.IMAGE: "i",
}


def _like_pattern(value: str) -> str:
    out = []
    for ch in value:
        if ch in "%_\\":
            out.append("\\" + ch)
        elif ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        else:
            out.append(ch)
    return "".join(out)


class _Connection(sqlite3.Connection):
    """A sqlite3 connection that can be weakly referenced."""


@lru_cache(maxsize=64)
def _upsert_sql(table: str, pk: str, columns: tuple[str, ...]) -> str:
    """The statement of ``SqliteIndex._upsert`` (built once per table and column list, not per row)."""
    cols = [pk, *columns]
    sets = ", ".join(f'"{c}" = excluded."{c}"' for c in columns)
    changed = " OR ".join(f'"{c}" IS NOT excluded."{c}"' for c in columns)
    return (f'INSERT INTO {table} ({", ".join(chr(34) + c + chr(34) for c in cols)}) '
            f'VALUES ({", ".join("?" for _ in cols)}) ON CONFLICT({pk}) DO UPDATE SET {sets} WHERE {changed}')


class _Registration:
    """One ``register`` call waiting for (or in) a group commit."""

    __slots__ = ("record", "placements", "finished", "error")

    def __init__(self, record: InstanceRecord, placements: Sequence[Placement]) -> None:
        self.record = record
        self.placements = placements
        self.finished = False
        self.error: Exception | None = None


class SqliteIndex:
    """Index on one SQLite file."""

    def __init__(self, path: Path, *, busy_timeout: float = 30.0, queue_rewrite: float = 60.0) -> None:
        """``busy_timeout``: seconds a writer waits for its turn (lock, gate, SQLite's busy handler) before failing.
        ``queue_rewrite``: a work-queue entry's ``written_at`` is rewritten at most this often (registrations
        into one study then touch its entry once, not each time)."""
        self.path = Path(path)
        self.busy_timeout = busy_timeout
        self.queue_rewrite = queue_rewrite
        self._local = threading.local()
        # connections are per thread (pynetdicom runs each association in a new thread); one is
        # closed when its thread ends and nothing else uses it, so associations do not leak files
        self._all: weakref.WeakSet[_Connection] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._writer = threading.Lock()  # one writer of this process at a time
        self._wconn: _Connection | None = None  # the writer's connection (used under _writer only)
        self._batch_cond = threading.Condition()  # group commit of register(): waiting requests, leader flag
        self._batch: list[_Registration] = []
        self._leading = False
        self._gate_fd: int | None = None  # flock'ed by the writer, against other processes' writers
        self._gate_broken = False  # the gate file cannot be opened or locked here
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise IndexUnavailable(f"cannot create {self.path.parent}: {exc.strerror}") from exc

    # -- connections -------------------------------------------------------
    def _connect(self) -> _Connection:
        try:
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False,
                                   factory=_Connection)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.row_factory = sqlite3.Row
        except sqlite3.Error as exc:
            raise IndexUnavailable(f"cannot open SQLite index {self.path}: {exc}") from exc
        with self._lock:
            self._all.add(conn)
        return conn

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction on the process's one writer connection (taken with the write turn).

        One connection for all writers keeps its page cache warm: SQLite drops a
        connection's whole cache whenever another connection has committed.
        """
        deadline = time.monotonic() + self.busy_timeout
        if not self._writer.acquire(timeout=self.busy_timeout):
            raise IndexUnavailable(f"SQLite index busy: no write turn in {self.busy_timeout:g} s")
        try:
            conn = self._wconn
            if conn is None:
                conn = self._wconn = self._connect()
            fd = self._gate(deadline)
            try:
                with self._transaction(conn):
                    yield conn
            finally:
                if fd is not None:
                    fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            self._writer.release()

    def _gate(self, deadline: float) -> int | None:
        """Take the cross-process write gate; its descriptor, or None without one (SQLite's locking remains).

        Raises IndexUnavailable if another process holds it past ``deadline``.
        """
        if self._gate_fd is None:
            if self._gate_broken:
                return None
            try:
                self._gate_fd = os.open(f"{self.path}.wlock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError:
                self._gate_broken = True
                return None
        fd = self._gate_fd
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise IndexUnavailable(
                        f"SQLite index busy: another process has held the write gate for {self.busy_timeout:g} s"
                    ) from None
                time.sleep(0.0005)
            except OSError:  # no flock on this filesystem (some NFS): SQLite's own locking only
                self._gate_broken = True
                return None

    @contextmanager
    def _transaction(self, conn: sqlite3.Connection) -> Iterator[None]:
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise IndexUnavailable(f"SQLite index busy or unavailable: {exc}") from exc
        try:
            yield
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            raise IndexUnavailable(f"SQLite commit failed: {exc}") from exc

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        try:
            return self._conn().execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise IndexUnavailable(f"SQLite read failed: {exc}") from exc

    def release_thread(self) -> None:
        """Close the calling thread's connection now.

        A sqlite3 connection sits in a reference cycle (its statement cache refers
        back to it), so one left to its thread's end is closed only when the cyclic
        garbage collector next runs -- a file descriptor per finished association until then.
        """
        conn: _Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            return
        self._local.conn = None
        with self._lock:
            self._all.discard(conn)
        try:
            conn.close()
        except sqlite3.Error:
            pass

    def close(self) -> None:
        with self._lock:
            for conn in list(self._all):
                try:
                    conn.close()
                except sqlite3.Error:
                    pass
            self._all.clear()
        self._local = threading.local()
        with self._writer:
            self._wconn = None  # closed above
            if self._gate_fd is not None:
                os.close(self._gate_fd)
                self._gate_fd = None

    # -- schema ------------------------------------------------------------
    def migrate(self) -> int:
        try:
            conn = self._conn()
            # functions the migrations call (v5 backfills the work queues)
            conn.create_function("vna_site_of", 1, site_of, deterministic=True)
            conn.create_function("vna_log_due", 1, log_due, deterministic=True)
            conn.create_function("vna_queue_due", 2, lambda received, date: queue_due(received, {"StudyDate": date}),
                                 deterministic=True)
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            for version, name in sorted(_MIGRATIONS.items()):
                # every version not recorded, in order (one row per version: a gap is applied too)
                done = conn.execute("SELECT 1 FROM schema_version WHERE version = ?", (version,)).fetchone()
                if done is None:
                    ddl = resources.files("vna.index").joinpath(name).read_text()
                    conn.executescript(
                        f"BEGIN IMMEDIATE;{ddl};INSERT INTO schema_version VALUES ({version}); COMMIT;")
            return SCHEMA_VERSION
        except sqlite3.Error as exc:
            raise IndexUnavailable(f"SQLite migration failed: {exc}") from exc

    # -- instances ---------------------------------------------------------
    def get_instance(self, sop_uid: str) -> InstanceRecord | None:
        rows = self._read(
            "SELECT * FROM instance_versions WHERE sop_uid = ? ORDER BY version DESC LIMIT 1", (sop_uid,)
        )
        return self._record(rows[0]) if rows else None

    def register(self, record: InstanceRecord, placements: Sequence[Placement]) -> None:
        """Group commit: registrations that arrive together share one transaction (one WAL fsync).

        The first caller to find no batch in progress leads: it takes every
        waiting registration, runs each in its own SAVEPOINT (a StateConflict
        rolls back that one only) and commits once; each caller returns (or
        raises its own error) only after that commit is durable.
        """
        req = _Registration(record, placements)
        deadline = time.monotonic() + self.busy_timeout
        with self._batch_cond:
            self._batch.append(req)
            while not req.finished and self._leading:
                if req in self._batch and time.monotonic() >= deadline:
                    self._batch.remove(req)  # not taken by a leader: safe to give up
                    raise IndexUnavailable(f"SQLite index busy: no write turn in {self.busy_timeout:g} s")
                self._batch_cond.wait(0.5)
            if not req.finished:
                self._leading = True
                batch, self._batch = self._batch, []
        if not req.finished:
            try:
                self._commit_registrations(batch)
            finally:
                with self._batch_cond:
                    self._leading = False
                    self._batch_cond.notify_all()
        if req.error is not None:
            raise req.error

    def _commit_registrations(self, batch: list[_Registration]) -> None:
        """Register ``batch`` in one transaction; every request ends finished, with its own error or none."""
        try:
            with self._write() as conn:
                for req in batch:
                    conn.execute("SAVEPOINT reg")
                    try:
                        self._register_rows(conn, req.record, req.placements)
                    except StateConflict as exc:
                        req.error = exc
                    except sqlite3.Error as exc:
                        req.error = IndexUnavailable(f"SQLite register failed: {exc}")
                    if req.error is not None:
                        conn.execute("ROLLBACK TO reg")
                    conn.execute("RELEASE reg")
        except (sqlite3.Error, IndexUnavailable) as exc:
            why = str(exc) if isinstance(exc, IndexUnavailable) else f"SQLite register failed: {exc}"
            for req in batch:
                req.error = IndexUnavailable(why)  # nothing of the batch was committed (one object per caller)
        except BaseException as exc:
            for req in batch:
                req.error = IndexUnavailable(f"SQLite register failed: {exc!r}")
            raise
        finally:
            for req in batch:
                req.finished = True

    def _register_rows(self, conn: sqlite3.Connection, record: InstanceRecord, placements: Sequence[Placement]) -> None:
        a = record.attrs
        try:
            conn.execute(
                "INSERT INTO instance_versions VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (record.sop_uid, record.version, record.series_uid, record.study_uid,
                 record.sop_class_uid, record.transfer_syntax_uid, record.content_sha256,
                 record.content_size, record.received_at, record.source_ae, json.dumps(a)),
            )
        except sqlite3.IntegrityError:
            raise StateConflict(f"instance {record.sop_uid} version {record.version} exists") from None
        study_cols = LEVEL_KEYS[QueryLevel.PATIENT] + LEVEL_KEYS[QueryLevel.STUDY][1:]
        study = {k: a.get(k, "") for k in study_cols} | {OTHER_IDS_KEY: a.get(OTHER_IDS_KEY, "")}
        study = self._identities(conn, record.study_uid, study)
        self._upsert(conn, "studies", "StudyInstanceUID", record.study_uid, study | {"updated_at": record.received_at})
        self._upsert(conn, "series", "SeriesInstanceUID", record.series_uid,
                     {k: a.get(k, "") for k in LEVEL_KEYS[QueryLevel.SERIES][1:]}
                     | {"StudyInstanceUID": record.study_uid})
        inst: dict[str, Any] = {k: a.get(k, "") for k in LEVEL_KEYS[QueryLevel.IMAGE][1:]}
        inst |= {
            "SeriesInstanceUID": record.series_uid, "StudyInstanceUID": record.study_uid,
            "version": record.version, "SOPClassUID": record.sop_class_uid,
            "TransferSyntaxUID": record.transfer_syntax_uid, "content_sha256": record.content_sha256,
            "content_size": record.content_size, "received_at": record.received_at,
            "source_ae": record.source_ae,
        }
        self._upsert(conn, "instances", "SOPInstanceUID", record.sop_uid, inst)
        for p in placements:
            self._insert_placement(conn, p)
        self._enqueue(conn, lifecycle_queues(placements), queue_due(record.received_at, a), record.study_uid)
        self._enqueue(conn, copy_logs(placements), log_due(time.time()), record.study_uid)

    def _log_ok(self, conn: sqlite3.Connection, old: Placement, new: Placement) -> None:
        """A copy that became OK (``old`` is ``new`` for a new row) puts its study in its site's copy log."""
        if new.state is PlacementState.OK and (old is new or old.state is not PlacementState.OK):
            v = conn.execute("SELECT study_uid FROM instance_versions WHERE sop_uid = ? AND version = ?",
                             (new.sop_uid, new.version)).fetchone()
            if v is not None:
                self._enqueue(conn, copy_logs([new]), log_due(time.time()), v["study_uid"])

    def _enqueue(self, conn: sqlite3.Connection, queues: set[str], due: float, study_uid: str) -> None:
        """Put the study in ``queues`` at ``due`` (in the caller's transaction); marks the entry written now,
        unless it was marked less than ``queue_rewrite`` seconds ago (see :attr:`queue_margin`)."""
        now = time.time()
        conn.executemany(
            "INSERT INTO study_queue (queue, due, study_uid, written_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (queue, due, study_uid) DO UPDATE SET written_at = excluded.written_at "
            "WHERE written_at < excluded.written_at - ?",
            [(q, due, study_uid, now, self.queue_rewrite) for q in sorted(queues)])

    @property
    def queue_margin(self) -> float:
        """Seconds before ``seen_at`` within which ``requeue`` keeps an entry written: a write it may not have
        seen marked the entry at most ``queue_rewrite`` before it began, and began at most ``busy_timeout``
        before it committed."""
        return self.queue_rewrite + self.busy_timeout

    @staticmethod
    def _identities(conn: sqlite3.Connection, study_uid: str, study: dict[str, str]) -> dict[str, str]:
        """The study row to write, merged with the stored one, and ``patient_ids`` kept equal to its identities.

        An instance's absent value is unknown, not none (docs/patient-identity.md, "Instances of one study"):
        the study keeps its non-empty issuer when the instance has none, and its Other Patient IDs are the
        union over its instances (at most MAX_OTHER_IDS, the first ones kept). One primary-key read when the
        identities are unchanged (every instance of a study but the first)."""
        old = conn.execute("SELECT PatientID, IssuerOfPatientID, other_patient_ids FROM studies "
                           "WHERE StudyInstanceUID = ?", (study_uid,)).fetchone()
        if old is not None:
            if not study["IssuerOfPatientID"]:
                study = study | {"IssuerOfPatientID": old[1]}
            study = study | {OTHER_IDS_KEY: merge_other_ids(old[2], study[OTHER_IDS_KEY])}
        new = (study["PatientID"], study["IssuerOfPatientID"], study[OTHER_IDS_KEY])
        if old is not None and tuple(old) == new:
            return study
        if old is not None:
            conn.execute("DELETE FROM patient_ids WHERE StudyInstanceUID = ?", (study_uid,))
        pairs = {(new[0], new[1]), *decode_other_ids(new[2])}
        conn.executemany("INSERT OR IGNORE INTO patient_ids VALUES (?, ?, ?)",
                         [(pid, issuer, study_uid) for pid, issuer in pairs])
        return study

    @staticmethod
    def _upsert(conn: sqlite3.Connection, table: str, pk: str, key: str, values: dict[str, Any]) -> None:
        """Insert the row, or update it where a value differs (an unchanged row is not rewritten:
        every instance of a series upserts the same series row; skipping it saves ~5 WAL pages)."""
        conn.execute(_upsert_sql(table, pk, tuple(values)), (key, *values.values()))

    @staticmethod
    def _insert_placement(conn: sqlite3.Connection, p: Placement) -> None:
        conn.execute(
            "INSERT OR REPLACE INTO placements VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (p.sop_uid, p.version, p.store_id, p.tier.value, p.blob_key, p.codec, p.content_sha256,
             p.content_size, p.stored_sha256, p.stored_size, p.state.value, p.created_at,
             p.verified_at, p.offset, p.length),
        )

    @staticmethod
    def _placement(r: sqlite3.Row) -> Placement:
        return Placement(
            sop_uid=r["sop_uid"], version=r["version"], tier=Tier(r["tier"]), store_id=r["store_id"],
            blob_key=r["blob_key"], codec=r["codec"], content_sha256=r["content_sha256"],
            content_size=r["content_size"], stored_sha256=r["stored_sha256"], stored_size=r["stored_size"],
            state=PlacementState(r["state"]), created_at=r["created_at"], verified_at=r["verified_at"],
            offset=r["offset"], length=r["length"],
        )

    def placements(self, sop_uid: str, version: int | None = None) -> list[Placement]:
        if version is None:
            rows = self._read(
                "SELECT p.* FROM placements p JOIN instances i ON i.SOPInstanceUID = p.sop_uid "
                "AND i.version = p.version WHERE p.sop_uid = ?", (sop_uid,))
        else:
            rows = self._read("SELECT * FROM placements WHERE sop_uid = ? AND version = ?", (sop_uid, version))
        return [self._placement(r) for r in rows]

    def placements_many(self, sop_uids: Sequence[str]) -> dict[str, list[Placement]]:
        out: dict[str, list[Placement]] = {uid: [] for uid in sop_uids}
        distinct = list(out)
        for i in range(0, len(distinct), _IN_CHUNK):
            chunk = distinct[i:i + _IN_CHUNK]
            rows = self._read(
                "SELECT p.* FROM placements p JOIN instances i ON i.SOPInstanceUID = p.sop_uid "
                f"AND i.version = p.version WHERE p.sop_uid IN ({', '.join('?' for _ in chunk)})", chunk)
            for r in rows:
                out[r["sop_uid"]].append(self._placement(r))
        return out

    def transition(
        self, placement: Placement, new_state: PlacementState, *, verified_at: float | None = None
    ) -> bool:
        p = placement
        try:
            with self._write() as conn:
                if new_state is PlacementState.TO_DELETE:
                    other = conn.execute(
                        "SELECT 1 FROM placements WHERE sop_uid = ? AND version = ? AND store_id != ? "
                        "AND state = 'OK' LIMIT 1", (p.sop_uid, p.version, p.store_id)).fetchone()
                    if other is None:
                        return False
                cur = conn.execute(
                    "UPDATE placements SET state = ?, verified_at = coalesce(?, verified_at) "
                    "WHERE sop_uid = ? AND version = ? AND store_id = ? AND state = ? AND blob_key = ?",
                    (new_state.value, verified_at, p.sop_uid, p.version, p.store_id, p.state.value, p.blob_key),
                )
                if cur.rowcount == 1:
                    self._log_ok(conn, p, replace(p, state=new_state))
                return cur.rowcount == 1
        except sqlite3.Error as exc:
            raise IndexUnavailable(f"SQLite transition failed: {exc}") from exc

    def add_placements(self, placements: Sequence[Placement]) -> None:
        try:
            with self._write() as conn:
                for p in placements:
                    try:
                        conn.execute(
                            "INSERT INTO placements VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                            (p.sop_uid, p.version, p.store_id, p.tier.value, p.blob_key, p.codec, p.content_sha256,
                             p.content_size, p.stored_sha256, p.stored_size, p.state.value, p.created_at,
                             p.verified_at, p.offset, p.length))
                    except sqlite3.IntegrityError:
                        raise StateConflict(f"placement of {p.sop_uid} v{p.version} on {p.store_id} exists") from None
                    queues = lifecycle_queues([p])
                    v = conn.execute("SELECT study_uid, received_at, attrs FROM instance_versions "
                                     "WHERE sop_uid = ? AND version = ?", (p.sop_uid, p.version)).fetchone()
                    if queues and v is not None:
                        self._enqueue(conn, queues, queue_due(v["received_at"], json.loads(v["attrs"])), v["study_uid"])
                    self._log_ok(conn, p, p)
        except sqlite3.Error as exc:
            raise IndexUnavailable(f"SQLite add_placements failed: {exc}") from exc

    def replace_placement(self, old: Placement, new: Placement) -> bool:
        if (old.sop_uid, old.version, old.store_id) != (new.sop_uid, new.version, new.store_id):
            raise ValueError("replace_placement keeps (sop_uid, version, store_id)")
        try:
            with self._write() as conn:
                if new.state is PlacementState.TO_DELETE and old.state is not PlacementState.TO_DELETE:
                    other = conn.execute(
                        "SELECT 1 FROM placements WHERE sop_uid = ? AND version = ? AND store_id != ? "
                        "AND state = 'OK' LIMIT 1", (old.sop_uid, old.version, old.store_id)).fetchone()
                    if other is None:
                        return False
                cur = conn.execute(
                    "UPDATE placements SET tier = ?, blob_key = ?, codec = ?, content_sha256 = ?, content_size = ?, "
                    "stored_sha256 = ?, stored_size = ?, state = ?, created_at = ?, verified_at = ?, "
                    '"offset" = ?, length = ? '
                    "WHERE sop_uid = ? AND version = ? AND store_id = ? AND state = ? AND blob_key = ?",
                    (new.tier.value, new.blob_key, new.codec, new.content_sha256, new.content_size,
                     new.stored_sha256, new.stored_size, new.state.value, new.created_at, new.verified_at,
                     new.offset, new.length, old.sop_uid, old.version, old.store_id, old.state.value, old.blob_key))
                if cur.rowcount == 1:
                    self._log_ok(conn, old, new)
                return cur.rowcount == 1
        except sqlite3.Error as exc:
            raise IndexUnavailable(f"SQLite replace_placement failed: {exc}") from exc

    def delete_placement(self, placement: Placement) -> bool:
        p = placement
        try:
            with self._write() as conn:
                cur = conn.execute(
                    "DELETE FROM placements WHERE sop_uid = ? AND version = ? AND store_id = ? "
                    "AND state = 'TO_DELETE' AND blob_key = ?", (p.sop_uid, p.version, p.store_id, p.blob_key))
                return cur.rowcount == 1
        except sqlite3.Error as exc:
            raise IndexUnavailable(f"SQLite delete_placement failed: {exc}") from exc

    def iter_placements(
        self,
        *,
        tier: Tier | None = None,
        states: Sequence[PlacementState] | None = None,
        store_id: str | None = None,
        limit: int | None = None,
    ) -> Iterator[Placement]:
        where, params = [], []
        if tier is not None:
            where.append("tier = ?")
            params.append(tier.value)
        if states:
            where.append(f"state IN ({', '.join('?' for _ in states)})")
            params.extend(st.value for st in states)
        if store_id is not None:
            where.append("store_id = ?")
            params.append(store_id)
        sql = "SELECT * FROM placements"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY verified_at IS NOT NULL, verified_at, sop_uid, version, store_id"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return (self._placement(r) for r in self._read(sql, params))

    def study_instances(self, study_uid: str) -> list[InstanceRecord]:
        rows = self._read(
            "SELECT v.* FROM instances i JOIN instance_versions v ON v.sop_uid = i.SOPInstanceUID "
            "AND v.version = i.version WHERE i.StudyInstanceUID = ? ORDER BY v.series_uid, v.sop_uid", (study_uid,))
        return [self._record(r) for r in rows]

    @staticmethod
    def _record(r: sqlite3.Row) -> InstanceRecord:
        return InstanceRecord(
            sop_uid=r["sop_uid"], series_uid=r["series_uid"], study_uid=r["study_uid"],
            sop_class_uid=r["sop_class_uid"], transfer_syntax_uid=r["transfer_syntax_uid"],
            version=r["version"], content_sha256=r["content_sha256"], content_size=r["content_size"],
            received_at=r["received_at"], source_ae=r["source_ae"], attrs=json.loads(r["attrs"]),
        )

    _SUMMARY_SQL = (
        "SELECT st.StudyInstanceUID AS uid, st.StudyDate AS date, st.last_access AS last_access, "
        "max(i.received_at) AS last_received, count(i.SOPInstanceUID) AS n, "
        "group_concat(DISTINCT se.Modality) AS mods, group_concat(DISTINCT i.source_ae) AS aes, "
        "(SELECT 1 FROM holds h WHERE h.study_uid = st.StudyInstanceUID) AS held "
        "FROM studies st JOIN instances i ON i.StudyInstanceUID = st.StudyInstanceUID "
        "JOIN series se ON se.SeriesInstanceUID = i.SeriesInstanceUID ")

    @staticmethod
    def _summary(r: sqlite3.Row) -> StudySummary:
        return StudySummary(
            study_uid=r["uid"], study_date=r["date"],
            modalities=tuple(sorted(m for m in (r["mods"] or "").split(",") if m)),
            source_aes=tuple(sorted(a for a in (r["aes"] or "").split(",") if a)),
            last_received=r["last_received"], last_access=r["last_access"], held=bool(r["held"]),
            instances=r["n"])

    def iter_studies(self, *, received_before: float | None = None, limit: int | None = None) -> Iterator[StudySummary]:
        """Every study: O(catalogue), for operator commands that want them all (the jobs read queues)."""
        sql = self._SUMMARY_SQL + "GROUP BY st.StudyInstanceUID"
        params: list[Any] = []
        if received_before is not None:
            sql += " HAVING max(i.received_at) < ?"
            params.append(received_before)
        sql += " ORDER BY last_received"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        for r in self._read(sql, params):
            yield self._summary(r)

    def study_summary(self, study_uid: str) -> StudySummary | None:
        rows = self._read(self._SUMMARY_SQL + "WHERE st.StudyInstanceUID = ? GROUP BY st.StudyInstanceUID",
                          (study_uid,))
        return self._summary(rows[0]) if rows else None

    def queued(self, queue: str, *, upto: float | None = None, after: QueueEntry | None = None,
               limit: int = 1000) -> list[QueueEntry]:
        """One range read of the primary key (queue, due, study)."""
        sql = "SELECT due, study_uid FROM study_queue WHERE queue = ?"
        params: list[Any] = [queue]
        if upto is not None:
            sql += " AND due <= ?"
            params.append(upto)
        if after is not None:
            sql += " AND (due, study_uid) > (?, ?)"
            params += [after.due, after.study_uid]
        sql += f" ORDER BY due, study_uid LIMIT {int(limit)}"
        return [QueueEntry(r["due"], r["study_uid"], queue) for r in self._read(sql, params)]

    def enqueue(self, entry: QueueEntry) -> None:
        try:
            with self._write() as conn:
                self._enqueue(conn, {entry.queue}, entry.due, entry.study_uid)
        except sqlite3.Error as exc:
            raise IndexUnavailable(f"SQLite enqueue failed: {exc}") from exc

    def requeue(self, entry: QueueEntry, due: float | None, *, seen_at: float) -> None:
        try:
            with self._write() as conn:
                gone = conn.execute(
                    "DELETE FROM study_queue WHERE queue = ? AND due = ? AND study_uid = ? AND written_at <= ?",
                    (entry.queue, entry.due, entry.study_uid, seen_at - self.queue_margin)).rowcount
                if gone and due is not None:
                    conn.execute("INSERT OR IGNORE INTO study_queue (queue, due, study_uid, written_at) "
                                 "VALUES (?, ?, ?, ?)", (entry.queue, due, entry.study_uid, seen_at))
        except sqlite3.Error as exc:
            raise IndexUnavailable(f"SQLite requeue failed: {exc}") from exc

    def job_cursor(self, name: str) -> QueueEntry | None:
        rows = self._read("SELECT due, study_uid, queue FROM job_cursors WHERE name = ?", (name,))
        return QueueEntry(rows[0]["due"], rows[0]["study_uid"], rows[0]["queue"]) if rows else None

    def set_job_cursor(self, name: str, entry: QueueEntry) -> None:
        try:
            with self._write() as conn:
                conn.execute("INSERT OR REPLACE INTO job_cursors (name, due, study_uid, queue) VALUES (?, ?, ?, ?)",
                             (name, entry.due, entry.study_uid, entry.queue))
        except sqlite3.Error as exc:
            raise IndexUnavailable(f"SQLite set_job_cursor failed: {exc}") from exc

    def record_access(self, study_uid: str, when: float) -> None:
        try:
            with self._write() as conn:
                conn.execute("UPDATE studies SET last_access = max(coalesce(last_access, 0), ?) "
                             "WHERE StudyInstanceUID = ?", (when, study_uid))
        except sqlite3.Error as exc:
            raise IndexUnavailable(f"SQLite record_access failed: {exc}") from exc

    def set_hold(self, study_uid: str, held: bool, reason: str = "") -> None:
        try:
            with self._write() as conn:
                if held:
                    conn.execute("INSERT OR REPLACE INTO holds VALUES (?, ?, ?)", (study_uid, reason, time.time()))
                else:
                    conn.execute("DELETE FROM holds WHERE study_uid = ?", (study_uid,))
        except sqlite3.Error as exc:
            raise IndexUnavailable(f"SQLite set_hold failed: {exc}") from exc

    def is_held(self, study_uid: str) -> bool:
        return bool(self._read("SELECT 1 FROM holds WHERE study_uid = ?", (study_uid,)))

    # -- query -------------------------------------------------------------
    def find(
        self, level: QueryLevel, conditions: Sequence[Condition], *, limit: int | None = None
    ) -> Iterator[dict[str, str]]:
        where: list[str] = []
        params: list[Any] = []
        ident: list[str] = []
        ident_params: list[Any] = []
        for c in conditions:
            if c.keyword in IDENTITY_KEYS:
                self._pushdown(QueryLevel.PATIENT, c, ident, ident_params, table="p")
            else:
                self._pushdown(level, c, where, params)
        if ident:  # jointly on one identity of the study (query.py): the primary one or another
            where.append("st.StudyInstanceUID IN (SELECT p.StudyInstanceUID FROM patient_ids p WHERE "
                         + " AND ".join(ident) + ")")
            params.extend(ident_params)
        if level is QueryLevel.PATIENT:
            keep = ("PatientID", "IssuerOfPatientID")
            cols = ", ".join(f'max(st."{k}") AS "{k}"' for k in LEVEL_KEYS[QueryLevel.PATIENT] if k not in keep)
            sql = (f"SELECT st.PatientID AS PatientID, st.IssuerOfPatientID AS IssuerOfPatientID, {cols}, "
                   f"group_concat(nullif(st.{OTHER_IDS_KEY}, ''), char(10)) AS {OTHER_IDS_KEY} FROM studies st")
            if where:
                sql += " WHERE " + " AND ".join(where)
            sql += (" GROUP BY st.PatientID, st.IssuerOfPatientID"
                    " ORDER BY st.PatientID, st.IssuerOfPatientID")
        else:
            sql = {
                QueryLevel.STUDY: "SELECT st.* FROM studies st",
                QueryLevel.SERIES: "SELECT st.*, se.* FROM series se JOIN studies st USING (StudyInstanceUID)",
                QueryLevel.IMAGE: (
                    "SELECT st.*, se.*, i.* FROM instances i "
                    "JOIN series se USING (SeriesInstanceUID) JOIN studies st ON st.StudyInstanceUID = i.StudyInstanceUID"
                ),
            }[level]
            if where:
                sql += " WHERE " + " AND ".join(where)
        try:
            cursor = self._conn().execute(sql, params)
        except sqlite3.Error as exc:
            raise IndexUnavailable(f"SQLite query failed: {exc}") from exc
        return self._filter(level, cursor, conditions, limit)

    def _filter(
        self, level: QueryLevel, cursor: sqlite3.Cursor, conditions: Sequence[Condition], limit: int | None
    ) -> Iterator[dict[str, str]]:
        n = 0
        if limit is not None and limit <= 0:
            cursor.close()
            return
        try:
            while True:
                batch = cursor.fetchmany(500 if limit is None else min(500, limit - n))
                if not batch:
                    return
                rows = [{k: ("" if r[k] is None else str(r[k])) for k in r.keys()} for r in batch]
                if level is QueryLevel.STUDY:
                    computed = self._study_computed([row["StudyInstanceUID"] for row in rows])
                    for row in rows:
                        row.update(computed[row["StudyInstanceUID"]])
                else:
                    for row in rows:
                        row.update(self._computed(level, row))
                        if level is QueryLevel.PATIENT:  # the union of the kept studies' other ids, canonical
                            row[OTHER_IDS_KEY] = encode_other_ids(decode_other_ids(row[OTHER_IDS_KEY]))
                for row in rows:
                    if matches_all(conditions, row):
                        yield row
                        n += 1
                        if limit is not None and n >= limit:
                            return
        except sqlite3.Error as exc:
            raise IndexUnavailable(f"SQLite query failed: {exc}") from exc
        finally:
            cursor.close()

    @staticmethod
    def _pushdown(level: QueryLevel, c: Condition, where: list[str], params: list[Any],
                  table: str | None = None) -> None:
        """Add a superset SQL pre-filter for the condition where the store can serve one.

        ``table``: the alias of the column's table instead of the level's own (``p``: patient_ids)."""
        if c.keyword == "ModalitiesInStudy":
            if c.kind in (MatchKind.SINGLE, MatchKind.LIST):
                where.append(
                    "EXISTS (SELECT 1 FROM series m WHERE m.StudyInstanceUID = st.StudyInstanceUID "
                    f"AND m.Modality IN ({', '.join('?' for _ in c.values)}))")
                params.extend(c.values)
            return
        for lv, keys in LEVEL_KEYS.items():
            if c.keyword in keys and table is None:
                table = {QueryLevel.PATIENT: "st", QueryLevel.STUDY: "st",
                         QueryLevel.SERIES: "se", QueryLevel.IMAGE: "i"}[lv]
                break
        if table is None or table not in ("st", "p") and level in (QueryLevel.PATIENT, QueryLevel.STUDY):
            return
        if table == "i" and level is not QueryLevel.IMAGE:
            return
        col = f'{table}."{c.keyword}"'
        if c.kind is MatchKind.SINGLE and c.vr not in ("PN", "TM", "IS", "DS", "US", "DT"):
            where.append(f"{col} = ?")
            params.append(c.values[0])
        elif c.kind in (MatchKind.SINGLE, MatchKind.WILDCARD) and c.vr == "PN" and not c.values[0].isascii():
            return  # SQLite's LIKE folds ASCII case only: leave non-ASCII names to the Python matcher
        elif c.kind is MatchKind.SINGLE and c.vr == "PN":
            where.append(f"{col} LIKE ? ESCAPE '\\'")
            params.append(_like_pattern(c.values[0]))
        elif c.kind is MatchKind.LIST and c.vr in ("UI", "CS", "LO", "SH", "AE", "DA"):
            where.append(f"{col} IN ({', '.join('?' for _ in c.values)})")
            params.extend(c.values)
        elif c.kind is MatchKind.WILDCARD and c.vr != "TM":
            where.append(f"{col} LIKE ? ESCAPE '\\'")
            params.append(_like_pattern(c.values[0]))
        elif c.kind is MatchKind.RANGE and c.vr == "DA":
            low, high = c.values
            where.append(f"{col} != ''")
            if low:
                where.append(f"{col} >= ?")
                params.append(low.replace(".", ""))
            if high:
                where.append(f"{col} <= ?")
                params.append(high.replace(".", ""))

    def _study_computed(self, uids: Sequence[str]) -> dict[str, dict[str, str]]:
        """STUDY-level computed keys of a batch of studies: three grouped queries, not three per study."""
        conn = self._conn()
        marks = ", ".join("?" for _ in uids)
        mods: dict[str, list[str]] = {}
        for uid, modality in conn.execute(
                f"SELECT DISTINCT StudyInstanceUID, Modality FROM series WHERE StudyInstanceUID IN ({marks}) "
                "AND Modality != '' ORDER BY StudyInstanceUID, Modality", uids):
            mods.setdefault(uid, []).append(modality)
        counts = {r[0]: (r[1], r[2]) for r in conn.execute(
            "SELECT StudyInstanceUID, count(DISTINCT SeriesInstanceUID), count(*) FROM instances "
            f"WHERE StudyInstanceUID IN ({marks}) GROUP BY StudyInstanceUID", uids)}
        avail = {r[0]: self._availability_of(r[1], r[2], r[3]) for r in conn.execute(
            "SELECT uid, count(*), sum(online), sum(nearline) FROM ("
            " SELECT i.StudyInstanceUID AS uid, max(p.state = 'OK' AND p.tier IN ('hot','cache')) AS online,"
            "        max(p.state = 'OK') AS nearline"
            " FROM instances i LEFT JOIN placements p ON p.sop_uid = i.SOPInstanceUID AND p.version = i.version"
            f" WHERE i.StudyInstanceUID IN ({marks}) GROUP BY i.SOPInstanceUID) GROUP BY uid", uids)}
        out: dict[str, dict[str, str]] = {}
        for uid in uids:
            n_series, n_instances = counts.get(uid, (0, 0))
            out[uid] = {
                "ModalitiesInStudy": "\\".join(mods.get(uid, [])),
                "NumberOfStudyRelatedSeries": str(n_series),
                "NumberOfStudyRelatedInstances": str(n_instances),
                "InstanceAvailability": avail.get(uid, "UNAVAILABLE"),
            }
        return out

    def _computed(self, level: QueryLevel, row: dict[str, str]) -> dict[str, str]:
        conn = self._conn()
        out: dict[str, str] = {}
        if level is QueryLevel.PATIENT:
            r = conn.execute(
                "SELECT count(DISTINCT st.StudyInstanceUID), count(DISTINCT i.SeriesInstanceUID), count(i.SOPInstanceUID) "
                "FROM studies st LEFT JOIN instances i ON i.StudyInstanceUID = st.StudyInstanceUID "
                "WHERE st.PatientID = ? AND st.IssuerOfPatientID = ?",
                (row["PatientID"], row["IssuerOfPatientID"])).fetchone()
            out["NumberOfPatientRelatedStudies"] = str(r[0])
            out["NumberOfPatientRelatedSeries"] = str(r[1])
            out["NumberOfPatientRelatedInstances"] = str(r[2])
        elif level is QueryLevel.STUDY:
            uid = row["StudyInstanceUID"]
            mods = [m[0] for m in conn.execute(
                "SELECT DISTINCT Modality FROM series WHERE StudyInstanceUID = ? AND Modality != '' ORDER BY Modality",
                (uid,))]
            out["ModalitiesInStudy"] = "\\".join(mods)
            r = conn.execute(
                "SELECT count(DISTINCT SeriesInstanceUID), count(*) FROM instances WHERE StudyInstanceUID = ?",
                (uid,)).fetchone()
            out["NumberOfStudyRelatedSeries"] = str(r[0])
            out["NumberOfStudyRelatedInstances"] = str(r[1])
            out["InstanceAvailability"] = self._availability(conn, "i.StudyInstanceUID = ?", uid)
        elif level is QueryLevel.SERIES:
            uid = row["SeriesInstanceUID"]
            r = conn.execute("SELECT count(*) FROM instances WHERE SeriesInstanceUID = ?", (uid,)).fetchone()
            out["NumberOfSeriesRelatedInstances"] = str(r[0])
            out["InstanceAvailability"] = self._availability(conn, "i.SeriesInstanceUID = ?", uid)
        else:
            out["InstanceAvailability"] = self._availability(conn, "i.SOPInstanceUID = ?", row["SOPInstanceUID"])
            out["AvailableTransferSyntaxUID"] = row.get("TransferSyntaxUID", "")
        return out

    @staticmethod
    def _availability(conn: sqlite3.Connection, where: str, uid: str) -> str:
        r = conn.execute(
            "SELECT count(*), sum(online), sum(nearline) FROM ("
            " SELECT max(p.state = 'OK' AND p.tier IN ('hot','cache')) AS online,"
            "        max(p.state = 'OK') AS nearline"
            " FROM instances i LEFT JOIN placements p ON p.sop_uid = i.SOPInstanceUID AND p.version = i.version"
            f" WHERE {where} GROUP BY i.SOPInstanceUID)", (uid,)).fetchone()
        return SqliteIndex._availability_of(r[0], r[1], r[2])

    @staticmethod
    def _availability_of(total: int, online: int | None, nearline: int | None) -> str:
        online, nearline = online or 0, nearline or 0
        if total and online == total:
            return "ONLINE"
        if total and nearline == total:
            return "NEARLINE"
        return "UNAVAILABLE"

    # -- stats & leases ----------------------------------------------------
    def stats(self) -> IndexStats:
        counts = self._read(
            "SELECT (SELECT count(*) FROM (SELECT DISTINCT PatientID, IssuerOfPatientID FROM studies)), "
            "(SELECT count(*) FROM studies), "
            "(SELECT count(*) FROM series), (SELECT count(*) FROM instances), "
            "(SELECT coalesce(sum(content_size), 0) FROM instances)")[0]
        tiers: dict[str, dict[str, Any]] = {}
        for r in self._read(
                "SELECT tier, state, count(*) AS n, coalesce(sum(stored_size), 0) AS b FROM placements GROUP BY tier, state"):
            t = tiers.setdefault(r["tier"], {"placements": 0, "stored_bytes": 0, "by_state": {}})
            t["placements"] += r["n"]
            t["by_state"][r["state"]] = r["n"]
            if r["state"] == "OK":
                t["stored_bytes"] += r["b"]
        return IndexStats(
            patients=counts[0], studies=counts[1], series=counts[2], instances=counts[3],
            content_bytes=counts[4], tiers={k: TierStats(**v) for k, v in tiers.items()},
        )

    def recount(self) -> tuple[IndexStats, IndexStats]:
        """Nothing is maintained apart: :meth:`stats` is already a recount (both sides are equal)."""
        s = self.stats()
        return s, s

    def abandoned_registrations(self, *, older_than: float | None = None,
                                limit: int | None = None) -> list[AbandonedRegistration]:
        """None: a registration is one transaction, rolled back if its writer dies."""
        return []

    def clean_abandoned(self, *, older_than: float | None = None, limit: int | None = None) -> int:
        """Nothing to clean (see :meth:`abandoned_registrations`)."""
        return 0

    def acquire_lease(self, name: str, owner: str, ttl: float) -> bool:
        now = time.time()
        with self._write() as conn:
            r = conn.execute("SELECT owner, expires_at FROM leases WHERE name = ?", (name,)).fetchone()
            if r is not None and r["owner"] != owner and r["expires_at"] > now:
                return False
            conn.execute("INSERT OR REPLACE INTO leases VALUES (?, ?, ?)", (name, owner, now + ttl))
            return True

    def release_lease(self, name: str, owner: str) -> None:
        with self._write() as conn:
            conn.execute("DELETE FROM leases WHERE name = ? AND owner = ?", (name, owner))
