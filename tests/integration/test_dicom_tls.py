"""DICOM over TLS (BCP 195) with DCMTK's TLS-enabled tools as real peers: listener, mutual TLS, C-MOVE to a TLS
destination, and clients that must not disturb anyone else."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable

from pydicom import dcmread

from tests.conftest import DCMTK_ENV, VnaServer, dataset_bytes, free_port, self_signed, stop_process, wait_port
from tests.integration import scu

Factory = Callable[..., VnaServer]


def _tls_config(tls_port: int, cert: Path, key: Path, extra: str = "") -> str:
    return f'[dicom]\ntls_port = {tls_port}\ntls_cert = "{cert}"\ntls_key = "{key}"\n{extra}'


def _dcmtk(tool: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool, *args], env=DCMTK_ENV, capture_output=True, text=True, timeout=timeout)


def test_storescu_over_tls_and_plain_clients_refused(make_server: Factory, corpus: list[Path], tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path, "server")
    tls_port = free_port()
    srv = make_server(_tls_config(tls_port, cert, key))
    wait_port("127.0.0.1", tls_port, 10)

    # a client that connects and never starts its handshake must not hold up anyone
    staller = socket.create_connection(("127.0.0.1", tls_port))
    try:
        r = _dcmtk("storescu", "+tla", "+cf", str(cert), "-aec", "VNA", "127.0.0.1", str(tls_port),
                   *map(str, corpus[:3]))
        assert r.returncode == 0, r.stderr
        # plain DICOM on the TLS port: refused (no association), the server keeps serving
        plain = _dcmtk("echoscu", "-to", "5", "-ta", "5", "-aec", "VNA", "127.0.0.1", str(tls_port), timeout=30)
        assert plain.returncode != 0
        # a TLS client that does not trust the server's certificate: refused
        untrusted = _dcmtk("echoscu", "+tla", "-aec", "VNA", "127.0.0.1", str(tls_port))
        assert untrusted.returncode != 0
    finally:
        staller.close()
    assert _dcmtk("echoscu", "+tla", "+cf", str(cert), "-aec", "VNA", "127.0.0.1", str(tls_port)).returncode == 0
    assert scu.echo(srv.port)  # the plain port is unaffected

    # what went in over TLS comes back bit-exact (C-GET on the plain port)
    for p in corpus[:3]:
        ds = dcmread(p, stop_before_pixels=True)
        _, final, raw = scu.get(srv.port, {"QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": ds.StudyInstanceUID,
                                           "SeriesInstanceUID": ds.SeriesInstanceUID,
                                           "SOPInstanceUID": ds.SOPInstanceUID}, [str(ds.SOPClassUID)])
        assert final.Status == 0 and raw[str(ds.SOPInstanceUID)] == dataset_bytes(p)


def test_mutual_tls_requires_a_client_certificate(make_server: Factory, corpus: list[Path], tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path, "server")
    ccert, ckey = self_signed(tmp_path, "client")
    other, okey = self_signed(tmp_path, "stranger")
    tls_port = free_port()
    make_server(_tls_config(tls_port, cert, key, f'tls_client_ca = "{ccert}"\n'))
    wait_port("127.0.0.1", tls_port, 10)
    anonymous = _dcmtk("echoscu", "+tla", "+cf", str(cert), "-aec", "VNA", "127.0.0.1", str(tls_port))
    assert anonymous.returncode != 0
    stranger = _dcmtk("echoscu", "+tls", str(okey), str(other), "+cf", str(cert), "-aec", "VNA", "127.0.0.1",
                      str(tls_port))
    assert stranger.returncode != 0
    r = _dcmtk("storescu", "+tls", str(ckey), str(ccert), "+cf", str(cert), "-aec", "VNA", "127.0.0.1",
               str(tls_port), str(corpus[0]))
    assert r.returncode == 0, r.stderr


def test_c_move_to_a_tls_destination(make_server: Factory, corpus: list[Path], tmp_path: Path) -> None:
    """The archive associates over TLS with a ``tls = true`` remote, verifying its certificate.

    On the python receiver: the native requestor has no TLS yet and refuses such a C-MOVE (0xA801,
    tests/integration/test_native_qr.py)."""
    cert, key = self_signed(tmp_path, "server")
    dcert, dkey = self_signed(tmp_path, "dest")
    out = tmp_path / "dest"
    out.mkdir()
    dport = free_port()
    with open(tmp_path / "storescp.log", "wb") as log:
        dest = subprocess.Popen(["storescp", "+tls", str(dkey), str(dcert), "+cf", str(cert), "-aet", "DEST",
                                 "-od", str(out), "+xa", str(dport)], stdout=log, stderr=subprocess.STDOUT,
                                env=DCMTK_ENV)
    try:
        wait_port("127.0.0.1", dport, 10, dest)
        remote = f'[[dicom.remote]]\nae_title = "DEST"\nhost = "127.0.0.1"\nport = {dport}\ntls = true\n'
        srv = make_server(_tls_config(free_port(), cert, key, f'tls_ca = "{dcert}"\nreceiver = "python"\n') + remote)
        assert all(s.Status == 0 for s in scu.store(srv.port, corpus[:2]))
        ds = dcmread(corpus[0], stop_before_pixels=True)
        r = _dcmtk("movescu", "-S", "-aec", "VNA", "-aem", "DEST", "-k", "QueryRetrieveLevel=IMAGE",
                   "-k", f"StudyInstanceUID={ds.StudyInstanceUID}", "-k", f"SOPInstanceUID={ds.SOPInstanceUID}",
                   "127.0.0.1", str(srv.port))
        assert r.returncode == 0, r.stderr
        deadline = time.monotonic() + 10
        while not list(out.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.1)
        (got,) = list(out.iterdir())
        assert dataset_bytes(got) == dataset_bytes(corpus[0])
    finally:
        stop_process(dest, 5)


def test_tls_misconfiguration_is_a_clear_start_up_error(make_server: Factory, tmp_path: Path) -> None:
    srv = make_server(f"[dicom]\ntls_port = {free_port()}\n", start=False)
    r = srv.cli("config", "show")
    assert r.returncode != 0 and "tls_cert" in r.stderr
    cert, _ = self_signed(tmp_path, "server")
    bad = make_server(_tls_config(free_port(), cert, tmp_path / "missing.key"), start=False)
    try:
        bad.start(timeout=20)
        raise AssertionError("vna serve started with an unreadable TLS key")
    except RuntimeError as exc:
        assert "dicom TLS" in str(exc)


def test_native_plain_port_and_pynetdicom_tls_port_side_by_side(make_server: Factory, corpus: list[Path],
                                                                 tmp_path: Path) -> None:
    """``dicom.receiver = "native"`` with ``tls_port``: the plain port is the native listener's, the TLS port
    pynetdicom's; C-ECHO and C-STORE work on both into one archive, and stopping the server closes both."""
    cert, key = self_signed(tmp_path, "server")
    tls_port = free_port()
    srv = make_server(_tls_config(tls_port, cert, key, 'receiver = "native"\n'))
    wait_port("127.0.0.1", tls_port, 10)
    assert "native DICOM receiver listening" in srv.log.read_text()
    tls = ["+tla", "+cf", str(cert), "-aec", "VNA", "127.0.0.1", str(tls_port)]
    plain = ["-aec", "VNA", "127.0.0.1", str(srv.port)]
    assert _dcmtk("echoscu", *plain).returncode == 0
    assert _dcmtk("echoscu", *tls).returncode == 0
    r = _dcmtk("storescu", *plain, *map(str, corpus[:2]))
    assert r.returncode == 0, r.stderr
    r = _dcmtk("storescu", *tls, *map(str, corpus[2:4]))
    assert r.returncode == 0, r.stderr
    stats = srv.cli("index", "stats", "--json")
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)["instances"] == 4
    # plain DICOM on the TLS port is still refused
    assert _dcmtk("echoscu", "-to", "5", "-ta", "5", *plain[:-1], str(tls_port), timeout=30).returncode != 0
    assert srv.stop() == 0
    for port in (srv.port, tls_port):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        except OSError:
            continue
        raise AssertionError(f"port {port} still open after stop")
