"""The C-STORE transfer journal in-process (vna/transfer_audit.py): recovery after a crash between a
record and its done line, and a rotated journal. Real files, the real audit writer."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vna.audit import Actor, AuditLog, _now_iso, iter_records, verify
from vna.config import AuditConfig
from vna.errors import AuditUnavailable
from vna.transfer_audit import _OWN, AssociationAudit, TransferAudit, _write_record


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
    assert t._fd is not None and t._path is not None
    os.close(t._fd)
    t._fd = None
    _OWN.discard(t._path)   # the process is gone, and with it its list of own journals


def _started(tmp_path: Path, cfg: AuditConfig | None = None) -> tuple[Path, AuditLog, Path, TransferAudit]:
    """A started TransferAudit journaling in ``tmp_path/journal`` for an audit trail at ``tmp_path/audit.log``:
    (trail, audit log, journal directory, transfer audit)."""
    trail = tmp_path / "audit.log"
    audit = AuditLog(cfg or AuditConfig(), trail)
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


def test_an_instance_stored_after_its_association_closed_is_recorded(tmp_path: Path) -> None:
    """EVT_CONN_CLOSE (the connection's thread) closes the audit while a handler still stores: the late
    instance is journaled and recorded at once, not left in a batch nobody writes (then truncated away)."""
    trail, audit, _jdir, t = _started(tmp_path)
    a = t.association(Actor("CT1", "ae", "10.0.0.1"))
    b = t.association(Actor("CT2", "ae", "10.0.0.2"))
    _store(b, "9.9", 0)
    a.close()
    _store(a, "1.2.3", 0)
    assert [r["study_uids"] for r in _transfers(trail)] == [["1.2.3"]]
    b.close()
    t.close()
    assert sorted(r["study_uids"][0] for r in _transfers(trail)) == ["1.2.3", "9.9"]  # type: ignore[index]
    assert t._assocs == set()
    audit.close()


def test_an_instance_stored_after_the_journal_closed_gets_its_own_record(tmp_path: Path) -> None:
    """A store that outlives the server's stop grace: its record is written directly."""
    trail, audit, _jdir, t = _started(tmp_path)
    a = t.association(Actor("CT1", "ae", "10.0.0.1"))
    t.close()
    _store(a, "1.2.3", 0)
    (rec,) = _transfers(trail)
    assert rec["details"]["instances"][0]["sop_uid"] == "1.2.3.0"  # type: ignore[index]
    audit.close()


def test_a_failing_journal_falls_back_to_a_record_and_refuses_the_next_store(tmp_path: Path) -> None:
    """The journal's disk is full: the stored instance gets its own record; the next store is refused first."""
    trail, audit, _jdir, t = _started(tmp_path)
    a = t.association(Actor("CT1", "ae", "10.0.0.1"))
    _store(a, "1.2.3", 0)
    assert t._fd is not None
    os.close(t._fd)
    t._fd = os.open("/dev/full", os.O_WRONLY | os.O_APPEND)   # every write: ENOSPC
    _store(a, "1.2.3", 1)
    (rec,) = _transfers(trail)
    assert [i["sop_uid"] for i in rec["details"]["instances"]] == ["1.2.3.1"]  # type: ignore[index]
    with pytest.raises(AuditUnavailable, match="journal"):
        a.instance()
    t.close()   # the journaled batch cannot be marked: its journal is kept for recovery
    assert [p.suffix for p in (tmp_path / "journal").iterdir()] == [".jnl"]
    assert TransferAudit.recover(audit, tmp_path / "journal") == 1
    listed = [i["sop_uid"] for r in _transfers(trail) for i in r["details"]["instances"]]  # type: ignore[index]
    assert sorted(listed) == ["1.2.3.0", "1.2.3.1"]
    audit.close()


def test_a_recovery_stopped_halfway_does_not_write_its_records_again(tmp_path: Path) -> None:
    """The first recovery writes one batch and fails on the next: the next recovery writes only that one."""
    trail, audit, _jdir, t = _started(tmp_path)
    for n, study in enumerate(("1.1", "2.2")):
        _store(t.association(Actor(f"CT{n}", "ae", "10.0.0.1")), study, 0)
    _crash(t)
    (tmp_path / "notadir").write_text("")
    failing = AuditLog(AuditConfig(on_failure="buffer", buffer_max=1), tmp_path / "notadir" / "audit.log")
    assert TransferAudit.recover(failing, tmp_path / "journal") == 1   # held in memory, then the buffer is full
    failing.close()
    assert TransferAudit.recover(audit, tmp_path / "journal") == 1
    assert [r["study_uids"] for r in _transfers(trail)] == [["2.2"]]
    assert not list((tmp_path / "journal").iterdir())
    audit.close()


def test_a_young_tmp_journal_is_not_swept(tmp_path: Path) -> None:
    """A .tmp between its creator's open and flock is left alone; an old unlocked one is removed."""
    _trail, audit, _jdir, t = _started(tmp_path)
    jdir = tmp_path / "journal"
    young, old = jdir / "1-young.tmp", jdir / "2-old.tmp"
    young.write_text("")
    old.write_text("")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    TransferAudit.recover(audit, jdir)
    assert young.exists() and not old.exists()
    t.close()
    audit.close()


def test_a_live_journal_of_this_process_is_not_recovered(tmp_path: Path) -> None:
    """On NFS a second flock of the same process succeeds: the process's own journals are skipped."""
    trail, audit, _jdir, t = _started(tmp_path)
    _store(t.association(Actor("CT1", "ae", "10.0.0.1")), "1.2.3", 0)
    assert t._fd is not None and t._path is not None
    fcntl.flock(t._fd, fcntl.LOCK_UN)   # as NFS sees a second lock of one process
    assert TransferAudit.recover(audit, tmp_path / "journal") == 0
    assert t._path.exists() and _transfers(trail) == []
    t.close()
    assert len(_transfers(trail)) == 1
    audit.close()


_COMPACT = """
import sys
from pathlib import Path
from vna.audit import Actor, AuditLog
from vna.config import AuditConfig
from vna.transfer_audit import TransferAudit
d = Path(sys.argv[1])
audit = AuditLog(AuditConfig(fsync_interval=600), d / "audit.log")
t = TransferAudit(audit, d / "journal", 600)
t.start()
for actor, n in (("OPEN", 1), ("BUSY", 1100)):
    assoc = t.association(Actor(actor, "ae", ""))
    for i in range(n):
        with assoc.instance() as scope:
            scope.study_uids.append(actor)
            scope.details.update({"sop_uid": f"{actor}.{i}", "note": "x" * 1000})
assoc.close()
t.close()
audit.close()
"""


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_journal_renames_are_durable_with_fsync(tmp_path: Path) -> None:
    """With fsync on: a rewritten journal is fdatasynced before it is renamed into place, and the directory
    is fsynced after each rename (creation and rewrite), as the system calls show."""
    trace = tmp_path / "strace.log"
    subprocess.run(["strace", "-f", "-y", "-e", "trace=fdatasync,fsync,rename,renameat,renameat2", "-o",
                    str(trace), sys.executable, "-c", _COMPACT, str(tmp_path)], check=True)
    jdir = str(tmp_path / "journal")
    calls = [line.split(None, 1)[1] for line in trace.read_text().splitlines()
             if jdir in line and "audit.log" not in line and "resumed" not in line]
    renames = [i for i, c in enumerate(calls) if c.startswith("rename")]
    assert len(renames) == 2                                  # created, then rewritten once
    for i in renames:
        assert calls[i + 1].startswith("fsync(") and calls[i + 1].split("<", 1)[1].startswith(jdir + ">")
    src = calls[renames[1]].split('"')[1]
    assert calls[renames[1] - 1].startswith("fdatasync(") and f"<{src}>" in calls[renames[1] - 1]
