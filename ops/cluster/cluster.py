#!/usr/bin/env python3
"""A local high-availability vna cluster: Cassandra, SeaweedFS, N front-ends, HAProxy.

``up`` starts, each waited for until ready:

1. one Cassandra 5.0 node (``ops/cassandra/launcher.py``) unless ``--cassandra
   HOST:PORT`` names a running one, and the index schema (``vna index migrate``,
   once, before any front-end: concurrent DDL from several front-ends races);
2. SeaweedFS (``ops/s3/launcher.py``) unless ``--s3-endpoint URL`` names one;
   the cold tier is the bucket ``vna-cold`` on it (created);
3. ``--frontends`` N ``vna serve`` processes, each with its own data directory
   (spool, audit trail) but one index and one set of hot replicas: two shared
   directories (``--hot shared``, the default on one host) or two S3 buckets
   (``--hot s3``); DIMSE, gRPC and the ``[health]`` readiness endpoint on ports
   of their own;
4. HAProxy (``haproxy -db -f DIR/haproxy.cfg``, rendered from
   ``ops/haproxy/vna.cfg``) with TCP frontends for DIMSE and gRPC, ready when
   its health checks see every front-end UP.

State (ports, pids, the gRPC tokens) is kept in ``DIR/cluster.json``; ``down``
stops what ``up`` started, by recorded PID (SIGTERM, SIGKILL after a grace
period), and ``status`` prints each process and HAProxy's view of each backend.

CLI::

    python ops/cluster/cluster.py up --dir .cluster --frontends 2
    python ops/cluster/cluster.py status --dir .cluster
    python ops/cluster/cluster.py down --dir .cluster

Module (the cluster fault test and ``benchmarks/cluster.py``)::

    c = plan(dir, frontends=2, cassandra=("127.0.0.1", 9042), s3_endpoint=url)
    up(c); ...; kill_frontend(c, "fe1"); start_frontend(c, "fe1"); down(dir)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
HAPROXY_TEMPLATE = ROOT / "ops" / "haproxy" / "vna.cfg"
STATE = "cluster.json"
HOST = "127.0.0.1"
STOP_GRACE = 20.0
READY_WAIT = 120.0

__all__ = ["ClusterError", "Frontend", "Cluster", "plan", "up", "down", "status", "load", "start_frontend",
           "stop_frontend", "kill_frontend", "start_haproxy", "haproxy_admin", "haproxy_command", "haproxy_servers", "wait_backends",
           "frontend_config", "free_port", "vna_command", "main"]


class ClusterError(RuntimeError):
    """A part of the cluster could not be started, reached or stopped."""


@dataclasses.dataclass
class Frontend:
    """One ``vna serve`` process of the cluster."""

    name: str
    dicom_port: int
    grpc_port: int
    health_port: int
    data_dir: str
    pid: int | None = None

    @property
    def config(self) -> Path:
        return Path(self.data_dir).parent / f"{self.name}.toml"

    @property
    def log(self) -> Path:
        return Path(self.data_dir).parent / f"{self.name}.log"


@dataclasses.dataclass
class Cluster:
    """Everything ``up`` needs and records (JSON in ``DIR/cluster.json``)."""

    dir: str
    dicom_port: int
    grpc_port: int
    stats_port: int
    frontends: list[Frontend]
    cassandra_host: str
    cassandra_port: int
    keyspace: str
    s3_endpoint: str
    hot: str                                 # "shared" (directories) or "s3" (buckets)
    write_token: str
    read_token: str
    ae_title: str = "VNA"
    buckets: list[str] = dataclasses.field(default_factory=list)   # cold first, then hot ones
    own_cassandra: bool = False              # started (and stopped) by this launcher
    own_s3: bool = False
    haproxy_pid: int | None = None
    env: dict[str, str] = dataclasses.field(default_factory=dict)  # extra VNA_* settings for front-ends

    @property
    def path(self) -> Path:
        return Path(self.dir)

    def frontend(self, name: str) -> Frontend:
        for fe in self.frontends:
            if fe.name == name:
                return fe
        raise ClusterError(f"no front-end {name!r} (have {', '.join(f.name for f in self.frontends)})")

    def save(self) -> None:
        tmp = self.path / (STATE + ".tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=2))
        os.chmod(tmp, 0o600)  # holds the gRPC tokens
        os.replace(tmp, self.path / STATE)


def load(dir: str | os.PathLike[str]) -> Cluster:
    """The cluster recorded under ``dir``. Raises ClusterError if there is none."""
    try:
        data = json.loads((Path(dir) / STATE).read_text())
    except (OSError, ValueError) as exc:
        raise ClusterError(f"no cluster recorded under {dir}: {exc}") from exc
    data["frontends"] = [Frontend(**f) for f in data["frontends"]]
    return Cluster(**data)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _load_module(name: str, path: Path) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ClusterError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses need the module registered
    spec.loader.exec_module(module)
    return module


def _python() -> str:
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def vna_command() -> list[str]:
    """How to run ``vna`` (the repository's venv when there is one)."""
    return [_python(), "-m", "vna.cli"]


# -- planning and configuration ------------------------------------------------------------

def plan(dir: str | os.PathLike[str], frontends: int = 2, *, dicom_port: int = 11112, grpc_port: int = 50051,
         stats_port: int | None = None, frontend_ports: list[tuple[int, int, int]] | None = None,
         cassandra: tuple[str, int] | None = None, s3_endpoint: str | None = None, hot: str = "shared",
         keyspace: str | None = None, env: dict[str, str] | None = None) -> Cluster:
    """A cluster description (nothing started). Ports default to free ones except the two public ones.

    ``frontend_ports``: (DICOM, gRPC, health) per front-end. ``cassandra`` / ``s3_endpoint``:
    use running servers instead of starting them. Raises ClusterError on bad arguments.
    """
    if frontends < 1:
        raise ClusterError("--frontends must be >= 1")
    if hot not in ("shared", "s3"):
        raise ClusterError("--hot must be 'shared' or 's3'")
    if frontend_ports is not None and len(frontend_ports) != frontends:
        raise ClusterError("one (dicom, grpc, health) port triple per front-end")
    path = Path(dir).resolve()
    ports = frontend_ports or [(free_port(), free_port(), free_port()) for _ in range(frontends)]
    fes = [Frontend(f"fe{i + 1}", d, g, h, str(path / f"fe{i + 1}")) for i, (d, g, h) in enumerate(ports)]
    run = uuid.uuid4().hex[:8]
    return Cluster(
        dir=str(path), dicom_port=dicom_port, grpc_port=grpc_port, stats_port=stats_port or free_port(),
        frontends=fes,
        cassandra_host=cassandra[0] if cassandra else HOST,
        cassandra_port=cassandra[1] if cassandra else free_port(),
        keyspace=keyspace or f"vna_cluster_{run}",
        s3_endpoint=s3_endpoint or "", hot=hot,
        write_token=secrets.token_urlsafe(24), read_token=secrets.token_urlsafe(24),
        buckets=[f"vna-cold-{run}"] + ([f"vna-hot1-{run}", f"vna-hot2-{run}"] if hot == "s3" else []),
        own_cassandra=cassandra is None, own_s3=s3_endpoint is None, env=dict(env or {}),
    )


def _s3_table(name: str, c: Cluster, bucket: str) -> str:
    return (f'[{name}]\nendpoint_url = "{c.s3_endpoint}"\nbucket = "{bucket}"\nregion = "us-east-1"\n'
            f'access_key = "vna"\nsecret_key = "vna-secret"\nmax_attempts = 2\nconnect_timeout = 5\n'
            f'read_timeout = 30\n')


def frontend_config(c: Cluster, fe: Frontend) -> str:
    """The TOML of one front-end: its own ports and data directory; shared index and stores."""
    if c.hot == "shared":
        hot = (f'[hot]\nreplicas = ["{c.path / "hot" / "r1"}", "{c.path / "hot" / "r2"}"]\n'
               f'write_quorum = 2\n')
    else:
        hot = '[hot]\nreplicas = []\nwrite_quorum = 2\n' + "".join(
            _s3_table("[hot.s3]", c, b) for b in c.buckets[1:])
    return (
        f'# {fe.name} of the cluster in {c.dir} (written by ops/cluster/cluster.py)\n'
        f'[archive]\ndata_dir = "{fe.data_dir}"\n\n'
        f'[dicom]\nae_title = "{c.ae_title}"\nhost = "{HOST}"\nport = {fe.dicom_port}\n\n'
        f'{hot}\n'
        f'[index]\nbackend = "cassandra"\nmigrate_on_start = false\n\n'
        f'[index.cassandra]\ncontact_points = ["{c.cassandra_host}"]\nport = {c.cassandra_port}\n'
        f'local_dc = "dc1"\nkeyspace = "{c.keyspace}"\nreplication = \'{{"dc1": 1}}\'\nrequest_timeout = 10\n\n'
        f'[cold]\nbackend = "s3"\n\n' + _s3_table("cold.s3", c, c.buckets[0]) + '\n'
        f'[grpc]\nenabled = true\nhost = "{HOST}"\nport = {fe.grpc_port}\n\n'
        f'[[grpc.token]]\nname = "cluster-write"\ntoken = "{c.write_token}"\nrole = "write"\n\n'
        f'[[grpc.token]]\nname = "cluster-read"\ntoken = "{c.read_token}"\nrole = "read"\n\n'
        f'[health]\nhost = "{HOST}"\nport = {fe.health_port}\n\n'
        f'[web]\nport = 0\n'  # DICOMweb off: front-ends share the host (its default port would collide)
    )


def haproxy_config(c: Cluster) -> str:
    """``ops/haproxy/vna.cfg`` filled in for this cluster."""
    def servers(port: str) -> str:
        return "\n".join(f"    server {fe.name} {HOST}:{getattr(fe, port)} check port {fe.health_port}"
                         for fe in c.frontends)

    return string.Template(HAPROXY_TEMPLATE.read_text()).substitute(
        stats_host=HOST, stats_port=c.stats_port, bind_host=HOST, dicom_port=c.dicom_port,
        grpc_port=c.grpc_port, dimse_servers=servers("dicom_port"), grpc_servers=servers("grpc_port"))


# -- processes -----------------------------------------------------------------------------

def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):  # a zombie (our child, not yet reaped) is not alive
        if Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].startswith("Z"):
            return False
    return True


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def _spawn(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> int:
    with open(log, "ab") as fh:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, **(env or {})}, start_new_session=True)
    _CHILDREN[proc.pid] = proc
    return proc.pid


