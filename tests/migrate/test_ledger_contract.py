"""Contract of the migration ledger port, run on SQLite and on the real Cassandra node."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from vna.config import CassandraConfig
from vna.errors import LeaseHeld
from vna.migrate.ledger import MigrationLedger, Outcome, SqliteLedger, StudyPlan, new_owner


@pytest.fixture(params=["sqlite", "cassandra"])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MigrationLedger]:
    if request.param == "sqlite":
        led: MigrationLedger = SqliteLedger(tmp_path / "index.sqlite")
        led.migrate()
        yield led
        led.close()
        return
    from vna.migrate.ledger_cassandra import CassandraLedger

    make: Callable[..., CassandraConfig] = request.getfixturevalue("cassandra_config")
    admin: Any = request.getfixturevalue("cassandra_admin")
    cfg = make()
    led = CassandraLedger(cfg)
    led.migrate()
    yield led
    led.close()
    admin.execute(f"DROP KEYSPACE IF EXISTS {cfg.keyspace}")


def plans(n: int, source: str = "PACS") -> list[StudyPlan]:
    return [StudyPlan(source, f"1.2.{i}", study_date=f"2020010{i % 9 + 1}", expected_series=1,
                      expected_instances=3) for i in range(n)]


def ok(n: int = 3, size: int = 300) -> Outcome:
    return Outcome(verified=True, expected_instances=n, archived_instances=n, bytes=size)


def test_plan_is_idempotent_and_counted(ledger: MigrationLedger) -> None:
    assert ledger.add_planned(plans(5)) == 5
    assert ledger.add_planned(plans(6)) == 1   # known studies keep their state
    c = ledger.counts("PACS")
    assert (c["planned"].studies, c["planned"].instances, c["done"].studies) == (6, 18, 0)
    assert ledger.sources() == ["PACS"]
    assert len(list(ledger.studies("PACS"))) == 6


def test_claim_leases_exclusively(ledger: MigrationLedger) -> None:
    ledger.add_planned(plans(4))
    a, b = new_owner(), new_owner()
    got_a = ledger.claim("PACS", a, 600, 1000.0, 3, 5)
    got_b = ledger.claim("PACS", b, 600, 1000.0, 3, 5)
    assert len(got_a) == 3 and len(got_b) == 1
    assert not {p.study_uid for p in got_a} & {p.study_uid for p in got_b}
    # an expired lease may be taken over
    got_c = ledger.claim("PACS", new_owner(), 600, 2000.0, 10, 5)
    assert len(got_c) == 4


def test_done_only_when_verified_and_counters_move(ledger: MigrationLedger) -> None:
    ledger.add_planned(plans(2))
    owner = new_owner()
    s1, s2 = ledger.claim("PACS", owner, 600, 1000.0, 2, 5)
    assert ledger.finish("PACS", s1.study_uid, owner, ok(), 1001.0, 0.0) == "done"
    bad = Outcome(verified=False, expected_instances=3, archived_instances=2, bytes=200, missing=["1.2.9.9"],
                  status=0xA702, comment="out of resources")
    assert ledger.finish("PACS", s2.study_uid, owner, bad, 1002.0, 1100.0) == "failed"
    c = ledger.counts("PACS")
    assert (c["planned"].studies, c["done"].studies, c["failed"].studies) == (0, 1, 1)
    assert (c["done"].archived, c["done"].bytes) == (3, 300)
    row = ledger.get("PACS", s2.study_uid)
    assert row is not None and row.missing == ["1.2.9.9"] and row.status == 0xA702 and row.attempts == 1
    # a failed study is due again only after its back-off, and not after max_attempts
    assert ledger.claim("PACS", owner, 600, 1050.0, 10, 5) == []
    again = ledger.claim("PACS", owner, 600, 1100.0, 10, 5)
    assert [p.study_uid for p in again] == [s2.study_uid]
    assert ledger.finish("PACS", s2.study_uid, owner, ok(), 1101.0, 0.0) == "done"
    c = ledger.counts("PACS")
    assert (c["failed"].studies, c["done"].studies, c["done"].archived) == (0, 2, 6)
    assert ledger.times("PACS") == (1001.0, 1101.0)
    assert ledger.claim("PACS", owner, 600, 5000.0, 10, 5) == []


def test_unverified_outcome_is_never_done(ledger: MigrationLedger) -> None:
    ledger.add_planned(plans(1))
    owner = new_owner()
    (s,) = ledger.claim("PACS", owner, 600, 1000.0, 1, 5)
    claimed_ok_but_missing = Outcome(verified=True, expected_instances=3, archived_instances=2, bytes=1,
                                     missing=["1.2.3"])
    assert ledger.finish("PACS", s.study_uid, owner, claimed_ok_but_missing, 1001.0, 1002.0) == "failed"


def test_finish_by_a_worker_that_lost_its_lease_is_refused(ledger: MigrationLedger) -> None:
    ledger.add_planned(plans(1))
    a, b = new_owner(), new_owner()
    (s,) = ledger.claim("PACS", a, 10, 1000.0, 1, 5)
    assert ledger.claim("PACS", b, 10, 2000.0, 1, 5)  # a's lease expired: b took the study over
    with pytest.raises(LeaseHeld):
        ledger.finish("PACS", s.study_uid, a, ok(), 2001.0, 0.0)
    assert ledger.finish("PACS", s.study_uid, b, ok(), 2002.0, 0.0) == "done"


def test_lease_of_a_dead_process_is_taken_over(ledger: MigrationLedger) -> None:
    ledger.add_planned(plans(1))
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = new_owner().split(":")
    dead[1] = proc.stdout.strip()   # a pid that has exited
    assert ledger.claim("PACS", ":".join(dead), 600, 1000.0, 1, 5)
    live = new_owner()
    assert [p.study_uid for p in ledger.claim("PACS", live, 600, 1001.0, 1, 5)] == ["1.2.0"]
    assert ledger.claim("PACS", new_owner(), 600, 1002.0, 1, 5) == []   # a live owner's lease holds


def test_renew_extends_only_the_holders_lease(ledger: MigrationLedger) -> None:
    ledger.add_planned(plans(1))
    a, b = new_owner(), new_owner()
    (s,) = ledger.claim("PACS", a, 10, 1000.0, 1, 5)
    assert ledger.renew("PACS", s.study_uid, a, 10, 1008.0)   # now held until 1018
    assert ledger.claim("PACS", b, 10, 1015.0, 1, 5) == []    # past the first expiry: still a's
    assert not ledger.renew("PACS", s.study_uid, b, 10, 1015.0)
    assert ledger.claim("PACS", b, 10, 1019.0, 1, 5)          # not renewed again: expired, taken over
    assert not ledger.renew("PACS", s.study_uid, a, 10, 1020.0)
    with pytest.raises(LeaseHeld):
        ledger.finish("PACS", s.study_uid, a, ok(), 1021.0, 0.0)
    assert not ledger.renew("PACS", "1.2.unknown", a, 10, 1022.0)
