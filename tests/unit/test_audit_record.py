"""The audit writer's record format in-process: canonical JSON, timestamps, and the operation block."""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path

import pytest

from vna.audit import INSTANCES_TRANSFERRED, Actor, AuditLog, _now_iso, canonical, iter_records, verify
from vna.config import AuditConfig
from vna.errors import InvalidDataset


def test_canonical_is_sorted_compact_utf8_json() -> None:
    obj = {"b": [1, 2.5, None], "a": {"z": "Ünïcode \"q\"", "y": True}, "c": Path("/x")}
    assert canonical(obj) == json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                                        default=str).encode("utf-8")


def test_timestamps_are_utc_iso_with_microseconds() -> None:
    before = datetime.now(timezone.utc)
    ts = _now_iso()
    after = datetime.now(timezone.utc)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", ts)
    parsed = datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
    assert before <= parsed <= after


def test_operation_records_success_and_failure_and_keeps_the_exception(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    audit = AuditLog(AuditConfig(), path, source={"ae": "VNA"})
    actor = Actor("CT01", "ae", "10.0.0.7")
    try:
        with audit.operation(INSTANCES_TRANSFERRED, "C", actor) as rec:
            rec.patient_ids.append("P1")
            rec.study_uids.append("1.2.3")
            rec.details["bytes"] = 10
        with pytest.raises(InvalidDataset, match="bad header"):
            with audit.operation(INSTANCES_TRANSFERRED, "C", actor, patient_ids=["P2"]) as rec:
                raise InvalidDataset("bad header")
    finally:
        audit.close()
    ok, failed = list(iter_records(path))
    assert (ok["outcome"], ok["patient_ids"], ok["study_uids"], ok["details"]) == (0, ["P1"], ["1.2.3"], {"bytes": 10})
    assert ok["actor"] == {"id": "CT01", "kind": "ae", "address": "10.0.0.7"} and ok["event_id"] == "110104"
    assert (failed["outcome"], failed["patient_ids"], failed["details"]) == (4, ["P2"], {"error": "bad header"})
    assert verify(path).intact and verify(path).records == 2
