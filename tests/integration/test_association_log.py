"""The INFO log of the DICOM port (issue 20): one line per association with who, how long, the services
used and the counts, no patient data; an unknown C-MOVE destination is logged once per name."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Callable

from pydicom import dcmread

from tests.conftest import StoreScp, VnaServer
from tests.integration import scu
from tests.integration.receivers import make_server  # noqa: F401 -- on both receivers

Factory = Callable[..., VnaServer]


def _lines(srv: VnaServer, pattern: str, n: int, timeout: float = 30.0) -> list[str]:
    """The log lines matching ``pattern`` once there are ``n`` of them (lines come when connections close)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [ln for ln in srv.log.read_text().splitlines() if re.search(pattern, ln)]
        if len(found) >= n or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_one_line_per_association_without_patient_data(make_server: Factory, corpus: list[Path],
                                                        storescp: StoreScp) -> None:
    srv = make_server(f'[[dicom.remote]]\nae_title = "DEST"\nhost = "127.0.0.1"\nport = {storescp.port}\n')
    assert all(r.Status == 0 for r in scu.store(srv.port, corpus[:3], ae_title="LOADER"))
    assert scu.echo(srv.port, calling="PINGER")
    ds = dcmread(corpus[0], stop_before_pixels=True)
    _, final = scu.move(srv.port, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": ds.StudyInstanceUID}, "DEST")
    assert final.Status == 0
    lines = _lines(srv, r"INFO .*association from ", 3)
    store = [ln for ln in lines if "association from LOADER (127.0.0.1:" in ln]
    assert len(store) == 1, lines
    assert re.search(r"released after [\d.]+ s: C-STORE 3; stored 3, sent 0, failures 0$", store[0]), store
    echo = [ln for ln in lines if "association from PINGER" in ln]
    assert len(echo) == 1 and "C-ECHO 1; stored 0, sent 0, failures 0" in echo[0], lines
    move = [ln for ln in lines if "C-MOVE 1" in ln]
    assert len(move) == 1 and "sent 3, failures 0" in move[0], lines
    text = "\n".join(lines)
    for phi in (str(ds.PatientID), str(ds.PatientName), str(ds.StudyInstanceUID)):
        assert phi not in text


def test_an_unknown_move_destination_is_logged_once(make_server: Factory, corpus: list[Path]) -> None:
    srv = make_server()
    assert all(r.Status == 0 for r in scu.store(srv.port, corpus[:1]))
    ds = dcmread(corpus[0], stop_before_pixels=True)
    for _ in range(3):
        _, final = scu.move(srv.port, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": ds.StudyInstanceUID},
                            "NOWHERE")
        assert final.Status == 0xA801
    lines = _lines(srv, r"C-MOVE 1; stored 0, sent 0, failures 1", 3)
    assert len(lines) == 3, srv.log.read_text()[-3000:]
    assert len([ln for ln in srv.log.read_text().splitlines() if "unknown destination 'NOWHERE'" in ln]) == 1
