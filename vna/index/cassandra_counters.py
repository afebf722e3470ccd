"""Catalogue counters of the Cassandra index without scans (schema v6): idempotent deltas, rolled up.

``stats()`` (``vna index stats``, the telemetry gauges) costs a read of
``SHARDS`` small partitions instead of a scan of the catalogue.

Model (table ``counter_ledger``, one partition per shard)
    * *totals*: a static map per shard and an ``epoch``, changed only by LWT
      (``IF epoch = e``), so roll-ups never double-apply.
    * *deltas*: rows ``d:<send second>:<event>`` written plainly **in the batch of
      the change they count** (the registration's commit; the placement
      transitions right after their LWT). The entry is keyed by the change, so a
      driver retry rewrites the same row, and a second front-end committing the
      same bytes writes an entry of the same *event* (``c|sop|version`` with its
      placements, ``cp|sop|version`` for the patient).
    * *markers*: ``e:<event>`` (TTL ``event_ttl``) for events already rolled,
      and ``s:<study>``, ``r:<series>``, ``p:<PatientID>`` for the distinct
      counts. A registration's rows go to the shard of its study (the study and
      series markers live there), its patient's row to the shard of its PatientID.

Roll-up (:meth:`CassandraCounters.rollup`, one front-end at a time under a
lease, every ``interval``): per shard, read the delta rows sent before
``now - margin`` (clustering order is send order), drop events that have an
``e:`` marker or repeat in the batch, count refs without a seen marker, then one
conditional batch on the shard's partition: new totals ``IF epoch = e``, the
markers, and one *range* delete of the rows read (one range tombstone per
roll-up, so reads never wade through per-row tombstones). A lost race (epoch
moved) re-reads. A delta that lands in an already rolled range is shadowed by
the range tombstone (its write time precedes the roll-up's Paxos time by more
than ``margin``, clock skew aside) and is lost: only a write slower than
``margin`` (past the server's write timeout, whose registration the writer
then reports failed or confirms) can do that; ``--recount`` repairs.

Read (:meth:`CassandraCounters.read`): the shards' totals (one ``SELECT
DISTINCT``) plus the pending deltas (at most ``margin + interval`` of traffic),
de-duplicated the same way against the markers. So a count is exact once its
change has committed: retries, identical concurrent registrations and kill -9
of a writer (nothing committed, nothing counted) leave it right.

Known gaps (``vna index stats --recount`` repairs the totals): a placement
transition whose front-end dies between its LWT and the delta write is not
counted; the stalled-writer take-over (a version committed by two writers of
other bytes) may count the loser's placements and its first commit; two
front-ends committing the same bytes onto different store sets (front-ends
must list the same hot replicas) count one writer's placements. The recount is exact on an index without
ingest in flight.

What is counted, per committed version (schema v1-5 semantics of ``stats()``):
instances and content bytes of the newest committed version of each SOP
instance; distinct studies, series and PatientIDs of committed versions;
placements per tier and state and the stored bytes of OK placements, of
committed versions.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
import zlib
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Mapping, Sequence

from cassandra.concurrent import execute_concurrent_with_args
from cassandra.cluster import Session
from cassandra.query import BatchStatement, BatchType, PreparedStatement, SimpleStatement

from vna.domain import InstanceRecord, Placement, PlacementState
from vna.index.base import IndexStats, TierStats

__all__ = ["CassandraCounters", "SHARDS", "shard_of"]

log = logging.getLogger(__name__)

SHARDS = 16
_ROLLUP_BATCH = 150  # delta rows per conditional batch (its markers stay under the batch size guardrail)
_ROLLUP_WORKERS = 8  # shards rolled up at once
_IN_CHUNK = 100
_EMPTY_PATIENT = "\x00"

Statement = tuple[PreparedStatement, tuple[Any, ...]]
Totals = dict[str, int]


def shard_of(key: str) -> int:
    """The ledger shard of a study UID or PatientID."""
    return zlib.crc32(key.encode("utf-8", "surrogatepass")) % SHARDS


def _patient_key(attrs: Mapping[str, Any]) -> str:
    """A patient's identity, (PatientID, IssuerOfPatientID), as one marker text ("\\" cannot occur in either)."""
    pid, issuer = str(attrs.get("PatientID", "")), str(attrs.get("IssuerOfPatientID", ""))
    return f"{pid}\\{issuer}" if issuer else pid


