"""Contract suite of the Index port, run on every adapter (SQLite and Cassandra).

The Cassandra adapter runs against the real node of ``tests/cassandra_node.py``.
The last class checks Cassandra-only registration atomicity (candidate, rows,
commit) with injected driver failures.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from vna.config import CassandraConfig
from vna.domain import InstanceRecord, Placement, PlacementState, QueryLevel, Tier
from vna.errors import IndexUnavailable, StateConflict
from vna.index.base import Index
from vna.index.cassandra import SCHEMA_VERSION as CASSANDRA_SCHEMA, CassandraIndex
from vna.index.query import UNIQUE_KEY, keys_for_level, make_condition
from vna.index.sqlite import SqliteIndex

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


# -- builders ------------------------------------------------------------------
def make_record(
    sop: str, series: str, study: str, *, version: int = 1, attrs: dict[str, str] | None = None,
    sha: str | None = None, size: int = 1000, received_at: float = 1_700_000_000.25,
) -> InstanceRecord:
    a = {"StudyInstanceUID": study, "SeriesInstanceUID": series, "SOPInstanceUID": sop, "SOPClassUID": CT_IMAGE}
    a.update(attrs or {})
    return InstanceRecord(
        sop_uid=sop, series_uid=series, study_uid=study, sop_class_uid=CT_IMAGE,
        transfer_syntax_uid=EXPLICIT_LE, version=version, content_sha256=sha or f"{sop}-v{version}".ljust(64, "0"),
        content_size=size, received_at=received_at, source_ae="MODALITY", attrs=a,
    )


def make_placement(
    sop: str, *, version: int = 1, store: str = "hot-a", tier: Tier = Tier.HOT,
    state: PlacementState = PlacementState.OK, size: int = 1000,
) -> Placement:
    return Placement(
        sop_uid=sop, version=version, tier=tier, store_id=store, blob_key=f"{store}/{sop}.v{version}",
        codec="identity", content_sha256=f"{sop}-v{version}".ljust(64, "0"), content_size=size,
        stored_sha256=f"{sop}-v{version}".ljust(64, "0"), stored_size=size, state=state,
        created_at=1_700_000_000.5, verified_at=None,
    )


def query(index: Index, level: QueryLevel, identifier: dict[str, str], limit: int | None) -> list[dict[str, str]]:
    conds = [c for kw, v in identifier.items() if (c := make_condition(kw, v)) is not None]
    return list(index.find(level, conds, limit=limit))


def find(index: Index, level: QueryLevel, *, limit: int | None = None, **identifier: str) -> list[dict[str, str]]:
    return query(index, level, identifier, limit)


def uids(index: Index, level: QueryLevel, **identifier: str) -> set[str]:
    rows = query(index, level, identifier, None)
    found = [r[UNIQUE_KEY[level]] for r in rows]
    assert len(found) == len(set(found)), f"duplicate rows: {found}"
    return set(found)


# -- fixtures ------------------------------------------------------------------
@pytest.fixture(params=["sqlite", "cassandra"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def index(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Index]:
    if backend == "sqlite":
        idx = SqliteIndex(tmp_path / "index.sqlite")
        idx.migrate()
        yield idx
        idx.close()
    else:
        yield request.getfixturevalue("cassandra_index")


# Patients, studies, series, instances of the query tests:
#   PID1 Doe^John   S1 1.2.1 (20200115 101500 ACC1): 1.3.1 CT [1.4.1, 1.4.2], 1.3.2 MR [1.4.3]
#                   S2 1.2.2 (20210620 0930 ACC2):   1.3.3 US [1.4.4 cold only]
#   PID2 Smith^Anna S3 1.2.3 (20191231 2359 ACC3):   1.3.4 CT [1.4.5 MISSING, 1.4.6]
#   PID3 (no name)  S4 1.2.4 (no date, no acc.):     1.3.5 (no modality) [1.4.7 hot + cold]
P1 = {"PatientID": "PID1", "PatientName": "Doe^John", "PatientBirthDate": "19700101", "PatientSex": "M"}
P2 = {"PatientID": "PID2", "PatientName": "Smith^Anna", "PatientBirthDate": "19851224", "PatientSex": "F"}
P3 = {"PatientID": "PID3", "PatientName": "", "PatientBirthDate": "", "PatientSex": "O"}
S1 = {"StudyDate": "20200115", "StudyTime": "101500", "AccessionNumber": "ACC1", "StudyDescription": "CT HEAD",
      "ReferringPhysicianName": "Who^Doctor", "StudyID": "1"}
S2 = {"StudyDate": "20210620", "StudyTime": "0930", "AccessionNumber": "ACC2", "StudyDescription": "US ABD"}
S3 = {"StudyDate": "20191231", "StudyTime": "2359", "AccessionNumber": "ACC3"}
S4 = {"StudyDate": "", "StudyTime": "", "AccessionNumber": ""}
CATALOGUE: list[tuple[str, str, str, dict[str, str], list[tuple[str, Tier, PlacementState]]]] = [
    ("1.4.1", "1.3.1", "1.2.1", P1 | S1 | {"Modality": "CT", "SeriesNumber": "1", "InstanceNumber": "1"},
     [("hot-a", Tier.HOT, PlacementState.OK), ("hot-b", Tier.HOT, PlacementState.OK)]),
    ("1.4.2", "1.3.1", "1.2.1", P1 | S1 | {"Modality": "CT", "SeriesNumber": "1", "InstanceNumber": "2"},
     [("hot-a", Tier.HOT, PlacementState.OK)]),
    ("1.4.3", "1.3.2", "1.2.1", P1 | S1 | {"Modality": "MR", "SeriesNumber": "2", "InstanceNumber": "1"},
     [("cache", Tier.CACHE, PlacementState.OK)]),
    ("1.4.4", "1.3.3", "1.2.2", P1 | S2 | {"Modality": "US", "SeriesDate": "20210620"},
     [("hot-a", Tier.HOT, PlacementState.TO_DELETE), ("cold", Tier.COLD, PlacementState.OK)]),
    ("1.4.5", "1.3.4", "1.2.3", P2 | S3 | {"Modality": "CT", "Rows": "512", "Columns": "512"},
     [("hot-a", Tier.HOT, PlacementState.MISSING)]),
    ("1.4.6", "1.3.4", "1.2.3", P2 | S3 | {"Modality": "CT", "Rows": "512", "Columns": "512"},
     [("hot-a", Tier.HOT, PlacementState.OK)]),
    ("1.4.7", "1.3.5", "1.2.4", P3 | S4 | {"Modality": ""},
     [("hot-a", Tier.HOT, PlacementState.OK), ("cold", Tier.COLD, PlacementState.OK)]),
]


def load_catalogue(index: Index) -> None:
    for n, (sop, series, study, attrs, copies) in enumerate(CATALOGUE):
        record = make_record(sop, series, study, attrs=attrs, size=1000 + n, received_at=1_700_000_000.0 + n)
        index.register(record, [make_placement(sop, store=s, tier=t, state=st, size=500 + n) for s, t, st in copies])


@pytest.fixture
def catalogue(index: Index) -> Index:
    load_catalogue(index)
    return index


# -- schema, register, versions ------------------------------------------------------
def test_migrate_is_idempotent(index: Index) -> None:
    version = index.migrate()
    assert version >= 2
    assert index.migrate() == version


def test_migrate_creates_a_new_cassandra_keyspace(cassandra_config: Callable[..., CassandraConfig],
                                                   cassandra_admin: Any) -> None:
    cfg = cassandra_config()
    idx = CassandraIndex(cfg)
    try:
        assert idx.migrate() == CASSANDRA_SCHEMA
        assert idx.migrate() == CASSANDRA_SCHEMA
        idx.register(make_record("1.9", "1.8", "1.7"), [make_placement("1.9")])
        assert idx.get_instance("1.9") is not None
        rows = cassandra_admin.execute("SELECT * FROM system_schema.keyspaces WHERE keyspace_name = %s",
                                       (cfg.keyspace,)).one()
        assert "NetworkTopologyStrategy" in rows["replication"]["class"]
    finally:
        idx.close()
        cassandra_admin.execute(f"DROP KEYSPACE IF EXISTS {cfg.keyspace}")


def test_cassandra_migration_v3_backfills_name_keys(cassandra_config: Callable[..., CassandraConfig],
                                                    cassandra_admin: Any) -> None:
    """An index written before schema v3 (no name_family/name_fg) answers PatientName queries after migrate."""
    cfg = cassandra_config()
    idx = CassandraIndex(cfg)
    try:
        idx.migrate()
        names = {"1.7": "Smith^John", "1.17": "SMITHSON^Jane", "1.27": "smith", "1.37": "Doe^^X"}
        for study, name in names.items():
            idx.register(make_record(f"{study}.9", f"{study}.8", study, attrs={"PatientName": name}),
                         [make_placement(f"{study}.9")])
        ks = cfg.keyspace
        for study in names:  # as written by a v2 index
            cassandra_admin.execute(f"DELETE name_family, name_fg FROM {ks}.studies WHERE study_uid = %s", (study,))
        cassandra_admin.execute(f"DELETE FROM {ks}.schema_version WHERE version IN (3, 4, 5, 6, 7)")
        assert uids(idx, QueryLevel.STUDY, PatientName="SMITH^J*") == set()  # what v2 data looks like to v3
        assert idx.migrate() == CASSANDRA_SCHEMA
        assert uids(idx, QueryLevel.STUDY, PatientName="SMITH^J*") == {"1.7"}
        assert uids(idx, QueryLevel.STUDY, PatientName="smith") == {"1.27"}
        assert uids(idx, QueryLevel.STUDY, PatientName="Smith^John") == {"1.7"}
        assert uids(idx, QueryLevel.STUDY, PatientName="SMITHSON^*") == {"1.17"}
        assert uids(idx, QueryLevel.STUDY, PatientName="DOE^^*") == {"1.37"}
        assert uids(idx, QueryLevel.STUDY, PatientName="SMI*") == {"1.7", "1.17", "1.27"}
    finally:
        idx.close()
        cassandra_admin.execute(f"DROP KEYSPACE IF EXISTS {cfg.keyspace}")


def test_register_get_instance_and_placements(index: Index) -> None:
    assert index.get_instance("1.4.1") is None
    assert index.placements("1.4.1") == []
    record = make_record("1.4.1", "1.3.1", "1.2.1", attrs=P1 | S1 | {"Modality": "CT"})
    copies = [make_placement("1.4.1", store="hot-a"), make_placement("1.4.1", store="hot-b", state=PlacementState.MISSING)]
    index.register(record, copies)
    assert index.get_instance("1.4.1") == record
    assert sorted(index.placements("1.4.1"), key=lambda p: p.store_id) == copies
    assert sorted(index.placements("1.4.1", 1), key=lambda p: p.store_id) == copies
    assert index.placements("1.4.1", 2) == []


def test_placements_many_are_the_current_versions_placements(index: Index) -> None:
    index.register(make_record("1.4.1", "1.3.1", "1.2.1", attrs=P1 | S1),
                   [make_placement("1.4.1", store="hot-a"),
                    make_placement("1.4.1", store="hot-b", state=PlacementState.CORRUPT)])
    index.register(make_record("1.4.2", "1.3.1", "1.2.1", attrs=P1 | S1), [make_placement("1.4.2", store="hot-a")])
    index.register(make_record("1.4.2", "1.3.1", "1.2.1", version=2, attrs=P1 | S1, received_at=1_700_000_100.0),
                   [make_placement("1.4.2", version=2, store="hot-b")])
    many = index.placements_many(["1.4.2", "1.9.9", "1.4.1"])
    assert set(many) == {"1.4.1", "1.4.2", "1.9.9"}
    for sop in ("1.4.1", "1.4.2", "1.9.9"):
        key = (lambda p: p.store_id)
        assert sorted(many[sop], key=key) == sorted(index.placements(sop), key=key), sop
    assert [p.version for p in many["1.4.2"]] == [2]
    assert index.placements_many([]) == {}
    # more UIDs than one IN list holds, each asked for once
    sops = [f"1.5.{i}" for i in range(620)]
    for sop in sops:
        index.register(make_record(sop, "1.3.2", "1.2.2", attrs=P2 | S2), [make_placement(sop)])
    many = index.placements_many([*sops, sops[0]])
    assert len(many) == len(sops) and all([p.sop_uid for p in many[s]] == [s] for s in sops)


def test_placement_fields_round_trip(index: Index) -> None:
    cold = Placement(
        sop_uid="1.5", version=1, tier=Tier.COLD, store_id="s3-cold", blob_key="bundles/b1.zst", codec="zstd",
        content_sha256="a" * 64, content_size=1234, stored_sha256="b" * 64, stored_size=99,
        state=PlacementState.PENDING, created_at=1.5, verified_at=2.25, offset=4096, length=99)
    index.register(make_record("1.5", "1.4", "1.3"), [cold])
    assert index.placements("1.5") == [cold]


def test_register_same_version_twice_conflicts_and_changes_nothing(index: Index) -> None:
    first = make_record("1.4.1", "1.3.1", "1.2.1", attrs=P1 | S1, sha="a" * 64)
    index.register(first, [make_placement("1.4.1", store="hot-a")])
    again = make_record("1.4.1", "1.3.1", "1.2.1", attrs=P2 | S2, sha="b" * 64)
    with pytest.raises(StateConflict):
        index.register(again, [make_placement("1.4.1", store="hot-z")])
    assert index.get_instance("1.4.1") == first
    assert [p.store_id for p in index.placements("1.4.1")] == ["hot-a"]
    assert uids(index, QueryLevel.STUDY, PatientID="PID1") == {"1.2.1"}
    assert uids(index, QueryLevel.STUDY, PatientID="PID2") == set()


def test_versions_current_is_newest(index: Index) -> None:
    v1 = make_record("1.4.1", "1.3.1", "1.2.1", version=1, attrs=P1 | S1 | {"InstanceNumber": "1"})
    v2 = make_record("1.4.1", "1.3.1", "1.2.1", version=2, attrs=P1 | S1 | {"InstanceNumber": "7"},
                     received_at=1_700_000_100.0)
    index.register(v1, [make_placement("1.4.1", version=1, store="hot-a")])
    index.register(v2, [make_placement("1.4.1", version=2, store="hot-b")])
    assert index.get_instance("1.4.1") == v2
    assert [p.store_id for p in index.placements("1.4.1")] == ["hot-b"]
    assert [p.store_id for p in index.placements("1.4.1", 1)] == ["hot-a"]
    rows = find(index, QueryLevel.IMAGE, SOPInstanceUID="1.4.1")
    assert [(r["version"], r["InstanceNumber"]) for r in rows] == [("2", "7")]
    assert find(index, QueryLevel.STUDY)[0]["NumberOfStudyRelatedInstances"] == "1"


def test_concurrent_registrations_of_one_version_one_wins(index: Index) -> None:
    records = [make_record("1.4.1", "1.3.1", "1.2.1", sha=str(n) * 64, attrs={"InstanceNumber": str(n)})
               for n in range(4)]
    outcomes: list[str] = []

    def register(record: InstanceRecord) -> None:
        try:
            index.register(record, [make_placement("1.4.1", store=f"hot-{record.content_sha256[0]}")])
            outcomes.append("ok")
        except StateConflict:
            outcomes.append("conflict")
        except IndexUnavailable as exc:
            outcomes.append(f"unavailable: {exc}")

    threads = [threading.Thread(target=register, args=(r,)) for r in records]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["conflict", "conflict", "conflict", "ok"]
    winner = index.get_instance("1.4.1")
    assert winner is not None
    assert [p.store_id for p in index.placements("1.4.1")] == [f"hot-{winner.content_sha256[0]}"]
    (row,) = find(index, QueryLevel.IMAGE)
    assert row["InstanceNumber"] == winner.attrs["InstanceNumber"]


# -- transitions ---------------------------------------------------------------------
def test_transition_is_compare_and_set(index: Index) -> None:
    p = make_placement("1.4.1", store="hot-a")
    index.register(make_record("1.4.1", "1.3.1", "1.2.1"), [p])
    assert index.transition(p, PlacementState.CORRUPT, verified_at=123.5)
    assert not index.transition(p, PlacementState.MISSING)  # stale expected state
    (now,) = index.placements("1.4.1")
    assert (now.state, now.verified_at) == (PlacementState.CORRUPT, 123.5)
    wrong_key = Placement(**{**now.__dict__, "blob_key": "other"})
    assert not index.transition(wrong_key, PlacementState.OK)
    assert index.transition(now, PlacementState.OK)
    (again,) = index.placements("1.4.1")
    assert (again.state, again.verified_at) == (PlacementState.OK, 123.5)  # verified_at kept when not given
    ghost = make_placement("1.4.1", store="nowhere")
    assert not index.transition(ghost, PlacementState.CORRUPT)


def test_to_delete_needs_another_ok_copy(index: Index) -> None:
    hot = make_placement("1.4.1", store="hot-a")
    cold = make_placement("1.4.1", store="cold", tier=Tier.COLD, state=PlacementState.PENDING)
    index.register(make_record("1.4.1", "1.3.1", "1.2.1"), [hot, cold])
    assert not index.transition(hot, PlacementState.TO_DELETE)  # the cold copy is not verified yet
    assert index.transition(cold, PlacementState.OK)
    cold_ok = Placement(**{**cold.__dict__, "state": PlacementState.OK})
    assert index.transition(hot, PlacementState.TO_DELETE)
    assert not index.transition(cold_ok, PlacementState.TO_DELETE)  # the last OK copy stays
    states = {p.store_id: p.state for p in index.placements("1.4.1")}
    assert states == {"hot-a": PlacementState.TO_DELETE, "cold": PlacementState.OK}


def test_two_copies_cannot_both_be_retired_concurrently(index: Index) -> None:
    copies = [make_placement("1.4.1", store=f"hot-{n}") for n in range(2)]
    index.register(make_record("1.4.1", "1.3.1", "1.2.1"), copies)
    for _round in range(3):
        results: list[bool] = []
        errors: list[Exception] = []
        barrier = threading.Barrier(2)

        def retire(p: Placement) -> None:
            barrier.wait()
            try:
                results.append(index.transition(p, PlacementState.TO_DELETE))
            except IndexUnavailable as exc:  # reported, not lost in the thread
                errors.append(exc)

        threads = [threading.Thread(target=retire, args=(p,)) for p in index.placements("1.4.1")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert results.count(True) <= 1
        states = [p.state for p in index.placements("1.4.1")]
        assert PlacementState.OK in states
        for p in index.placements("1.4.1"):  # back to two OK copies for the next round
            if p.state is PlacementState.TO_DELETE:
                assert index.transition(p, PlacementState.OK)


# -- find ------------------------------------------------------------------------------
def test_find_single_value(catalogue: Index) -> None:
    assert uids(catalogue, QueryLevel.STUDY, AccessionNumber="ACC2") == {"1.2.2"}
    assert uids(catalogue, QueryLevel.STUDY, PatientID="PID2") == {"1.2.3"}
    assert uids(catalogue, QueryLevel.STUDY, StudyDate="20191231") == {"1.2.3"}
    assert uids(catalogue, QueryLevel.STUDY, StudyTime="0930") == {"1.2.2"}
    assert uids(catalogue, QueryLevel.STUDY, AccessionNumber="acc2") == set()  # SH is case-sensitive
    assert uids(catalogue, QueryLevel.SERIES, Modality="CT") == {"1.3.1", "1.3.4"}
    assert uids(catalogue, QueryLevel.IMAGE, InstanceNumber="2") == {"1.4.2"}


def test_find_wildcards(catalogue: Index) -> None:
    assert uids(catalogue, QueryLevel.STUDY, AccessionNumber="ACC*") == {"1.2.1", "1.2.2", "1.2.3"}
    assert uids(catalogue, QueryLevel.STUDY, AccessionNumber="AC?1") == {"1.2.1"}
    assert uids(catalogue, QueryLevel.STUDY, AccessionNumber="*2") == {"1.2.2"}
    assert uids(catalogue, QueryLevel.STUDY, PatientName="Doe*") == {"1.2.1", "1.2.2"}
    assert uids(catalogue, QueryLevel.STUDY, PatientName="D?e^J*") == {"1.2.1", "1.2.2"}
    assert uids(catalogue, QueryLevel.STUDY, PatientName="*^Anna") == {"1.2.3"}
    assert uids(catalogue, QueryLevel.STUDY, StudyDescription="*HEAD") == {"1.2.1"}
    assert uids(catalogue, QueryLevel.SERIES, Modality="?T") == {"1.3.1", "1.3.4"}


def test_find_person_names_are_case_insensitive(catalogue: Index) -> None:
    assert uids(catalogue, QueryLevel.STUDY, PatientName="doe^john") == {"1.2.1", "1.2.2"}
    assert uids(catalogue, QueryLevel.STUDY, PatientName="SMITH*") == {"1.2.3"}
    assert uids(catalogue, QueryLevel.STUDY, PatientName="s") == set()
    assert uids(catalogue, QueryLevel.STUDY, ReferringPhysicianName="WHO^doctor") == {"1.2.1"}
    assert uids(catalogue, QueryLevel.PATIENT, PatientName="do*") == {"PID1"}


def test_find_date_ranges(catalogue: Index) -> None:
    assert uids(catalogue, QueryLevel.STUDY, StudyDate="20200101-20201231") == {"1.2.1"}
    assert uids(catalogue, QueryLevel.STUDY, StudyDate="20200101-") == {"1.2.1", "1.2.2"}
    assert uids(catalogue, QueryLevel.STUDY, StudyDate="-20200115") == {"1.2.1", "1.2.3"}
    assert uids(catalogue, QueryLevel.STUDY, StudyDate="20200116-20210619") == set()
    assert uids(catalogue, QueryLevel.STUDY, StudyDate="20191231\\20210620") == {"1.2.2", "1.2.3"}
    assert uids(catalogue, QueryLevel.PATIENT, PatientBirthDate="1980-") == {"PID2"}
    assert uids(catalogue, QueryLevel.SERIES, SeriesDate="20210101-") == {"1.3.3"}


def test_find_dates_that_are_not_dates(index: Index) -> None:
    # stored values that are not YYYYMMDD still compare as strings, as in SQLite
    for n, day in enumerate(["2020", "20201340", "20200615", ""]):
        index.register(make_record(f"1.4.{n}", f"1.3.{n}", f"1.2.{n}", attrs={"StudyDate": day}), [])
    assert uids(index, QueryLevel.STUDY, StudyDate="20190101-20210101") == {"1.2.0", "1.2.1", "1.2.2"}
    assert uids(index, QueryLevel.STUDY, StudyDate="20200101-20201231") == {"1.2.2"}
    assert uids(index, QueryLevel.STUDY, StudyDate="2020-") == {"1.2.0", "1.2.1", "1.2.2"}
    assert uids(index, QueryLevel.STUDY, StudyDate="-2020") == {"1.2.0"}
    assert uids(index, QueryLevel.IMAGE, StudyDate="2020") == {"1.4.0"}
    assert uids(index, QueryLevel.SERIES, StudyDate="20201340\\20200615") == {"1.3.1", "1.3.2"}


def test_find_time_ranges(catalogue: Index) -> None:
    assert uids(catalogue, QueryLevel.STUDY, StudyTime="0900-1100") == {"1.2.1", "1.2.2"}
    assert uids(catalogue, QueryLevel.STUDY, StudyTime="2300-") == {"1.2.3"}
    assert uids(catalogue, QueryLevel.STUDY, StudyTime="-0930") == {"1.2.2"}
    assert uids(catalogue, QueryLevel.STUDY, StudyTime="1015-1015") == {"1.2.1"}


def test_find_uid_and_value_lists(catalogue: Index) -> None:
    assert uids(catalogue, QueryLevel.STUDY, StudyInstanceUID="1.2.1\\1.2.3\\9.9") == {"1.2.1", "1.2.3"}
    assert uids(catalogue, QueryLevel.SERIES, SeriesInstanceUID="1.3.2\\1.3.5") == {"1.3.2", "1.3.5"}
    assert uids(catalogue, QueryLevel.IMAGE, SOPInstanceUID="1.4.4\\1.4.7\\1.4.99") == {"1.4.4", "1.4.7"}
    assert uids(catalogue, QueryLevel.STUDY, AccessionNumber="ACC1\\ACC3") == {"1.2.1", "1.2.3"}
    assert uids(catalogue, QueryLevel.PATIENT, PatientID="PID1\\PID3") == {"PID1", "PID3"}
    assert uids(catalogue, QueryLevel.SERIES, Modality="MR\\US") == {"1.3.2", "1.3.3"}


def test_find_modalities_in_study(catalogue: Index) -> None:
    assert uids(catalogue, QueryLevel.STUDY, ModalitiesInStudy="CT") == {"1.2.1", "1.2.3"}
    assert uids(catalogue, QueryLevel.STUDY, ModalitiesInStudy="MR\\US") == {"1.2.1", "1.2.2"}
    assert uids(catalogue, QueryLevel.STUDY, ModalitiesInStudy="CT\\MR") == {"1.2.1", "1.2.3"}
    assert uids(catalogue, QueryLevel.STUDY, ModalitiesInStudy="XA") == set()


def test_find_universal_and_empty_values(catalogue: Index) -> None:
    every = {"1.2.1", "1.2.2", "1.2.3", "1.2.4"}
    assert uids(catalogue, QueryLevel.STUDY) == every
    assert uids(catalogue, QueryLevel.STUDY, PatientName="*", AccessionNumber="") == every
    # a stored empty value matches nothing but universal matching
    assert uids(catalogue, QueryLevel.STUDY, PatientName="?*") == {"1.2.1", "1.2.2", "1.2.3"}
    assert uids(catalogue, QueryLevel.STUDY, StudyDate="-20991231") == {"1.2.1", "1.2.2", "1.2.3"}
    assert uids(catalogue, QueryLevel.STUDY, AccessionNumber="*C*") == {"1.2.1", "1.2.2", "1.2.3"}
    assert uids(catalogue, QueryLevel.SERIES, Modality="*?") == {"1.3.1", "1.3.2", "1.3.3", "1.3.4"}
    assert uids(catalogue, QueryLevel.PATIENT) == {"PID1", "PID2", "PID3"}
    assert uids(catalogue, QueryLevel.IMAGE) == {f"1.4.{n}" for n in range(1, 8)}


def test_find_combined_conditions_across_levels(catalogue: Index) -> None:
    assert uids(catalogue, QueryLevel.IMAGE, PatientID="PID1", Modality="CT") == {"1.4.1", "1.4.2"}
    assert uids(catalogue, QueryLevel.SERIES, StudyInstanceUID="1.2.1", Modality="M?") == {"1.3.2"}
    assert uids(catalogue, QueryLevel.STUDY, PatientName="doe*", StudyDate="2021-") == {"1.2.2"}
    assert uids(catalogue, QueryLevel.STUDY, Modality="CT") == set()  # not a STUDY-level key
    assert uids(catalogue, QueryLevel.PATIENT, StudyDate="2020-") == set()


def test_find_returns_every_key_of_the_level(catalogue: Index) -> None:
    for level in QueryLevel:
        rows = find(catalogue, level)
        assert rows
        for row in rows:
            missing = set(keys_for_level(level)) - set(row)
            assert not missing, (level, missing)
            assert all(isinstance(v, str) for v in row.values())
    (image,) = find(catalogue, QueryLevel.IMAGE, SOPInstanceUID="1.4.5")
    assert (image["SOPClassUID"], image["TransferSyntaxUID"]) == (CT_IMAGE, EXPLICIT_LE)
    assert image["AvailableTransferSyntaxUID"] == EXPLICIT_LE
    assert (image["Rows"], image["Columns"], image["PatientName"]) == ("512", "512", "Smith^Anna")


def test_find_computed_keys(catalogue: Index) -> None:
    studies = {r["StudyInstanceUID"]: r for r in find(catalogue, QueryLevel.STUDY)}
    got = {uid: (r["ModalitiesInStudy"], r["NumberOfStudyRelatedSeries"], r["NumberOfStudyRelatedInstances"],
                 r["InstanceAvailability"]) for uid, r in studies.items()}
    assert got == {
        "1.2.1": ("CT\\MR", "2", "3", "ONLINE"),
        "1.2.2": ("US", "1", "1", "NEARLINE"),
        "1.2.3": ("CT", "1", "2", "UNAVAILABLE"),
        "1.2.4": ("", "1", "1", "ONLINE"),
    }
    series = {r["SeriesInstanceUID"]: (r["NumberOfSeriesRelatedInstances"], r["InstanceAvailability"])
              for r in find(catalogue, QueryLevel.SERIES)}
    assert series == {"1.3.1": ("2", "ONLINE"), "1.3.2": ("1", "ONLINE"), "1.3.3": ("1", "NEARLINE"),
                      "1.3.4": ("2", "UNAVAILABLE"), "1.3.5": ("1", "ONLINE")}
    images = {r["SOPInstanceUID"]: r["InstanceAvailability"] for r in find(catalogue, QueryLevel.IMAGE)}
    assert images == {"1.4.1": "ONLINE", "1.4.2": "ONLINE", "1.4.3": "ONLINE", "1.4.4": "NEARLINE",
                      "1.4.5": "UNAVAILABLE", "1.4.6": "ONLINE", "1.4.7": "ONLINE"}
    patients = {r["PatientID"]: (r["PatientName"], r["NumberOfPatientRelatedStudies"],
                                 r["NumberOfPatientRelatedSeries"], r["NumberOfPatientRelatedInstances"])
                for r in find(catalogue, QueryLevel.PATIENT)}
    assert patients == {"PID1": ("Doe^John", "2", "3", "4"), "PID2": ("Smith^Anna", "1", "1", "2"),
                        "PID3": ("", "1", "1", "1")}


def test_find_availability_follows_transitions(catalogue: Index) -> None:
    (missing,) = catalogue.placements("1.4.5")
    assert catalogue.transition(missing, PlacementState.OK)
    (study,) = find(catalogue, QueryLevel.STUDY, StudyInstanceUID="1.2.3")
    assert study["InstanceAvailability"] == "ONLINE"


def test_find_limit(catalogue: Index) -> None:
    every = uids(catalogue, QueryLevel.IMAGE)
    rows = find(catalogue, QueryLevel.IMAGE, limit=3)
    assert len(rows) == 3 and {r["SOPInstanceUID"] for r in rows} <= every
    assert len(find(catalogue, QueryLevel.STUDY, limit=10)) == 4
    assert len(find(catalogue, QueryLevel.PATIENT, limit=1)) == 1


def test_find_is_lazy(catalogue: Index) -> None:
    rows = catalogue.find(QueryLevel.IMAGE, [])
    first = next(iter(rows))
    assert first["SOPInstanceUID"].startswith("1.4.")


# -- placement ledger and studies for jobs ----------------------------------------------
def replace(p: Placement, **changes: Any) -> Placement:
    return Placement(**{**p.__dict__, **changes})


def test_add_placements_is_all_or_nothing(index: Index) -> None:
    load_catalogue(index)
    cold = [make_placement(f"1.4.{n}", store="cold-2", tier=Tier.COLD, state=PlacementState.PENDING)
            for n in (1, 2, 3)]
    index.add_placements(cold)
    assert {p.store_id for p in index.placements("1.4.3")} == {"cache", "cold-2"}
    clash = [make_placement("1.4.5", store="cold-3", tier=Tier.COLD), make_placement("1.4.1", store="cold-2")]
    with pytest.raises(StateConflict):
        index.add_placements(clash)
    assert {p.store_id for p in index.placements("1.4.5")} == {"hot-a"}  # none of the batch was kept
    assert [p.state for p in index.placements("1.4.1") if p.store_id == "cold-2"] == [PlacementState.PENDING]


def test_replace_and_delete_placement(index: Index) -> None:
    hot = make_placement("1.4.1", store="hot-a")
    pending = make_placement("1.4.1", store="cold", tier=Tier.COLD, state=PlacementState.PENDING)
    index.register(make_record("1.4.1", "1.3.1", "1.2.1"), [hot])
    index.add_placements([pending])
    done = replace(pending, state=PlacementState.OK, stored_sha256="c" * 64, stored_size=77, verified_at=5.0,
                   offset=10, length=77)
    assert index.replace_placement(pending, done)
    assert not index.replace_placement(pending, done)  # stale: the row is OK now
    with pytest.raises(ValueError):
        index.replace_placement(done, replace(done, store_id="elsewhere"))
    assert index.placements("1.4.1", 1) == [done, hot] or index.placements("1.4.1", 1) == [hot, done]
    retiring = replace(hot, state=PlacementState.TO_DELETE)
    assert index.replace_placement(hot, retiring)  # another OK copy (cold) exists
    assert not index.replace_placement(done, replace(done, state=PlacementState.TO_DELETE))  # the last OK one
    assert not index.delete_placement(done)  # only TO_DELETE rows are purged
    assert not index.delete_placement(replace(retiring, blob_key="other"))
    assert index.delete_placement(retiring)
    assert not index.delete_placement(retiring)
    assert index.placements("1.4.1") == [done]
    repaired = replace(done, blob_key="cold/new-key", state=PlacementState.PENDING)
    assert index.replace_placement(done, repaired)
    assert index.placements("1.4.1") == [repaired]


def test_iter_placements_filters_and_order(index: Index) -> None:
    load_catalogue(index)
    (p1,) = [p for p in index.placements("1.4.1") if p.store_id == "hot-b"]
    (p6,) = index.placements("1.4.6")
    assert index.transition(p1, PlacementState.OK, verified_at=200.0)
    assert index.transition(p6, PlacementState.OK, verified_at=100.0)
    every = list(index.iter_placements())
    assert len(every) == 10
    keys = [(p.verified_at is not None, p.verified_at or 0.0, p.sop_uid, p.store_id) for p in every]
    assert keys == sorted(keys)  # never verified first, then oldest verified
    assert [(p.sop_uid, p.store_id) for p in every[-2:]] == [("1.4.6", "hot-a"), ("1.4.1", "hot-b")]
    assert [(p.sop_uid, p.store_id) for p in index.iter_placements(limit=3)] == \
        [(p.sop_uid, p.store_id) for p in every[:3]]
    cold = {(p.sop_uid, p.state) for p in index.iter_placements(tier=Tier.COLD)}
    assert cold == {("1.4.4", PlacementState.OK), ("1.4.7", PlacementState.OK)}
    damaged = {p.sop_uid for p in index.iter_placements(states=[PlacementState.MISSING, PlacementState.TO_DELETE])}
    assert damaged == {"1.4.4", "1.4.5"}
    assert {p.sop_uid for p in index.iter_placements(store_id="hot-b")} == {"1.4.1"}
    assert [p.sop_uid for p in index.iter_placements(tier=Tier.HOT, states=[PlacementState.MISSING],
                                                     store_id="hot-a")] == ["1.4.5"]
    assert list(index.iter_placements(limit=0)) == []


def test_study_instances_are_current_versions(index: Index) -> None:
    load_catalogue(index)
    v2 = make_record("1.4.2", "1.3.1", "1.2.1", version=2, attrs=P1 | S1 | {"Modality": "CT"},
                     received_at=1_700_000_500.0)
    index.register(v2, [make_placement("1.4.2", version=2)])
    records = index.study_instances("1.2.1")
    assert [(r.series_uid, r.sop_uid, r.version) for r in records] == [
        ("1.3.1", "1.4.1", 1), ("1.3.1", "1.4.2", 2), ("1.3.2", "1.4.3", 1)]
    assert records[1] == v2
    assert index.study_instances("9.9") == []


def test_iter_studies_access_and_holds(index: Index) -> None:
    load_catalogue(index)
    studies = list(index.iter_studies())
    assert [s.study_uid for s in studies] == ["1.2.1", "1.2.2", "1.2.3", "1.2.4"]  # oldest newest-instance first
    s1 = studies[0]
    assert (s1.study_date, s1.modalities, s1.source_aes, s1.instances, s1.held, s1.last_access) == \
        ("20200115", ("CT", "MR"), ("MODALITY",), 3, False, None)
    assert s1.last_received == 1_700_000_002.0
    assert [s.study_uid for s in index.iter_studies(received_before=1_700_000_004.0)] == ["1.2.1", "1.2.2"]
    assert [s.study_uid for s in index.iter_studies(limit=1)] == ["1.2.1"]
    index.record_access("1.2.2", 50.0)
    index.record_access("1.2.2", 40.0)  # older: ignored
    index.record_access("9.9.9", 60.0)  # unknown study: ignored
    assert not index.is_held("1.2.3")
    index.set_hold("1.2.3", True, "litigation")
    assert index.is_held("1.2.3")
    got = {s.study_uid: (s.last_access, s.held) for s in index.iter_studies()}
    assert got == {"1.2.1": (None, False), "1.2.2": (50.0, False), "1.2.3": (None, True), "1.2.4": (None, False)}
    assert [r["last_access"] for r in find(index, QueryLevel.STUDY, StudyInstanceUID="1.2.2")] == ["50.0"]
    index.set_hold("1.2.3", False)
    assert not index.is_held("1.2.3")


# -- leases & stats ---------------------------------------------------------------------
def test_leases(index: Index) -> None:
    assert index.acquire_lease("migrate", "worker-a", ttl=30)
    assert not index.acquire_lease("migrate", "worker-b", ttl=30)
    assert index.acquire_lease("migrate", "worker-a", ttl=30)  # renew
    index.release_lease("migrate", "worker-b")  # not the owner: no effect
    assert not index.acquire_lease("migrate", "worker-b", ttl=30)
    index.release_lease("migrate", "worker-a")
    assert index.acquire_lease("migrate", "worker-b", ttl=30)
    assert index.acquire_lease("other", "worker-a", ttl=30)  # leases are independent


def test_lease_expires(index: Index) -> None:
    # The TTL must outlast two lightweight transactions on a loaded CI host. Cassandra
    # counts a row TTL from the whole second, so a lease must not rely on it alone.
    ttl = 2.0
    start = time.time()
    assert index.acquire_lease("scrub", "worker-a", ttl=ttl)
    refused = not index.acquire_lease("scrub", "worker-b", ttl=ttl)
    if time.time() - start < ttl:
        assert refused, "a live lease was granted to another owner"
    deadline = time.monotonic() + 10
    while not index.acquire_lease("scrub", "worker-b", ttl=30):
        assert time.monotonic() < deadline, "lease never expired"
        time.sleep(0.1)
    assert time.time() >= start + ttl, "lease expired before its TTL"
    assert not index.acquire_lease("scrub", "worker-a", ttl=30)


def test_stats(index: Index) -> None:
    empty = index.stats()
    assert (empty.patients, empty.studies, empty.series, empty.instances, empty.content_bytes) == (0, 0, 0, 0, 0)
    load_catalogue(index)
    s = index.stats()
    assert (s.patients, s.studies, s.series, s.instances) == (3, 4, 5, 7)
    assert s.content_bytes == sum(1000 + n for n in range(7))
    assert s.tiers["hot"].placements == 7
    assert s.tiers["hot"].by_state == {"OK": 5, "TO_DELETE": 1, "MISSING": 1}
    assert s.tiers["hot"].stored_bytes == 500 + 500 + 501 + 505 + 506
    assert (s.tiers["cold"].placements, s.tiers["cold"].stored_bytes) == (2, 503 + 506)
    assert s.tiers["cache"].by_state == {"OK": 1}


# -- unreachable backend -------------------------------------------------------------
def test_unreachable_backend_raises_index_unavailable(backend: str, tmp_path: Path) -> None:
    with pytest.raises(IndexUnavailable):
        if backend == "sqlite":
            (tmp_path / "file").write_text("not a directory")
            SqliteIndex(tmp_path / "file" / "index.sqlite").migrate()
        else:
            with socket_closed_port() as port:
                CassandraIndex(CassandraConfig(contact_points=("127.0.0.1",), port=port,
                                               keyspace="vna_unreachable", request_timeout=5.0))


class socket_closed_port:
    """A loopback port that nothing listens on (bound, never listened, so nobody else takes it)."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        return int(self.sock.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


