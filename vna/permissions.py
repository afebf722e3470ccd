"""Patient data at rest: the modes of what vna creates, and warnings about readable secrets.

``archive.permissions`` ("owner" or "group") becomes the process umask of
every ``vna`` verb (:func:`apply`), so every file and directory vna, SQLite
or a library creates under the data, spool, audit, cold and replica paths is
owner-only (0600/0700) or group-readable (0640/0750), never other-readable.
Directories and index files vna owns that already exist with wider modes are
tightened once at start; nothing is walked recursively (a data directory of
0700 protects what it holds).
"""

from __future__ import annotations

import logging
import os
import stat
import tomllib
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from vna.config import Config

__all__ = ["apply", "owned_dirs", "owned_files", "warn_readable_secrets", "secret_settings"]

log = logging.getLogger(__name__)


def apply(cfg: Config) -> None:
    """Set the process umask from ``archive.permissions`` and tighten what vna owns that already exists.

    Tightening only removes bits (never adds any), logs each change at INFO and
    logs a WARNING (does not raise) when a path cannot be changed.
    """
    os.umask(cfg.archive.umask)
    for path in owned_dirs(cfg):
        _tighten(path, stat.S_ISDIR, cfg.archive.dir_mode, cfg.archive.permissions)
    for path in owned_files(cfg):
        _tighten(path, stat.S_ISREG, cfg.archive.file_mode, cfg.archive.permissions)


def owned_dirs(cfg: Config) -> list[Path]:
    """The top-level directories vna owns: data dir, hot replica dirs, the filesystem cold dir, the spool.

    The audit log's directory is included when it lies under the data dir
    (an absolute audit path may share a directory with other logs).
    """
    data = cfg.data_dir
    dirs = [data, cfg.resolve("spool"), *(cfg.resolve(r) for r in cfg.hot.replicas)]
    if cfg.cold.backend == "filesystem":
        dirs.append(cfg.resolve(cfg.cold.path))
    audit_dir = cfg.resolve(cfg.audit.path).parent
    if audit_dir.is_relative_to(data):
        dirs.append(audit_dir)
    return _unique(dirs)


def owned_files(cfg: Config) -> list[Path]:
    """The files vna owns whose mode SQLite copies or that were made before: the SQLite index and the audit log."""
    files = [cfg.resolve(cfg.audit.path)]
    if cfg.index.backend == "sqlite":
        index = cfg.resolve(cfg.index.sqlite_path)
        files += [index, *(Path(f"{index}{suffix}") for suffix in ("-wal", "-shm", ".wlock"))]
    return _unique(files)


def _unique(paths: Iterable[Path]) -> list[Path]:
    return list(dict.fromkeys(paths))


def _tighten(path: Path, kind: Callable[[int], bool], allowed: int, permissions: str) -> None:
    """Remove the mode bits of ``path`` beyond ``allowed``: only a directory / regular file this user owns.

    Anything else (a device such as /dev/full as the audit path, another
    user's directory) is never changed: a WARNING says it is wider.
    """
    try:
        st = path.stat()
    except FileNotFoundError:
        return
    except OSError as exc:
        log.warning("cannot check the permissions of %s: %s", path, exc.strerror)
        return
    mode = stat.S_IMODE(st.st_mode)
    tightened = mode & ~(0o777 & ~allowed)
    if tightened == mode:
        return
    if not kind(st.st_mode) or st.st_uid != os.geteuid():
        log.warning("%s is %s, wider than archive.permissions = %r allows; left as it is (not a %s owned "
                    "by this user)", path, oct(mode), permissions, "directory" if kind is stat.S_ISDIR else "file")
        return
    try:
        os.chmod(path, tightened)
    except OSError as exc:
        log.warning("%s is %s, wider than archive.permissions = %r allows: %s (chmod %o %s)",
                    path, oct(mode), permissions, exc.strerror, tightened, path)
        return
    log.info("permissions of %s tightened: %s -> %s (archive.permissions = %r)",
             path, oct(mode), oct(tightened), permissions)


#: Settings that hold a secret or name a private key, as (section path, key); a list of tables is walked.
_SECRETS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("grpc", "token"), "token"),
    (("grpc",), "tls_key"),
    (("dicom",), "tls_key"),
    (("index", "cassandra"), "password"),
    (("hot", "s3"), "secret_key"),
    (("cold", "s3"), "secret_key"),
    (("federation", "site"), "token"),
)


def secret_settings(data: Mapping[str, Any]) -> list[str]:
    """The names of the secret settings (tokens, passwords, keys, private key paths) set in parsed TOML ``data``."""
    found: list[str] = []
    for section, key in _SECRETS:
        node: Any = data
        for part in section:
            node = node.get(part) if isinstance(node, Mapping) else None
        tables = node if isinstance(node, list) else [node]
        if any(isinstance(t, Mapping) and t.get(key) for t in tables):
            found.append(".".join(section if section[-1] == key else (*section, key)))
    return found


def warn_readable_secrets(cfg: Config, config_path: str | Path | None) -> None:
    """Log one WARNING if the config file holds secrets and others (or, for "owner", the group) can read it.

    Also one WARNING per TLS private key file (dicom.tls_key, grpc.tls_key) that is world-readable.
    """
    if config_path is not None:
        _check_config_file(Path(config_path), cfg.archive.permissions)
    for setting, value in (("dicom.tls_key", cfg.dicom.tls_key), ("grpc.tls_key", cfg.grpc.tls_key)):
        if not value:
            continue
        key = cfg.resolve(value)
        try:
            mode = stat.S_IMODE(key.stat().st_mode)
        except OSError:
            continue  # a missing key is reported when the listener starts
        if mode & 0o004:
            log.warning("TLS private key %s (%s) is world-readable (%s): chmod 600 %s", key, setting, oct(mode), key)


def _check_config_file(path: Path, permissions: str) -> None:
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        with open(path, "rb") as fh:
            secrets = secret_settings(tomllib.load(fh))
    except (OSError, tomllib.TOMLDecodeError):
        return  # load_config reported it already
    wider = mode & (0o007 if permissions == "group" else 0o077)
    if not secrets or not wider:
        return
    who = " and ".join(w for w, bits in (("group", 0o070), ("others", 0o007)) if wider & bits)
    fix = "chmod 640" if permissions == "group" else "chmod 600"
    log.warning("config file %s holds secrets (%s) and is readable by %s (%s): %s %s",
                path, ", ".join(secrets), who, oct(mode), fix, path)
