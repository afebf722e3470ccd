#!/usr/bin/env python3
"""Run a real Apache Cassandra 5.0 node (or a small 2-DC cluster) without Docker.

The server jars come from Maven Central (``cassandra-all`` and its runtime
dependencies, resolved by ``mvn`` into a cache outside the repo); each node is a
plain ``java ... org.apache.cassandra.service.CassandraDaemon`` process with its
own conf/data/logs directory. Standard library only, Python 3.11+.

CLI::

    python ops/cassandra/launcher.py fetch
    python ops/cassandra/launcher.py start --dir /tmp/cass [--layout single|federation]
    python ops/cassandra/launcher.py status --dir /tmp/cass
    python ops/cassandra/launcher.py stop --dir /tmp/cass
    python ops/cassandra/launcher.py nodetool --dir /tmp/cass -- status   # needs --jmx-port
    python ops/cassandra/launcher.py stop-node|restart-node --dir /tmp/cass --node n3   # one node, data kept

Module (e.g. from a pytest fixture)::

    from launcher import start, stop
    nodes = start(tmp_path / "cass", port=19042)
    try: ...  # connect to nodes[0].address:nodes[0].native_port
    finally: stop(tmp_path / "cass")
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

CASSANDRA_VERSION = os.environ.get("VNA_CASSANDRA_VERSION", "5.0.9")
DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1"
HERE = Path(__file__).resolve().parent
POM = HERE / "pom.xml"

DEFAULT_NATIVE_PORT = 19042
DEFAULT_STORAGE_PORT = 17000
DEFAULT_WAIT = 240.0
STOP_GRACE = 30.0
CLUSTER_NAME = "vna-test"
MAIN_CLASS = "org.apache.cassandra.service.CassandraDaemon"
READY_MARKERS = ("Startup complete", "Starting listening for CQL clients")
MARKER_FILE = ".vna-fetch-complete"

# Murmur3 tokens: dc1's two nodes split the ring evenly, dc2 is offset by 100
# (the usual "one ring per DC" assignment; every token must be unique).
_MIN_TOKEN = -(2**63)
_LAYOUTS: dict[str, list[tuple[str, str, str, int]]] = {
    "single": [("n1", "127.0.0.1", "dc1", _MIN_TOKEN)],
    "federation": [
        ("n1", "127.0.0.1", "dc1", _MIN_TOKEN),
        ("n2", "127.0.0.2", "dc1", 0),
        ("n3", "127.0.0.3", "dc2", _MIN_TOKEN + 100),
    ],
}
_SEEDS = {"single": ("127.0.0.1",), "federation": ("127.0.0.1", "127.0.0.3")}

# JVM flags from Cassandra 5.0's conf/jvm-server.options + conf/jvm17-server.options.
_JVM_BASE = [
    "-ea", "-da:net.openhft...",
    "-XX:+UseThreadPriorities", "-Xss256k", "-XX:+UseTLAB", "-XX:+ResizeTLAB",
    "-XX:+PerfDisableSharedMem", "-Djava.net.preferIPv4Stack=true",
    "-Dchronicle.analytics.disable=true",
    "-XX:+UseG1GC", "-XX:+ParallelRefProcEnabled", "-XX:MaxTenuringThreshold=1",
    "-XX:G1RSetUpdatingPauseTimePercent=5", "-XX:MaxGCPauseMillis=300",
    "-XX:InitiatingHeapOccupancyPercent=70", "-XX:+ExitOnOutOfMemoryError",
    "-Djdk.attach.allowAttachSelf=true",
    "-Dio.netty.tryReflectionSetAccessible=true",
    "-Dio.netty.allocator.useCacheForAllThreads=true",
    "-Dio.netty.allocator.maxOrder=11",
]
_ADD_EXPORTS = [
    "java.base/jdk.internal.misc", "java.management.rmi/com.sun.jmx.remote.internal.rmi",
    "java.management/com.sun.jmx.remote.security", "java.rmi/sun.rmi.registry",
    "java.rmi/sun.rmi.server", "java.sql/java.sql", "java.base/java.lang.ref",
    "jdk.unsupported/sun.misc",
]
_ADD_OPENS = [
    "java.base/java.lang.module", "java.base/jdk.internal.loader", "java.base/jdk.internal.ref",
    "java.base/jdk.internal.reflect", "java.base/jdk.internal.math",
    "java.base/jdk.internal.module", "java.base/jdk.internal.util.jar",
    "jdk.management/com.sun.management.internal", "java.base/sun.nio.ch", "java.base/java.io",
    "java.base/java.lang.reflect", "java.base/java.lang", "java.base/java.util",
    "java.base/java.nio", "java.base/java.util.concurrent",
    "java.base/java.util.concurrent.atomic", "java.base/java.nio.charset", "java.base/java.net",
]

# Popen handles of nodes started by this process, so liveness checks can reap
# zombies (a killed-but-unreaped child still answers kill(pid, 0)).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


class LaunchError(RuntimeError):
    """A node could not be fetched, configured or started."""


@dataclasses.dataclass
class Node:
    """One Cassandra node managed by this launcher."""

    name: str
    address: str
    dc: str
    rack: str
    token: int
    native_port: int
    storage_port: int
    home: Path
    jmx_port: int | None = None
    pid: int | None = None

    @property
    def conf_dir(self) -> Path:
        return self.home / "conf"

    @property
    def log_dir(self) -> Path:
        return self.home / "logs"

    @property
    def pid_file(self) -> Path:
        return self.home / "pid"

    @property
    def system_log(self) -> Path:
        return self.log_dir / "system.log"

    @property
    def stdout_log(self) -> Path:
        return self.log_dir / "stdout.log"

    def to_json(self) -> dict[str, object]:
        d = dataclasses.asdict(self)
        d["home"] = str(self.home)
        return d

    @classmethod
    def from_json(cls, d: dict[str, object]) -> Node:
        d = dict(d)
        d["home"] = Path(str(d["home"]))
        return cls(**d)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- fetch


def lib_dir() -> Path:
    """Jar cache directory: ``$VNA_CASSANDRA_LIB`` or ``~/.cache/vna/cassandra-<ver>/lib``."""
    env = os.environ.get("VNA_CASSANDRA_LIB")
    if env:
        return Path(env).expanduser().resolve()
    return Path.home() / ".cache" / "vna" / f"cassandra-{CASSANDRA_VERSION}" / "lib"


def _fetch_fingerprint() -> str:
    return hashlib.sha256(POM.read_bytes() + CASSANDRA_VERSION.encode()).hexdigest()


def _fetched(lib: Path) -> bool:
    marker = lib / MARKER_FILE
    return (
        marker.is_file()
        and marker.read_text().strip() == _fetch_fingerprint()
        and (lib / f"cassandra-all-{CASSANDRA_VERSION}.jar").is_file()
    )


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def fetch(quiet: bool = True) -> Path:
    """Resolve cassandra-all and its runtime jars into :func:`lib_dir`; return it.

    Idempotent: returns immediately when the marker file says the cache is complete.
    """
    lib = lib_dir()
    if _fetched(lib):
        return lib
    if shutil.which("mvn") is None:
        raise LaunchError("mvn not found on PATH (needed once to fetch the Cassandra jars)")
    with _locked(lib.parent / f".{lib.name}.lock"):
        if _fetched(lib):  # another process finished while we waited
            return lib
        staging = lib.parent / f".{lib.name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        cmd = [
            "mvn", "-B", *(["-q"] if quiet else []), "-f", str(POM),
            f"-Dcassandra.version={CASSANDRA_VERSION}",
            f"{DEPENDENCY_PLUGIN}:copy-dependencies",
            f"-DoutputDirectory={staging}", "-DincludeScope=runtime",
        ]
        proc = subprocess.run(cmd, capture_output=quiet, text=True)
        if proc.returncode != 0:
            out = ((proc.stdout or "") + (proc.stderr or ""))[-4000:] if quiet else ""
            raise LaunchError(f"mvn failed ({proc.returncode}): {' '.join(cmd)}\n{out}")
        if not (staging / f"cassandra-all-{CASSANDRA_VERSION}.jar").is_file():
            raise LaunchError(f"mvn succeeded but cassandra-all-{CASSANDRA_VERSION}.jar is missing")
        (staging / MARKER_FILE).write_text(_fetch_fingerprint() + "\n")
        shutil.rmtree(lib, ignore_errors=True)
        staging.rename(lib)
    return lib


# --------------------------------------------------------------------------- java


def _java_major(java: str) -> int | None:
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r'version "(\d+)', out.stderr + out.stdout)
    return int(m.group(1)) if m else None


def find_java() -> str:
    """Return a Java 17 executable (``$VNA_CASSANDRA_JAVA``, ``$JAVA_HOME``, /usr/lib/jvm, PATH).

    Cassandra 5.0 installs a SecurityManager, which JDK 24+ refuses; we insist on 17.
    """
    explicit = os.environ.get("VNA_CASSANDRA_JAVA")
    if explicit:
        return explicit
    candidates: list[str] = []
    if os.environ.get("JAVA_HOME"):
        candidates.append(os.path.join(os.environ["JAVA_HOME"], "bin", "java"))
    candidates += sorted(str(p) for p in Path("/usr/lib/jvm").glob("*17*/bin/java"))
    if shutil.which("java"):
        candidates.append(shutil.which("java") or "java")
    for java in candidates:
        if os.access(java, os.X_OK) and _java_major(java) == 17:
            return java
    raise LaunchError(f"no Java 17 found (tried {candidates}); set VNA_CASSANDRA_JAVA")


# --------------------------------------------------------------------------- config


def _render(template: Path, values: dict[str, object]) -> str:
    """Replace ``{name}`` placeholders; unknown names are an error."""

    def sub(m: re.Match[str]) -> str:
        key = m.group(1)
        if key not in values:
            raise LaunchError(f"{template.name}: no value for placeholder {{{key}}}")
        return str(values[key])

    return re.sub(r"\{([a-z_]+)\}", sub, template.read_text())


def plan(
    dir: Path,
    port: int = DEFAULT_NATIVE_PORT,
    layout: str = "single",
    storage_port: int = DEFAULT_STORAGE_PORT,
    jmx_port: int | None = None,
) -> list[Node]:
    """Describe the nodes of ``layout`` under ``dir`` (nothing is written)."""
    if layout not in _LAYOUTS:
        raise LaunchError(f"unknown layout {layout!r}; choose from {sorted(_LAYOUTS)}")
    dir = Path(dir).resolve()
    return [
        Node(name, addr, dc, "rack1", token, port, storage_port, dir / name,
             None if jmx_port is None else jmx_port + i)
        for i, (name, addr, dc, token) in enumerate(_LAYOUTS[layout])
    ]


def _write_conf(node: Node, seeds: str) -> None:
    """Wipe the node's directory and write a fresh conf/ (data dirs start empty)."""
    shutil.rmtree(node.home, ignore_errors=True)
    for sub in ("conf", "logs", "data", "tmp", "triggers"):
        (node.home / sub).mkdir(parents=True, exist_ok=True)
    values: dict[str, object] = {
        "cluster_name": CLUSTER_NAME, "initial_token": node.token, "seeds": seeds,
        "address": node.address, "storage_port": node.storage_port,
        "native_port": node.native_port, "data_dir": node.home / "data",
        "dc": node.dc, "rack": node.rack,
    }
    (node.conf_dir / "cassandra.yaml").write_text(_render(HERE / "cassandra.yaml.in", values))
    (node.conf_dir / "cassandra-rackdc.properties").write_text(
        _render(HERE / "cassandra-rackdc.properties.in", values))
    shutil.copyfile(HERE / "logback.xml", node.conf_dir / "logback.xml")
    (node.home / "node.json").write_text(json.dumps(node.to_json(), indent=2) + "\n")