def _reap(pid: int) -> None:
    child = _CHILDREN.pop(pid, None)
    if child is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(5)


def _stop_pid(pid: int | None, marker: str, grace: float = STOP_GRACE) -> None:
    """SIGTERM ``pid`` if it is ours (its command line contains ``marker``), SIGKILL after ``grace``."""
    if not _alive(pid) or marker not in _cmdline(pid or 0):
        if pid:
            _reap(pid)
        return
    assert pid is not None
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if pid in _CHILDREN and _CHILDREN[pid].poll() is not None:
            break
        if not _alive(pid):
            break
        time.sleep(0.1)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _reap(pid)


def _http_ok(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=2) as s:
            s.sendall(b"GET /health HTTP/1.0\r\nHost: vna\r\n\r\n")
            return s.recv(64).startswith(b"HTTP/1.0 200")
    except OSError:
        return False


def start_frontend(c: Cluster, name: str, wait: float = READY_WAIT) -> Frontend:
    """Start (or restart) front-end ``name`` and wait until its health endpoint answers 200."""
    fe = c.frontend(name)
    if _alive(fe.pid) and str(fe.config) in _cmdline(fe.pid or 0):
        raise ClusterError(f"{name} is already running (pid {fe.pid})")
    Path(fe.data_dir).mkdir(parents=True, exist_ok=True)
    fe.config.write_text(frontend_config(c, fe))
    os.chmod(fe.config, 0o600)
    fe.pid = _spawn([*vna_command(), "serve", "--config", str(fe.config)], fe.log, c.env)
    c.save()
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if not _alive(fe.pid):
            raise ClusterError(f"{name} exited before it was ready:\n{_tail(fe.log)}")
        if _http_ok(fe.health_port):
            return fe
        time.sleep(0.1)
    raise ClusterError(f"{name} not ready after {wait:.0f}s:\n{_tail(fe.log)}")