def _placement_deltas(p: Placement, sign: int) -> Totals:
    out = {f"pl|{p.tier.value}|{p.state.value}": sign}
    if p.state is PlacementState.OK:
        out[f"pb|{p.tier.value}"] = sign * int(p.stored_size)
    return out


def _add(into: Totals, deltas: dict[str, int] | None) -> None:
    for k, v in (deltas or {}).items():
        into[k] = into.get(k, 0) + int(v)


def _ref_counts(refs: Iterable[str]) -> Totals:
    out: Totals = {}
    for r in refs:
        key = {"s": "studies", "r": "series", "p": "patients"}.get(r[:1])
        if key:
            out[key] = out.get(key, 0) + 1
    return out


def to_stats(t: Totals) -> IndexStats:
    """IndexStats from a totals map (placements and bytes keyed ``pl|tier|state``, ``pb|tier``)."""
    tiers: dict[str, dict[str, Any]] = {}
    for k, v in t.items():
        if k.startswith("pl|") and v:
            _, tier, state = k.split("|", 2)
            e = tiers.setdefault(tier, {"placements": 0, "stored_bytes": 0, "by_state": {}})
            e["placements"] += v
            e["by_state"][state] = v
    for k, v in t.items():
        if k.startswith("pb|") and k[3:] in tiers:
            tiers[k[3:]]["stored_bytes"] = v
    return IndexStats(
        patients=t.get("patients", 0), studies=t.get("studies", 0), series=t.get("series", 0),
        instances=t.get("instances", 0), content_bytes=t.get("bytes", 0),
        tiers={k: TierStats(**v) for k, v in tiers.items()})


