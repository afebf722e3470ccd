"""Several worker processes on one DICOM port (SO_REUSEPORT), supervised and restarted."""

from __future__ import annotations

import json
import re
import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from tests.conftest import VnaServer
from tests.integration import scu

Factory = Callable[..., VnaServer]


def _workers(parent: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def test_workers_share_the_port_and_are_restarted(make_server: Factory, corpus: list[Path]) -> None:
    srv = make_server("[dicom]\nworkers = 2\n")
    assert srv.proc is not None
    assert "2 worker processes" in srv.log.read_text()
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda part: scu.store(srv.port, part), [corpus[i::4] for i in range(4)]))
    assert all(r.Status == 0 for rs in results for r in rs)
    assert json.loads(srv.cli("index", "stats", "--json").stdout)["instances"] == len(corpus)

    workers = [int(m) for m in re.findall(r"worker \d started \(pid (\d+)\)", srv.log.read_text())]
    assert len(workers) == 2 and set(workers) <= set(_workers(srv.proc.pid))
    victim = workers[0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and "restarting it" not in srv.log.read_text():
        time.sleep(0.1)
    assert "restarting it" in srv.log.read_text()
    for _ in range(6):  # whichever worker takes the association, it is served
        assert scu.echo(srv.port)
    assert srv.stop() == 0
    assert "vna stopped" in srv.log.read_text()


def test_sigterm_to_the_process_group_stops_supervisor_and_workers(make_server: Factory, corpus: list[Path]) -> None:
    """systemd (KillMode=control-group) and shells signal every process of the group at once.

    A worker's SIGTERM handler used to set the supervisor's multiprocessing Event from inside
    a wait on it and deadlocked; the supervisor then hung on setting the same Event.
    """
    srv = make_server("[dicom]\nworkers = 2\n", env={})
    assert srv.proc is not None
    assert scu.store(srv.port, corpus[:2])[0].Status == 0
    workers = _workers(srv.proc.pid)
    assert len(workers) >= 2
    for pid in [srv.proc.pid, *workers]:
        os.kill(pid, signal.SIGTERM)
    assert srv.proc.wait(timeout=60) == 0
    assert "vna stopped" in srv.log.read_text()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") for p in workers):
        time.sleep(0.1)
    assert not any(os.path.exists(f"/proc/{p}") and "zombie" not in open(f"/proc/{p}/status").read().lower()
                   for p in workers)
