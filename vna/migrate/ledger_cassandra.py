"""The migration ledger in Cassandra: own tables in the index's keyspace, own session.

Tables (created by :meth:`CassandraLedger.migrate`):

- ``migrate_study ((source, bucket), study_uid)``: one row per study; the
  lease is taken and the outcome recorded with lightweight transactions on it.
- ``migrate_due ((source, state, bucket), next_attempt_at, study_uid)``: the
  studies still to do (planned / failed), so a claim reads only due rows.
- ``migrate_count ((source), state)``: counters kept with each transition.
- ``migrate_source (source)``: first/last completion times (rate, ETA).

A worker killed between a study's transition and its counter update leaves
the counter one transition short; the study rows stay exact.
"""

from __future__ import annotations

import json
import zlib
from typing import Any, Iterator, Sequence

from cassandra.query import PreparedStatement

from vna.config import CassandraConfig
from vna.index.cassandra import connect
from vna.errors import ConfigError, IndexUnavailable, LeaseHeld
from vna.migrate.ledger import STATES, Counts, Outcome, StudyPlan, _after, owner_dead, row_plan

__all__ = ["CassandraLedger", "BUCKETS"]

#: study rows of a source are spread over this many partitions (per state for due rows)
BUCKETS = 16


_TABLES = (
    "CREATE TABLE IF NOT EXISTS {ks}.migrate_study (source text, bucket int, study_uid text, study_date text,"
    " expected_series int, expected_instances int, state text, attempts int, archived_instances int,"
    " bytes bigint, missing text, extra text, status int, comment text, next_attempt_at double, done_at double,"
    " lease_owner text, lease_expires double, PRIMARY KEY ((source, bucket), study_uid))",
    "CREATE TABLE IF NOT EXISTS {ks}.migrate_due (source text, state text, bucket int, next_attempt_at double,"
    " study_uid text, PRIMARY KEY ((source, state, bucket), next_attempt_at, study_uid))",
    "CREATE TABLE IF NOT EXISTS {ks}.migrate_count (source text, state text, studies counter, instances counter,"
    " archived counter, bytes counter, PRIMARY KEY ((source), state))",
    "CREATE TABLE IF NOT EXISTS {ks}.migrate_source (source text PRIMARY KEY, first_done_at double,"
    " last_done_at double)",
)


def bucket_of(study_uid: str) -> int:
    """The partition bucket of a study."""
    return zlib.crc32(study_uid.encode()) % BUCKETS


