"""Cassandra only: the per-study summary (schema v4) that answers STUDY-level C-FIND.

Every change that alters a study's computed keys must leave its summary either
exact or invalid (then answered from the partitions). Each check compares the
STUDY row served from a valid summary with the row computed from the
partitions, after every kind of change: registration, re-registration into
another study, placement transitions (hot -> cold), added placements, the v4
migration's backfill, and concurrent registrations from two front-ends.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

from tests.contracts.test_index import find, make_placement, make_record
from vna.config import CassandraConfig
from vna.domain import PlacementState, QueryLevel, Tier
from vna.index.cassandra import CassandraIndex

COMPUTED = ("ModalitiesInStudy", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
            "InstanceAvailability")


def summary_row(idx: CassandraIndex, admin: Any, study: str) -> dict[str, str] | None:
    """The study's STUDY row as answered from its summary, after re-summarising it (None: no row)."""
    idx._refresh([study])
    raw = admin.execute(f"SELECT * FROM {idx.cfg.keyspace}.studies WHERE study_uid = %s", (study,)).one()
    summary = CassandraIndex._summary(raw) if raw else None
    assert summary is not None, f"summary of {study} not valid after a refresh: {raw}"
    rows = find(idx, QueryLevel.STUDY, StudyInstanceUID=study)
    if summary["NumberOfStudyRelatedInstances"] == "0":
        assert rows == []
        return None
    assert len(rows) == 1 and {k: rows[0][k] for k in COMPUTED} == summary
    return rows[0]


def partition_row(idx: CassandraIndex, admin: Any, study: str) -> dict[str, str] | None:
    """The same row computed from the partitions (summary invalidated by hand)."""
    admin.execute(f"UPDATE {idx.cfg.keyspace}.studies SET sum_of = null WHERE study_uid = %s", (study,))
    rows = find(idx, QueryLevel.STUDY, StudyInstanceUID=study)
    return rows[0] if rows else None


def check(idx: CassandraIndex, admin: Any, study: str) -> dict[str, str] | None:
    from_summary = summary_row(idx, admin, study)
    assert partition_row(idx, admin, study) == from_summary
    return from_summary


def test_summary_follows_registrations_versions_and_lifecycle(cassandra_index: CassandraIndex,
                                                              cassandra_admin: Any) -> None:
    idx, admin = cassandra_index, cassandra_admin
    for i in range(3):
        idx.register(make_record(f"1.1.{i}", "1.1", "1.0", attrs={"Modality": "CT"}), [make_placement(f"1.1.{i}")])
    idx.register(make_record("1.2.0", "1.2", "1.0", attrs={"Modality": "SR"}), [make_placement("1.2.0")])
    row = check(idx, admin, "1.0")
    assert row is not None and (row["NumberOfStudyRelatedInstances"], row["NumberOfStudyRelatedSeries"],
                                row["ModalitiesInStudy"], row["InstanceAvailability"]) == ("4", "2", "CT\\SR", "ONLINE")

    # a new version of 1.2.0 in another study takes it (and its series) out of 1.0
    idx.register(make_record("1.2.0", "2.2", "2.0", version=2, attrs={"Modality": "MR"}),
                 [make_placement("1.2.0", version=2)])
    row = check(idx, admin, "1.0")
    assert row is not None and (row["NumberOfStudyRelatedInstances"], row["ModalitiesInStudy"]) == ("3", "CT")
    row = check(idx, admin, "2.0")
    assert row is not None and (row["NumberOfStudyRelatedInstances"], row["ModalitiesInStudy"]) == ("1", "MR")

    # lifecycle: a cold copy is added and finished, then the hot copies are retired -> NEARLINE
    for i in range(3):
        pending = make_placement(f"1.1.{i}", store="cold", tier=Tier.COLD, state=PlacementState.PENDING)
        idx.add_placements([pending])
        idx.replace_placement(pending, make_placement(f"1.1.{i}", store="cold", tier=Tier.COLD))
    assert check(idx, admin, "1.0")["InstanceAvailability"] == "ONLINE"  # type: ignore[index]
    for i in range(3):
        hot = make_placement(f"1.1.{i}")
        assert idx.transition(hot, PlacementState.TO_DELETE)
        if i == 0:
            assert check(idx, admin, "1.0")["InstanceAvailability"] == "NEARLINE"  # type: ignore[index]
    assert check(idx, admin, "1.0")["InstanceAvailability"] == "NEARLINE"  # type: ignore[index]
    # the cold copy goes bad -> UNAVAILABLE for that instance, so for the study
    assert idx.transition(make_placement("1.1.0", store="cold", tier=Tier.COLD), PlacementState.CORRUPT)
    assert check(idx, admin, "1.0")["InstanceAvailability"] == "UNAVAILABLE"  # type: ignore[index]


