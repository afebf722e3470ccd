"""Retrieve verifies every copy: a bad one is marked CORRUPT, quarantined and skipped; none left -> failed sub-operation.

Each test runs on both receivers (``dicom.receiver`` python and native)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from pydicom import dcmread

from benchmarks.corpus import write_corpus
from tests.conftest import StoreScp, VnaServer, dataset_bytes
from tests.integration import scu
from tests.integration.receivers import make_server  # noqa: F401 -- on both receivers

Factory = Callable[..., VnaServer]


def _blob(srv: VnaServer, replica: str, sop_uid: str) -> Path:
    found = [p for p in (srv.data_dir / "hot" / replica).rglob(f"{sop_uid}.v1.*.dcm") if ".quarantine" not in p.parts]
    assert len(found) == 1
    return found[0]


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_one_corrupt_replica_is_skipped_and_marked(make_server: Factory, corpus: list[Path]) -> None:
    srv = make_server()
    assert scu.store(srv.port, [corpus[0]])[0].Status == 0
    ds = dcmread(corpus[0], stop_before_pixels=True)
    uid = str(ds.SOPInstanceUID)
    _flip(_blob(srv, "r1", uid))
    _, final, raw = scu.get(srv.port, {"QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": ds.StudyInstanceUID,
                                       "SeriesInstanceUID": ds.SeriesInstanceUID, "SOPInstanceUID": uid},
                            [str(ds.SOPClassUID)])
    assert final.Status == 0 and raw[uid] == dataset_bytes(corpus[0])
    stats = json.loads(srv.cli("index", "stats", "--json").stdout)
    assert stats["tiers"]["hot"]["by_state"] == {"OK": 1, "CORRUPT": 1}
    assert [p for p in (srv.data_dir / "hot" / "r1" / ".quarantine").rglob("*") if p.is_file()]


def test_no_verified_copy_fails_the_sub_operation(make_server: Factory, corpus: list[Path]) -> None:
    srv = make_server()
    study = [p for p in corpus if p.name.startswith("ct-7-0000")]
    assert all(r.Status == 0 for r in scu.store(srv.port, study))
    ds = dcmread(study[0], stop_before_pixels=True)
    uid = str(ds.SOPInstanceUID)
    _flip(_blob(srv, "r1", uid))
    _blob(srv, "r2", uid).unlink()
    received, final, raw = scu.get(srv.port, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": ds.StudyInstanceUID},
                                   [str(ds.SOPClassUID)])
    assert final.Status == 0xB000  # warning: some sub-operations failed
    assert final.NumberOfFailedSuboperations == 1
    assert final.NumberOfCompletedSuboperations == len(study) - 1
    assert uid not in raw and len(received) == len(study) - 1
    stats = json.loads(srv.cli("index", "stats", "--json").stdout)
    assert stats["tiers"]["hot"]["by_state"] == {"OK": 2 * (len(study) - 1), "CORRUPT": 1, "MISSING": 1}


def test_refused_retrieves_get_a_failure_status(make_server: Factory, corpus: list[Path], storescp: StoreScp) -> None:
    srv = make_server(f'[[dicom.remote]]\nae_title = "DEST"\nhost = "127.0.0.1"\nport = {storescp.port}\n')
    assert scu.store(srv.port, [corpus[0]])[0].Status == 0
    # no unique key at all
    _, final = scu.move(srv.port, {"QueryRetrieveLevel": "STUDY", "PatientName": "TEST*"}, "DEST")
    assert final.Status == 0xA900
    _, final, _ = scu.get(srv.port, {"QueryRetrieveLevel": "BOGUS", "StudyInstanceUID": "1.2.3"}, ["1.2.840.10008.5.1.4.1.1.2"])
    assert final.Status == 0xA900
    assert storescp.files() == []


def test_bad_copies_on_both_sides_of_a_batch_boundary(make_server: Factory, tmp_path: Path) -> None:
    """The native sender takes instances from the job in batches (RETRIEVE_BATCH = 64) and names the one it
    sends by its rank: bad copies and fallbacks in the first and in a later batch reach the right instance."""
    srv = make_server()
    study = write_corpus(tmp_path / "study", "small", studies=1, per_study=70, seed=23)
    assert all(r.Status == 0 for r in scu.store(srv.port, study))
    by_uid = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in study}
    uids = sorted(by_uid)                      # the order a retrieve sends them in
    corrupt, lost = [uids[3], uids[63], uids[66]], uids[65]
    for uid in corrupt:
        _flip(_blob(srv, "r1", uid))
    _flip(_blob(srv, "r1", lost))
    _blob(srv, "r2", lost).unlink()
    ds = dcmread(study[0], stop_before_pixels=True)
    received, final, raw = scu.get(srv.port, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": ds.StudyInstanceUID},
                                   [str(ds.SOPClassUID)])
    assert (final.Status, final.NumberOfFailedSuboperations, final.NumberOfCompletedSuboperations) == (0xB000, 1, 69)
    assert sorted(raw) == sorted(set(uids) - {lost})
    assert all(raw[uid] == dataset_bytes(by_uid[uid]) for uid in raw)
    stats = json.loads(srv.cli("index", "stats", "--json").stdout)
    assert stats["tiers"]["hot"]["by_state"] == {"OK": 2 * 70 - 5, "CORRUPT": 4, "MISSING": 1}
