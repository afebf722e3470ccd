"""The DICOM port against hostile or broken peers: raw sockets against a real ``vna serve``, DCMTK as the good peer.

On the native receiver (``dicom.receiver = "native"``), which gives these guarantees; the python receiver is
plain pynetdicom, the reference (docs/conformance.md §3.2).

Every test ends with the server still answering C-ECHO and C-STORE (DCMTK
``echoscu`` / ``storescu``), no spool file left and no traceback in its log.
"""

from __future__ import annotations

import json
import os
import random
import socket
import struct
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from tests.conftest import DCMTK_ENV, VnaServer, dataset_bytes, with_receiver
from tests.faults.hostile import (EXPLICIT_LE, IMPLICIT_LE, RELEASE_RQ, VERIFICATION, RawPeer, associate_rq,
                                  command_set, p_data, spool, wait_for)

Factory = Callable[..., VnaServer]
MB = 1 << 20


@pytest.fixture
def receiver() -> str:
    """The native receiver gives the hardening against hostile peers; tests of what both receivers
    guarantee (the connection limits) parametrize ``receiver``."""
    return "native"


@pytest.fixture
def make_server(make_server: Factory, receiver: str) -> Factory:
    def factory(config: str = "", **kwargs: object) -> VnaServer:
        return make_server(with_receiver(config, receiver), **kwargs)
    return factory


BOTH = pytest.mark.parametrize("receiver", ["native", "python"])


# -- helpers ------------------------------------------------------------------------------------------
def _status(srv: VnaServer, key: str) -> int:
    """A /proc/<pid>/status value of the server, in kB (VmRSS, VmHWM, Threads)."""
    assert srv.proc is not None
    for line in Path(f"/proc/{srv.proc.pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _sockets(srv: VnaServer) -> int:
    """Open sockets of the server process."""
    assert srv.proc is not None
    count = 0
    for fd in Path(f"/proc/{srv.proc.pid}/fd").iterdir():
        try:
            count += os.readlink(fd).startswith("socket:")
        except FileNotFoundError:  # closed since the listing
            pass
    return count


def _echoscu(srv: VnaServer) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["echoscu", "-aec", "VNA", "127.0.0.1", str(srv.port)], env=DCMTK_ENV,
                          capture_output=True, text=True, timeout=60)


def _storescu(srv: VnaServer, files: list[Path]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["storescu", "-v", "-aec", "VNA", "127.0.0.1", str(srv.port), *map(str, files)],
                          env=DCMTK_ENV, capture_output=True, text=True, timeout=120)


def _instances(srv: VnaServer) -> int:
    r = srv.cli("index", "stats", "--json")
    assert r.returncode == 0, r.stderr
    return int(json.loads(r.stdout)["instances"])


def _log(srv: VnaServer) -> str:
    return srv.log.read_text(errors="replace")


def _tracebacks(log: str) -> list[str]:
    """The tracebacks in a log, each as its text up to the exception line."""
    out = []
    for chunk in log.split("Traceback (most recent call last):")[1:]:
        lines = chunk.splitlines()
        end = next((i for i, ln in enumerate(lines[1:], 1) if not ln.startswith(" ")), len(lines) - 1)
        out.append("\n".join(lines[:end + 1]))
    return out


def _still_serving(srv: VnaServer, good: Path, fuzzed: bool = False) -> None:
    """DCMTK's echoscu and storescu succeed; no spool file is left; the log holds no traceback.

    ``fuzzed``: tracebacks logged by the libraries' own decoders (pynetdicom logs
    an undecodable AE title with one) are tolerated; none may come from vna's DICOM code,
    and no thread may have died.
    """
    r = _echoscu(srv)
    assert r.returncode == 0, r.stdout + r.stderr
    r = _storescu(srv, [good])
    assert r.returncode == 0 and "Success" in r.stdout + r.stderr, r.stdout + r.stderr
    assert spool(srv) == []
    log = _log(srv)
    assert "Exception in thread" not in log
    if not fuzzed:
        assert "Traceback" not in log
    escaped = [tb for tb in _tracebacks(log) if "vna/dicom/" in tb]
    assert escaped == [], escaped[0]


def _send_quietly(peer: RawPeer, data: bytes) -> bool:
    """Send; False when the server has closed the connection (reset or broken pipe)."""
    try:
        peer.send(data)
        return True
    except OSError:
        return False