def stop_frontend(c: Cluster, name: str, grace: float = STOP_GRACE) -> None:
    """SIGTERM front-end ``name`` (it drains: health 503, running stores finish), SIGKILL after ``grace``."""
    fe = c.frontend(name)
    _stop_pid(fe.pid, str(fe.config), grace)
    fe.pid = None
    c.save()


def kill_frontend(c: Cluster, name: str) -> None:
    """SIGKILL front-end ``name`` (a crash: nothing is flushed or drained)."""
    fe = c.frontend(name)
    if _alive(fe.pid) and str(fe.config) in _cmdline(fe.pid or 0):
        os.kill(fe.pid or 0, signal.SIGKILL)
    _reap(fe.pid or 0)
    fe.pid = None
    c.save()


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


# -- HAProxy -------------------------------------------------------------------------------

def haproxy_command(cfg: Path) -> list[str]:
    exe = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not Path(exe).exists():
        raise ClusterError("haproxy is not installed: run `make system-deps` (apt-get install haproxy)")
    return [exe, "-db", "-f", str(cfg)]


def start_haproxy(c: Cluster) -> None:
    """Render ``DIR/haproxy.cfg``, check it (``haproxy -c``) and start HAProxy in the foreground mode."""
    cfg = c.path / "haproxy.cfg"
    cfg.write_text(haproxy_config(c))
    check = subprocess.run([*haproxy_command(cfg)[:1], "-c", "-f", str(cfg)], capture_output=True, text=True)
    if check.returncode != 0:
        raise ClusterError(f"haproxy rejects {cfg}:\n{check.stdout}{check.stderr}")
    c.haproxy_pid = _spawn(haproxy_command(cfg), c.path / "haproxy.log")
    c.save()


