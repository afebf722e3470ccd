"""DICOM over TLS (BCP 195) with DCMTK's TLS-enabled tools as real peers: listener, mutual TLS, C-MOVE to a TLS
destination, and clients that must not disturb anyone else."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from tests.conftest import (DCMTK_ENV, VnaServer, dataset_bytes, free_port, self_signed, stop_process, wait_port,
                            with_receiver)
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


class _TlsStoreScp:
    """A DCMTK storescp serving TLS with ``cert``/``key`` (AE DEST), logging verbosely; stopped by ``stop``."""

    def __init__(self, tmp_path: Path, name: str, cert: Path, key: Path, *extra: str) -> None:
        self.out = tmp_path / name
        self.out.mkdir()
        self.log = tmp_path / f"{name}.log"
        self.port = free_port()
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(["storescp", "-v", "+tls", str(key), str(cert), *extra, "-aet", "DEST",
                                          "-od", str(self.out), "+xa", str(self.port)],
                                         stdout=log, stderr=subprocess.STDOUT, env=DCMTK_ENV)
        wait_port("127.0.0.1", self.port, 10, self.proc)

    def remote(self, name: str) -> str:
        return f'[[dicom.remote]]\nae_title = "{name}"\nhost = "127.0.0.1"\nport = {self.port}\ntls = true\n'

    def stop(self) -> None:
        stop_process(self.proc, 5)


def _move_one(srv: VnaServer, path: Path, destination: str) -> tuple[list[Dataset], Dataset]:
    ds = dcmread(path, stop_before_pixels=True)
    return scu.move(srv.port, {"QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": ds.StudyInstanceUID,
                               "SeriesInstanceUID": ds.SeriesInstanceUID, "SOPInstanceUID": ds.SOPInstanceUID},
                    destination)


def _received(out: Path, timeout: float = 10) -> list[Path]:
    deadline = time.monotonic() + timeout
    while not list(out.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return list(out.iterdir())


@pytest.mark.parametrize("receiver", ["python", "native"])
def test_c_move_to_a_tls_destination(make_server: Factory, corpus: list[Path], tmp_path: Path,
                                     receiver: str) -> None:
    """The archive associates over TLS with a ``tls = true`` remote, verifying its certificate
    (``tls_ca``, the host name) and presenting its own, which the remote requires (mutual TLS)."""
    cert, key = self_signed(tmp_path, "server")
    dcert, dkey = self_signed(tmp_path, "dest")
    dest = _TlsStoreScp(tmp_path, "dest", dcert, dkey, "+cf", str(cert))   # -rc: our certificate is required
    try:
        srv = make_server(with_receiver(_tls_config(free_port(), cert, key, f'tls_ca = "{dcert}"\n'), receiver)
                          + dest.remote("DEST"))
        assert all(s.Status == 0 for s in scu.store(srv.port, corpus[:2]))
        ds = dcmread(corpus[0], stop_before_pixels=True)
        r = _dcmtk("movescu", "-S", "-aec", "VNA", "-aem", "DEST", "-k", "QueryRetrieveLevel=IMAGE",
                   "-k", f"StudyInstanceUID={ds.StudyInstanceUID}", "-k", f"SOPInstanceUID={ds.SOPInstanceUID}",
                   "127.0.0.1", str(srv.port))
        assert r.returncode == 0, r.stderr
        (got,) = _received(dest.out)
        assert dataset_bytes(got) == dataset_bytes(corpus[0])
    finally:
        dest.stop()


@pytest.mark.parametrize("receiver", ["python", "native"])
def test_c_move_to_a_tls_destination_that_cannot_be_verified_or_refuses_us_fails(
        make_server: Factory, corpus: list[Path], tmp_path: Path, receiver: str) -> None:
    """A destination whose certificate ``tls_ca`` did not sign gets no association (the handshake fails before
    any DICOM byte); one that requires a client certificate when we have none refuses us. Either C-MOVE fails
    as pynetdicom answers a destination it cannot associate with: 0xA801 and no sub-operation counts. A
    destination we can verify and that does not ask for our certificate gets the instance (the control)."""
    dcert, dkey = self_signed(tmp_path, "dest")
    ccert, _ = self_signed(tmp_path, "client")
    ocert, okey = self_signed(tmp_path, "stranger")
    dests: dict[str, _TlsStoreScp] = {}
    try:
        dests["GOOD"] = _TlsStoreScp(tmp_path, "good", dcert, dkey, "-ic")
        dests["UNTRUSTED"] = _TlsStoreScp(tmp_path, "untrusted", ocert, okey, "-ic")
        dests["MUTUAL"] = _TlsStoreScp(tmp_path, "mutual", dcert, dkey, "+cf", str(ccert))   # -rc
        srv = make_server(f'[dicom]\nreceiver = "{receiver}"\ntls_ca = "{dcert}"\n'
                          + "".join(d.remote(name) for name, d in dests.items()))
        assert all(s.Status == 0 for s in scu.store(srv.port, corpus[:1]))
        _, final = _move_one(srv, corpus[0], "GOOD")
        assert final.Status == 0 and final.NumberOfCompletedSuboperations == 1
        (got,) = _received(dests["GOOD"].out)
        assert dataset_bytes(got) == dataset_bytes(corpus[0])
        for name in ("UNTRUSTED", "MUTUAL"):
            responses, final = _move_one(srv, corpus[0], name)
            assert [r.Status for r in responses] == [0xA801], name
            assert not any(k in final for k in ("NumberOfRemainingSuboperations", "NumberOfCompletedSuboperations",
                                                "NumberOfFailedSuboperations", "NumberOfWarningSuboperations"))
            assert list(dests[name].out.iterdir()) == [], name
        # the untrusted destination saw a failed handshake, never an association
        assert "Association Received" not in dests["UNTRUSTED"].log.read_text()
        assert "Association Received" in dests["GOOD"].log.read_text()
    finally:
        for d in dests.values():
            d.stop()


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
