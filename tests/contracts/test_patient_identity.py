"""Contract tests of patient identity domains on every Index adapter (SQLite and Cassandra).

A patient is (PatientID, IssuerOfPatientID); Other Patient IDs of a study are
matched jointly (ID and issuer of one identity) as described in
``docs/patient-identity.md``. Also: a SQLite database of schema v3 upgraded in place.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

import pytest

from vna.config import CassandraConfig
from vna.domain import QueryLevel
from vna.errors import InvalidInput
from vna.index.base import Index
from vna.index.cassandra import SCHEMA_VERSION as CASSANDRA_SCHEMA, CassandraIndex
from vna.index.query import MAX_OTHER_IDS, OTHER_IDS_KEY, encode_other_ids
from vna.index.sqlite import SCHEMA_VERSION as SQLITE_SCHEMA, SqliteIndex

from tests.contracts.test_index import backend, find, index, make_placement, make_record, query, uids  # noqa: F401

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"

A = {"PatientID": "12345", "IssuerOfPatientID": "HOSP_A", "PatientName": "Alpha^Anna"}
B = {"PatientID": "12345", "IssuerOfPatientID": "HOSP_B", "PatientName": "Beta^Bert"}
# hospital B's own patient "B-777", whose study at hospital A lists the B ID as another ID
LINKED = {"PatientID": "A-1", "IssuerOfPatientID": "HOSP_A", "PatientName": "Gamma^Gus",
          OTHER_IDS_KEY: encode_other_ids([("B-777", "HOSP_B"), ("X-9", "")])}
B777 = {"PatientID": "B-777", "IssuerOfPatientID": "HOSP_B", "PatientName": "Gamma^Gus"}


def load(index: Index) -> None:
    rows = [("1.1.1.1", "1.1.1", "1.1", A), ("1.1.1.2", "1.1.1", "1.1", A), ("1.2.1.1", "1.2.1", "1.2", A),
            ("1.3.1.1", "1.3.1", "1.3", B), ("1.4.1.1", "1.4.1", "1.4", LINKED), ("1.5.1.1", "1.5.1", "1.5", B777)]
    for n, (sop, series, study, attrs) in enumerate(rows):
        index.register(make_record(sop, series, study, attrs=attrs | {"Modality": "CT", "StudyDate": "20200101"},
                                   received_at=1_700_000_000.0 + n), [make_placement(sop)])


def patients(index: Index, **identifier: str) -> set[tuple[str, str, str]]:
    rows = query(index, QueryLevel.PATIENT, identifier, None)
    got = [(r["PatientID"], r["IssuerOfPatientID"], r["NumberOfPatientRelatedStudies"]) for r in rows]
    assert len(got) == len(set(got)), got
    return set(got)


def test_colliding_patient_ids_with_other_issuers_are_two_patients(index: Index) -> None:
    load(index)
    assert patients(index, PatientID="12345") == {("12345", "HOSP_A", "2"), ("12345", "HOSP_B", "1")}
    assert patients(index, PatientID="12345", IssuerOfPatientID="HOSP_A") == {("12345", "HOSP_A", "2")}
    assert patients(index, PatientID="12345", IssuerOfPatientID="HOSP_B") == {("12345", "HOSP_B", "1")}
    assert patients(index, PatientID="1234*", IssuerOfPatientID="HOSP_B") == {("12345", "HOSP_B", "1")}
    assert patients(index, PatientID="12345", IssuerOfPatientID="HOSP_C") == set()
    row = find(index, QueryLevel.PATIENT, PatientID="12345", IssuerOfPatientID="HOSP_B")[0]
    assert row["PatientName"] == "Beta^Bert" and row["NumberOfPatientRelatedInstances"] == "1"
    assert uids(index, QueryLevel.STUDY, PatientID="12345") == {"1.1", "1.2", "1.3"}
    assert uids(index, QueryLevel.STUDY, PatientID="12345", IssuerOfPatientID="HOSP_A") == {"1.1", "1.2"}
    assert uids(index, QueryLevel.STUDY, PatientID="12345", IssuerOfPatientID="HOSP_B") == {"1.3"}
    assert uids(index, QueryLevel.SERIES, PatientID="12345", IssuerOfPatientID="HOSP_B") == {"1.3.1"}
    assert uids(index, QueryLevel.IMAGE, PatientID="12345", IssuerOfPatientID="HOSP_A") == {
        "1.1.1.1", "1.1.1.2", "1.2.1.1"}
    assert {(r["StudyInstanceUID"], r["IssuerOfPatientID"]) for r in find(index, QueryLevel.STUDY, PatientID="12345")} \
        == {("1.1", "HOSP_A"), ("1.2", "HOSP_A"), ("1.3", "HOSP_B")}


def test_issuer_alone_is_a_matching_key(index: Index) -> None:
    load(index)
    # the primary identities issued by HOSP_B, and the study at A that lists a HOSP_B ID
    assert uids(index, QueryLevel.STUDY, IssuerOfPatientID="HOSP_B") == {"1.3", "1.4", "1.5"}
    assert uids(index, QueryLevel.STUDY, IssuerOfPatientID="HOSP_?") == {"1.1", "1.2", "1.3", "1.4", "1.5"}


def test_other_patient_ids_find_the_study_filed_under_another_id(index: Index) -> None:
    load(index)
    assert uids(index, QueryLevel.STUDY, PatientID="B-777") == {"1.4", "1.5"}
    assert uids(index, QueryLevel.STUDY, PatientID="B-777", IssuerOfPatientID="HOSP_B") == {"1.4", "1.5"}
    assert uids(index, QueryLevel.STUDY, PatientID="B-777", IssuerOfPatientID="HOSP_A") == set()
    # ID and issuer match one identity jointly: A-1 is issued by HOSP_A, B-777 by HOSP_B
    assert uids(index, QueryLevel.STUDY, PatientID="A-1", IssuerOfPatientID="HOSP_B") == set()
    assert uids(index, QueryLevel.STUDY, PatientID="X-9") == {"1.4"}
    assert uids(index, QueryLevel.STUDY, PatientID="X-9", IssuerOfPatientID="HOSP_A") == set()
    assert uids(index, QueryLevel.STUDY, PatientID="B-7*") == {"1.4", "1.5"}
    assert uids(index, QueryLevel.STUDY, PatientID="B-777\\Z") == {"1.4", "1.5"}
    assert uids(index, QueryLevel.SERIES, PatientID="B-777") == {"1.4.1", "1.5.1"}
    assert uids(index, QueryLevel.IMAGE, PatientID="B-777", IssuerOfPatientID="HOSP_B") == {"1.4.1.1", "1.5.1.1"}
    # the answer carries the study's primary identity
    row = find(index, QueryLevel.STUDY, PatientID="B-777", StudyInstanceUID="1.4")[0]
    assert (row["PatientID"], row["IssuerOfPatientID"]) == ("A-1", "HOSP_A")
    # PATIENT level: patients are not merged; a query by B's ID finds B and the patient whose study lists it
    assert patients(index, PatientID="B-777") == {("A-1", "HOSP_A", "1"), ("B-777", "HOSP_B", "1")}
    assert patients(index, PatientID="A-1") == {("A-1", "HOSP_A", "1")}


def test_a_study_whose_patient_id_changes_is_found_by_the_new_primary_id(index: Index) -> None:
    """The primary PatientID is the latest instance's; the Other Patient IDs of the earlier ones stay."""
    index.register(make_record("2.1.1.1", "2.1.1", "2.1", attrs=LINKED), [make_placement("2.1.1.1")])
    assert uids(index, QueryLevel.STUDY, PatientID="B-777") == {"2.1"}
    corrected = {"PatientID": "A-2", "IssuerOfPatientID": "HOSP_A", "PatientName": "Gamma^Gus"}
    index.register(make_record("2.1.1.2", "2.1.1", "2.1", attrs=corrected, received_at=1_700_000_009.0),
                   [make_placement("2.1.1.2")])
    assert uids(index, QueryLevel.STUDY, PatientID="A-1") == set()
    assert uids(index, QueryLevel.STUDY, PatientID="A-2", IssuerOfPatientID="HOSP_A") == {"2.1"}
    assert uids(index, QueryLevel.STUDY, PatientID="B-777", IssuerOfPatientID="HOSP_B") == {"2.1"}
    assert patients(index, PatientID="A-*") == {("A-2", "HOSP_A", "1")}