def haproxy_admin(stats_port: int, command: str) -> str:
    """Send one command to an HAProxy admin stats socket on ``127.0.0.1:stats_port``; its answer."""
    with socket.create_connection((HOST, stats_port), timeout=5) as s:
        s.sendall(command.encode() + b"\n")
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks).decode()


def haproxy_servers(c: Cluster) -> dict[str, dict[str, Any]]:
    """HAProxy's view of every backend server, ``backend/server`` -> {status, sessions (total), active}."""
    out: dict[str, dict[str, Any]] = {}
    lines = haproxy_admin(c.stats_port, "show stat").splitlines()
    if not lines or not lines[0].startswith("# "):
        raise ClusterError(f"unexpected HAProxy stats answer: {lines[:1]}")
    header = lines[0][2:].split(",")
    for line in lines[1:]:
        if not line:
            continue
        row = dict(zip(header, line.split(",")))
        if row["svname"] in ("FRONTEND", "BACKEND"):
            continue
        out[f"{row['pxname']}/{row['svname']}"] = {
            "status": row["status"], "sessions": int(row["stot"] or 0), "active": int(row["scur"] or 0)}
    return out


def wait_backends(c: Cluster, up: set[str] | None = None, wait: float = READY_WAIT) -> dict[str, dict[str, Any]]:
    """Wait until HAProxy reports exactly ``up`` (default: every front-end) UP in both backends."""
    want = {fe.name for fe in c.frontends} if up is None else up
    deadline = time.monotonic() + wait
    last: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline:
        if c.haproxy_pid and not _alive(c.haproxy_pid):
            raise ClusterError(f"haproxy exited:\n{_tail(c.path / 'haproxy.log')}")
        with contextlib.suppress(OSError, ClusterError):
            last = haproxy_servers(c)
            if all((v["status"] == "UP") == (k.split("/")[1] in want) for k, v in last.items()) and last:
                return last
        time.sleep(0.2)
    raise ClusterError(f"HAProxy backends not as expected ({sorted(want)} UP) after {wait:.0f}s: {last}")


# -- the whole cluster ---------------------------------------------------------------------

def _create_buckets(c: Cluster) -> None:
    sys.path.insert(0, str(ROOT))
    from vna.config import S3Config
    from vna.storage.s3 import S3BlobStore

    for bucket in c.buckets:
        cfg = S3Config(endpoint_url=c.s3_endpoint, bucket=bucket, access_key="vna", secret_key="vna-secret")
        S3BlobStore(f"admin-{bucket}", cfg).create_bucket_if_missing()


