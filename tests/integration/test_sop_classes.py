"""Which storage SOP classes the DIMSE port accepts: retired ones always, unknown/private ones when configured.

Real DCMTK storescu/dcmsend/findscu/getscu/movescu against a real `vna serve` (issue 17).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Callable

import pytest
from pydicom import dcmread

from tests.conftest import DCMTK_ENV, VnaServer, dataset_bytes, free_port, stop_process, uid_of, wait_port
from tests.integration import scu
from tests.integration.receivers import RECEIVERS, with_receiver

Factory = Callable[..., VnaServer]

RETIRED = {
    "1.2.840.10008.5.1.4.1.1.6": "Ultrasound Image Storage (Retired)",
    "1.2.840.10008.5.1.4.1.1.3": "Ultrasound Multi-frame Image Storage (Retired)",
    "1.2.840.10008.5.1.4.1.1.5": "Nuclear Medicine Image Storage (Retired)",
    "1.2.840.10008.5.1.4.1.1.12.3": "X-Ray Angiographic Bi-Plane Image Storage (Retired)",
}
PRIVATE = "1.2.3.4.5.6.7"


def _with_class(src: Path, out: Path, sop_class: str, n: int) -> Path:
    """A copy of ``src`` whose SOP Class UID (meta and data set) is ``sop_class``, with a new SOP Instance UID."""
    ds = dcmread(src)
    ds.SOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPInstanceUID = f"{ds.SOPInstanceUID}.{900 + n}"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return out


def _instances(server: VnaServer) -> int:
    r = server.cli("index", "stats", "--json")
    assert r.returncode == 0, r.stderr
    return int(json.loads(r.stdout)["instances"])


def _storescu(server: VnaServer, *files: Path) -> subprocess.CompletedProcess[str]:
    """storescu proposing the files' own SOP classes (-R: by default it proposes only its own list)."""
    return subprocess.run(["storescu", "-R", "-aec", "VNA", "127.0.0.1", str(server.port), *map(str, files)],
                          env=DCMTK_ENV, capture_output=True, text=True, timeout=120)