def _ct(corpus: list[Path]) -> tuple[Path, str, str]:
    """A CT file of the corpus with its SOP Class UID and transfer syntax."""
    meta = dcmread(corpus[0], stop_before_pixels=True)
    return corpus[0], str(meta.SOPClassUID), str(meta.file_meta.TransferSyntaxUID)


# -- a PDU length field is bounded --------------------------------------------------------------------
def _stream_zeros(peer: RawPeer, total: int) -> int:
    """Send up to ``total`` zero bytes; returns how many were sent before the server closed."""
    chunk = bytes(MB)
    sent = 0
    while sent < total and _send_quietly(peer, chunk):
        sent += len(chunk)
    return sent


def test_huge_pdu_length_is_refused_before_and_after_association(make_server: Factory,
                                                                  corpus: list[Path]) -> None:
    srv = make_server()
    before = _status(srv, "VmHWM")
    with RawPeer(srv.port) as peer:  # an A-ASSOCIATE-RQ announcing 0xFFFFFFF0 bytes
        peer.send(b"\x01\x00\xff\xff\xff\xf0")
        sent = _stream_zeros(peer, 256 * MB)
        assert sent < 256 * MB and peer.closed_by_server(30)
    with RawPeer(srv.port) as peer:  # associated, then a P-DATA-TF announcing 0xFFFFFFF0 bytes
        peer.associate([(VERIFICATION, [IMPLICIT_LE])])
        peer.send(b"\x04\x00\xff\xff\xff\xf0")
        sent = _stream_zeros(peer, 256 * MB)
        assert sent < 256 * MB and peer.closed_by_server(30)
    grown = _status(srv, "VmHWM") - before
    assert grown < 50 * 1024, f"peak RSS grew by {grown} kB"
    log = _log(srv)
    assert "more than the 524288 allowed before association" in log
    assert "P-DATA-TF of 4294967280 bytes, more than the 65542 allowed (dicom.max_pdu)" in log
    _still_serving(srv, corpus[0])


def test_a_real_associate_rq_with_128_contexts_fits(make_server: Factory, corpus: list[Path]) -> None:
    from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts

    srv = make_server()
    syntaxes = [str(ts) for ts in ALL_TRANSFER_SYNTAXES]
    contexts = [(str(cx.abstract_syntax), syntaxes) for cx in AllStoragePresentationContexts[:128]]
    rq = associate_rq(contexts)
    assert len(rq) > 64 * 1024  # larger than the smallest cap the issue allowed
    with RawPeer(srv.port) as peer:
        accepted = peer.associate(contexts)
        assert len(accepted) == 128
        peer.send(RELEASE_RQ)
        assert peer.recv_pdu()[0] == 0x06  # A-RELEASE-RP


# -- half-open connections, the ACSE timer and the per-address limit ----------------------------------
def test_one_byte_connections_do_not_lock_out_dimse(make_server: Factory, corpus: list[Path]) -> None:
    srv = make_server("[dicom]\nacse_timeout = 15\nmax_connections_per_address = 100\n")
    sockets = _sockets(srv)
    trickler = RawPeer(srv.port)  # sends an A-ASSOCIATE-RQ one byte at a time
    rq = associate_rq([(VERIFICATION, [IMPLICIT_LE])])

    def trickle() -> None:
        for byte in rq:
            if not _send_quietly(trickler, bytes([byte])):
                return
            time.sleep(0.5)

    peers = [RawPeer(srv.port) for _ in range(40)]  # more than dicom.max_associations (32)
    try:
        with ThreadPoolExecutor(1) as pool:
            pool.submit(trickle)
            for p in peers:
                p.send(b"\x01")
            wait_for(lambda: _sockets(srv) >= sockets + 41, 30, "41 connections accepted")
            r = _echoscu(srv)
            assert r.returncode == 0, r.stdout + r.stderr
            r = _storescu(srv, [corpus[0]])
            assert r.returncode == 0 and "Success" in r.stdout + r.stderr, r.stdout + r.stderr
            # however they trickle, connections that do not complete an A-ASSOCIATE in time are closed
            assert trickler.closed_by_server(120)
        assert all(p.closed_by_server(120) for p in peers)
    finally:
        trickler.close()
        for p in peers:
            p.close()
    assert "no A-ASSOCIATE within 15 s (dicom.acse_timeout)" in _log(srv)
    _still_serving(srv, corpus[1])