# a PR/SR of study 3.x from another workstation: no issuer, no Other Patient IDs
BARE = {"PatientID": "A-1", "PatientName": "Gamma^Gus"}
LINKED_C = LINKED | {OTHER_IDS_KEY: encode_other_ids([("C-5", "HOSP_C")])}


def test_instances_without_issuer_or_other_ids_do_not_erase_the_studys(index: Index) -> None:
    """An absent issuer or Other Patient IDs is unknown, not none, whatever the arrival order: the study
    keeps its non-empty issuer and the union of its instances' other IDs."""
    orders = {"3.1": [LINKED, BARE, LINKED_C, BARE], "3.2": [BARE, LINKED_C, BARE, LINKED]}
    for study, order in orders.items():
        for n, attrs in enumerate(order):
            sop = f"{study}.1.{n + 1}"
            index.register(make_record(sop, f"{study}.1", study, attrs=attrs,
                                       received_at=1_700_000_000.0 + n), [make_placement(sop)])
    for level in (QueryLevel.STUDY, QueryLevel.SERIES):
        rows = find(index, level, PatientID="A-1")
        assert {(r["PatientID"], r["IssuerOfPatientID"]) for r in rows} == {("A-1", "HOSP_A")}, level
        assert len(rows) == 2, rows
    for pid, issuer in (("A-1", "HOSP_A"), ("B-777", "HOSP_B"), ("X-9", ""), ("C-5", "HOSP_C")):
        assert uids(index, QueryLevel.STUDY, PatientID=pid, IssuerOfPatientID=issuer) == {"3.1", "3.2"}, pid
    assert uids(index, QueryLevel.IMAGE, PatientID="C-5", IssuerOfPatientID="HOSP_C") == {
        f"{s}.1.{n}" for s in orders for n in range(1, 5)}
    assert uids(index, QueryLevel.STUDY, IssuerOfPatientID="HOSP_A") == {"3.1", "3.2"}
    assert patients(index, PatientID="A-1") == {("A-1", "HOSP_A", "2")}
    assert patients(index, PatientID="A-1", IssuerOfPatientID="HOSP_A") == {("A-1", "HOSP_A", "2")}