def _dcmsend(server: VnaServer, *files: Path) -> str:
    """DCMTK dcmsend (storescu refuses to send a SOP class it does not know); returns its log with the summary."""
    r = subprocess.run(["dcmsend", "-v", "-nuc", "-aec", "VNA", "127.0.0.1", str(server.port), *map(str, files)],
                       env=DCMTK_ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr  # 0 also when nothing was accepted: the summary says
    return r.stdout + r.stderr


def _small(corpus: list[Path]) -> Path:
    return next(p for p in corpus if p.name.startswith("small-"))


@pytest.mark.parametrize("receiver", RECEIVERS)
def test_retired_storage_classes_are_stored_found_and_retrieved(make_server: Factory, corpus: list[Path],
                                                                tmp_path: Path, receiver: str) -> None:
    srv = make_server(with_receiver(receiver, ""))
    files = [_with_class(_small(corpus), tmp_path / "in" / f"{n}.dcm", uid, n) for n, uid in enumerate(RETIRED)]
    r = _storescu(srv, *files)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _instances(srv) == len(RETIRED)

    study = dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    r = subprocess.run(["findscu", "-S", "-aec", "VNA", "-k", "QueryRetrieveLevel=IMAGE", "-k", f"StudyInstanceUID={study}",
                        "-k", "SeriesInstanceUID", "-k", "SOPInstanceUID", "-k", "SOPClassUID",
                        "127.0.0.1", str(srv.port)], env=DCMTK_ENV, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    found = r.stdout + r.stderr  # findscu prints its responses as log lines
    assert all(f"[{dcmread(f, stop_before_pixels=True).SOPInstanceUID}" in found for f in files), found

    out = tmp_path / "got"
    out.mkdir()
    r = subprocess.run(["getscu", "-S", "-aec", "VNA", "-od", str(out), "-k", "QueryRetrieveLevel=STUDY",
                        "-k", f"StudyInstanceUID={study}", "127.0.0.1", str(srv.port)],
                       env=DCMTK_ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    got = {str(dcmread(p, stop_before_pixels=True).SOPClassUID) for p in out.iterdir()}
    assert got == set(RETIRED)


@pytest.mark.parametrize("receiver", RECEIVERS)
def test_private_sop_class_refused_by_default(make_server: Factory, corpus: list[Path], tmp_path: Path,
                                              receiver: str) -> None:
    srv = make_server(with_receiver(receiver, ""))
    f = _with_class(_small(corpus), tmp_path / "private.dcm", PRIVATE, 0)
    out = _dcmsend(srv, f)
    assert "No Acceptable Presentation Contexts" in out, out
    assert re.search(r"NOT sent to the peer\s*: 1", out), out
    assert _instances(srv) == 0


@pytest.mark.parametrize("receiver", RECEIVERS)
@pytest.mark.parametrize("sop_class", [PRIVATE, "1.2.840.10008.5.1.4.1.1.501.1"])  # private; DICOS CT (unknown to pynetdicom)
def test_unknown_sop_class_stored_when_configured(make_server: Factory, corpus: list[Path], tmp_path: Path,
                                                  sop_class: str, receiver: str) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    port = free_port()
    with open(tmp_path / "storescp.log", "wb") as log:  # -pm: it accepts unknown SOP classes too
        scp = subprocess.Popen(["storescp", "-pm", "+xa", "-aet", "DEST", "-od", str(dest), str(port)],
                               stdout=log, stderr=subprocess.STDOUT, env=DCMTK_ENV)
    try:
        wait_port("127.0.0.1", port, 10, scp)
        srv = make_server(with_receiver(receiver, f'[dicom]\naccept_unknown_storage_classes = true\n'
                          f'[[dicom.remote]]\nae_title = "DEST"\nhost = "127.0.0.1"\nport = {port}\n'))
        f = _with_class(_small(corpus), tmp_path / "unknown.dcm", sop_class, 0)
        out = _dcmsend(srv, f, _small(corpus))  # with a known class on the same association
        assert re.search(r"with status SUCCESS\s*: 2", out), out
        assert _instances(srv) == 2
        # and it is retrieved like any other instance (C-MOVE)
        r = subprocess.run(["movescu", "-S", "-aec", "VNA", "-aem", "DEST", "-k", "QueryRetrieveLevel=IMAGE",
                            "-k", f"StudyInstanceUID={uid_of(f, 'StudyInstanceUID')}",
                            "-k", f"SeriesInstanceUID={uid_of(f, 'SeriesInstanceUID')}",
                            "-k", f"SOPInstanceUID={uid_of(f)}", "127.0.0.1", str(srv.port)],
                           env=DCMTK_ENV, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        got = [p for p in dest.iterdir() if p.is_file()]
        assert [uid_of(p, "SOPClassUID") for p in got] == [sop_class]
        assert dataset_bytes(got[0]) == dataset_bytes(f)
        # and C-GET: the requestor takes the SCP role for the unknown class on the same association
        ts = str(dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        received, final, raw = scu.get(srv.port, {"QueryRetrieveLevel": "IMAGE",
                                                  "StudyInstanceUID": uid_of(f, "StudyInstanceUID"),
                                                  "SeriesInstanceUID": uid_of(f, "SeriesInstanceUID"),
                                                  "SOPInstanceUID": uid_of(f)}, [sop_class], [ts])
        assert int(final.Status) == 0, final
        assert [str(ds.SOPClassUID) for ds in received] == [sop_class]
        assert raw[uid_of(f)] == dataset_bytes(f)
    finally:
        stop_process(scp, 5)
    # a known non-storage SOP class is not turned into storage: Modality Worklist FIND stays unsupported
    r = subprocess.run(["findscu", "-W", "-aec", "VNA", "-k", "PatientID", "127.0.0.1", str(srv.port)],
                       env=DCMTK_ENV, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