def up(c: Cluster, log: bool = True) -> Cluster:
    """Start everything ``c`` describes and wait until HAProxy sees every front-end UP.

    On failure whatever was started is stopped again and ClusterError raised.
    """
    def say(msg: str) -> None:
        if log:
            print(f"[cluster] {msg}", file=sys.stderr)

    c.path.mkdir(parents=True, exist_ok=True)
    if (c.path / STATE).exists():
        old = load(c.path)
        if _alive(old.haproxy_pid) or any(_alive(fe.pid) for fe in old.frontends):
            raise ClusterError(f"a cluster is already running under {c.dir}: run `down --dir {c.dir}` first")
    c.save()
    t0 = time.monotonic()
    try:
        if c.own_cassandra:
            launcher = _load_module("vna_ops_cassandra_launcher", ROOT / "ops" / "cassandra" / "launcher.py")
            try:
                launcher.start(c.path / "cassandra", port=c.cassandra_port, storage_port=free_port(), log=log)
            except launcher.LaunchError as exc:
                raise ClusterError(f"Cassandra: {exc}") from exc
            say(f"Cassandra on {c.cassandra_host}:{c.cassandra_port}")
        if c.own_s3:
            s3 = _load_module("vna_ops_s3_launcher", ROOT / "ops" / "s3" / "launcher.py")
            base = _free_block(s3.PORT_SPAN)
            try:
                c.s3_endpoint = s3.start(c.path / "s3", base)
            except s3.LaunchError as exc:
                raise ClusterError(f"SeaweedFS: {exc}") from exc
            c.save()
            say(f"SeaweedFS S3 on {c.s3_endpoint}")
        _create_buckets(c)
        first = c.frontends[0]
        Path(first.data_dir).mkdir(parents=True, exist_ok=True)
        first.config.write_text(frontend_config(c, first))
        migrate = subprocess.run([*vna_command(), "index", "migrate", "--config", str(first.config)],
                                 capture_output=True, text=True, cwd=ROOT, env={**os.environ, **c.env})
        if migrate.returncode != 0:
            raise ClusterError(f"vna index migrate failed:\n{migrate.stdout}{migrate.stderr}")
        say(f"index keyspace {c.keyspace} migrated")
        for fe in c.frontends:
            start_frontend(c, fe.name)
            say(f"{fe.name}: DICOM {fe.dicom_port}, gRPC {fe.grpc_port}, health {fe.health_port} (pid {fe.pid})")
        start_haproxy(c)
        wait_backends(c)
        say(f"HAProxy: DICOM {HOST}:{c.dicom_port} (AE {c.ae_title}), gRPC {HOST}:{c.grpc_port}, "
            f"stats {HOST}:{c.stats_port} (pid {c.haproxy_pid}); up after {time.monotonic() - t0:.1f}s")
    except BaseException:
        down(c.path, log=log)
        raise
    return c


def _free_block(span: int) -> int:
    for _ in range(200):
        base = free_port()
        if base + span >= 65536:
            continue
        ok = True
        for port in range(base, base + span):
            with socket.socket() as s:
                try:
                    s.bind((HOST, port))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise ClusterError(f"no block of {span} free ports")


def down(dir: str | os.PathLike[str], log: bool = True) -> None:
    """Stop HAProxy, the front-ends, and the Cassandra / SeaweedFS this launcher started (by recorded PID)."""
    try:
        c = load(dir)
    except ClusterError:
        return
    _stop_pid(c.haproxy_pid, str(c.path / "haproxy.cfg"), 5.0)
    c.haproxy_pid = None
    for fe in c.frontends:
        _stop_pid(fe.pid, str(fe.config))
        fe.pid = None
    c.save()
    if c.own_s3 and (c.path / "s3").exists():
        _load_module("vna_ops_s3_launcher", ROOT / "ops" / "s3" / "launcher.py").stop(c.path / "s3", grace=5.0)
    if c.own_cassandra and (c.path / "cassandra").exists():
        _load_module("vna_ops_cassandra_launcher", ROOT / "ops" / "cassandra" / "launcher.py").stop(
            c.path / "cassandra", log=log)
    if log:
        print(f"[cluster] {c.dir} stopped", file=sys.stderr)