def jvm_command(node: Node, lib: Path, java: str, heap_max: str, fast_unsafe: bool = True) -> list[str]:
    """The full ``java`` command line for ``node``."""
    jamm = sorted(lib.glob("jamm-*.jar"))
    if not jamm:
        raise LaunchError(f"no jamm-*.jar in {lib}; run fetch again")
    h = node.home
    cmd = [java, *_JVM_BASE, "-Xms256m", f"-Xmx{heap_max}"]
    major = _java_major(java)
    if major is not None and 18 <= major <= 23:  # 24+ cannot run Cassandra 5.0 at all
        cmd.append("-Djava.security.manager=allow")
    for e in _ADD_EXPORTS:
        cmd += ["--add-exports", f"{e}=ALL-UNNAMED"]
    for o in _ADD_OPENS:
        cmd += ["--add-opens", f"{o}=ALL-UNNAMED"]
    cmd += [
        f"-javaagent:{jamm[-1]}",
        "-Dcassandra-foreground=yes",
        f"-Dcassandra.config={(node.conf_dir / 'cassandra.yaml').as_uri()}",
        f"-Dcassandra-rackdc.properties={(node.conf_dir / 'cassandra-rackdc.properties').as_uri()}",
        f"-Dcassandra.storagedir={h / 'data'}",
        f"-Dcassandra.logdir={node.log_dir}",
        f"-Dlogback.configurationFile={node.conf_dir / 'logback.xml'}",
        f"-Dcassandra.triggers_dir={h / 'triggers'}",
        f"-Djava.io.tmpdir={h / 'tmp'}",
        "-Dcassandra.available_processors=2",
        "-Dcassandra.libjemalloc=-",
    ]
    if node.jmx_port is not None:
        # 5.0 opens no JMX port unless asked (7199 only comes from cassandra-env.sh).
        cmd.append(f"-Dcassandra.jmx.local.port={node.jmx_port}")
    if fast_unsafe:
        # ring_delay_ms bounds the gossip shadow round: with the default 30 s the first
        # federation node waits 30 s for the not-yet-started second seed (127.0.0.3).
        cmd += ["-Dcassandra.skip_wait_for_gossip_to_settle=0", "-Dcassandra.unsafesystem=true",
                "-Dcassandra.ring_delay_ms=5000"]
    cmd += ["-cp", f"{node.conf_dir}:{lib}/*", MAIN_CLASS]
    return cmd


