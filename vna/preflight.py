"""What ``vna serve`` checks before it creates anything, so that a start that cannot work fails at once.

Each check raises one ConfigError naming the setting, its value and what to
do (the CLI prints it and exits 2). The port probes are advisory (another
process may take a port between the probe and the bind): the servers' own
bind errors are turned into the same message by :func:`listen_error`.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import socket
from pathlib import Path

from vna.config import Config
from vna.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["check_serve", "check_dirs", "check_tls_files", "check_ports", "listen_error", "missing_roots",
           "remove_created", "require_archive"]


def check_serve(cfg: Config, *, dicom: bool = True) -> None:
    """Every check of a ``vna serve`` start: directories, TLS files, ports. Raises ConfigError."""
    check_dirs(cfg)
    check_tls_files(cfg, dicom=dicom)
    check_ports(cfg, dicom=dicom)


def _dirs(cfg: Config) -> list[tuple[str, str, Path]]:
    """(setting, value, directory) of every directory vna serve writes into."""
    dirs = [("archive.data_dir", cfg.archive.data_dir, cfg.data_dir)]
    dirs += [(f"hot.replicas[{i}]", r, cfg.resolve(r)) for i, r in enumerate(cfg.hot.replicas)]
    if cfg.cold.backend == "filesystem":
        dirs.append(("cold.path", cfg.cold.path, cfg.resolve(cfg.cold.path)))
    if cfg.audit.enabled and not cfg.resolve(cfg.audit.path).exists():  # an existing trail is checked itself
        dirs.append(("audit.path", cfg.audit.path, cfg.resolve(cfg.audit.path).parent))
    if cfg.index.backend == "sqlite":
        dirs.append(("index.sqlite_path", cfg.index.sqlite_path, cfg.resolve(cfg.index.sqlite_path).parent))
    return dirs


def check_dirs(cfg: Config) -> None:
    """Each directory exists and is writable, or can be created (no regular file or read-only place on the way)."""
    for setting, value, path in _dirs(cfg):
        existing = _nearest_existing(path)
        shown = f"{setting} = {value}" + (f" ({path})" if str(path) != value else "")
        if not existing.is_dir():
            raise ConfigError(f"{shown}: {existing} is a file, not a directory: "
                              f"choose another directory for {setting}")
        if not os.access(existing, os.W_OK | os.X_OK):
            readonly = os.statvfs(existing).f_flag & os.ST_RDONLY
            why = "a read-only file system" if readonly else "no write permission for this user"
            where = "" if existing == path else f" ({existing} exists, the rest must be created)"
            raise ConfigError(f"{shown} is not writable: {why}{where}: make it writable for the user "
                              f"running vna or choose another directory for {setting}")
    audit = cfg.resolve(cfg.audit.path)
    if cfg.audit.enabled and audit.exists() and not os.access(audit, os.W_OK):
        raise ConfigError(f"audit.path = {cfg.audit.path}: {audit} is not writable for this user: fix its owner "
                          "or mode, or choose another audit.path")


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def missing_roots(cfg: Config) -> list[Path]:
    """The topmost directories vna serve would create (for :func:`remove_created` after a failed start)."""
    roots: list[Path] = []
    for _, _, path in _dirs(cfg):
        if path.exists():
            continue
        top = path
        while not top.parent.exists() and top.parent != top:
            top = top.parent
        if top not in roots:
            roots.append(top)
    return roots


def remove_created(roots: list[Path], cfg: Config) -> None:
    """Remove the directories a failed start created (``missing_roots`` taken before it began).

    A root is kept (with a WARNING) when a hot replica or cold directory under
    it holds any file: a listener may have stored, and acknowledged, an
    instance before a later step of the start failed (blob first, so no stored
    file means nothing was acknowledged).
    """
    stores = [cfg.resolve(r) for r in cfg.hot.replicas]
    if cfg.cold.backend == "filesystem":
        stores.append(cfg.resolve(cfg.cold.path))
    for root in roots:
        holding = [s for s in stores if (s == root or root in s.parents) and _holds_a_file(s)]
        if holding:
            log.warning("the failed start keeps %s: %s holds stored copies", root, holding[0])
            continue
        shutil.rmtree(root, ignore_errors=True)


def _holds_a_file(directory: Path) -> bool:
    """True if anything but directories lies under ``directory`` (stops at the first)."""
    for _dirpath, _dirnames, filenames in os.walk(directory):
        if filenames:
            return True
    return False


def check_tls_files(cfg: Config, *, dicom: bool = True) -> None:
    """Every configured certificate, key and CA file of the listeners that will start can be read."""
    files: list[tuple[str, str]] = []
    if dicom:
        d = cfg.dicom
        files += [("dicom.tls_cert", d.tls_cert), ("dicom.tls_key", d.tls_key),
                  ("dicom.tls_client_ca", d.tls_client_ca), ("dicom.tls_ca", d.tls_ca)]
    if cfg.grpc.enabled:
        g = cfg.grpc
        files += [("grpc.tls_cert", g.tls_cert), ("grpc.tls_key", g.tls_key), ("grpc.client_ca", g.client_ca)]
    if cfg.web.port:
        files += [("web.tls_cert", cfg.web.tls_cert), ("web.tls_key", cfg.web.tls_key)]
    for setting, value in files:
        if not value:
            continue
        path = cfg.resolve(value)
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            why = "no such file" if exc.errno == errno.ENOENT else (exc.strerror or str(exc)).lower()
            section, key = setting.split(".")
            kind = "certificate" if key.endswith("cert") else "private key" if key.endswith("key") else "CA bundle"
            raise ConfigError(f"{setting} = {value}: cannot read the {section} TLS {kind} {path}: {why}: "
                              f"point {setting} at the PEM file (relative paths are taken under the data "
                              "directory)") from None


def _listeners(cfg: Config, dicom: bool) -> list[tuple[str, str, str, int]]:
    """(setting, what, host, port) of every listener vna serve opens."""
    out: list[tuple[str, str, str, int]] = []
    if dicom:
        out.append(("dicom.port", "the DICOM listener", cfg.dicom.host, cfg.dicom.port))
        if cfg.dicom.tls_port:
            out.append(("dicom.tls_port", "the DICOM TLS listener", cfg.dicom.host, cfg.dicom.tls_port))
    if cfg.grpc.enabled:
        out.append(("grpc.port", "the gRPC API", cfg.grpc.host, cfg.grpc.port))
    if cfg.health.port:
        out.append(("health.port", "the health endpoint", cfg.health.host, cfg.health.port))
    t = cfg.telemetry
    if t.enabled and t.prometheus_port:  # the first process's port (further worker processes take the next ones)
        out.append(("telemetry.prometheus_port", "the Prometheus endpoint", t.prometheus_host, t.prometheus_port))
    if cfg.web.port:
        out.append(("web.port", "DICOMweb and the viewer", cfg.web.host, cfg.web.port))
    return out


def check_ports(cfg: Config, *, dicom: bool = True) -> None:
    """No two listeners share a port, and each port can be bound now (not in use, allowed)."""
    seen: dict[int, str] = {}
    for setting, what, host, port in _listeners(cfg, dicom):
        if port in seen:
            raise ConfigError(f"{setting} = {port} is also {seen[port]}: give each listener its own port")
        seen[port] = setting
        try:
            _probe(host, port)
        except OSError as exc:
            raise listen_error(setting, what, host, port, exc) from None


def _probe(host: str, port: int) -> None:
    family, kind, proto, _, addr = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                      flags=socket.AI_PASSIVE)[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: TIME_WAIT is no conflict
        s.bind(addr)


def listen_error(setting: str, what: str, host: str, port: int, exc: OSError) -> ConfigError:
    """The ConfigError for a listener that cannot bind ``host:port``."""
    where = f"{what} cannot listen on {host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        return ConfigError(f"{setting} = {port}: {where}: address in use (another vna or program; "
                           f"`ss -ltnp 'sport = :{port}'` shows which): stop it or set {setting} to a free port")
    if exc.errno == errno.EACCES:
        return ConfigError(f"{setting} = {port}: {where}: permission denied (ports below 1024 need root or "
                           f"CAP_NET_BIND_SERVICE): choose a port above 1023")
    if exc.errno == errno.EADDRNOTAVAIL or isinstance(exc, socket.gaierror):
        host_setting = "telemetry.prometheus_host" if setting.startswith("telemetry.") \
            else setting.split(".")[0] + ".host"
        return ConfigError(f"{host_setting} = {host}: {where}: not an address of this machine: "
                           f"set {host_setting} (or dicom.host / --host) to one of its addresses")
    return ConfigError(f"{setting} = {port}: {where}: {exc.strerror or exc}")


def require_archive(cfg: Config) -> None:
    """Raise ConfigError unless an archive exists at the configured place (for read-only verbs).

    Only the SQLite index can be checked without connecting; a Cassandra
    index is taken as present.
    """
    if cfg.index.backend != "sqlite":
        return
    index = cfg.resolve(cfg.index.sqlite_path)
    if not index.is_file():
        raise ConfigError(f"no archive at archive.data_dir = {cfg.archive.data_dir} ({index} does not exist): "
                          "check the data directory (`vna index migrate` creates an empty archive)")
