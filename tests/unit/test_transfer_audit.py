"""The C-STORE transfer journal in-process (vna/transfer_audit.py): recovery after a crash between a
record and its done line, and a rotated journal. Real files, the real audit writer."""

from __future__ import annotations

import json
import os
from pathlib import Path

from vna.audit import Actor, AuditLog, _now_iso, iter_records, verify
from vna.config import AuditConfig
from vna.transfer_audit import AssociationAudit, TransferAudit, _write_record


def _store(assoc: AssociationAudit, study: str, n: int, pad: int = 0) -> None:
    """What ingest_file puts in the scope of one stored instance."""
    with assoc.instance() as scope:
        scope.patient_ids.append("P1")
        scope.study_uids.append(study)
        scope.details.update({"sop_uid": f"{study}.{n}", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
                              "bytes": 100 + pad, "note": "x" * pad})


def _transfers(path: Path) -> list[dict[str, object]]:
    return [r for r in iter_records(path) if r["event_id"] == "110104"]


def _crash(t: TransferAudit) -> None:
    """As kill -9 leaves it: the journal's descriptor closed (its lock released), nothing else done."""
    t._stop.set()
    assert t._fd is not None
    os.close(t._fd)
    t._fd = None


def _started(tmp_path: Path) -> tuple[Path, AuditLog, Path, TransferAudit]:
    """A started TransferAudit journaling in ``tmp_path/journal`` for an audit trail at ``tmp_path/audit.log``:
    (trail, audit log, journal directory, transfer audit)."""
    trail = tmp_path / "audit.log"
    audit = AuditLog(AuditConfig(), trail)
    jdir = tmp_path / "journal"
    t = TransferAudit(audit, jdir, 600)
    t.start()
    return trail, audit, jdir, t


def test_a_record_written_before_a_crash_is_not_recovered_twice(tmp_path: Path) -> None:
    trail, audit, jdir, t = _started(tmp_path)
    assoc = t.association(Actor("CT1", "ae", "10.0.0.1"))
    for i in range(3):
        _store(assoc, "1.2.3", i)
    _store(t.association(Actor("CT2", "ae", "10.0.0.2")), "4.5.6", 0)
    # the first association's record is written, and the process dies before its done line:
    # replay what _write_due does up to the record
    (path,) = jdir.glob("*.jnl")
    with t._lock:
        due = list(assoc.batches.values())
        assoc.batches.clear()
        t._append(b'{"writing":[%d],"ts":"%s"}\n' % (due[0].id, _now_iso().encode()))
        _write_record(audit, due[0])
    _crash(t)
    assert TransferAudit.recover(audit, jdir) == 1           # only the other association's batch
    recs = _transfers(trail)
    assert [r["details"]["count"] for r in recs] == [3, 1]   # type: ignore[index]
    assert recs[1]["details"]["recovered"] is True and recs[1]["study_uids"] == ["4.5.6"]  # type: ignore[index]
    assert "recovered" not in recs[0]["details"]             # type: ignore[operator]
    assert not path.exists()
    audit.close()
    assert verify(trail).intact


def test_a_large_journal_is_rewritten_with_the_open_batches(tmp_path: Path) -> None:
    """More than a mebibyte of journal: once records are written it is replaced by a file holding only the open
    batch; after a crash that batch alone is recovered."""
    trail, audit, jdir, t = _started(tmp_path)
    open_ = t.association(Actor("OPEN", "ae", "10.0.0.1"))
    _store(open_, "7.7", 0)
    busy = t.association(Actor("BUSY", "ae", "10.0.0.2"))
    for i in range(2500):
        _store(busy, "8.8", i, pad=400)
    busy.close()
    (path,) = jdir.glob("*.jnl")
    assert path.stat().st_size < 4096                        # rewritten: the open batch only
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [x.get("assoc") for x in lines if "assoc" in x] == [open_.id]
    assert len(_transfers(trail)) == 3                       # 2500 instances: 1000 + 1000 + 500
    _crash(t)
    assert TransferAudit.recover(audit, jdir) == 1
    last = _transfers(trail)[-1]
    assert last["actor"]["id"] == "OPEN" and last["details"]["recovered"] is True  # type: ignore[index]
    listed = [i["sop_uid"] for r in _transfers(trail) for i in r["details"]["instances"]]  # type: ignore[index]
    assert len(listed) == len(set(listed)) == 2501
    audit.close()