def test_other_patient_ids_of_a_study_are_bounded(index: Index) -> None:
    """The union over a study's instances holds at most MAX_OTHER_IDS items; the first ones stay."""
    for n in range(3):
        other = encode_other_ids([(f"O-{n}-{k:02}", "HOSP_O") for k in range(MAX_OTHER_IDS)])
        sop = f"4.1.1.{n + 1}"
        index.register(make_record(sop, "4.1.1", "4.1", attrs=BARE | {OTHER_IDS_KEY: other},
                                   received_at=1_700_000_000.0 + n), [make_placement(sop)])
    assert uids(index, QueryLevel.STUDY, PatientID="O-0-*") == {"4.1"}
    assert uids(index, QueryLevel.STUDY, PatientID="O-1-*") == set()


def test_stats_count_patients_by_identity(index: Index) -> None:
    load(index)
    assert index.stats().patients == 4  # (12345, A), (12345, B), (A-1, A), (B-777, B)


def test_sqlite_database_of_schema_v3_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite"
    shutil.copy(FIXTURES / "index-v3.sqlite", path)  # written by the schema-v3 code (tests/fixtures/make_index_v3.py)
    idx = SqliteIndex(path)
    try:
        assert [r[0] for r in idx._read("SELECT version FROM schema_version")] == [1, 2, 3]
        assert idx.migrate() == SQLITE_SCHEMA == 5
        assert patients(idx, PatientID="12345") == {("12345", "HOSP_A", "1"), ("12345", "HOSP_B", "1")}
        assert uids(idx, QueryLevel.STUDY, PatientID="12345", IssuerOfPatientID="HOSP_B") == {"1.8"}
        assert uids(idx, QueryLevel.IMAGE, PatientID="12345", IssuerOfPatientID="HOSP_A") == {"1.9.1.1", "1.9.1.2"}
        assert uids(idx, QueryLevel.STUDY, PatientID="777") == {"1.7"}
        # new registrations after the upgrade: another ID of an existing patient links a new study
        idx.register(make_record("1.6.1.1", "1.6.1", "1.6", attrs={
            "PatientID": "777", OTHER_IDS_KEY: encode_other_ids([("12345", "HOSP_B")])}), [make_placement("1.6.1.1")])
        assert uids(idx, QueryLevel.STUDY, PatientID="12345", IssuerOfPatientID="HOSP_B") == {"1.6", "1.8"}
        assert idx.migrate() == 5
    finally:
        idx.close()


def test_cassandra_keyspace_before_schema_v7_is_upgraded(cassandra_config: Callable[..., CassandraConfig],
                                                         cassandra_admin: Any) -> None:
    """A keyspace without v7 (no other_ids column) keeps its data and answers identity queries after migrate."""
    cfg = cassandra_config()
    idx = CassandraIndex(cfg)
    try:
        idx.migrate()
        ks = cfg.keyspace
        cassandra_admin.execute(f"ALTER TABLE {ks}.studies DROP other_ids")  # as a v5/v6 keyspace has it
        cassandra_admin.execute(f"DELETE FROM {ks}.schema_version WHERE version = 7")
        idx.close()
        idx = CassandraIndex(cfg)
        assert idx.migrate() == CASSANDRA_SCHEMA == 8
        load(idx)
        assert patients(idx, PatientID="12345") == {("12345", "HOSP_A", "2"), ("12345", "HOSP_B", "1")}
        assert uids(idx, QueryLevel.STUDY, PatientID="B-777", IssuerOfPatientID="HOSP_B") == {"1.4", "1.5"}
    finally:
        idx.close()
        cassandra_admin.execute(f"DROP KEYSPACE IF EXISTS {cfg.keyspace}")