@BOTH
def test_per_address_connection_limit(make_server: Factory, corpus: list[Path]) -> None:
    srv = make_server("[dicom]\nmax_connections_per_address = 4\n")
    held = [RawPeer(srv.port, source="127.0.0.2") for _ in range(4)]
    try:
        for p in held:
            p.send(b"\x01")
        refused = []
        for _ in range(20):
            p = RawPeer(srv.port, source="127.0.0.2")
            refused.append(p.closed_by_server(10))
            p.close()
        assert all(refused), refused
        # other addresses are not affected
        r = _echoscu(srv)
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        for p in held:
            p.close()
    lines = [ln for ln in _log(srv).splitlines() if "127.0.0.2" in ln and "max_connections_per_address" in ln]
    assert len(lines) == 1, lines  # rate limited: the first refusal, the rest counted
    # the address gets its slots back once its connections are closed
    def associates() -> bool:
        with RawPeer(srv.port, source="127.0.0.2") as p:
            try:
                p.associate([(VERIFICATION, [IMPLICIT_LE])])
            except (AssertionError, ConnectionError, OSError):
                return False
            p.send(RELEASE_RQ)
            return p.recv_pdu()[0] == 0x06
    wait_for(associates, 30, "a new association from 127.0.0.2")
    _still_serving(srv, corpus[0])


@BOTH
def test_association_limit_counts_associations_only(make_server: Factory, corpus: list[Path]) -> None:
    srv = make_server("[dicom]\nmax_associations = 2\n")
    half_open = [RawPeer(srv.port) for _ in range(4)]  # connected, nothing sent: no slot taken
    held = [RawPeer(srv.port), RawPeer(srv.port)]
    try:
        for p in held:
            p.associate([(VERIFICATION, [IMPLICIT_LE])])
        r = _echoscu(srv)
        assert r.returncode != 0 and "Local Limit Exceeded" in r.stdout + r.stderr, r.stdout + r.stderr
        held.pop().close()
        wait_for(lambda: _echoscu(srv).returncode == 0, 30, "an association slot given back")
    finally:
        for p in held + half_open:
            p.close()
    assert _log(srv).count("association rejected: 2 associations open (dicom.max_associations)") == 1
    _still_serving(srv, corpus[0])


