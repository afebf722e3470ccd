"""A real DIMSE source for migration tests: DCMTK dcmqrscp loaded with a generated corpus."""

from __future__ import annotations

import json
import shutil
import subprocess
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