# --------------------------------------------------------------------------- processes


def _alive(pid: int) -> bool:
    child = _CHILDREN.get(pid)
    if child is not None:
        return child.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie still "exists"
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _is_our_node(pid: int, node_home: Path) -> bool:
    """True if ``pid`` is a CassandraDaemon whose config lives under ``node_home``."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    return MAIN_CLASS in cmdline and str(node_home) in cmdline


def _port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"({path} not readable)"
    return f"--- {path} (last {min(lines, len(text))} lines) ---\n" + "\n".join(text[-lines:])


def _log_ready(node: Node) -> bool:
    try:
        text = node.system_log.read_text(errors="replace")
    except OSError:
        return False
    return any(m in text for m in READY_MARKERS)


def _spawn(node: Node, cmd: list[str]) -> int:
    env = dict(os.environ, MALLOC_ARENA_MAX="4")
    with open(node.stdout_log, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            cwd=node.home, env=env, start_new_session=True,
        )
    _CHILDREN[proc.pid] = proc
    node.pid = proc.pid
    node.pid_file.write_text(f"{proc.pid}\n")
    return proc.pid


def _wait_ready(node: Node, deadline: float) -> None:
    assert node.pid is not None
    while True:
        if not _alive(node.pid):
            raise LaunchError(
                f"{node.name}: JVM (pid {node.pid}) exited during startup\n"
                f"{_tail(node.stdout_log, 20)}\n{_tail(node.system_log)}")
        if _port_open(node.address, node.native_port, 0.5) and _log_ready(node):
            return
        if time.monotonic() > deadline:
            raise LaunchError(
                f"{node.name}: not ready on {node.address}:{node.native_port} in time\n"
                f"{_tail(node.stdout_log, 20)}\n{_tail(node.system_log)}")
        time.sleep(0.5)


def recorded_nodes(dir: Path) -> list[Node]:
    """Nodes previously written under ``dir`` (from ``<node>/node.json``), pid from the pid file."""
    nodes = []
    for meta in sorted(Path(dir).resolve().glob("*/node.json")):
        node = Node.from_json(json.loads(meta.read_text()))
        node.pid = None
        if node.pid_file.is_file():
            with contextlib.suppress(ValueError):
                node.pid = int(node.pid_file.read_text().strip())
        nodes.append(node)
    return nodes


def start(
    dir: Path,
    port: int = DEFAULT_NATIVE_PORT,
    layout: str = "single",
    wait: float = DEFAULT_WAIT,
    *,
    storage_port: int = DEFAULT_STORAGE_PORT,
    jmx_port: int | None = None,
    fast_unsafe: bool = True,
    log: bool = True,
) -> list[Node]:
    """Start ``layout`` under ``dir`` with fresh data, one node at a time; wait until ready.

    ``wait`` bounds the whole start. On failure every node started here is stopped and
    :class:`LaunchError` (with the log tail) is raised.
    """
    dir = Path(dir).resolve()
    for old in recorded_nodes(dir):
        if old.pid is not None and _alive(old.pid) and _is_our_node(old.pid, old.home):
            raise LaunchError(f"{old.name} is still running (pid {old.pid}); run stop --dir {dir}")
    nodes = plan(dir, port, layout, storage_port, jmx_port)
    busy = [
        f"{n.address}:{p}" for n in nodes
        for p in (n.native_port, n.storage_port, *([n.jmx_port] if n.jmx_port else []))
        if not _port_free(n.address if p != n.jmx_port else "127.0.0.1", p)
    ]
    if busy:
        raise LaunchError(f"ports already in use: {', '.join(busy)} (choose --port/--storage-port)")
    lib = fetch()
    java = find_java()
    heap = "1g" if layout == "single" else "768m"
    seeds = ",".join(f"{a}:{storage_port}" for a in _SEEDS[layout])
    t0 = time.monotonic()
    deadline = t0 + wait
    started: list[Node] = []
    try:
        for node in nodes:
            _write_conf(node, seeds)
            _spawn(node, jvm_command(node, lib, java, heap, fast_unsafe))
            started.append(node)
            _wait_ready(node, deadline)
            if log:
                print(f"[cassandra] {node.name} {node.address}:{node.native_port} ({node.dc}) "
                      f"up after {time.monotonic() - t0:.1f}s", file=sys.stderr)
    except BaseException:
        _stop_nodes(started, grace=10.0)
        raise
    return nodes


def _stop_nodes(nodes: list[Node], grace: float = STOP_GRACE, log: bool = False) -> None:
    t0 = time.monotonic()
    live = []
    for n in nodes:
        if n.pid is not None and _alive(n.pid) and _is_our_node(n.pid, n.home):
            with contextlib.suppress(ProcessLookupError):
                os.kill(n.pid, signal.SIGTERM)
            live.append(n)
    deadline = time.monotonic() + grace
    pending = list(live)
    while pending and time.monotonic() < deadline:
        time.sleep(0.2)
        for n in [n for n in pending if not _alive(n.pid or -1)]:
            pending.remove(n)
            if log:
                print(f"[cassandra] {n.name} (pid {n.pid}) stopped after "
                      f"{time.monotonic() - t0:.1f}s", file=sys.stderr)
    for n in pending:
        if n.pid and _alive(n.pid):
            if log:
                print(f"[cassandra] {n.name} (pid {n.pid}) SIGKILL after {grace:.0f}s", file=sys.stderr)
            with contextlib.suppress(ProcessLookupError):
                os.kill(n.pid, signal.SIGKILL)
    for n in live:
        child = _CHILDREN.pop(n.pid or -1, None)
        if child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=10)
    for n in nodes:
        n.pid_file.unlink(missing_ok=True)
        n.pid = None


def stop(dir: Path, log: bool = False) -> None:
    """SIGTERM the nodes recorded under ``dir`` (SIGKILL after 30 s) and remove their pid files."""
    _stop_nodes(recorded_nodes(dir), log=log)


def _recorded(dir: Path, name: str) -> Node:
    match = [n for n in recorded_nodes(dir) if n.name == name]
    if not match:
        raise LaunchError(f"no node {name!r} recorded under {dir}")
    return match[0]


def stop_node(dir: Path, name: str, log: bool = False) -> None:
    """Stop one node of a running layout (SIGTERM, SIGKILL after 30 s); its data stays for a restart."""
    _stop_nodes([_recorded(dir, name)], log=log)


def restart_node(dir: Path, name: str, wait: float = DEFAULT_WAIT, *, fast_unsafe: bool = True) -> Node:
    """Start a stopped node again on its existing data and conf; wait until it serves CQL.

    It rejoins its cluster; writes it missed come back through hinted handoff
    (or ``nodetool repair``).
    """
    node = _recorded(dir, name)
    if node.pid is not None and _alive(node.pid) and _is_our_node(node.pid, node.home):
        raise LaunchError(f"{name} is still running (pid {node.pid})")
    heap = "768m" if len(recorded_nodes(dir)) > 1 else "1g"  # as start() chose for the layout
    node.system_log.rename(node.log_dir / f"system.log.{int(time.time())}")  # readiness is read from a fresh log
    _spawn(node, jvm_command(node, lib_dir(), find_java(), heap, fast_unsafe))
    try:
        _wait_ready(node, time.monotonic() + wait)
    except BaseException:
        _stop_nodes([node], grace=10.0)
        raise
    return node


def nodetool_command(node: Node, args: list[str]) -> list[str]:
    """``java ... NodeTool`` against ``node``'s local JMX port (needs ``start --jmx-port``)."""
    if node.jmx_port is None:
        raise LaunchError(f"{node.name} was started without --jmx-port; nodetool needs JMX")
    cmd = [find_java(), "-Xmx128m", f"-Duser.home={node.home / 'tmp'}",
           f"-Dcassandra.logdir={node.log_dir}", "-Dlogback.configurationFile=/dev/null"]
    for e in _ADD_EXPORTS:
        cmd += ["--add-exports", f"{e}=ALL-UNNAMED"]
    for o in _ADD_OPENS:
        cmd += ["--add-opens", f"{o}=ALL-UNNAMED"]
    return [*cmd, "-cp", f"{lib_dir()}/*", "org.apache.cassandra.tools.NodeTool",
            "-h", "127.0.0.1", "-p", str(node.jmx_port), *args]


