"""Helpers shared by the benchmarks and the test fixtures that start real servers."""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
from pathlib import Path
from types import ModuleType

__all__ = ["CASSANDRA_LAUNCHER", "CLUSTER_LAUNCHER", "S3_LAUNCHER", "load_cassandra_launcher", "load_cluster_launcher",
           "load_s3_launcher", "free_port", "fs_type", "group_cpu_seconds"]

ROOT = Path(__file__).resolve().parent.parent
CASSANDRA_LAUNCHER = ROOT / "ops" / "cassandra" / "launcher.py"
CLUSTER_LAUNCHER = ROOT / "ops" / "cluster" / "cluster.py"
S3_LAUNCHER = ROOT / "ops" / "s3" / "launcher.py"


def _load_script(name: str, path: Path) -> ModuleType:
    """Import a script under ops/ (not a package) as a module, once."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses need the module registered
    spec.loader.exec_module(module)
    return module


def load_cassandra_launcher() -> ModuleType:
    """Import ops/cassandra/launcher.py (a stdlib-only script, not a package) as a module."""
    return _load_script("vna_ops_cassandra_launcher", CASSANDRA_LAUNCHER)


def load_cluster_launcher() -> ModuleType:
    """Import ops/cluster/cluster.py (the local HA cluster: front-ends, HAProxy) as a module."""
    return _load_script("vna_ops_cluster", CLUSTER_LAUNCHER)


def load_s3_launcher() -> ModuleType:
    """Import ops/s3/launcher.py (SeaweedFS start/stop, not a package) as a module."""
    return _load_script("vna_ops_s3_launcher", S3_LAUNCHER)


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fs_type(path: Path) -> str:
    """Filesystem type of the mount holding ``path`` (from /proc/mounts); "ext4 (no journal)" when
    ext4 runs without one (no /proc/fs/jbd2 entry): fsync is then far cheaper than on a production disk."""
    best, kind, dev = "", "?", ""
    try:
        real = str(path.resolve())
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            mnt = parts[1]
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, kind, dev = mnt, parts[2], parts[0]
        jbd2 = Path("/proc/fs/jbd2")
        if kind == "ext4" and jbd2.is_dir() and not any(jbd2.glob(Path(dev).name + "-*")):
            kind = "ext4 (no journal)"
    except OSError:
        pass
    return kind


def _stat_cpu(fields: list[str], children: bool) -> tuple[int, int]:
    """(utime, stime) (+ cutime, cstime) in clock ticks from the fields after the comm of /proc/<pid>/stat."""
    user, system = int(fields[11]), int(fields[12])    # fields 14, 15 of proc(5)
    if children:
        user += int(fields[13])                        # 16, 17: children waited for
        system += int(fields[14])
    return user, system


def group_cpu_seconds(pgid: int) -> tuple[float, float]:
    """(user, system) CPU seconds used so far by the processes of group ``pgid`` (its leader's reaped
    children included)."""
    user = system = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                raw = fh.read().decode("ascii", "replace")
        except OSError:
            continue          # gone meanwhile
        fields = raw[raw.rindex(")") + 2:].split()
        if int(fields[2]) == pgid:                     # field 5: process group
            u, s = _stat_cpu(fields, children=int(entry) == pgid)
            user, system = user + u, system + s
    tick = os.sysconf("SC_CLK_TCK")
    return user / tick, system / tick
