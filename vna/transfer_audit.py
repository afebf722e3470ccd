"""Audit of DIMSE C-STORE receive per association and study (PS3.15 A.5.3.3, as dcm4chee does).

A C-STORE association writes one "DICOM Instances Transferred" record (action
C) per study and outcome, listing its instances (``details.instances``: SOP
class and instance UID, series, bytes, version, duplicate, and the error of a
failed one), with their count, total bytes and count per SOP class, and the
association's id (``details.association``). Successful stores (outcome 0) and
failed ones (the outcome of their error, 4, 8 or 12) of one study are separate
records. A study's record is written when the association ends (released,
aborted or its connection closed) and, while it runs, at the latest
``audit.transfer_flush_interval`` seconds after the study's first instance not
yet in a record (or once ``_MAX_INSTANCES`` are listed): a long association
writes several records for one study. gRPC Store, STOW-RS and ``vna store``
keep their record per call.

No acknowledged instance without a record, across a crash (kill -9): each
:class:`TransferAudit` (one per DICOM server object, so one or more per
process) keeps a journal, ``<data_dir>/audit/journal/<pid>-<random>.jnl``,
one JSON line per instance written to the kernel before its C-STORE-RSP (and
fsynced as the audit trail is: every ``fsync_interval`` seconds, or before the
answer when it is 0). Lines::

    {"b":7,"assoc":"...","actor":{...},"study":"1.2...","outcome":0}   a batch opens (one future record)
    {"b":7,"p":"P1^^^HOSP","i":{"sop_uid":...,"bytes":...}}            one instance of batch 7
    {"writing":[7],"ts":"2026-..."}                                     batch 7's record is being written
    {"done":[7]}                                                        batch 7's record is written

The journal is truncated when no batch is open and rewritten with the open
batches alone (a new file renamed over it) once it exceeds ``_ROTATE_BYTES``.
Its owner holds an exclusive ``flock`` on it for its whole life. When a DICOM
server starts (``vna serve``, a restarted worker), :meth:`TransferAudit.recover`
takes every journal of the directory whose lock it can get -- its owner died;
a live process's journal is never touched -- writes the batches without a
``done`` line as records marked ``"recovered": true`` and removes the
journal, marking each batch it writes (``writing`` before, ``done`` after),
so a recovery stopped halfway is not repeated for what it wrote. It reads only
those journals (never the catalogue) and skips the journals its own process
created (on NFS ``flock`` does not exclude a second lock of one process). A
journal is created under a temporary name and locked before it is renamed
into place (with ``fsync``: the directory is fsynced after each rename, a
rewritten journal before it); a recovering process checks that the file it
locked is still linked, so two starting processes never recover one journal
twice, and removes only ``.tmp`` files left unlocked for ``_STALE_TMP`` seconds.

An instance that cannot be journaled gets a record of its own at once: when
the journal cannot be written (then, under ``on_failure = "refuse"``, the
next stores are refused before storing, as while the journal's filesystem has
less than ``min_free_mb`` free), when the journal is closed (a store that
outlived the server's stop) and, journaled first, when its association is
already closed (pynetdicom closes the connection from another thread than
the store's).

A crash between a ``writing`` line and its ``done`` line leaves recovery in
doubt: it reads the audit trail's tail back to that time (never more) and
writes only the batches whose record (same association, same instances) is
not there, so nothing is listed twice. A record held in memory under
``on_failure = "buffer"`` counts as written, as it does for every other record.
"""

from __future__ import annotations

import calendar
import errno
import fcntl
import json
import logging
import os
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Iterator

from vna.audit import INSTANCES_TRANSFERRED, Actor, AuditLog, AuditScope, _now_iso
from vna.errors import AuditUnavailable, ConfigError

__all__ = ["TransferAudit", "AssociationAudit", "journal_dir"]

log = logging.getLogger(__name__)

_MAX_INSTANCES = 1000       # instances listed per record at most (a larger batch is written at once)
_ROTATE_BYTES = 1 << 20     # rewrite the journal with the open batches once it is larger
_SUFFIX = ".jnl"
_PROBE_INTERVAL = 1.0       # seconds between checks of the journal's free space, and retries of a failing journal
_STALE_TMP = 30.0           # seconds after which an unlocked .tmp journal is a dead creator's leftover

