"""Cassandra registration after a crashed front-end (issue 19), on the real node.

A crash is simulated by doing the first half of a registration with the
adapter's own statements (:meth:`CassandraIndex._begin`: the candidate and the
rows, never the commit), then a second front-end (another CassandraIndex on
the same keyspace) writes.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import pytest

from tests.cassandra_node import KeyspacePool
from tests.contracts.test_index import P1, S1, make_placement, make_record, uids
from vna.config import CassandraConfig
from vna.domain import InstanceRecord, Placement, QueryLevel
from vna.errors import StateConflict
from vna.index.cassandra import CassandraIndex

pytestmark = pytest.mark.cassandra


@pytest.fixture
def two_frontends(cassandra_config: Callable[..., CassandraConfig],
                  cassandra_keyspaces: KeyspacePool) -> Iterator[tuple[CassandraIndex, CassandraIndex]]:
    keyspace = cassandra_keyspaces.acquire()
    first = CassandraIndex(cassandra_config(keyspace=keyspace))
    second = CassandraIndex(cassandra_config(keyspace=keyspace))
    try:
        yield first, second
    finally:
        first.close()
        second.close()
        cassandra_keyspaces.release(keyspace)


def crash_mid_registration(index: CassandraIndex, record: InstanceRecord, placements: list[Placement]) -> None:
    """What a front-end killed between its first writes and its commit leaves behind."""
    index._begin(record, placements)


def age_candidates(admin: Any, index: CassandraIndex, seconds: float) -> None:
    """Move every registration candidate ``seconds`` into the past (time passing, without waiting)."""
    t = f"{index.cfg.keyspace}.registrations"
    for r in list(admin.execute(f"SELECT sop_uid, version, content_sha256, writer, started_at FROM {t}")):
        admin.execute(f"UPDATE {t} SET started_at = %s WHERE sop_uid = %s AND version = %s "
                      "AND content_sha256 = %s AND writer = %s",
                      (r["started_at"] - seconds, r["sop_uid"], r["version"], r["content_sha256"], r["writer"]))


def record_of(sha: str) -> InstanceRecord:
    return make_record("1.4.1", "1.3.1", "1.2.1", attrs=P1 | S1 | {"Modality": "CT"}, sha=sha * 64)


def placement_of(sha: str, store: str) -> Placement:
    p = make_placement("1.4.1", store=store)
    return Placement(**{**p.__dict__, "content_sha256": sha * 64, "blob_key": f"{store}/{sha}"})


def test_resend_of_the_same_bytes_after_a_crash_is_stored_at_once(
        two_frontends: tuple[CassandraIndex, CassandraIndex]) -> None:
    dead, alive = two_frontends
    crash_mid_registration(dead, record_of("a"), [placement_of("a", "hot-old")])
    assert alive.get_instance("1.4.1") is None  # nothing of it is visible
    assert uids(alive, QueryLevel.IMAGE) == set()

    alive.register(record_of("a"), [placement_of("a", "hot-new")])  # no StateConflict, no wait

    assert alive.get_instance("1.4.1") == record_of("a")
    held = alive.placements("1.4.1")
    assert "hot-new" in {p.store_id for p in held}
    assert {p.content_sha256 for p in held} == {"a" * 64}
    assert uids(alive, QueryLevel.IMAGE) == {"1.4.1"}
    assert alive.abandoned_registrations(older_than=0.0) == []  # converged: nothing left over


def test_other_bytes_wait_only_while_the_dead_writer_could_still_commit(
        two_frontends: tuple[CassandraIndex, CassandraIndex], cassandra_admin: Any) -> None:
    dead, alive = two_frontends
    crash_mid_registration(dead, record_of("a"), [placement_of("a", "hot-a"), placement_of("a", "hot-b")])
    alive.contention_wait = 0.2
    with pytest.raises(StateConflict):  # the writer of "a" may still be alive: a retryable conflict
        alive.register(record_of("b"), [placement_of("b", "hot-a")])
    age_candidates(cassandra_admin, alive, alive.stale_claim_after + 1)  # ... now it cannot commit any more
    alive.register(record_of("b"), [placement_of("b", "hot-a")])
    assert alive.get_instance("1.4.1") == record_of("b")
    # the dead writer's copy on hot-b (other bytes) is not a placement of the stored version
    assert [(p.store_id, p.content_sha256) for p in alive.placements("1.4.1")] == [("hot-a", "b" * 64)]


def test_abandoned_registrations_are_counted_and_cleaned(
        two_frontends: tuple[CassandraIndex, CassandraIndex], cassandra_admin: Any) -> None:
    dead, alive = two_frontends
    crash_mid_registration(dead, record_of("a"), [placement_of("a", "hot-a")])
    assert alive.abandoned_registrations() == []  # in flight, not abandoned yet
    (left,) = alive.abandoned_registrations(older_than=0.0)
    assert (left.sop_uid, left.version, left.content_sha256) == ("1.4.1", 1, "a" * 64)
    assert alive.stats().instances == 0
    assert list(alive.iter_placements()) == []  # the uncommitted copy is no job's work

    assert alive.clean_abandoned(older_than=0.0) == 1
    assert alive.clean_abandoned(older_than=0.0) == 0  # idempotent
    assert alive.abandoned_registrations(older_than=0.0) == []
    ks = alive.cfg.keyspace
    assert list(cassandra_admin.execute(f"SELECT * FROM {ks}.placements")) == []
    assert list(cassandra_admin.execute(f"SELECT * FROM {ks}.instances")) == []
    alive.register(record_of("b"), [placement_of("b", "hot-a")])  # the UID is free for any bytes
    assert alive.get_instance("1.4.1") == record_of("b")


def test_front_ends_storing_overlapping_sets_converge(
        two_frontends: tuple[CassandraIndex, CassandraIndex]) -> None:
    """Identical retries from two front-ends (4 threads each) and one UID sent with other bytes by both."""
    import threading

    records = [make_record(f"1.5.{n}", f"1.3.{n % 3}", "1.2.1", attrs=P1 | S1, sha=f"{n:064d}") for n in range(40)]
    other = {0: record_of("b"), 1: record_of("c")}  # "1.4.1": two different contents, one must win
    outcomes: list[tuple[str, str]] = []
    errors: list[BaseException] = []

    def writer(index: CassandraIndex, mine: list[InstanceRecord]) -> None:
        for r in mine:
            try:
                index.register(r, [placement_of(r.content_sha256[0], "hot-a") if r.sop_uid == "1.4.1"
                                   else Placement(**{**make_placement(r.sop_uid).__dict__,
                                                     "content_sha256": r.content_sha256})])
                outcomes.append((r.sop_uid, r.content_sha256))
            except StateConflict:
                pass
            except BaseException as exc:  # reported, not lost in the thread
                errors.append(exc)

    threads = []
    for f, index in enumerate(two_frontends):
        for t in range(4):
            mine = records[t::4] + records[(t + 1) % 4::4] + [other[f]]  # every record twice per front-end
            threads.append(threading.Thread(target=writer, args=(index, mine)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    a, b = two_frontends
    for r in records:
        assert a.get_instance(r.sop_uid) == b.get_instance(r.sop_uid)
        assert a.get_instance(r.sop_uid).content_sha256 == r.content_sha256  # type: ignore[union-attr]
        assert (r.sop_uid, r.content_sha256) in outcomes  # acknowledged at least once
    won = a.get_instance("1.4.1")
    assert won is not None
    assert {p.content_sha256 for p in a.placements("1.4.1")} == {won.content_sha256}
    assert all(sha == won.content_sha256 for sop, sha in outcomes if sop == "1.4.1")  # the loser never acked
    assert a.stats().instances == len(records) + 1
    assert uids(b, QueryLevel.IMAGE) == {r.sop_uid for r in records} | {"1.4.1"}
    assert a.abandoned_registrations(older_than=0.0) == []


def test_a_schema_v4_claim_left_incomplete_is_listed_cleaned_and_no_obstacle(
        two_frontends: tuple[CassandraIndex, CassandraIndex], cassandra_admin: Any) -> None:
    """What a v4 front-end killed mid-registration left (an LWT claim, complete = false, and its rows)."""
    import json
    import uuid

    _, alive = two_frontends
    ks = alive.cfg.keyspace
    r = record_of("a")
    cassandra_admin.execute(
        f"INSERT INTO {ks}.instance_versions (sop_uid, version, series_uid, study_uid, content_sha256, "
        "content_size, attrs, complete, claim_id, claimed_at) VALUES (%s, 1, %s, %s, %s, 1000, %s, false, %s, %s)",
        (r.sop_uid, r.series_uid, r.study_uid, r.content_sha256, json.dumps(r.attrs), uuid.uuid4(), 1_000.0))
    alive._write_rows(r, [placement_of("a", "hot-a")], [])
    (left,) = alive.abandoned_registrations()
    assert (left.sop_uid, left.content_sha256) == ("1.4.1", "a" * 64)
    assert alive.get_instance("1.4.1") is None
    assert alive.clean_abandoned() == 1
    assert alive.abandoned_registrations() == []
    assert list(cassandra_admin.execute(f"SELECT * FROM {ks}.instance_versions")) == []
    assert list(cassandra_admin.execute(f"SELECT * FROM {ks}.placements")) == []
    alive.register(record_of("b"), [placement_of("b", "hot-b")])
    assert alive.get_instance("1.4.1") == record_of("b")


# -- a writer stalled past stale_claim_after/2 (issue 19 review finding) ---------------------------------
# The stall is driven through the adapter's own protocol steps: ``_begin`` (candidate, decision,
# rows), then time passes (the candidates are aged: a rival deems the writer dead), then
# ``_finish`` (commit, then what decides whether it may acknowledge) with a monotonic start
# ``stale_claim_after`` in the past, exactly as ``register`` calls it after its deadline check.

def stalled(index: CassandraIndex) -> float:
    """The monotonic start of an attempt that has been running for stale_claim_after."""
    import time

    return time.monotonic() - index.stale_claim_after


def test_a_stalled_writer_whose_rival_took_over_is_never_acknowledged(
        two_frontends: tuple[CassandraIndex, CassandraIndex], cassandra_admin: Any) -> None:
    slow, rival = two_frontends
    a = [placement_of("a", "hot-a"), placement_of("a", "hot-x")]
    writer, stamp, _t0, marks = slow._begin(record_of("a"), a)
    age_candidates(cassandra_admin, rival, rival.stale_claim_after + 1)  # the stall: "a" looks dead
    rival.register(record_of("b"), [placement_of("b", "hot-a")])  # takes the version over: acknowledged

    with pytest.raises(StateConflict):  # the stalled commit lands now, but "a" was not stored
        slow._finish(record_of("a"), writer, stamp, stalled(slow), [p.store_id for p in a])
    slow._settle_shared(marks)

    for index in two_frontends:  # "b", acknowledged, is what every reader sees, whole
        assert index.get_instance("1.4.1") == record_of("b")
        assert [(p.store_id, p.content_sha256) for p in index.placements("1.4.1")] == [("hot-a", "b" * 64)]
    ks = rival.cfg.keyspace
    assert [r["content_sha256"] for r in cassandra_admin.execute(f"SELECT * FROM {ks}.instances")] == ["b" * 64]
    assert uids(slow, QueryLevel.IMAGE) == {"1.4.1"}


def test_a_stalled_writer_waits_for_a_rival_still_in_flight_and_never_both_acknowledge(
        two_frontends: tuple[CassandraIndex, CassandraIndex], cassandra_admin: Any) -> None:
    """The rival read before the stalled commit landed and commits after it: the later start wins."""
    slow, rival = two_frontends
    slow.contention_wait = 0.3
    a = [placement_of("a", "hot-a")]
    writer_a, stamp_a, _t0, marks_a = slow._begin(record_of("a"), a)
    age_candidates(cassandra_admin, rival, rival.stale_claim_after + 1)
    writer_b, stamp_b, t0_b, marks_b = rival._begin(record_of("b"), [placement_of("b", "hot-a")])

    from vna.errors import IndexUnavailable
    with pytest.raises(IndexUnavailable):  # committed, but "b" may still take it over: not acknowledged
        slow._finish(record_of("a"), writer_a, stamp_a, stalled(slow), ["hot-a"])
    rival._finish(record_of("b"), writer_b, stamp_b, t0_b, ["hot-a"])  # in time: acknowledged
    slow._settle_shared(marks_a)
    rival._settle_shared(marks_b)

    assert slow.get_instance("1.4.1") == record_of("b")  # its commit wins whichever landed last
    assert [(p.store_id, p.content_sha256) for p in slow.placements("1.4.1")] == [("hot-a", "b" * 64)]


def test_a_stalled_writer_that_the_rival_lost_to_is_acknowledged(
        two_frontends: tuple[CassandraIndex, CassandraIndex], cassandra_admin: Any) -> None:
    """A rival that read after the stalled commit landed gets StateConflict and withdraws."""
    import threading
    import time

    slow, rival = two_frontends
    slow.contention_wait = 5.0
    writer_a, stamp_a, _t0, marks_a = slow._begin(record_of("a"), [placement_of("a", "hot-a")])
    age_candidates(cassandra_admin, rival, rival.stale_claim_after + 1)
    cassandra_admin.execute(  # a rival of other bytes begun after it, still deciding
        f"INSERT INTO {rival.cfg.keyspace}.registrations (sop_uid, version, content_sha256, writer, study_uid, "
        "series_uid, started_at, state) VALUES ('1.4.1', 1, %s, uuid(), '1.2.1', '1.3.1', %s, 'writing')",
        ("b" * 64, time.time()))

    def rival_gives_up() -> None:  # what the rival does once it reads the commit: withdraw
        time.sleep(0.5)
        cassandra_admin.execute(f"DELETE FROM {rival.cfg.keyspace}.registrations WHERE sop_uid = '1.4.1' "
                                "AND version = 1 AND content_sha256 = %s", ("b" * 64,))

    t = threading.Thread(target=rival_gives_up)
    t.start()
    slow._finish(record_of("a"), writer_a, stamp_a, stalled(slow), ["hot-a"])  # waited, then acknowledged
    t.join()
    slow._settle_shared(marks_a)
    assert rival.get_instance("1.4.1") == record_of("a")
    assert [(p.store_id, p.content_sha256) for p in rival.placements("1.4.1")] == [("hot-a", "a" * 64)]
