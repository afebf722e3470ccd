"""Adaptive C-FIND window splitting against a real pynetdicom C-FIND SCP that caps its answers."""

from __future__ import annotations

import datetime as dt
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Iterator

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

from tests.conftest import free_port
from vna.config import MigrateSource
from vna.migrate.ledger import SqliteLedger
from vna.migrate.runner import plan_source
from vna.migrate.source import DimseSource, SourceError

#: 20 studies over 2020, and 10 on one day at different times
STUDIES = ([(f"1.2.826.0.1.99.{i}", (dt.date(2020, 1, 1) + dt.timedelta(days=17 * i)).strftime("%Y%m%d"), "083000")
            for i in range(20)]
           + [(f"1.2.826.0.1.99.{100 + i}", "20210615", f"{8 + i:02d}{(7 * i) % 60:02d}00") for i in range(10)]
           + [(f"1.2.826.0.1.99.{200 + i}", "20210616", "000000") for i in range(9)])   # batch-imported
#: PatientID of each study: the batch-imported ones on one minute share prefixes (and two share an ID)
_BATCH = [uid for uid, date, _ in STUDIES if date == "20210616"]
PIDS = {uid: f"P{i}" for i, (uid, _, _) in enumerate(STUDIES)}
PIDS.update({uid: (f"H{j % 3}-{j}" if j < 8 else "H1-7") for j, uid in enumerate(_BATCH)})


def _in(value: str, match: str) -> bool:
    if not match:
        return True
    lo, sep, hi = match.partition("-")
    if not sep:
        return value == lo
    return (not lo or value >= lo) and (not hi or value <= hi)


class CappedScp:
    """Answers STUDY-level C-FINDs with at most ``cap`` matches: then either stops with Success
    (``mode='exact'``) or ends with status 0xA700 Out of Resources (``mode='status'``)."""

    def __init__(self, cap: int, mode: str) -> None:
        self.cap, self.mode = cap, mode
        self.port = free_port()
        self.queries = 0
        ae = AE(ae_title="CAPPED")
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_FIND, self.on_find)])

    def on_find(self, event: Any) -> Iterator[tuple[int, Dataset | None]]:
        self.queries += 1
        q = event.identifier
        pid = str(q.get("PatientID", "") or "")
        matches = [s for s in STUDIES if _in(s[1], str(q.get("StudyDate", "") or ""))
                   and _in(s[2], str(q.get("StudyTime", "") or "")) and (not pid or fnmatchcase(PIDS[s[0]], pid))]
        for n, (uid, date, time) in enumerate(matches):
            if n >= self.cap:
                if self.mode == "status":
                    yield 0xA700, None
                return
            ds = Dataset()
            ds.QueryRetrieveLevel = "STUDY"
            ds.StudyInstanceUID = uid
            ds.StudyDate = date
            ds.StudyTime = time
            ds.NumberOfStudyRelatedSeries = 1
            ds.NumberOfStudyRelatedInstances = 3
            yield 0xFF00, ds
        yield 0x0000, None


@pytest.fixture(params=["exact", "status"])
def capped(request: pytest.FixtureRequest) -> Iterator[CappedScp]:
    scp = CappedScp(4, request.param)
    yield scp
    scp.server.shutdown()


def test_capped_source_is_enumerated_completely(capped: CappedScp, tmp_path: Path) -> None:
    src = MigrateSource("CAPPED", "127.0.0.1", capped.port, find_limit=4 if capped.mode == "exact" else 0,
                        timeout=10)
    ledger = SqliteLedger(tmp_path / "index.sqlite")
    ledger.migrate()
    found, new = plan_source(ledger, DimseSource(src, "VNA"), dt.date(2019, 1, 1), dt.date(2022, 1, 1))
    assert (found, new) == (len(STUDIES), len(STUDIES))
    planned = {p.study_uid: p for p in ledger.studies("CAPPED")}
    assert set(planned) == {s[0] for s in STUDIES}
    assert {(p.expected_series, p.expected_instances) for p in planned.values()} == {(1, 3)}  # STUDY keys used
    assert capped.queries > len(STUDIES) // 4   # it had to split
    assert ledger.counts("CAPPED")["planned"].instances == 3 * len(STUDIES)
    ledger.close()


def test_a_cap_that_holds_for_one_minute_is_an_error(tmp_path: Path) -> None:
    scp = CappedScp(0, "status")   # answers nothing, always "out of resources"
    try:
        src = MigrateSource("CAPPED", "127.0.0.1", scp.port, timeout=10)
        with pytest.raises(SourceError):
            list(DimseSource(src, "VNA").studies(dt.date(2021, 6, 15), dt.date(2021, 6, 15)))
    finally:
        scp.server.shutdown()
