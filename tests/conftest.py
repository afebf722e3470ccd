"""Shared fixtures: real vna servers, real DCMTK peers, generated corpora. No mocks."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pytest

from benchmarks.corpus import write_corpus

pytest_plugins = ["tests.cassandra_node", "tests.s3_server"]

ROOT = Path(__file__).resolve().parent.parent
VNA = [sys.executable, "-m", "vna.cli"]
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(host: str, port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Poll until the port accepts connections (fail fast if ``proc`` dies)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{host}:{port} not listening after {timeout}s")


def stop_process(proc: subprocess.Popen[bytes], grace: float = 15.0) -> int:
    """SIGTERM, then SIGKILL after ``grace`` seconds; returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return int(proc.returncode)


@dataclass
class VnaServer:
    """A running ``vna serve`` process."""

    data_dir: Path
    port: int
    ae_title: str
    config: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)

    def start(self, timeout: float = 30.0) -> "VnaServer":
        fh = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [*VNA, "serve", "--config", str(self.config), "--data-dir", str(self.data_dir),
             "--dicom-port", str(self.port), "--ae-title", self.ae_title, "--host", "127.0.0.1"],
            stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT,
            env={"VNA_WEB_PORT": "0", **os.environ, **self.env},  # DICOMweb off unless a test asks for it
        )
        fh.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vna serve exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            if "vna ready" in self.log.read_text():
                wait_port("127.0.0.1", self.port, 5, self.proc)
                return self
            time.sleep(0.05)
        raise TimeoutError(f"vna serve not ready:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> int:
        assert self.proc is not None
        return stop_process(self.proc)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run a ``vna`` verb against this server's config and data dir."""
        return subprocess.run([*VNA, *args, "--config", str(self.config), "--data-dir", str(self.data_dir)],
                              capture_output=True, text=True, cwd=ROOT, env={**os.environ, **self.env}, timeout=120)


def with_receiver(config: str, receiver: str) -> str:
    """``config`` (TOML text) with ``dicom.receiver = receiver`` added to its [dicom] table."""
    line = f'receiver = "{receiver}"\n'
    if "[dicom]\n" in config:
        return config.replace("[dicom]\n", "[dicom]\n" + line, 1)
    return "[dicom]\n" + line + config


def write_config(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., VnaServer]]:
    """Factory for vna servers on fresh data dirs; every one is stopped at teardown."""
    servers: list[VnaServer] = []

    def factory(config: str = "", env: dict[str, str] | None = None, start: bool = True,
                ae_title: str = "VNA") -> VnaServer:
        n = len(servers)
        data = tmp_path / f"vna{n}"
        data.mkdir()
        srv = VnaServer(data, free_port(), ae_title, write_config(tmp_path / f"vna{n}.toml", config),
                        tmp_path / f"vna{n}.log", env=env or {})
        servers.append(srv)
        return srv.start() if start else srv

    yield factory
    for s in servers:
        if s.proc is not None:
            s.stop()



@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small generated corpus: 2 CT studies x 3 instances, 1 MR study x 2, 1 small study x 4."""
    d = tmp_path_factory.mktemp("corpus")
    write_corpus(d, "ct", studies=2, per_study=3, seed=7)
    write_corpus(d, "mr", studies=1, per_study=2, seed=7)
    write_corpus(d, "small", studies=1, per_study=4, seed=7)
    return d


@pytest.fixture(scope="session")
def corpus(corpus_dir: Path) -> list[Path]:
    return sorted(corpus_dir.glob("*.dcm"))


@dataclass
class StoreScp:
    """A DCMTK storescp writing received files into ``out``."""

    ae_title: str
    port: int
    out: Path
    proc: subprocess.Popen[bytes]

    def files(self) -> list[Path]:
        return sorted(p for p in self.out.iterdir() if p.is_file())


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreScp]:
    """DCMTK storescp as a C-MOVE destination / commitment-free peer (AE DEST)."""
    if shutil.which("storescp") is None:
        pytest.fail("DCMTK storescp is missing: run `make system-deps`")
    out = tmp_path / "storescp"
    out.mkdir()
    port = free_port()
    log = open(tmp_path / "storescp.log", "wb")
    proc = subprocess.Popen(["storescp", "-aet", "DEST", "-od", str(out), "+xa", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=DCMTK_ENV)
    log.close()
    wait_port("127.0.0.1", port, 10, proc)
    yield StoreScp("DEST", port, out, proc)
    stop_process(proc, 5)


def self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    """A throwaway self-signed EC certificate (CN=name, SAN localhost/127.0.0.1) and its key, as PEM files."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is missing (needed to make a throwaway certificate)")
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", f"/CN={name}",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


def uid_of(path: Path, keyword: str = "SOPInstanceUID") -> str:
    """A UID (or any attribute) of a Part 10 file, read without its pixel data."""
    from pydicom import dcmread

    return str(getattr(dcmread(path, stop_before_pixels=True), keyword))


def dataset_bytes(path: Path) -> bytes:
    """The bytes of a Part 10 file after its file meta group (what DIMSE transfers)."""
    from pydicom.filereader import read_preamble, _read_file_meta_info

    with open(path, "rb") as fh:
        read_preamble(fh, False)
        _read_file_meta_info(fh)
        return fh.read()