def status(dir: Path) -> list[tuple[Node, bool, bool]]:
    """``(node, alive, native_port_open)`` for each node recorded under ``dir``."""
    out = []
    for n in recorded_nodes(dir):
        alive = n.pid is not None and _alive(n.pid) and _is_our_node(n.pid, n.home)
        out.append((n, alive, _port_open(n.address, n.native_port)))
    return out


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("fetch", help="resolve the Cassandra jars into the cache")
    s = sub.add_parser("start", help="start node(s) and wait until CQL is up")
    s.add_argument("--dir", type=Path, required=True)
    s.add_argument("--port", type=int, default=DEFAULT_NATIVE_PORT, help="CQL native port")
    s.add_argument("--storage-port", type=int, default=DEFAULT_STORAGE_PORT)
    s.add_argument("--jmx-port", type=int, default=None,
                   help="enable local JMX on this port (+node index); off by default")
    s.add_argument("--layout", choices=sorted(_LAYOUTS), default="single")
    s.add_argument("--wait", type=float, default=DEFAULT_WAIT, help="seconds (default %(default)s)")
    s.add_argument("--fast-unsafe", action=argparse.BooleanOptionalAction, default=True,
                   help="skip gossip settle wait, no fsync of system tables (tests only)")
    for name in ("stop", "status"):
        sub.add_parser(name).add_argument("--dir", type=Path, required=True)
    for name, what in (("stop-node", "stop one node (data kept)"), ("restart-node", "start a stopped node again")):
        nd = sub.add_parser(name, help=what)
        nd.add_argument("--dir", type=Path, required=True)
        nd.add_argument("--node", required=True)
    nt = sub.add_parser("nodetool", help="run nodetool against a node started with --jmx-port")
    nt.add_argument("--dir", type=Path, required=True)
    nt.add_argument("--node", default="n1")
    nt.add_argument("args", nargs=argparse.REMAINDER, help="nodetool arguments, e.g. status")
    a = p.parse_args(argv)

    try:
        if a.cmd == "fetch":
            t0 = time.monotonic()
            lib = fetch(quiet=True)
            jars = len(list(lib.glob("*.jar")))
            print(f"{lib} ({jars} jars, {time.monotonic() - t0:.1f}s)")
        elif a.cmd == "start":
            t0 = time.monotonic()
            nodes = start(a.dir, a.port, a.layout, a.wait, storage_port=a.storage_port,
                          jmx_port=a.jmx_port, fast_unsafe=a.fast_unsafe)
            first = nodes[0]
            print(f"cassandra ready: contact_point={first.address} port={first.native_port} "
                  f"local_dc={first.dc} nodes={','.join(n.address for n in nodes)} "
                  f"elapsed={time.monotonic() - t0:.1f}s")
        elif a.cmd == "stop":
            stop(a.dir, log=True)
        elif a.cmd == "stop-node":
            stop_node(a.dir, a.node, log=True)
        elif a.cmd == "restart-node":
            n = restart_node(a.dir, a.node)
            print(f"{n.name} {n.address}:{n.native_port} ({n.dc}) ready")
        elif a.cmd == "nodetool":
            match = [n for n in recorded_nodes(a.dir) if n.name == a.node]
            if not match:
                raise LaunchError(f"no node {a.node!r} recorded under {a.dir}")
            args = a.args[1:] if a.args[:1] == ["--"] else a.args
            return subprocess.run(nodetool_command(match[0], args or ["status"])).returncode
        elif a.cmd == "status":
            rows = status(a.dir)
            if not rows:
                print(f"no nodes recorded under {a.dir}")
                return 1
            for n, alive, port_open in rows:
                print(f"{n.name} {n.address} dc={n.dc} pid={n.pid or '-'} "
                      f"alive={'yes' if alive else 'no'} "
                      f"port {n.native_port}={'open' if port_open else 'closed'}")
            return 0 if all(alive and po for _, alive, po in rows) else 1
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