_OWN: set[Path] = set()     # the journals this process created (flock is per process on NFS: never recover them)


def journal_dir(data_dir_audit: Path) -> Path:
    """The journals' directory under ``data_dir_audit`` (``<data_dir>/audit``)."""
    return data_dir_audit / "journal"


@dataclass
class _Batch:
    """The instances of one future record: one association, one study, one outcome."""

    id: int
    assoc: str
    actor: dict[str, str]
    study: str
    outcome: int
    started: float = field(default_factory=time.monotonic)
    writing: str = ""      # recovery: when a process began writing its record ("": it never did)
    patients: list[str] = field(default_factory=list)       # without repeats, for the record
    instances: list[dict[str, Any]] = field(default_factory=list)
    patient_of: list[str] = field(default_factory=list)     # each instance's, for a rewritten journal

    def add(self, patient: str, item: dict[str, Any]) -> None:
        if patient and patient not in self.patients:
            self.patients.append(patient)
        self.instances.append(item)
        self.patient_of.append(patient)

    def header(self) -> dict[str, Any]:
        return {"b": self.id, "assoc": self.assoc, "actor": self.actor, "study": self.study, "outcome": self.outcome}


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode() + b"\n"


def _write_record(audit: AuditLog, batch: _Batch, recovered: bool = False) -> None:
    """The batch's record. Raises AuditUnavailable."""
    classes = Counter(str(i.get("sop_class_uid", "")) for i in batch.instances)
    details: dict[str, Any] = {
        "association": batch.assoc, "count": len(batch.instances),
        "bytes": sum(int(i.get("bytes") or 0) for i in batch.instances),
        "sop_classes": dict(sorted(classes.items())), "instances": batch.instances,
    }
    if recovered:
        details["recovered"] = True
    a = batch.actor
    audit.record(INSTANCES_TRANSFERRED, "C", Actor(a.get("id", ""), a.get("kind", "ae"), a.get("address", "")),
                 outcome=batch.outcome, patient_ids=batch.patients, study_uids=[batch.study] if batch.study else [],
                 details=details)