def status(dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Each process (alive or not) and HAProxy's view of each backend server."""
    c = load(dir)
    out: dict[str, Any] = {
        "dicom": f"{HOST}:{c.dicom_port}", "grpc": f"{HOST}:{c.grpc_port}", "ae_title": c.ae_title,
        "cassandra": f"{c.cassandra_host}:{c.cassandra_port}/{c.keyspace}", "s3": c.s3_endpoint,
        "haproxy": {"pid": c.haproxy_pid, "alive": _alive(c.haproxy_pid)},
        "frontends": {fe.name: {"pid": fe.pid, "alive": _alive(fe.pid), "dicom": fe.dicom_port,
                                "grpc": fe.grpc_port, "health": fe.health_port,
                                "ready": _http_ok(fe.health_port)} for fe in c.frontends},
    }
    with contextlib.suppress(OSError, ClusterError):
        out["backends"] = haproxy_servers(c)
    return out


@contextlib.contextmanager
def running(c: Cluster, log: bool = False) -> Iterator[Cluster]:
    """``up`` on entry, ``down`` on exit."""
    up(c, log=log)
    try:
        yield c
    finally:
        down(c.path, log=log)


def main(argv: list[str] | None = None) -> int:
    """CLI: exit 0 ok, 1 failure (or not all up), 2 usage."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="verb", required=True)
    u = sub.add_parser("up", help="start Cassandra, SeaweedFS, the front-ends and HAProxy; wait until ready")
    u.add_argument("--dir", type=Path, required=True)
    u.add_argument("--frontends", type=int, default=2)
    u.add_argument("--dicom-port", type=int, default=11112, help="HAProxy's DIMSE port")
    u.add_argument("--grpc-port", type=int, default=50051, help="HAProxy's gRPC port")
    u.add_argument("--stats-port", type=int, default=None, help="HAProxy's admin stats socket (TCP)")
    u.add_argument("--frontend-base-port", type=int, default=0,
                   help="front-end i listens on BASE+3i (DICOM), +1 (gRPC), +2 (health); default: free ports")
    u.add_argument("--hot", choices=("shared", "s3"), default="shared",
                   help="hot replicas: two shared directories, or two S3 buckets (on the one local S3 server "
                        "here: a demo; use independent object stores in production)")
    u.add_argument("--cassandra", default="", help="HOST:PORT of a running Cassandra (default: start one)")
    u.add_argument("--s3-endpoint", default="", help="URL of a running S3 (default: start SeaweedFS)")
    for verb in ("down", "status"):
        sub.add_parser(verb).add_argument("--dir", type=Path, required=True)
    a = p.parse_args(argv)
    try:
        if a.verb == "up":
            cass = None
            if a.cassandra:
                host, _, port = a.cassandra.rpartition(":")
                cass = (host or HOST, int(port))
            base = a.frontend_base_port
            fports = [(base + 3 * i, base + 3 * i + 1, base + 3 * i + 2) for i in range(a.frontends)] if base else None
            c = up(plan(a.dir, a.frontends, dicom_port=a.dicom_port, grpc_port=a.grpc_port,
                        stats_port=a.stats_port, frontend_ports=fports, cassandra=cass,
                        s3_endpoint=a.s3_endpoint or None, hot=a.hot))
            print(f"vna cluster up: DICOM {HOST}:{c.dicom_port} AE {c.ae_title}, gRPC {HOST}:{c.grpc_port}\n"
                  f"gRPC write token: {c.write_token}\ngRPC read token:  {c.read_token}\n"
                  f"stop with: make cluster-down (or {Path(__file__).name} down --dir {c.dir})")
            return 0
        if a.verb == "down":
            down(a.dir)
            return 0
        info = status(a.dir)
        print(json.dumps(info, indent=2))
        ok = info["haproxy"]["alive"] and all(f["ready"] for f in info["frontends"].values())
        return 0 if ok else 1
    except ClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