def test_a_pending_change_keeps_the_summary_invalid(cassandra_index: CassandraIndex, cassandra_admin: Any) -> None:
    """A writer between its mark and its settle (or dead there): readers use the partitions, store nothing."""
    idx, admin = cassandra_index, cassandra_admin
    idx.register(make_record("1.1.1", "1.1", "1.0"), [make_placement("1.1.1")])
    check(idx, admin, "1.0")
    mark = idx._mark(["1.0"])
    idx.register(make_record("1.1.2", "1.1", "1.0"), [make_placement("1.1.2")])
    # the registration settled its own token; ours is still pending
    idx._refresh(["1.0"])
    raw = admin.execute(f"SELECT * FROM {idx.cfg.keyspace}.studies WHERE study_uid = '1.0'").one()
    assert CassandraIndex._summary(raw) is None
    assert find(idx, QueryLevel.STUDY, StudyInstanceUID="1.0")[0]["NumberOfStudyRelatedInstances"] == "2"
    idx._settle(mark)
    assert check(idx, admin, "1.0")["NumberOfStudyRelatedInstances"] == "2"  # type: ignore[index]


def test_migration_v4_backfills_summaries(cassandra_config: Callable[..., CassandraConfig],
                                          cassandra_admin: Any) -> None:
    cfg = cassandra_config()
    idx = CassandraIndex(cfg)
    try:
        idx.migrate()
        for s in range(3):
            for i in range(s + 1):
                idx.register(make_record(f"{s}.1.{i}", f"{s}.1", f"{s}.0"), [make_placement(f"{s}.1.{i}")])
        ks = cfg.keyspace
        for s in range(3):  # as written by a v3 index
            cassandra_admin.execute(f"DELETE sum_done, sum_of, sum_instances, sum_series, sum_modalities, "
                                    f"sum_availability, sum_pending FROM {ks}.studies WHERE study_uid = %s",
                                    (f"{s}.0",))
        cassandra_admin.execute(f"DELETE FROM {ks}.schema_version WHERE version IN (4, 5, 6)")
        assert idx.migrate() == 6
        for s in range(3):
            raw = cassandra_admin.execute(f"SELECT * FROM {ks}.studies WHERE study_uid = %s", (f"{s}.0",)).one()
            assert CassandraIndex._summary(raw) is not None
            assert raw["sum_instances"] == s + 1
    finally:
        idx.close()
        cassandra_admin.execute(f"DROP KEYSPACE IF EXISTS {cfg.keyspace}")


def test_concurrent_front_ends_never_leave_a_wrong_summary(cassandra_index: CassandraIndex,
                                                          cassandra_admin: Any) -> None:
    """Two front-ends register into one study while a third keeps querying (and storing summaries)."""
    idx, admin = cassandra_index, cassandra_admin
    others = [CassandraIndex(idx.cfg) for _ in range(2)]
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer(ix: CassandraIndex, w: int) -> None:
        try:
            for i in range(15):
                ix.register(make_record(f"1.{w}.{i}", f"1.{w}", "1.0", attrs={"Modality": f"M{w}"}),
                            [make_placement(f"1.{w}.{i}")])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def reader() -> None:
        while not stop.is_set():
            find(idx, QueryLevel.STUDY, StudyInstanceUID="1.0")

    try:
        threads = [threading.Thread(target=writer, args=(ix, w)) for w, ix in enumerate(others)]
        r = threading.Thread(target=reader)
        r.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stop.set()
        r.join()
        assert not errors
        raw = admin.execute(f"SELECT * FROM {idx.cfg.keyspace}.studies WHERE study_uid = '1.0'").one()
        summary = CassandraIndex._summary(raw)
        assert summary is None or summary["NumberOfStudyRelatedInstances"] == "30"
        row = check(idx, admin, "1.0")
        assert row is not None and (row["NumberOfStudyRelatedInstances"], row["ModalitiesInStudy"]) == ("30", "M0\\M1")
    finally:
        for ix in others:
            ix.close()
