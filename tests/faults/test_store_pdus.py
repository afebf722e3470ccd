"""C-STORE-RQs built PDU by PDU on a real association, on both receivers: what is stored, what is answered,
what is left behind.

(These cases were the fast C-STORE path's tests; the native receiver took its place and the python receiver is
plain pynetdicom, so both are held to the same outcomes here.)
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import pytest
from pydicom import dcmread

from benchmarks.corpus import write_corpus
from tests.conftest import VnaServer, dataset_bytes, with_receiver
from tests.faults.hostile import RawPeer, command_set, p_data, spool, wait_for

Factory = Callable[..., VnaServer]

pytestmark = pytest.mark.parametrize("receiver", ["native", "python"])


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    d = tmp_path_factory.mktemp("small")
    write_corpus(d, "small", studies=1, per_study=3, seed=31)
    return sorted(d.glob("*.dcm"))


def _instances(srv: VnaServer) -> int:
    r = srv.cli("index", "stats", "--json")
    assert r.returncode == 0, r.stderr
    return int(json.loads(r.stdout)["instances"])


def _command(path: Path, msg_id: int = 7) -> bytes:
    ds = dcmread(path, stop_before_pixels=True)
    return command_set(AffectedSOPClassUID=str(ds.SOPClassUID), CommandField=0x0001, MessageID=msg_id, Priority=2,
                       CommandDataSetType=0x0000, AffectedSOPInstanceUID=str(ds.SOPInstanceUID))


def _open(srv: VnaServer, path: Path) -> tuple[RawPeer, int]:
    ds = dcmread(path, stop_before_pixels=True)
    peer = RawPeer(srv.port, timeout=30)
    cx = next(iter(peer.associate([(str(ds.SOPClassUID), [str(ds.file_meta.TransferSyntaxUID)])])))
    return peer, cx


def test_store_pdus(make_server: Factory, receiver: str, small: list[Path]) -> None:
    srv = make_server(with_receiver("", receiver))
    a, b, c = small
    body_a = dataset_bytes(a)

    # 1. the peer aborts in the middle of a data set: nothing stored, no spool file left
    peer, cx = _open(srv, a)
    peer.send(p_data([(cx, 0x03, _command(a)), (cx, 0x00, body_a[:1000])]))
    peer.send(p_data([(cx, 0x00, body_a[1000:2000])]))
    time.sleep(0.5)
    peer.send(b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00")  # A-ABORT
    peer.close()
    wait_for(lambda: spool(srv) == [], 30, "spool removed after A-ABORT")
    assert _instances(srv) == 0

    # 2. a command set split over two PDVs, the data set in one: stored, Success
    peer, cx = _open(srv, b)
    cmd = _command(b)
    peer.send(p_data([(cx, 0x01, cmd[:20]), (cx, 0x03, cmd[20:])]))
    peer.send(p_data([(cx, 0x02, dataset_bytes(b))]))
    rsp = peer.response()
    assert not isinstance(rsp, int) and rsp.Status == 0 and rsp.MessageIDBeingRespondedTo == 7, rsp
    assert _instances(srv) == 1
    peer.close()

    # 3. a data set that is not what its command announced is refused with a status and an error comment;
    #    the association goes on: a good store on it
    peer, cx = _open(srv, c)
    peer.send(p_data([(cx, 0x03, _command(c)), (cx, 0x02, b"\x08\x00\x05\x00CS\x04\x00ISO_IR")]))
    rsp = peer.response()
    assert not isinstance(rsp, int) and rsp.Status >> 12 in (0xA, 0xC) and rsp.ErrorComment, rsp
    assert _instances(srv) == 1
    peer.send(p_data([(cx, 0x03, _command(c, 9)), (cx, 0x02, dataset_bytes(c))]))
    rsp = peer.response()
    assert not isinstance(rsp, int) and rsp.Status == 0 and rsp.MessageIDBeingRespondedTo == 9, rsp
    assert _instances(srv) == 2
    peer.close()
    wait_for(lambda: spool(srv) == [], 30, "spool emptied")
