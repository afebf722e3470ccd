"""Migration test fixtures: a real DIMSE source (DCMTK dcmqrscp loaded with a generated corpus) and a TCP
relay that holds a source's C-STORE sub-operations mid-study."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.conftest import DCMTK_ENV, VnaServer, free_port, stop_process, wait_port


@dataclass
class QrScp:
    """A running dcmqrscp (AE ``PACS``) whose storage area holds ``files``; C-MOVE destination ``VNA``."""

    ae_title: str
    port: int
    db: Path
    files: list[Path]
    proc: subprocess.Popen[bytes]


@pytest.fixture
def make_qrscp(tmp_path: Path) -> Iterator[Callable[..., QrScp]]:
    """Factory: dcmqrscp on a free port with ``files`` copied into and indexed in its storage area.

    ``vna_port`` is where it sends C-MOVE sub-operations for the destination AE ``VNA``.
    """
    if shutil.which("dcmqrscp") is None or shutil.which("dcmqridx") is None:
        pytest.fail("DCMTK dcmqrscp/dcmqridx are missing: run `make system-deps`")
    procs: list[subprocess.Popen[bytes]] = []

    def factory(files: list[Path], vna_port: int, port: int | None = None) -> QrScp:
        n = len(procs)
        db = tmp_path / f"qr{n}"
        db.mkdir()
        copies = []
        for f in files:
            shutil.copy(f, db / f.name)
            copies.append(db / f.name)
        subprocess.run(["dcmqridx", str(db), *map(str, copies)], check=True, capture_output=True, env=DCMTK_ENV)
        port = port or free_port()
        cfg = tmp_path / f"qr{n}.cfg"
        cfg.write_text(f"NetworkTCPPort = {port}\nMaxPDUSize = 16384\nMaxAssociations = 16\n"
                       f"HostTable BEGIN\nvna = (VNA, 127.0.0.1, {vna_port})\nHostTable END\n"
                       "VendorTable BEGIN\nVendorTable END\n"
                       f"AETable BEGIN\nPACS {db} RW (200, 1024mb) ANY\nAETable END\n")
        log = open(tmp_path / f"qr{n}.log", "wb")
        proc = subprocess.Popen(["dcmqrscp", "-c", str(cfg), str(port)], stdout=log, stderr=subprocess.STDOUT,
                                env=DCMTK_ENV)
        log.close()
        procs.append(proc)
        wait_port("127.0.0.1", port, 10, proc)
        return QrScp("PACS", port, db, copies, proc)

    yield factory
    for p in procs:
        stop_process(p, 5)


def source_config(port: int, **extra: Any) -> str:
    """A vna config with one ``[[migrate.source]]`` PACS at ``port`` (extra keys: ``migrate.X`` or source keys)."""
    migrate = {k[len("migrate."):]: v for k, v in extra.items() if k.startswith("migrate.")}
    src = {k: v for k, v in extra.items() if not k.startswith("migrate.")}
    lines = []
    if migrate:
        lines.append("[migrate]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in migrate.items()]
    lines += ["[[migrate.source]]", 'ae_title = "PACS"', 'host = "127.0.0.1"', f"port = {port}"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in src.items()]
    return "\n".join(lines) + "\n"


def cli_json(srv: VnaServer, *args: str) -> Any:
    r = srv.cli("migrate", *args, "--json")
    return r.returncode, (json.loads(r.stdout) if r.stdout.strip() else None), r.stderr


class HoldingRelay:
    """A TCP relay on a free loopback port to ``target_port``, standing between a source and vna's receiver.

    Bytes towards the target pass while ``budget`` lasts; then the relay stops reading (the connection stays
    open, the sender waits) until :meth:`release`. Bytes back pass freely.
    """

    def __init__(self, target_port: int, budget: int) -> None:
        self.target_port = target_port
        self._budget: int | None = budget
        self._cond = threading.Condition()
        self._closed = False
        self._socks: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                return
            with self._cond:
                self._socks += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, metered: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                while data:
                    n = len(data)
                    if metered:
                        with self._cond:
                            while self._budget is not None and self._budget <= 0 and not self._closed:
                                self._cond.wait()
                            if self._closed:
                                return
                            if self._budget is not None:
                                n = min(n, self._budget)
                                self._budget -= n
                    dst.sendall(data[:n])
                    data = data[n:]
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def release(self) -> None:
        """Let everything through from now on."""
        with self._cond:
            self._budget = None
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            socks, self._socks = self._socks, []
        self._listener.close()
        for s in socks:
            s.close()


@pytest.fixture
def holding_relay() -> Iterator[Callable[[int, int], HoldingRelay]]:
    """Factory: ``HoldingRelay(target_port, budget)``, closed at the end of the test."""
    relays: list[HoldingRelay] = []

    def make(target_port: int, budget: int) -> HoldingRelay:
        relays.append(HoldingRelay(target_port, budget))
        return relays[-1]

    yield make
    for r in relays:
        r.close()