def test_sqlite_migrate_applies_a_version_missing_below_the_highest(tmp_path: Path) -> None:
    """A version merged after a higher one (a gap in schema_version) is applied, not skipped."""
    idx = SqliteIndex(tmp_path / "index.sqlite")
    try:
        idx.migrate()
        with idx._write() as conn:  # as if v3 had not been applied while v4 was
            conn.execute("DROP INDEX instances_study_cover")
            conn.execute("DELETE FROM schema_version WHERE version = 3")
        assert idx.migrate() == SQLITE_SCHEMA
        assert sorted(r[0] for r in idx._read("SELECT version FROM schema_version")) == list(range(1, SQLITE_SCHEMA + 1))
        assert idx._read("SELECT name FROM sqlite_master WHERE name = 'instances_study_cover'")
        assert idx.migrate() == SQLITE_SCHEMA  # idempotent
        assert sorted(r[0] for r in idx._read("SELECT version FROM schema_version")) == list(range(1, SQLITE_SCHEMA + 1))
    finally:
        idx.close()


def test_cassandra_migrate_applies_a_version_missing_below_the_highest(
        cassandra_config: Callable[..., CassandraConfig], cassandra_admin: Any) -> None:
    """With v7 applied and v5 not (as a v6 merged after v7 would be), migrate applies v5; registration works."""
    cfg = cassandra_config()
    idx = CassandraIndex(cfg)
    try:
        idx.migrate()
        ks = cfg.keyspace
        before = {r["version"] for r in cassandra_admin.execute(f"SELECT version FROM {ks}.schema_version")}
        cassandra_admin.execute(f"DROP TABLE {ks}.registration_decisions")
        cassandra_admin.execute(f"DELETE FROM {ks}.schema_version WHERE version = 5")
        idx.close()
        idx = CassandraIndex(cfg)
        assert idx.migrate() == CASSANDRA_SCHEMA
        assert {r["version"] for r in cassandra_admin.execute(f"SELECT version FROM {ks}.schema_version")} == before
        load(idx)
        assert patients(idx, PatientID="12345") == {("12345", "HOSP_A", "2"), ("12345", "HOSP_B", "1")}
    finally:
        idx.close()
        cassandra_admin.execute(f"DROP KEYSPACE IF EXISTS {cfg.keyspace}")


def test_sqlite_issuer_only_query_reads_an_index(tmp_path: Path) -> None:
    """The statement of an issuer-only PATIENT query searches an index of patient_ids (no scan)."""
    idx = SqliteIndex(tmp_path / "index.sqlite")
    try:
        idx.migrate()
        load(idx)
        conn = idx._conn()
        seen: list[str] = []
        conn.set_trace_callback(seen.append)
        try:
            assert patients(idx, IssuerOfPatientID="HOSP_B") == {
                ("12345", "HOSP_B", "1"), ("A-1", "HOSP_A", "1"), ("B-777", "HOSP_B", "1")}
        finally:
            conn.set_trace_callback(None)
        stmts = [s for s in seen if "patient_ids" in s]
        assert stmts, seen
        plan = " ".join(str(r[3]) for s in stmts for r in conn.execute("EXPLAIN QUERY PLAN " + s))
        assert "USING COVERING INDEX patient_ids_issuer" in plan and "SCAN p" not in plan, plan
    finally:
        idx.close()


def test_issuer_only_patient_query_on_cassandra_is_refused(index: Index) -> None:
    """No Cassandra index serves IssuerOfPatientID without a PatientID at PATIENT level: refused, not a
    read of every patient's studies; with a PatientID or a PatientName it is answered (SQLite: always)."""
    load(index)
    want = {("12345", "HOSP_B", "1"), ("A-1", "HOSP_A", "1"), ("B-777", "HOSP_B", "1")}
    if isinstance(index, CassandraIndex):
        with pytest.raises(InvalidInput, match="IssuerOfPatientID"):
            patients(index, IssuerOfPatientID="HOSP_B")
    else:
        assert patients(index, IssuerOfPatientID="HOSP_B") == want
    assert patients(index, PatientID="12345", IssuerOfPatientID="HOSP_B") == {("12345", "HOSP_B", "1")}
    assert patients(index, PatientID="1234*", IssuerOfPatientID="HOSP_B") == {("12345", "HOSP_B", "1")}
    assert patients(index, PatientName="Gamma*", IssuerOfPatientID="HOSP_B") == {
        ("A-1", "HOSP_A", "1"), ("B-777", "HOSP_B", "1")}
    assert len(patients(index)) == 4  # a universal query stops at its limit: served
