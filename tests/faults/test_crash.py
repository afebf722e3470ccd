"""kill -9 during ingest: every acknowledged instance survives bit-exact; nothing is half-registered."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import Callable

from pydicom import dcmread
from pynetdicom import AE

from benchmarks.corpus import write_corpus
from tests.conftest import VnaServer, dataset_bytes
from tests.integration import scu

Factory = Callable[..., VnaServer]


def test_kill_9_during_ingest_loses_no_acknowledged_instance(make_server: Factory, tmp_path: Path) -> None:
    files = write_corpus(tmp_path / "corpus", "ct", studies=1, per_study=60, seed=11)
    srv = make_server()
    acked: list[Path] = []
    stop = threading.Event()

    def sender() -> None:
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(str(dcmread(files[0], stop_before_pixels=True).SOPClassUID))
        assoc = ae.associate("127.0.0.1", srv.port, ae_title="VNA")
        if not assoc.is_established:
            return
        for f in files:
            if stop.is_set() or not assoc.is_established:
                break
            try:
                rsp = assoc.send_c_store(dcmread(f))
            except RuntimeError:  # the server was killed under us
                break
            if rsp is not None and "Status" in rsp and rsp.Status == 0:
                acked.append(f)
        if assoc.is_established:
            assoc.release()

    t = threading.Thread(target=sender)
    t.start()
    deadline = time.monotonic() + 60
    while len(acked) < 15 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert srv.proc is not None
    srv.proc.send_signal(signal.SIGKILL)
    srv.proc.wait(10)
    stop.set()
    t.join(30)
    assert 15 <= len(acked) < len(files)

    srv.start()
    stats = json.loads(srv.cli("index", "stats", "--json").stdout)
    assert stats["instances"] >= len(acked)
    # every registered instance has two OK placements whose blobs exist (nothing half-registered)
    assert stats["tiers"]["hot"]["by_state"] == {"OK": 2 * stats["instances"]}
    ds = dcmread(files[0], stop_before_pixels=True)
    _, final, raw = scu.get(srv.port, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": ds.StudyInstanceUID},
                            [str(ds.SOPClassUID)])
    assert final.Status == 0
    assert final.NumberOfCompletedSuboperations == stats["instances"]
    for f in acked:
        uid = str(dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        assert raw[uid] == dataset_bytes(f)
    # the sender retries what was not acknowledged: idempotent, completes the study
    assert all(r.Status == 0 for r in scu.store(srv.port, files))
    assert json.loads(srv.cli("index", "stats", "--json").stdout)["instances"] == len(files)