def test_cassandra_node_going_away_raises_index_unavailable(cassandra_index: CassandraIndex) -> None:
    load_catalogue(cassandra_index)
    cassandra_index.close()  # the session is gone: every call must map, not leak driver errors
    with pytest.raises(IndexUnavailable):
        cassandra_index.get_instance("1.4.1")
    with pytest.raises(IndexUnavailable):
        list(cassandra_index.find(QueryLevel.STUDY, []))
    with pytest.raises(IndexUnavailable):
        cassandra_index.register(make_record("1.4.9", "1.3.9", "1.2.9"), [make_placement("1.4.9")])


# -- Cassandra registration atomicity --------------------------------------------------
class TestCassandraRegistration:
    """Readers never see a registration that has not committed (candidate -> rows -> commit)."""

    def visible(self, idx: CassandraIndex, sop: str) -> dict[str, Any]:
        return {
            "instance": idx.get_instance(sop),
            "placements": idx.placements(sop) + idx.placements(sop, 1),
            "images": uids(idx, QueryLevel.IMAGE, SOPInstanceUID=sop) | uids(idx, QueryLevel.IMAGE),
            "studies": uids(idx, QueryLevel.STUDY),
            "series": uids(idx, QueryLevel.SERIES),
            "patients": uids(idx, QueryLevel.PATIENT),
            "stats": idx.stats().instances,
        }

    def nothing(self) -> dict[str, Any]:
        return {"instance": None, "placements": [], "images": set(), "studies": set(), "series": set(),
                "patients": set(), "stats": 0}

    def test_failure_before_the_commit_leaves_nothing_visible(self, cassandra_index: CassandraIndex,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
        from cassandra import OperationTimedOut

        def lost(self: CassandraIndex, record: InstanceRecord, writer: Any, *stamp: Any) -> None:
            raise OperationTimedOut("injected: connection reset before the commit")

        monkeypatch.setattr(CassandraIndex, "_commit", lost)
        record = make_record("1.4.1", "1.3.1", "1.2.1", attrs=P1 | S1 | {"Modality": "CT"})
        with pytest.raises(IndexUnavailable):
            cassandra_index.register(record, [make_placement("1.4.1")])
        monkeypatch.undo()
        assert self.visible(cassandra_index, "1.4.1") == self.nothing()
        cassandra_index.register(record, [make_placement("1.4.1")])  # a retry converges at once
        assert cassandra_index.get_instance("1.4.1") == record
        assert uids(cassandra_index, QueryLevel.IMAGE) == {"1.4.1"}

    def test_a_commit_whose_answer_is_lost_is_a_success(self, cassandra_index: CassandraIndex,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
        from cassandra import OperationTimedOut

        real = CassandraIndex._commit

        def applied_unanswered(self: CassandraIndex, record: InstanceRecord, writer: Any, *stamp: Any) -> None:
            real(self, record, writer, *stamp)
            raise OperationTimedOut("injected: the commit applied, its answer was lost")

        monkeypatch.setattr(CassandraIndex, "_commit", applied_unanswered)
        record = make_record("1.4.1", "1.3.1", "1.2.1", attrs=P1 | S1 | {"Modality": "CT"})
        cassandra_index.register(record, [make_placement("1.4.1")])
        monkeypatch.undo()
        assert cassandra_index.get_instance("1.4.1") == record
        assert cassandra_index.abandoned_registrations(older_than=0.0) == []

    def test_placements_of_other_instances_are_rejected(self, cassandra_index: CassandraIndex) -> None:
        from vna.errors import InvalidInput

        with pytest.raises(InvalidInput):
            cassandra_index.register(make_record("1.4.1", "1.3.1", "1.2.1"), [make_placement("1.4.2")])
        assert cassandra_index.get_instance("1.4.1") is None



def test_sqlite_writers_wait_for_the_cross_process_gate_then_fail_cleanly(tmp_path: Path) -> None:
    """The write gate (flock of <index>.wlock) orders writers of several processes; a holder that never lets go
    costs a writer busy_timeout, then IndexUnavailable -- nothing is written, and the next writer succeeds."""
    import fcntl
    import os

    idx = SqliteIndex(tmp_path / "index.sqlite", busy_timeout=1.0)
    idx.migrate()
    holder = os.open(tmp_path / "index.sqlite.wlock", os.O_RDWR | os.O_CREAT)  # another open file: another "process"
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        t0 = time.monotonic()
        with pytest.raises(IndexUnavailable, match="write gate"):
            idx.register(make_record("1.2.9.1", "1.2.9", "1.2"), [make_placement("1.2.9.1")])
        assert 0.9 <= time.monotonic() - t0 < 10
        assert idx.get_instance("1.2.9.1") is None
        released = threading.Timer(0.3, fcntl.flock, (holder, fcntl.LOCK_UN))
        released.start()  # let go while the next writer waits: it proceeds
        idx.register(make_record("1.2.9.1", "1.2.9", "1.2"), [make_placement("1.2.9.1")])
        released.join()
        assert idx.get_instance("1.2.9.1") is not None
    finally:
        os.close(holder)
        idx.close()


def test_sqlite_concurrent_registrations_share_commits_and_keep_their_own_outcome(tmp_path: Path) -> None:
    """Group commit: concurrent register() calls are committed together, each still gets its own result --
    a duplicate (sop_uid, version) fails alone with StateConflict, every other registration is durable."""
    idx = SqliteIndex(tmp_path / "index.sqlite")
    idx.migrate()
    batches: list[int] = []
    commit = idx._commit_registrations  # observed, not replaced

    def observed(batch: Any) -> None:
        batches.append(len(batch))
        commit(batch)

    idx._commit_registrations = observed  # type: ignore[method-assign]
    start = threading.Barrier(8)
    outcomes: dict[str, list[str]] = {}

    def writer(t: int) -> None:
        start.wait()
        for i in range(25):
            uid = f"1.2.7.{t}.{i}" if i != 12 else "1.2.7.99"  # every writer once registers the same instance
            try:
                idx.register(make_record(uid, f"1.2.7.{t}", "1.2.7"), [make_placement(uid)])
                outcomes.setdefault("ok", []).append(uid)
            except StateConflict:
                outcomes.setdefault("conflict", []).append(uid)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    try:
        assert len(outcomes["ok"]) == 8 * 24 + 1 and outcomes["conflict"] == ["1.2.7.99"] * 7
        assert all(idx.get_instance(uid) is not None for uid in outcomes["ok"])
        assert sum(batches) == 8 * 25 and max(batches) > 1  # fewer commits than registrations
    finally:
        idx.close()
