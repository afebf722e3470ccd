"""vna.dicom.fast_store: C-STOREs received in the DUL thread store exactly what pynetdicom's path stores.

Driven over the network by DCMTK ``storescu`` and by hand-built PDUs on a real
association. The servers run in a child interpreter (importing vna.dicom.server
configures pynetdicom for the whole process), where the test can also count the
stores the fast path took over.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import free_port

_CHILD = textwrap.dedent('''
    import hashlib, json, os, struct, subprocess, sys, time
    from io import BytesIO
    from pathlib import Path

    from pydicom import dcmread
    from pynetdicom import AE
    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE

    import vna.dicom.fast_store as fs
    from vna.archive import Archive
    from vna.config import load_config
    from vna.dicom.server import DicomServer
    from tests.conftest import dataset_bytes

    corpus = [Path(p) for p in sys.argv[1].split(os.pathsep)]
    work, ports = Path(sys.argv[2]), [int(p) for p in sys.argv[3].split(",")]

    taken = []
    _complete = fs.FastStore._complete
    def complete(self, dul):
        taken.append(self.current.sop_uid)
        _complete(self, dul)
    fs.FastStore._complete = complete

    def serve(name, port, fast):
        cfg = load_config(None, env={}, overrides={"archive": {"data_dir": str(work / name)},
                                                   "dicom": {"port": port, "host": "127.0.0.1", "fast_store": fast}})
        archive = Archive(cfg)
        server = DicomServer(archive, cfg.dicom)
        server.start()
        return archive, server, cfg.resolve("spool/incoming")

    def storescu(port, paths, *opts):
        r = subprocess.run(["storescu", *opts, "-aec", "VNA", "127.0.0.1", str(port), *map(str, paths)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr

    def blobs(name):
        out = {}
        for p in sorted((work / name / "hot").rglob("*.dcm")):
            uid = p.name.split(".v")[0]
            out.setdefault(uid, []).append(p.read_bytes())
        return out

    def wait_for(pred, what, timeout=10.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return
            time.sleep(0.05)
        raise AssertionError(what)

    fast_archive, fast_server, fast_spool = serve("fast", ports[0], True)
    slow_archive, slow_server, slow_spool = serve("slow", ports[1], False)

    # 1. storescu, default and tiny PDUs (data sets in many fragments), and implicit VR:
    #    the fast path takes every store and the stored files equal pynetdicom's byte for byte
    storescu(ports[0], corpus[:4])
    storescu(ports[0], corpus[4:], "-pdu", "4096", "-xi")
    storescu(ports[1], corpus[:4])
    storescu(ports[1], corpus[4:], "-pdu", "4096", "-xi")
    uids = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in corpus}
    assert set(taken) == uids and len(taken) == len(corpus), (len(taken), len(corpus))
    fast, slow = blobs("fast"), blobs("slow")
    assert set(fast) == uids and fast.keys() == slow.keys()
    for uid in uids:
        assert len(fast[uid]) == 2 and fast[uid][0] == fast[uid][1] == slow[uid][0], uid
        # hashed while spooled (fast) or read back (pynetdicom's path): both the digest of the bytes stored
        for archive in (fast_archive, slow_archive):
            rec = archive.index.get_instance(uid)
            assert rec.content_sha256 == hashlib.sha256(fast[uid][0]).hexdigest(), uid
            assert rec.content_size == len(fast[uid][0]), uid
    for p in corpus[:4]:  # sent as they are (the rest converted to implicit VR by storescu)
        assert fast[str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)][0].endswith(dataset_bytes(p)), p
    assert list(fast_spool.iterdir()) == []
    # one replica took over the spool file (hard link), the other is a copy: two files, one link each
    for name in ("fast", "slow"):
        files = sorted((work / name / "hot").rglob("*.dcm"))
        assert len({p.stat().st_ino for p in files}) == len(files) == 2 * len(uids)
        assert all(p.stat().st_nlink == 1 for p in files)

    # hand-built PDUs on a real association
    def pdu(*pdvs):
        body = b"".join(struct.pack(">IBB", len(d) + 2, cx, mch) + d for cx, mch, d in pdvs)
        return struct.pack(">BBI", 4, 0, len(body)) + body

    def command(ds, msg_id=7):
        prim = C_STORE()
        prim.MessageID = msg_id
        prim.AffectedSOPClassUID = ds.SOPClassUID
        prim.AffectedSOPInstanceUID = ds.SOPInstanceUID
        prim.Priority = 2
        prim.DataSet = BytesIO(b"")
        msg = C_STORE_RQ()
        msg.primitive_to_message(prim)
        first = next(iter(msg.encode_msg(1, 0)))
        return first.presentation_data_value_list[0][1][1:]

    def associate(ds):
        ae = AE(ae_title="RAWSCU")
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", ports[0], ae_title="VNA")
        assert assoc.is_established
        assoc._reactor_checkpoint.clear()  # as pynetdicom's send_* do: its reactor must not take our answers
        wait_for(lambda: assoc._is_paused, "SCU reactor paused")
        return assoc, assoc.accepted_contexts[0].context_id, assoc.dul.socket.socket

    def stored(uid):
        return fast_archive.index.get_instance(uid) is not None

    extra = [p for p in sorted(Path(sys.argv[4]).glob("*.dcm"))]
    ds_a, ds_b, ds_c = (dcmread(p) for p in extra[:3])
    body_a = dataset_bytes(extra[0])
    n_before = len(taken)

    # 2. the peer aborts in the middle of a data set: nothing stored, no spool file left
    assoc, cx, sock = associate(ds_a)
    sock.sendall(pdu((cx, 0x03, command(ds_a)), (cx, 0x00, body_a[:1000])))
    sock.sendall(pdu((cx, 0x00, body_a[1000:2000])))
    wait_for(lambda: len(list(fast_spool.iterdir())) == 1, "spool file while receiving")
    assoc._reactor_checkpoint.set()
    assoc.abort()
    wait_for(lambda: list(fast_spool.iterdir()) == [], "spool removed after A-ABORT")
    assert not stored(str(ds_a.SOPInstanceUID))

    # 3. another command arrives in the middle of a data set: protocol error, the association is aborted
    assoc, cx, sock = associate(ds_a)
    sock.sendall(pdu((cx, 0x03, command(ds_a)), (cx, 0x00, body_a[:1000])))
    sock.sendall(pdu((cx, 0x03, command(ds_a, 8))))
    wait_for(lambda: assoc.acse.is_aborted(), "association aborted by the server")
    assoc._reactor_checkpoint.set()
    wait_for(lambda: list(fast_spool.iterdir()) == [], "spool removed after the protocol error")
    assert not stored(str(ds_a.SOPInstanceUID))

    # 4. a command set split over two PDVs is left to pynetdicom, which stores it
    assoc, cx, sock = associate(ds_b)
    cmd = command(ds_b)
    body_b = dataset_bytes(extra[1])
    sock.sendall(pdu((cx, 0x01, cmd[:20]), (cx, 0x03, cmd[20:])))
    sock.sendall(pdu((cx, 0x02, body_b)))
    _cx, rsp = assoc.dimse.get_msg(block=True)
    assert rsp is not None and rsp.Status == 0 and rsp.MessageIDBeingRespondedTo == 7, rsp
    assert stored(str(ds_b.SOPInstanceUID)) and len(taken) == n_before
    assoc._reactor_checkpoint.set()
    assoc.release()

    # 5. the answer of a refused store comes back from the fast path: status and error comment
    assoc, cx, sock = associate(ds_c)
    sock.sendall(pdu((cx, 0x03, command(ds_c)), (cx, 0x02, b"\\x08\\x00\\x05\\x00CS\\x04\\x00ISO_IR")))
    _cx, rsp = assoc.dimse.get_msg(block=True)
    assert rsp is not None and rsp.Status >> 12 in (0xA, 0xC) and rsp.ErrorComment, rsp
    assert len(taken) == n_before + 1 and not stored(str(ds_c.SOPInstanceUID))
    # and the association goes on: a good store on it
    sock.sendall(pdu((cx, 0x03, command(ds_c, 9)), (cx, 0x02, dataset_bytes(extra[2]))))
    _cx, rsp = assoc.dimse.get_msg(block=True)
    assert rsp.Status == 0 and rsp.MessageIDBeingRespondedTo == 9, rsp
    assert stored(str(ds_c.SOPInstanceUID))
    assoc._reactor_checkpoint.set()
    assoc.release()

    fast_server.stop(grace=5)
    slow_server.stop(grace=5)
    print("ok", len(taken))
''')


def test_fast_path_stores_what_pynetdicom_stores_and_survives_bad_peers(corpus: list[Path], tmp_path: Path,
                                                                          corpus_dir: Path) -> None:
    from benchmarks.corpus import write_corpus

    extra = tmp_path / "extra"
    write_corpus(extra, "small", studies=1, per_study=3, seed=31)
    ports = f"{free_port()},{free_port()}"
    r = subprocess.run([sys.executable, "-c", _CHILD, os.pathsep.join(map(str, corpus)), str(tmp_path), ports,
                        str(extra)], capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0 and r.stdout.strip().startswith("ok"), r.stdout[-2000:] + r.stderr[-4000:]