@BOTH
def test_connection_counts_are_exported(make_server: Factory) -> None:
    import re
    import urllib.request

    from tests.conftest import free_port

    port = free_port()
    srv = make_server(f"[telemetry]\nenabled = true\nprometheus_port = {port}\n")

    def gauge(state: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as rsp:
            body = rsp.read().decode()
        m = re.search(rf'^vna_dicom_connections{{state="{state}"}} (\S+)$', body, re.M)
        return float(m.group(1)) if m else -1.0

    half_open = [RawPeer(srv.port) for _ in range(3)]
    associated = RawPeer(srv.port)
    try:
        associated.associate([(VERIFICATION, [IMPLICIT_LE])])
        wait_for(lambda: (gauge("half_open"), gauge("associated")) == (3, 1), 30, "3 half-open and 1 associated")
    finally:
        for p in half_open + [associated]:
            p.close()
    wait_for(lambda: (gauge("half_open"), gauge("associated")) == (0, 0), 30, "no connection left")


# -- garbage ------------------------------------------------------------------------------------------
def test_garbage_gets_one_line_and_a_close(make_server: Factory, corpus: list[Path]) -> None:
    srv = make_server()
    rng = random.Random(3)
    size_before = srv.log.stat().st_size
    bad = [b"GET / HTTP/1.1\r\nHost: vna\r\n\r\n" + b"x" * MB, b"\x99" * MB, b"\x00" * MB]
    bad += [bytes([rng.choice([0x01, 0x04, 0x55])]) + bytes(5) + rng.randbytes(MB) for _ in range(5)]
    for data in bad:
        with RawPeer(srv.port) as peer:
            _send_quietly(peer, data)
            assert peer.closed_by_server(30)
    per_connection = (srv.log.stat().st_size - size_before) / len(bad)
    assert per_connection < 1024, f"{per_connection:.0f} bytes of log per bad connection"
    _still_serving(srv, corpus[0])


# -- malformed command sets and PDUs in the wrong state -----------------------------------------------
@pytest.mark.parametrize("missing", ["AffectedSOPInstanceUID", "CommandDataSetType"])
def test_c_store_rq_without_a_required_element(make_server: Factory, corpus: list[Path], missing: str) -> None:
    srv = make_server()
    path, sop_class, ts = _ct(corpus)
    body = dataset_bytes(path)
    elements = dict(AffectedSOPClassUID=sop_class, CommandField=0x0001, MessageID=7, Priority=2,
                    CommandDataSetType=0x0000, AffectedSOPInstanceUID=str(dcmread(path).SOPInstanceUID))
    del elements[missing]
    with RawPeer(srv.port, timeout=30) as peer:
        cx = next(iter(peer.associate([(sop_class, [ts])])))
        pdus = [p_data([(cx, 0x03, command_set(**elements))])]
        pdus += [p_data([(cx, 0x02 if i + 16000 >= len(body) else 0x00, body[i:i + 16000])])
                 for i in range(0, len(body), 16000)]
        for pdu in pdus:
            if not _send_quietly(peer, pdu):
                break
        try:
            answer = peer.response()
        except ConnectionError:
            answer = 0x07  # closed right after the A-ABORT
        if isinstance(answer, int):
            assert answer == 0x07, f"PDU 0x{answer:02X} instead of a C-STORE-RSP or an A-ABORT"
        else:
            assert answer.Status not in (0x0000,) and answer.Status >> 12 in (0xA, 0xC), answer
    assert "association aborted" in _log(srv) and missing in _log(srv)
    wait_for(lambda: spool(srv) == [], 30, "spool emptied")
    assert _instances(srv) == 0
    _still_serving(srv, corpus[1])


def test_p_data_before_the_association_is_aborted(make_server: Factory, corpus: list[Path]) -> None:
    srv = make_server()
    pdata = p_data([(1, 0x03, command_set(AffectedSOPClassUID=VERIFICATION, CommandField=0x0030, MessageID=1,
                                          CommandDataSetType=0x0101))])
    for first in (b"", associate_rq([(VERIFICATION, [IMPLICIT_LE])])):  # alone, and before our A-ASSOCIATE-AC
        with RawPeer(srv.port) as peer:
            peer.send(first + pdata)
            try:
                pdu_type, _ = peer.recv_pdu()
            except ConnectionError:
                pdu_type = 0
            assert pdu_type == 0x07  # A-ABORT
            assert peer.closed_by_server(30)
    assert _log(srv).count("P-DATA-TF before the association was established") == 1  # rate limited
    _still_serving(srv, corpus[0])


def test_associate_rq_with_non_ascii_text_gets_one_line(make_server: Factory, corpus: list[Path]) -> None:
    srv = make_server()
    rq = associate_rq([(VERIFICATION, [IMPLICIT_LE])])
    for field in (VERIFICATION.encode(), b"RAWSCU"):  # an abstract syntax, the calling AE title
        bad = bytearray(rq)
        bad[rq.index(field) + 1] = 0xC3
        with RawPeer(srv.port) as peer:
            peer.send(bytes(bad))
            assert peer.closed_by_server(30)
    log = _log(srv)
    assert "A-ASSOCIATE-RQ with non-ASCII bytes in its Abstract Syntax" in log
    assert "A-ASSOCIATE-RQ with non-ASCII bytes in an AE title" in log
    assert "Traceback" not in log
    _still_serving(srv, corpus[0])


# -- a seeded fuzz of A-ASSOCIATE-RQ and P-DATA-TF PDUs -----------------------------------------------
def _mutate(rng: random.Random, pdu: bytes) -> bytes:
    """One of: bit flips, a new length field (PDU or PDV), truncation, duplication, inserted random bytes."""
    data = bytearray(pdu)
    kind = rng.randrange(6)
    if kind == 0:
        for _ in range(rng.randint(1, 8)):
            pos = rng.randrange(len(data))
            data[pos] ^= 1 << rng.randrange(8)
    elif kind == 1:
        struct.pack_into(">L", data, 2, rng.choice([0, 1, len(data), len(data) * 2, 0xFFFFFFFF,
                                                    rng.randrange(1 << 32)]))
    elif kind == 2 and len(data) > 12:
        struct.pack_into(">L", data, rng.randrange(6, len(data) - 4), rng.randrange(1 << 32))
    elif kind == 3:
        del data[rng.randrange(1, len(data)):]
    elif kind == 4:
        start = rng.randrange(len(data))
        end = rng.randrange(start, len(data)) + 1
        data[end:end] = data[start:end]
    else:
        pos = rng.randrange(len(data))
        data[pos:pos] = rng.randbytes(rng.randint(1, 64))
    return bytes(data)


def _drain(peer: RawPeer) -> list[int]:
    """Statuses of the C-STORE-RSPs the server sent before it closed (the peer has shut its side down)."""
    statuses = []
    while True:
        try:
            answer = peer.response()
        except (ConnectionError, OSError):
            return statuses
        if not isinstance(answer, int) and "Status" in answer:
            statuses.append(int(answer.Status))


def test_seeded_fuzz_of_associate_and_p_data(make_server: Factory, corpus: list[Path], tmp_path: Path) -> None:
    srv = make_server("[dicom]\nacse_timeout = 5\nnetwork_timeout = 5\nmax_connections_per_address = 64\n")
    rng = random.Random(20261207)
    path, sop_class, ts = _ct(corpus)
    original = dcmread(path)
    contexts = [(VERIFICATION, [IMPLICIT_LE]), (sop_class, [ts, EXPLICIT_LE, IMPLICIT_LE])]
    rq = associate_rq(contexts)

    lengths: dict[str, int] = {}  # data set bytes of each fuzz instance as sent unmutated

    def store_pdus(cx: int, uid: str) -> list[bytes]:
        ds = original.copy()
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        out = tmp_path / f"{uid}.dcm"
        ds.save_as(out, enforce_file_format=True)
        body = dataset_bytes(out)
        out.unlink()
        lengths[uid] = len(body)
        cmd = command_set(AffectedSOPClassUID=sop_class, CommandField=0x0001, MessageID=3, Priority=0,
                          CommandDataSetType=0x0000, AffectedSOPInstanceUID=uid)
        pdus = [p_data([(cx, 0x03, cmd)])]
        pdus += [p_data([(cx, 0x02 if i + 8000 >= len(body) else 0x00, body[i:i + 8000])])
                 for i in range(0, len(body), 8000)]
        return pdus

    cases: list[tuple[str, bytes, str]] = []  # (kind, mutated bytes or the index of the mutated PDU, uid)
    for n in range(400):
        if n % 2 == 0:
            cases.append(("rq", _mutate(rng, rq), ""))
        else:
            cases.append(("pdata", rng.randbytes(8), generate_uid(prefix="1.2.826.0.1.3680043.10.1137.77.")))
    seeds = [rng.randrange(1 << 30) for _ in cases]
    sent_uids = {uid for kind, _, uid in cases if kind == "pdata"}
    acknowledged: set[str] = set()
    before = _status(srv, "VmHWM")

    def run(i: int) -> None:
        kind, mutated, uid = cases[i]
        case_rng = random.Random(seeds[i])
        with RawPeer(srv.port, timeout=60) as peer:
            if kind == "rq":
                _send_quietly(peer, mutated)
            else:
                try:
                    accepted = peer.associate(contexts)
                except (AssertionError, ConnectionError, OSError) as exc:
                    raise AssertionError(f"case {i}: a valid association failed: {exc}") from exc
                assert 3 in accepted, f"case {i}: the storage context was not accepted"
                pdus = store_pdus(3, uid)
                k = case_rng.randrange(len(pdus))
                pdus[k] = _mutate(case_rng, pdus[k])
                for pdu in pdus + [RELEASE_RQ]:
                    if not _send_quietly(peer, pdu):
                        break
            try:
                peer.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            statuses = _drain(peer)
            if kind == "pdata" and any(s == 0 or s >> 12 == 0xB for s in statuses):
                acknowledged.add(uid)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(run, range(len(cases))))

    # the server is alive and serving, has left nothing behind, and stayed bounded
    _still_serving(srv, corpus[1], fuzzed=True)
    grown = _status(srv, "VmHWM") - before
    assert grown < 100 * 1024, f"peak RSS grew by {grown} kB"
    wait_for(lambda: spool(srv) == [], 30, "spool emptied")
    # nothing partial: every stored fuzz instance was sent whole (its data set as long as the original's)
    stored: dict[str, int] = {}
    for blob in (srv.data_dir / "hot").rglob("*"):
        if blob.is_file() and blob.stat().st_size > 1000:
            uid = str(dcmread(blob, stop_before_pixels=True).SOPInstanceUID)
            stored[uid] = len(dataset_bytes(blob))
    fuzz_stored = {uid for uid in stored if uid in sent_uids}
    assert acknowledged <= fuzz_stored
    assert set(stored) - sent_uids == {str(dcmread(corpus[1], stop_before_pixels=True).SOPInstanceUID)}
    assert all(stored[uid] == lengths[uid] for uid in fuzz_stored), \
        {uid: (stored[uid], lengths[uid]) for uid in fuzz_stored if stored[uid] != lengths[uid]}
    assert _instances(srv) == len(fuzz_stored) + 1