class CassandraLedger:
    """The ledger on the index's Cassandra cluster and keyspace (same settings, own session)."""

    def __init__(self, cfg: CassandraConfig) -> None:
        self.cfg = cfg
        self._ks = cfg.keyspace
        self._prepared: dict[str, PreparedStatement] = {}
        self._cluster, self._session = connect(cfg, "migration ledger")

    # -- plumbing --------------------------------------------------------------
    def _x(self, cql: str, params: Sequence[Any] = ()) -> Any:
        cql = cql.replace("{ks}", self._ks)
        try:
            stmt = self._prepared.get(cql)
            if stmt is None:
                stmt = self._prepared[cql] = self._session.prepare(cql)
            return self._session.execute(stmt, tuple(params))
        except Exception as exc:  # the driver's error classes are many; all mean "the ledger did not answer"
            if isinstance(exc, (LeaseHeld, ConfigError)):
                raise
            raise IndexUnavailable(f"migration ledger: Cassandra: {type(exc).__name__}: {exc}") from exc

    def migrate(self) -> None:
        """Create the keyspace (if absent) and the ledger's tables."""
        repl = ", ".join(f"'{k}': '{v}'" for k, v in self.cfg.replication_map.items())
        try:
            self._session.execute(f"CREATE KEYSPACE IF NOT EXISTS {self._ks} WITH replication = "
                                  f"{{'class': 'NetworkTopologyStrategy', {repl}}}")
            for ddl in _TABLES:
                self._session.execute(ddl.replace("{ks}", self._ks))
        except Exception as exc:
            raise IndexUnavailable(f"migration ledger: Cassandra schema: {exc}") from exc

    def close(self) -> None:
        """Shut the session down."""
        self._cluster.shutdown()

    def _count(self, source: str, state: str, sign: int, p: StudyPlan) -> None:
        self._x("UPDATE {ks}.migrate_count SET studies = studies + ?, instances = instances + ?,"
                " archived = archived + ?, bytes = bytes + ? WHERE source = ? AND state = ?",
                (sign, sign * max(p.expected_instances, 0), sign * p.archived_instances, sign * p.bytes,
                 source, state))

    # -- the port --------------------------------------------------------------
    def add_planned(self, plans: Sequence[StudyPlan]) -> int:
        """Insert new studies (IF NOT EXISTS), with their due rows and counters."""
        new = 0
        for p in plans:
            b = bucket_of(p.study_uid)
            rs = self._x("INSERT INTO {ks}.migrate_study (source, bucket, study_uid, study_date, expected_series,"
                         " expected_instances, state, attempts, archived_instances, bytes, missing, extra, status,"
                         " comment, next_attempt_at, done_at, lease_owner, lease_expires)"
                         " VALUES (?, ?, ?, ?, ?, ?, 'planned', 0, 0, 0, '[]', '[]', -1, '', 0, 0, '', 0)"
                         " IF NOT EXISTS",
                         (p.source, b, p.study_uid, p.study_date, p.expected_series, p.expected_instances))
            if rs.was_applied:
                new += 1
                self._x("INSERT INTO {ks}.migrate_due (source, state, bucket, next_attempt_at, study_uid)"
                        " VALUES (?, 'planned', ?, 0, ?)", (p.source, b, p.study_uid))
                self._count(p.source, "planned", 1, StudyPlan(p.source, p.study_uid,
                                                              expected_instances=p.expected_instances))
        for source in {p.source for p in plans}:
            self._x("INSERT INTO {ks}.migrate_source (source, first_done_at, last_done_at) VALUES (?, 0, 0)"
                    " IF NOT EXISTS", (source,))
        return new

    def _row(self, source: str, study_uid: str) -> dict[str, Any] | None:
        rows = list(self._x("SELECT * FROM {ks}.migrate_study WHERE source = ? AND bucket = ? AND study_uid = ?",
                            (source, bucket_of(study_uid), study_uid)))
        return rows[0] if rows else None

    def claim(self, source: str, owner: str, ttl: float, now: float, limit: int,
              max_attempts: int) -> list[StudyPlan]:
        """Lease due studies: read due rows per bucket, take each lease with a compare-and-set."""
        out: list[StudyPlan] = []
        for state in ("planned", "failed"):
            for b in range(BUCKETS):
                if len(out) >= limit:
                    return out
                due = self._x("SELECT next_attempt_at, study_uid FROM {ks}.migrate_due WHERE source = ? AND"
                              " state = ? AND bucket = ? AND next_attempt_at <= ?", (source, state, b, now))
                for d in due:
                    if len(out) >= limit:
                        return out
                    r = self._row(source, d["study_uid"])
                    if r is None or r["state"] != state or r["next_attempt_at"] != d["next_attempt_at"]:
                        self._x("DELETE FROM {ks}.migrate_due WHERE source = ? AND state = ? AND bucket = ? AND"
                                " next_attempt_at = ? AND study_uid = ?",
                                (source, state, b, d["next_attempt_at"], d["study_uid"]))  # stale (killed worker)
                        continue
                    if r["attempts"] >= max_attempts and state == "failed":
                        continue
                    held = r["lease_owner"] or ""
                    if held and r["lease_expires"] > now and not owner_dead(held):
                        continue
                    rs = self._x("UPDATE {ks}.migrate_study SET lease_owner = ?, lease_expires = ? WHERE source = ?"
                                 " AND bucket = ? AND study_uid = ? IF lease_owner = ?",
                                 (owner, now + ttl, source, b, r["study_uid"], held))
                    if rs.was_applied:
                        out.append(row_plan({**r, "source": source}))
        return out

    def renew(self, source: str, study_uid: str, owner: str, ttl: float, now: float) -> bool:
        """Extend the lease with a compare-and-set on its owner."""
        rs = self._x("UPDATE {ks}.migrate_study SET lease_expires = ? WHERE source = ? AND bucket = ? AND"
                     " study_uid = ? IF lease_owner = ?", (now + ttl, source, bucket_of(study_uid), study_uid, owner))
        return bool(rs.was_applied)

    def finish(self, source: str, study_uid: str, owner: str, outcome: Outcome, now: float,
               retry_at: float) -> str:
        """Record the outcome with a compare-and-set on the lease, then move the due row and counters."""
        r = self._row(source, study_uid)
        if r is None or r["lease_owner"] != owner:
            raise LeaseHeld(f"study {study_uid} of {source} is no longer leased to this worker")
        old = row_plan(r)
        new = _after(old, outcome, now, retry_at)
        b = bucket_of(study_uid)
        rs = self._x(
            "UPDATE {ks}.migrate_study SET state = ?, attempts = ?, expected_instances = ?, archived_instances = ?,"
            " bytes = ?, missing = ?, extra = ?, status = ?, comment = ?, next_attempt_at = ?, done_at = ?,"
            " lease_owner = '', lease_expires = 0 WHERE source = ? AND bucket = ? AND study_uid = ?"
            " IF lease_owner = ?",
            (new.state, new.attempts, new.expected_instances, new.archived_instances, new.bytes,
             json.dumps(new.missing), json.dumps(new.extra), new.status, new.comment, new.next_attempt_at,
             new.done_at, source, b, study_uid, owner))
        if not rs.was_applied:
            raise LeaseHeld(f"study {study_uid} of {source} is no longer leased to this worker")
        if new.state != "done":
            self._x("INSERT INTO {ks}.migrate_due (source, state, bucket, next_attempt_at, study_uid)"
                    " VALUES (?, ?, ?, ?, ?)", (source, new.state, b, new.next_attempt_at, study_uid))
        self._x("DELETE FROM {ks}.migrate_due WHERE source = ? AND state = ? AND bucket = ? AND next_attempt_at = ?"
                " AND study_uid = ?", (source, old.state, b, old.next_attempt_at, study_uid))
        self._count(source, old.state, -1, old)
        self._count(source, new.state, 1, new)
        if new.state == "done":
            first, _ = self.times(source)
            self._x("UPDATE {ks}.migrate_source SET last_done_at = ?, first_done_at = ? WHERE source = ?",
                    (now, first or now, source))
        return new.state

    def get(self, source: str, study_uid: str) -> StudyPlan | None:
        """One study."""
        r = self._row(source, study_uid)
        return None if r is None else row_plan(r)

    def counts(self, source: str) -> dict[str, Counts]:
        """Counters per state."""
        out = {s: Counts() for s in STATES}
        for r in self._x("SELECT * FROM {ks}.migrate_count WHERE source = ?", (source,)):
            out[r["state"]] = Counts(r["studies"] or 0, r["instances"] or 0, r["archived"] or 0, r["bytes"] or 0)
        return out

    def times(self, source: str) -> tuple[float, float]:
        """First and last done_at."""
        rows = list(self._x("SELECT * FROM {ks}.migrate_source WHERE source = ?", (source,)))
        if not rows:
            return (0.0, 0.0)
        return (float(rows[0]["first_done_at"] or 0.0), float(rows[0]["last_done_at"] or 0.0))

    def sources(self) -> list[str]:
        """Sources with a plan (a small table)."""
        return sorted(r["source"] for r in self._x("SELECT source FROM {ks}.migrate_source"))

    def studies(self, source: str, state: str | None = None) -> Iterator[StudyPlan]:
        """Studies of a source, bucket by bucket, sorted by study UID."""
        rows: list[StudyPlan] = []
        for b in range(BUCKETS):
            for r in self._x("SELECT * FROM {ks}.migrate_study WHERE source = ? AND bucket = ?", (source, b)):
                if state is None or r["state"] == state:
                    rows.append(row_plan(r))
        yield from sorted(rows, key=lambda p: p.study_uid)
