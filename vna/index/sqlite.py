"""SqliteIndex: the embedded-default index (one file, WAL mode).

Each thread gets its own connection; writes run in ``BEGIN IMMEDIATE``
transactions with a busy timeout, so concurrent associations serialise their
registrations without failing. sqlite3 errors map to IndexUnavailable.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Sequence

from vna.domain import InstanceRecord, Placement, PlacementState, QueryLevel, Tier
from vna.errors import IndexUnavailable, StateConflict
from vna.index.base import IndexStats, TierStats
from vna.index.query import LEVEL_KEYS, Condition, MatchKind, matches_all

__all__ = ["SqliteIndex"]

SCHEMA_VERSION = 1

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


class SqliteIndex:
    """Index on one SQLite file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise IndexUnavailable(f"cannot create {self.path.parent}: {exc.strerror}") from exc

    # -- connections -------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute("PRAGMA foreign_keys=ON")
                conn.row_factory = sqlite3.Row
            except sqlite3.Error as exc:
                raise IndexUnavailable(f"cannot open SQLite index {self.path}: {exc}") from exc
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise IndexUnavailable(f"SQLite index busy or unavailable: {exc}") from exc
        try:
            yield conn
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

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                try:
                    conn.close()
                except sqlite3.Error:
                    pass
            self._all.clear()
        self._local = threading.local()

    # -- schema ------------------------------------------------------------
    def migrate(self) -> int:
        ddl = resources.files("vna.index").joinpath("sql/001_initial.sql").read_text()
        try:
            conn = self._conn()
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
            current = row[0] or 0
            if current < 1:
                conn.executescript("BEGIN IMMEDIATE;" + ddl + "INSERT INTO schema_version VALUES (1); COMMIT;")
            return SCHEMA_VERSION
        except sqlite3.Error as exc:
            raise IndexUnavailable(f"SQLite migration failed: {exc}") from exc

    # -- instances ---------------------------------------------------------
    def get_instance(self, sop_uid: str) -> InstanceRecord | None:
        rows = self._read(
            "SELECT * FROM instance_versions WHERE sop_uid = ? ORDER BY version DESC LIMIT 1", (sop_uid,)
        )
        if not rows:
            return None
        r = rows[0]
        return InstanceRecord(
            sop_uid=r["sop_uid"], series_uid=r["series_uid"], study_uid=r["study_uid"],
            sop_class_uid=r["sop_class_uid"], transfer_syntax_uid=r["transfer_syntax_uid"],
            version=r["version"], content_sha256=r["content_sha256"], content_size=r["content_size"],
            received_at=r["received_at"], source_ae=r["source_ae"], attrs=json.loads(r["attrs"]),
        )

    def register(self, record: InstanceRecord, placements: Sequence[Placement]) -> None:
        a = record.attrs
        try:
            with self._write() as conn:
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
                self._upsert(conn, "studies", "StudyInstanceUID", record.study_uid,
                             {k: a.get(k, "") for k in study_cols} | {"updated_at": record.received_at})
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
        except sqlite3.Error as exc:
            raise IndexUnavailable(f"SQLite register failed: {exc}") from exc

    @staticmethod
    def _upsert(conn: sqlite3.Connection, table: str, pk: str, key: str, values: dict[str, Any]) -> None:
        cols = [pk, *values]
        sets = ", ".join(f'"{c}" = excluded."{c}"' for c in values)
        conn.execute(
            f'INSERT INTO {table} ({", ".join(chr(34) + c + chr(34) for c in cols)}) '
            f'VALUES ({", ".join("?" for _ in cols)}) ON CONFLICT({pk}) DO UPDATE SET {sets}',
            (key, *values.values()),
        )

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
                return cur.rowcount == 1
        except sqlite3.Error as exc:
            raise IndexUnavailable(f"SQLite transition failed: {exc}") from exc

    # -- query -------------------------------------------------------------
    def find(
        self, level: QueryLevel, conditions: Sequence[Condition], *, limit: int | None = None
    ) -> Iterator[dict[str, str]]:
        where: list[str] = []
        params: list[Any] = []
        for c in conditions:
            self._pushdown(level, c, where, params)
        if level is QueryLevel.PATIENT:
            cols = ", ".join(f'max(st."{k}") AS "{k}"' for k in LEVEL_KEYS[QueryLevel.PATIENT] if k != "PatientID")
            sql = f"SELECT st.PatientID AS PatientID, {cols} FROM studies st"
            if where:
                sql += " WHERE " + " AND ".join(where)
            sql += " GROUP BY st.PatientID ORDER BY st.PatientID"
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
        try:
            while True:
                batch = cursor.fetchmany(500)
                if not batch:
                    return
                for r in batch:
                    row = {k: ("" if r[k] is None else str(r[k])) for k in r.keys()}
                    row.update(self._computed(level, row))
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
    def _pushdown(level: QueryLevel, c: Condition, where: list[str], params: list[Any]) -> None:
        """Add a superset SQL pre-filter for the condition where the store can serve one."""
        if c.keyword == "ModalitiesInStudy":
            if c.kind in (MatchKind.SINGLE, MatchKind.LIST):
                where.append(
                    "EXISTS (SELECT 1 FROM series m WHERE m.StudyInstanceUID = st.StudyInstanceUID "
                    f"AND m.Modality IN ({', '.join('?' for _ in c.values)}))")
                params.extend(c.values)
            return
        table = None
        for lv, keys in LEVEL_KEYS.items():
            if c.keyword in keys:
                table = {QueryLevel.PATIENT: "st", QueryLevel.STUDY: "st",
                         QueryLevel.SERIES: "se", QueryLevel.IMAGE: "i"}[lv]
                break
        if table is None or table != "st" and level in (QueryLevel.PATIENT, QueryLevel.STUDY):
            return
        if table == "i" and level is not QueryLevel.IMAGE:
            return
        col = f'{table}."{c.keyword}"'
        if c.kind is MatchKind.SINGLE and c.vr not in ("PN", "TM", "IS", "DS", "US", "DT"):
            where.append(f"{col} = ?")
            params.append(c.values[0])
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

    def _computed(self, level: QueryLevel, row: dict[str, str]) -> dict[str, str]:
        conn = self._conn()
        out: dict[str, str] = {}
        if level is QueryLevel.PATIENT:
            r = conn.execute(
                "SELECT count(DISTINCT st.StudyInstanceUID), count(DISTINCT i.SeriesInstanceUID), count(i.SOPInstanceUID) "
                "FROM studies st LEFT JOIN instances i ON i.StudyInstanceUID = st.StudyInstanceUID "
                "WHERE st.PatientID = ?", (row["PatientID"],)).fetchone()
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
        total, online, nearline = r[0], r[1] or 0, r[2] or 0
        if total and online == total:
            return "ONLINE"
        if total and nearline == total:
            return "NEARLINE"
        return "UNAVAILABLE"

    # -- stats & leases ----------------------------------------------------
    def stats(self) -> IndexStats:
        counts = self._read(
            "SELECT (SELECT count(DISTINCT PatientID) FROM studies), (SELECT count(*) FROM studies), "
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