class CassandraCounters:
    """The counter ledger of one keyspace: delta statements for writers, roll-up, read and recount.

    ``prepare``: the index's statement cache (one per session). ``lease``: ``(name, owner, ttl) -> bool`` (the index's ``acquire_lease``), so
    one front-end rolls up at a time. Thread-safe.
    """

    def __init__(self, session: Session, keyspace: str, prepare: Callable[[str], PreparedStatement], *,
                 concurrency: int = 32, lease: Callable[[str, str, float], bool] | None = None,
                 margin: float = 5.0, interval: float = 2.0, event_ttl: float = 900.0) -> None:
        self._session = session
        self._t = f"{keyspace}.counter_ledger"
        self._concurrency = max(1, concurrency)
        self._lease = lease
        self._owner = f"counters-{uuid.uuid4()}"
        self.margin = margin
        self.interval = interval
        self.event_ttl = event_ttl
        self._prep = prepare
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- writers ---------------------------------------------------------------
    def _delta(self, shard: int, event: str, deltas: Totals, refs: Iterable[str] = ()) -> Statement:
        now = time.time()
        return (self._prep(f"INSERT INTO {self._t} (shard, entry, deltas, refs, stamp) VALUES (?, ?, ?, ?, ?)"),
                (shard, f"d:{int(now):012d}:{event}", deltas, set(refs) or None, int(now * 1_000_000)))

    def commit_statements(self, record: InstanceRecord, placements: Sequence[Placement],
                          previous_size: int | None) -> list[Statement]:
        """The delta rows of a registration's commit (to go in the commit's batch).

        ``previous_size``: content size of the newest earlier committed version, None if there is none.
        """
        pid = _patient_key(record.attrs)
        shard = shard_of(record.study_uid)
        key = f"{record.sop_uid}|{record.version}"
        deltas = {"instances": 1 if previous_size is None else 0,
                  "bytes": int(record.content_size) - (previous_size or 0)}
        for p in placements:
            _add(deltas, _placement_deltas(p, 1))
        return [self._delta(shard, f"c|{key}", deltas, {f"s:{record.study_uid}", f"r:{record.series_uid}"}),
                self._delta(shard_of(pid), f"cp|{key}", {}, {f"p:{pid or _EMPTY_PATIENT}"})]

    def placements_changed(self, removed: Sequence[Placement] = (), added: Sequence[Placement] = ()) -> None:
        """Count a placement change that has applied (after its LWT). Best effort: logged on failure."""
        deltas: Totals = {}
        for p in removed:
            _add(deltas, _placement_deltas(p, -1))
        for p in added:
            _add(deltas, _placement_deltas(p, 1))
        deltas = {k: v for k, v in deltas.items() if v}
        if not deltas:
            return
        stmt, params = self._delta(uuid.uuid4().int % SHARDS, f"t|{uuid.uuid4()}", deltas)
        try:
            self._session.execute(stmt, params)
        except Exception as exc:  # noqa: BLE001 - the change applied; only its count is lost
            log.warning("counter delta of a placement change lost (%s: %s); `vna index stats --recount` repairs",
                        type(exc).__name__, exc)

    # -- read ------------------------------------------------------------------
    def _statics(self, rows: Iterable[dict[str, Any]] | None = None) -> dict[int, tuple[Totals, int | None]]:
        if rows is None:
            rows = self._session.execute(self._prep(
                f"SELECT DISTINCT shard, totals, epoch FROM {self._t} WHERE shard IN ?"), (list(range(SHARDS)),))
        out: dict[int, tuple[Totals, int | None]] = {s: ({}, None) for s in range(SHARDS)}
        for r in rows:
            out[int(r["shard"])] = (dict(r["totals"] or {}), r["epoch"])
        return out

    def _pending(self, shard: int, upto: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        cql = f"SELECT entry, deltas, refs FROM {self._t} WHERE shard = ? AND entry >= 'd:' AND entry < " + \
              ("?" if upto is not None else "'d;'") + (f" LIMIT {int(limit)}" if limit else "")
        return list(self._session.execute(self._prep(cql), (shard, upto) if upto is not None else (shard,)))

    def _existing(self, shard: int, entries: Iterable[str]) -> set[str]:
        keys = list(dict.fromkeys(entries))
        stmt = self._prep(f"SELECT entry FROM {self._t} WHERE shard = ? AND entry IN ?")
        futures = [self._session.execute_async(stmt, (shard, keys[i:i + _IN_CHUNK]))
                   for i in range(0, len(keys), _IN_CHUNK)]
        return {r["entry"] for f in futures for r in f.result()}

    def _fold(self, shard: int, rows: Sequence[dict[str, Any]]) -> tuple[Totals, list[str], list[str]]:
        """(deltas, new event markers, new seen markers) of pending rows, de-duplicated."""
        events = {r["entry"].split(":", 2)[2]: r for r in rows}  # the same event twice: one row counts
        known = self._existing(shard, [f"e:{e}" for e in events] +
                               [ref for r in events.values() for ref in (r["refs"] or ())])
        total: Totals = {}
        new_events: list[str] = []
        new_refs: dict[str, None] = {}
        for event, r in events.items():
            if f"e:{event}" in known:
                continue
            new_events.append(event)
            _add(total, r["deltas"])
            for ref in r["refs"] or ():
                if ref not in known:
                    new_refs[ref] = None
        _add(total, _ref_counts(new_refs))
        return total, new_events, list(new_refs)

    def read(self) -> IndexStats:
        """Totals plus the pending deltas of every shard: two concurrent queries over the SHARDS partitions."""
        shards = list(range(SHARDS))
        statics_f = self._session.execute_async(self._prep(
            f"SELECT DISTINCT shard, totals, epoch FROM {self._t} WHERE shard IN ?"), (shards,))
        pending_f = self._session.execute_async(self._prep(
            f"SELECT shard, entry, deltas, refs FROM {self._t} WHERE shard IN ? AND entry >= 'd:' AND entry < 'd;'"),
            (shards,))
        statics = self._statics(statics_f.result())
        pending: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for r in pending_f.result():
            pending[int(r["shard"])].append(r)
        total: Totals = {}
        for shard in range(SHARDS):
            _add(total, statics[shard][0])
        busy = [shard for shard, rows in pending.items() if rows]
        if busy:
            with ThreadPoolExecutor(max_workers=min(_ROLLUP_WORKERS, len(busy))) as pool:
                for folded in pool.map(lambda shard: self._fold(shard, pending[shard])[0], busy):
                    _add(total, folded)
        return to_stats(total)

    # -- roll-up ---------------------------------------------------------------
    def rollup(self, *, margin: float | None = None) -> int:
        """Fold the deltas sent before ``now - margin`` into the totals, every shard; returns rows folded."""
        # entries are 'd:<send second>:<event>': everything sent in a second up to now - margin
        cutoff = f"d:{int(time.time() - (self.margin if margin is None else margin)) + 1:012d}:"
        def shard_rollup(shard: int) -> int:
            done = 0
            while True:
                n = self._rollup_batch(shard, cutoff)
                done += n
                if n < _ROLLUP_BATCH:
                    return done

        with ThreadPoolExecutor(max_workers=_ROLLUP_WORKERS, thread_name_prefix="vna-cass-rollup") as pool:
            return sum(pool.map(shard_rollup, range(SHARDS)))

    def _rollup_batch(self, shard: int, cutoff: str) -> int:
        for _attempt in range(10):
            totals, epoch = self._statics_of(shard)
            rows = self._pending(shard, cutoff, _ROLLUP_BATCH)
            if not rows:
                return 0
            delta, events, refs = self._fold(shard, rows)
            new = dict(totals)
            _add(new, delta)
            batch = BatchStatement(batch_type=BatchType.LOGGED)  # conditional: one Paxos round, one partition
            if epoch is None:
                batch.add(self._prep(f"UPDATE {self._t} SET totals = ?, epoch = 1 WHERE shard = ? IF epoch = null"),
                          (new, shard))
            else:
                batch.add(self._prep(f"UPDATE {self._t} SET totals = ?, epoch = ? WHERE shard = ? IF epoch = ?"),
                          (new, epoch + 1, shard, epoch))
            marker = self._prep(f"INSERT INTO {self._t} (shard, entry) VALUES (?, ?) USING TTL ?")
            for e in events:
                batch.add(marker, (shard, f"e:{e}", int(self.event_ttl)))
            seen = self._prep(f"INSERT INTO {self._t} (shard, entry) VALUES (?, ?)")
            for ref in refs:
                batch.add(seen, (shard, ref))
            batch.add(self._prep(f"DELETE FROM {self._t} WHERE shard = ? AND entry >= 'd:' AND entry <= ?"),
                      (shard, rows[-1]["entry"]))
            if self._session.execute(batch).was_applied:
                return len(rows)
        log.warning("counter roll-up of shard %d lost 10 races in a row; next time", shard)
        return 0

    def _statics_of(self, shard: int) -> tuple[Totals, int | None]:
        r = self._session.execute(self._prep(
            f"SELECT DISTINCT shard, totals, epoch FROM {self._t} WHERE shard = ?"), (shard,)).one()
        return (dict(r["totals"] or {}), r["epoch"]) if r else ({}, None)

    def start(self) -> None:
        """Roll up in the background every ``interval`` while this front-end holds the roll-up lease."""
        with self._lock:
            if self._thread is not None or self._stop.is_set():
                return
            self._thread = threading.Thread(target=self._loop, name="vna-cass-counters", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if self._lease is None or self._lease("counters-rollup", self._owner, max(10.0, 5 * self.interval)):
                    self.rollup()
            except Exception as exc:  # noqa: BLE001 - a roll-up is retried next interval
                log.warning("counter roll-up failed (%s: %s); retried in %.0f s", type(exc).__name__, exc,
                            self.interval)

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()

    # -- recount (operators) -----------------------------------------------------
    def recount(self, *, repair: bool) -> tuple[IndexStats, IndexStats]:
        """(maintained, recounted): a full scan of the catalogue; with ``repair``, the totals and seen
        markers are set to it. O(catalogue) time and memory: an operator's command, exact when no
        ingest is in flight."""
        if repair:
            self.rollup(margin=0.0)
        before = self.read()
        total, markers = self._scan()
        if repair:
            self._repair(total, markers)
        return before, to_stats(total)

    def _scan(self) -> tuple[Totals, dict[int, set[str]]]:
        ks = self._t.split(".", 1)[0]
        total: Totals = defaultdict(int)
        markers: dict[int, set[str]] = defaultdict(set)
        committed: set[tuple[str, int]] = set()
        studies: set[str] = set()
        series: set[str] = set()
        patients: set[str] = set()
        last = None
        for r in self._session.execute(SimpleStatement(
                f"SELECT sop_uid, version, study_uid, series_uid, content_size, complete, attrs "
                f"FROM {ks}.instance_versions", fetch_size=1000)):
            if not r["complete"]:
                continue
            committed.add((r["sop_uid"], int(r["version"])))
            if r["sop_uid"] != last:  # newest committed version first in its partition
                last = r["sop_uid"]
                total["instances"] += 1
                total["bytes"] += int(r["content_size"])
            pid = _patient_key(json.loads(r["attrs"] or "{}"))
            markers[shard_of(r["study_uid"])] |= {f"s:{r['study_uid']}", f"r:{r['series_uid']}"}
            markers[shard_of(pid)].add(f"p:{pid or _EMPTY_PATIENT}")
            studies.add(r["study_uid"])
            series.add(r["series_uid"])
            patients.add(pid)
        total["studies"], total["series"], total["patients"] = len(studies), len(series), len(patients)
        for r in self._session.execute(SimpleStatement(
                f"SELECT sop_uid, version, tier, state, stored_size FROM {ks}.placements", fetch_size=1000)):
            if (r["sop_uid"], int(r["version"])) in committed:
                total[f"pl|{r['tier']}|{r['state']}"] += 1
                if r["state"] == PlacementState.OK.value:
                    total[f"pb|{r['tier']}"] += int(r["stored_size"])
        return dict(total), markers

    def _repair(self, total: Totals, markers: dict[int, set[str]]) -> None:
        seen = self._prep(f"INSERT INTO {self._t} (shard, entry) VALUES (?, ?)")
        drop = self._prep(f"DELETE FROM {self._t} WHERE shard = ? AND entry = ?")
        for shard in range(SHARDS):
            have = {r["entry"] for r in self._session.execute(self._prep(
                f"SELECT entry FROM {self._t} WHERE shard = ? AND entry >= 'p:'"), (shard,))
                if r["entry"][:2] in ("p:", "r:", "s:")}
            want = markers.get(shard, set())
            for stmt, keys in ((seen, want - have), (drop, have - want)):
                if keys:
                    execute_concurrent_with_args(self._session, stmt, [(shard, k) for k in keys],
                                                 concurrency=self._concurrency, raise_on_first_error=True)
            for _attempt in range(10):
                _totals, epoch = self._statics_of(shard)
                new = total if shard == 0 else {}
                if epoch is None:
                    res = self._session.execute(self._prep(
                        f"UPDATE {self._t} SET totals = ?, epoch = 1 WHERE shard = ? IF epoch = null"), (new, shard))
                else:
                    res = self._session.execute(self._prep(
                        f"UPDATE {self._t} SET totals = ?, epoch = ? WHERE shard = ? IF epoch = ?"),
                        (new, epoch + 1, shard, epoch))
                if res.was_applied:
                    break