class _Instance:
    """The block of :meth:`AssociationAudit.instance`: journals the instance when it ends."""

    __slots__ = ("assoc", "scope")

    def __init__(self, assoc: AssociationAudit) -> None:
        self.assoc = assoc
        self.scope = AuditScope()

    def __enter__(self) -> AuditScope:
        return self.scope

    def __exit__(self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        scope = self.scope
        outcome = scope.ended(exc)
        try:
            self.assoc.add(scope, outcome)
        except AuditUnavailable as aexc:
            if exc is None:
                raise   # stored but not journaled: the store is answered with a failure
            log.error("audit of a failed C-STORE by %s could not be journaled: %s", self.assoc.actor.id, aexc)


class AssociationAudit:
    """The C-STORE audit of one association (see the module docstring). Use it from the association's
    thread: :meth:`instance` around each store, :meth:`close` when the association ends."""

    def __init__(self, owner: TransferAudit, actor: Actor) -> None:
        self.owner = owner
        self.actor = actor
        self.id = uuid.uuid4().hex
        self.batches: dict[tuple[str, int], _Batch] = {}   # (study, outcome) -> the open batch
        self.closed = False

    def instance(self) -> _Instance:
        """A block around one C-STORE: :meth:`AuditLog.require` first (raises AuditUnavailable), then the
        block fills the yielded scope as for :meth:`AuditLog.operation`; when it ends the instance is
        journaled (to the kernel) before this returns; if the journal cannot be written, or the association
        or the journal is already closed, the instance gets a record of its own at once instead. If the block
        succeeded and neither can be written, AuditUnavailable is raised: the caller answers a failure."""
        self.owner.require()
        return _Instance(self)

    def add(self, scope: AuditScope, outcome: int) -> None:
        """Journal one instance in its (study, outcome) batch. Raises AuditUnavailable."""
        self.owner.add(self, scope, outcome)

    def close(self) -> None:
        """The association ended: write its records (those that cannot be written now are retried)."""
        self.owner.end(self)


class TransferAudit:
    """The per-association C-STORE audit of one DICOM server: a journal, and a thread that writes records
    of batches older than the flush interval. :meth:`start` recovers dead journals first; :meth:`close`
    writes every open batch and removes the journal when nothing is left in it."""

    def __init__(self, audit: AuditLog, directory: Path, flush_interval: float) -> None:
        self.audit = audit
        self.dir = directory
        self.interval = flush_interval
        self.enabled = audit.enabled
        self._lock = threading.Lock()
        self._assocs: set[AssociationAudit] = set()
        self._retry: list[_Batch] = []        # batches of ended associations whose record failed
        self._next = 0
        self._fd: int | None = None
        self._path: Path | None = None
        self._size = 0
        self._dirty = False
        self._failing = False                 # the last record could not be written
        self._journal_error: str | None = None   # the last append failed (cleared by the next that succeeds)
        self._journal_failed_at = 0.0
        self._space_checked = 0.0
        self._space_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- life ---------------------------------------------------------------------------
    def start(self) -> None:
        """Recover the journals of dead processes, open this one's, start the flush thread.
        Raises ConfigError when the journal's directory cannot be written."""
        if not self.enabled:
            return
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.recover(self.audit, self.dir)
            self._fd, self._path = self._create()
        except OSError as exc:
            raise ConfigError(f"{self.dir}: the C-STORE audit journal cannot be written there "
                              f"({exc.strerror or exc}): check the data directory's owner and free space") from exc
        self._thread = threading.Thread(target=self._background, name="vna-audit-transfers", daemon=True)
        self._thread.start()

    def require(self) -> None:
        """:meth:`AuditLog.require`, and under ``on_failure = "refuse"`` the journal too: raise AuditUnavailable
        while its last append failed (retried at most once a second) or its filesystem has less than
        ``min_free_mb`` free."""
        self.audit.require()
        cfg = self.audit.cfg
        if not self.enabled or cfg.on_failure != "refuse":
            return
        now = time.monotonic()
        if self._journal_error is not None and now - self._journal_failed_at < _PROBE_INTERVAL:
            raise AuditUnavailable(f"audit: the transfer journal cannot be written ({self._journal_error}); "
                                   "operation refused")
        if cfg.min_free_mb:
            if now - self._space_checked >= _PROBE_INTERVAL:
                self._space_checked = now
                try:
                    st = os.statvfs(self.dir)
                    free = st.f_bavail * st.f_frsize
                except OSError as exc:
                    self._space_error = f"{self.dir}: {exc.strerror or exc}"
                else:
                    self._space_error = (f"{self.dir} has {free // (1024 * 1024)} MiB free, below audit.min_free_mb"
                                         f" = {cfg.min_free_mb}" if free < cfg.min_free_mb * 1024 * 1024 else None)
                    if self._space_error is not None:
                        log.error("audit: %s; operations are refused", self._space_error)
            if self._space_error is not None:
                raise AuditUnavailable(f"audit: the transfer journal cannot be written ({self._space_error}); "
                                       "operation refused")

    def association(self, actor: Actor) -> AssociationAudit:
        """The audit of a new association of ``actor``."""
        assoc = AssociationAudit(self, actor)
        if self.enabled:
            with self._lock:
                self._assocs.add(assoc)
        return assoc

    def close(self) -> None:
        """Write every open batch (associations still open included), stop; the journal is removed when
        every record was written, else left for recovery."""
        if not self.enabled or self._fd is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        with self._lock:
            for assoc in list(self._assocs):
                self._end_locked(assoc)
            self._write_due(force=True)
            fd, path, self._fd = self._fd, self._path, None
            left = bool(self._retry)
            if left:
                log.error("audit: %d transfer records could not be written; %s keeps them for recovery",
                          len(self._retry), path)
            elif path is not None:
                path.unlink(missing_ok=True)
            if path is not None:
                _OWN.discard(path)
            if fd is not None:
                self._sync(fd)
                os.close(fd)

    # -- recording ----------------------------------------------------------------------
    def add(self, assoc: AssociationAudit, scope: AuditScope, outcome: int) -> None:
        """Journal one instance; if the journal is closed or failing, write its own record at once. An instance
        of an association already closed (its handler outlived the connection) is journaled and its record
        written at once. Raises AuditUnavailable when the instance can be neither journaled nor recorded."""
        if not self.enabled:
            return
        study = scope.study_uids[0] if scope.study_uids else ""
        patient = scope.patient_ids[0] if scope.patient_ids else ""
        with self._lock:
            if self._fd is None:   # a store that outlived the server's stop
                self._write_alone(assoc, study, outcome, patient, dict(scope.details), "the journal is closed")
                return
            key = (study, outcome)
            batch = assoc.batches.get(key)
            out = b""
            if batch is None:
                batch = assoc.batches[key] = _Batch(self._next, assoc.id, assoc.actor.as_dict(), study, outcome)
                self._next += 1
                out = _line(batch.header())
            item = dict(scope.details)
            out += _line({"b": batch.id, "p": patient, "i": item})
            try:
                self._append(out)
            except OSError as exc:
                if not batch.instances:
                    del assoc.batches[key]
                self._journal_error, self._journal_failed_at = str(exc), time.monotonic()
                self._write_alone(assoc, study, outcome, patient, item, f"the journal cannot be written: {exc}")
                return
            self._journal_error = None
            batch.add(patient, item)
            if assoc.closed or len(batch.instances) >= _MAX_INSTANCES:
                del assoc.batches[key]
                self._retry.append(batch)   # written below, outside the per-instance path's usual lock
        if self._retry:
            self._write_retry()

    def _write_alone(self, assoc: AssociationAudit, study: str, outcome: int, patient: str,
                     item: dict[str, Any], why: str) -> None:
        """One instance's own record, not journaled (lock held). Raises AuditUnavailable."""
        batch = _Batch(-1, assoc.id, assoc.actor.as_dict(), study, outcome)
        batch.add(patient, item)
        log.error("audit: %s; the C-STORE of %s by %s gets a record of its own", why, item.get("sop_uid"),
                  assoc.actor.id)
        _write_record(self.audit, batch)

    def end(self, assoc: AssociationAudit) -> None:
        if not self.enabled:
            return
        with self._lock:
            self._end_locked(assoc)
        self._write_retry()

    def _end_locked(self, assoc: AssociationAudit) -> None:
        assoc.closed = True
        self._assocs.discard(assoc)
        self._retry.extend(b for b in assoc.batches.values() if b.instances)
        assoc.batches.clear()

    def _write_retry(self) -> None:
        with self._lock:
            self._write_due(force=False, only_retry=True)

    def _write_due(self, force: bool, only_retry: bool = False) -> None:
        """Write the records of ended batches and (unless only_retry) of batches older than the interval,
        then their ``done`` line (lock held)."""
        due = list(self._retry)
        self._retry.clear()
        if not only_retry:
            now = time.monotonic()
            for assoc in self._assocs:
                for key, b in list(assoc.batches.items()):
                    if b.instances and (force or now - b.started >= self.interval):
                        due.append(b)
                        del assoc.batches[key]
        done: list[int] = []
        if due and self._fd is not None:
            try:   # a crash before the done line: recovery looks for these records before writing them
                self._append(_line({"writing": [b.id for b in due], "ts": _now_iso()}))
            except OSError as exc:   # written now, they could be written again by a recovery: retried later
                if self._journal_error is None:
                    log.error("audit: the transfer journal %s cannot be written: %s; %d transfer records are "
                              "held for a retry", self._path, exc, len(due))
                self._journal_error, self._journal_failed_at = str(exc), time.monotonic()
                self._retry.extend(due)
                return
        for i, batch in enumerate(due):
            try:
                _write_record(self.audit, batch)
            except AuditUnavailable as exc:
                if not self._failing:   # the audit writer raises its own alarm; one line here per failure
                    log.error("audit: %d transfer records are held for a retry: %s", len(due) - i, exc)
                self._failing = True
                self._retry.extend(due[i:])
                break
            done.append(batch.id)
            self._failing = False
        if done and self._fd is not None:
            try:
                self._append(_line({"done": done}))
                self._compact()
            except OSError as exc:
                log.error("audit: the transfer journal %s cannot be written: %s", self._path, exc)

    def _open_batches(self) -> list[_Batch]:
        return [b for a in self._assocs for b in a.batches.values()] + self._retry

    def _compact(self) -> None:
        """Truncate the journal when no batch is open; rewrite it with the open ones when too large."""
        assert self._fd is not None
        open_ = self._open_batches()
        if not open_:
            os.ftruncate(self._fd, 0)
            self._size = 0
            return
        if self._size < _ROTATE_BYTES:
            return
        fd, tmp = self._create(final=False)
        data = b"".join(_line(b.header()) + b"".join(_line({"b": b.id, "p": p, "i": i})
                                                      for p, i in zip(b.patient_of, b.instances))
                        for b in open_)
        try:
            _write_all(fd, data)
            if self.audit.cfg.fsync:
                os.fdatasync(fd)
            assert self._path is not None
            os.rename(tmp, self._path)
            self._sync_dir()
        except OSError:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(self._fd)
        self._fd, self._size = fd, len(data)

    # -- journal ------------------------------------------------------------------------
    def _create(self, final: bool = True) -> tuple[int, Path]:
        """A new locked journal file; with ``final`` renamed into place, else left under its temporary name."""
        name = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        tmp = self.dir / f"{name}.tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if not final:
            return fd, tmp
        path = self.dir / f"{name}{_SUFFIX}"
        try:
            os.rename(tmp, path)
            self._sync_dir()
        except OSError:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        _OWN.add(path)
        self._size = 0
        return fd, path

    def _sync_dir(self) -> None:
        """With ``fsync``: make a rename in the journals' directory durable. Raises OSError."""
        if self.audit.cfg.fsync:
            dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    def _append(self, data: bytes) -> None:
        assert self._fd is not None
        try:
            _write_all(self._fd, data)
        except OSError:
            try:
                os.ftruncate(self._fd, self._size)   # no torn line left behind
            except OSError:
                pass
            raise
        self._size += len(data)
        cfg = self.audit.cfg
        if cfg.fsync and cfg.fsync_interval == 0:
            os.fdatasync(self._fd)
        else:
            self._dirty = True

    def _sync(self, fd: int) -> None:
        if self.audit.cfg.fsync:
            try:
                os.fdatasync(fd)
            except OSError as exc:
                log.error("audit: fsync of the transfer journal failed: %s", exc)

    def _background(self) -> None:
        cfg = self.audit.cfg
        tick = max(min(self.interval, cfg.fsync_interval or self.interval, 1.0), 0.05)
        last_sync = time.monotonic()
        while not self._stop.wait(tick):
            with self._lock:
                self._write_due(force=False)
                if self._dirty and self._fd is not None and time.monotonic() - last_sync >= cfg.fsync_interval:
                    self._dirty = False
                    last_sync = time.monotonic()
                    self._sync(self._fd)

    # -- recovery -----------------------------------------------------------------------
    @staticmethod
    def recover(audit: AuditLog, directory: Path) -> int:
        """Write the records left in the journals of dead processes (marked recovered) and remove those
        journals; returns the number of records written. A journal whose records cannot be written is
        kept for the next start. Journals of live processes (locked, or created by this process) are left
        alone. Each recovered batch gets a ``writing`` line before its record and a ``done`` line after it in
        the dead journal, so a recovery that stops halfway is not repeated for the batches it wrote."""
        if not audit.enabled or not directory.is_dir():
            return 0
        written = 0
        for path in sorted(directory.glob(f"*{_SUFFIX}")):
            if path in _OWN:
                continue           # a live journal of this process (its flock does not exclude us on NFS)
            try:
                fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                        continue   # its process is alive
                    raise
                if os.fstat(fd).st_nlink == 0:
                    continue       # recovered and removed by another process meanwhile
                data = _read_all(fd)
                batches = _not_in_trail(audit.path, list(_unfinished(data)))
                sep = b"\n" if data and not data.endswith(b"\n") else b""   # after a torn last line
                for batch in batches:
                    try:
                        _write_all(fd, sep + _line({"writing": [batch.id], "ts": _now_iso()}))
                    except OSError as exc:
                        raise AuditUnavailable(f"the journal cannot be marked: {exc}") from None
                    sep = b""
                    _write_record(audit, batch, recovered=True)
                    written += 1
                    try:
                        _write_all(fd, _line({"done": [batch.id]}))
                    except OSError as exc:   # its writing line lets the next recovery find the record
                        log.error("audit: the transfer journal %s cannot be marked: %s", path, exc)
                if batches:
                    log.warning("audit: wrote %d transfer records of %d instances from %s, left by a process "
                                "that stopped without writing them (marked recovered)", len(batches),
                                sum(len(b.instances) for b in batches), path.name)
                path.unlink()
            except AuditUnavailable as exc:
                log.error("audit: the transfer journal %s is kept: its records cannot be written: %s", path, exc)
            finally:
                os.close(fd)
        for stale in directory.glob("*.tmp"):   # never renamed into place: its creator died before using it
            try:
                fd = os.open(stale, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:   # a young one may be between its creator's open and flock
                if time.time() - os.fstat(fd).st_mtime < _STALE_TMP:
                    continue
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                stale.unlink(missing_ok=True)
            except OSError:
                pass
            finally:
                os.close(fd)
        return written


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError(errno.ENOSPC, "short write")
        view = view[n:]


def _read_all(fd: int) -> bytes:
    chunks: list[bytes] = []
    pos = 0
    while True:
        chunk = os.pread(fd, 1 << 20, pos)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        pos += len(chunk)


def _json_object(raw: bytes) -> dict[str, Any] | None:
    """The JSON object on a journal or trail line; None for a torn, empty or non-object line."""
    try:
        obj = json.loads(raw)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def _unfinished(data: bytes) -> Iterator[_Batch]:
    """The batches of a journal without their ``done`` line, in journal order (a torn last line is ignored)."""
    batches: dict[int, _Batch] = {}
    done: set[int] = set()
    for raw in data.split(b"\n"):
        if (obj := _json_object(raw)) is None:
            continue
        if "done" in obj:
            done.update(int(b) for b in obj["done"])
        elif "writing" in obj:
            for b in obj["writing"]:
                if int(b) in batches and not batches[int(b)].writing:
                    batches[int(b)].writing = str(obj["ts"])
        elif "i" in obj:
            batch = batches.get(int(obj["b"]))
            if batch is not None:
                batch.add(str(obj.get("p") or ""), dict(obj["i"]))
        elif "assoc" in obj:
            b = int(obj["b"])
            batches[b] = _Batch(b, str(obj["assoc"]), dict(obj["actor"]), str(obj["study"]), int(obj["outcome"]))
    for b, batch in batches.items():
        if b not in done and batch.instances:
            yield batch


def _not_in_trail(trail: Path, batches: list[_Batch]) -> list[_Batch]:
    """``batches`` without those whose record is already in the trail: a batch its process began writing
    (a ``writing`` line) but not marked done. Only the trail's tail written since then is read."""
    started = [b.writing for b in batches if b.writing]
    if not started:
        return batches
    since = min(started)
    written: set[tuple[str, tuple[str, ...]]] = set()
    for rec in _tail_since(trail, since):
        details = rec.get("details") or {}
        if rec.get("event_id") == INSTANCES_TRANSFERRED.code and isinstance(details, dict) and "association" in details:
            written.add((str(details["association"]),
                         tuple(str(i.get("sop_uid")) for i in details.get("instances") or ())))
    return [b for b in batches
            if not (b.writing and (b.assoc, tuple(str(i.get("sop_uid")) for i in b.instances)) in written)]


def _tail_since(trail: Path, since: str) -> Iterator[dict[str, Any]]:
    """The trail's records from the end back to the first one older than ``since`` (ISO text; a second of
    slack for clocks of other processes), newest first."""
    try:
        fh = open(trail, "rb")
    except OSError:
        return
    with fh:
        try:
            pos = os.fstat(fh.fileno()).st_size
        except OSError:
            return
        rest = b""
        while pos > 0:
            step = min(1 << 16, pos)
            pos -= step
            fh.seek(pos)
            lines = (fh.read(step) + rest).split(b"\n")
            rest = lines[0] if pos > 0 else b""
            for raw in reversed(lines[1:] if pos > 0 else lines):
                if (rec := _json_object(raw)) is None:
                    continue
                if str(rec.get("ts", ""))[:19] < _seconds_before(since):
                    return
                yield rec


def _seconds_before(ts: str) -> str:
    """``ts`` (ISO, UTC) one second earlier, to the second."""
    try:
        t = calendar.timegm(time.strptime(ts[:19], "%Y-%m-%dT%H:%M:%S")) - 1
    except ValueError:
        return ""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t))
