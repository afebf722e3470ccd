"""The audit trail: who touched which patient's data, when, and how it went.

One JSON object per line, append-only, every record hash-chained to the one
before it, so that editing, inserting or removing a record is detectable
(:func:`verify`). The vocabulary is DICOM's (PS3.15 Annex A.5): ``event_id``
is a DCM code such as ``110104`` "DICOM Instances Transferred", ``action``
one of C/R/U/D/E, ``outcome`` 0 (success), 4 (minor failure), 8 (serious
failure) or 12 (major failure). A record::

    {"action":"C","actor":{"address":"10.0.0.7","id":"CT01","kind":"ae"},
     "details":{"bytes":526336,"sop_uid":"1.2...",...},"event":"DICOM Instances Transferred",
     "event_id":"110104","outcome":0,"patient_ids":["P123"],"prev_hash":"41ab...","seq":812,
     "source":{"ae":"VNA","host":"vna-1","pid":4242,"site":"local"},"study_uids":["1.2.840..."],
     "ts":"2026-11-28T03:42:13.123456Z","hash":"9f2c..."}

The C-STOREs of a DIMSE association are recorded per study, listing their
instances, and recovered after a crash: :mod:`vna.transfer_audit`.

``hash`` is the SHA-256 of the record's canonical JSON (keys sorted, no
spaces, UTF-8) without ``hash`` (the line is that JSON with ``hash`` appended
last); ``prev_hash`` is the previous record's
``hash`` (64 zeros for the first); ``seq`` counts from 1. Several processes
(worker processes, CLI verbs) append to one file under an exclusive ``flock``;
each re-reads the tail when the file grew behind its back.

Durability: a record is written to the kernel before the operation it
describes is answered (a process crash loses nothing); the file is fsynced
every ``fsync_interval`` seconds by a background thread (power loss can cost
up to that much), or before the answer when ``fsync_interval = 0`` (one more
fsync per operation).

Failure policy (``on_failure``), for a full or failing audit disk and for an
unreachable syslog collector (TCP; UDP cannot tell):

- ``refuse``: :meth:`AuditLog.require` — called before an operation touches
  anything — raises :class:`~vna.errors.AuditUnavailable` while the trail is
  failing (or its filesystem has less than ``min_free_mb`` free), so a C-STORE
  is refused before anything is stored. Recovery is probed at most once a
  second by writing an "Audit Recording Started" security alert.
- ``buffer``: records that cannot be written are kept in memory in order
  (``buffer_max`` at most), an ERROR is logged and :attr:`AuditLog.healthy`
  turns false; a background thread writes them once the trail works again.
  A full buffer refuses like ``refuse``. Records are never dropped silently.
"""

from __future__ import annotations

import errno
import fcntl
import getpass
import hashlib
import json
import logging
import os
import socket
import threading
import time
from collections import deque
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping

from vna.config import AuditConfig
from vna.errors import AuditUnavailable, DuplicateConflict, InvalidInput, NotFound, VnaError

if TYPE_CHECKING:
    from vna.telemetry import SeriesKey, Telemetry

__all__ = [
    "Code", "Actor", "AuditScope", "AuditLog", "VerifyResult",
    "APPLICATION_ACTIVITY", "AUDIT_LOG_USED", "INSTANCES_ACCESSED", "INSTANCES_TRANSFERRED", "STUDY_DELETED",
    "EXPORT", "IMPORT", "QUERY", "SECURITY_ALERT", "USER_AUTHENTICATION", "EVENTS",
    "APPLICATION_START", "APPLICATION_STOP", "LOGIN", "AUDIT_RECORDING_STARTED", "OBJECT_SECURITY_CHANGED",
    "GENESIS", "canonical", "record_hash", "outcome_for", "iter_records", "verify", "search",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Code:
    """A coded value of the DICOM audit vocabulary (scheme DCM)."""

    code: str
    meaning: str


# Event IDs (PS3.15 A.5.3, CID 400)
APPLICATION_ACTIVITY = Code("110100", "Application Activity")
AUDIT_LOG_USED = Code("110101", "Audit Log Used")
INSTANCES_ACCESSED = Code("110103", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED = Code("110104", "DICOM Instances Transferred")
STUDY_DELETED = Code("110105", "DICOM Study Deleted")
EXPORT = Code("110106", "Export")
IMPORT = Code("110107", "Import")
QUERY = Code("110112", "Query")
SECURITY_ALERT = Code("110113", "Security Alert")
USER_AUTHENTICATION = Code("110114", "User Authentication")
EVENTS: dict[str, Code] = {c.code: c for c in (
    APPLICATION_ACTIVITY, AUDIT_LOG_USED, INSTANCES_ACCESSED, INSTANCES_TRANSFERRED, STUDY_DELETED,
    EXPORT, IMPORT, QUERY, SECURITY_ALERT, USER_AUTHENTICATION)}

# Event type codes (CID 401, 403)
APPLICATION_START = Code("110120", "Application Start")
APPLICATION_STOP = Code("110121", "Application Stop")
LOGIN = Code("110122", "Login")
AUDIT_RECORDING_STARTED = Code("110134", "Audit Recording Started")
OBJECT_SECURITY_CHANGED = Code("110135", "Object Security Attributes Changed")

ACTIONS = ("C", "R", "U", "D", "E")
GENESIS = "0" * 64
_MAX_LIST = 1000            # patient ids / study uids kept per record
_PROBE_INTERVAL = 1.0       # seconds between recovery attempts on the request path
_ALARM_INTERVAL = 60.0      # seconds between repeated ERROR lines while failing
_HOST = socket.gethostname()


@dataclass(frozen=True)
class Actor:
    """Who did it: a calling AE title, an API token name, an OS user or a job; and from where."""

    id: str
    kind: str = "ae"            # "ae" | "token" | "user" | "process"
    address: str = ""

    @classmethod
    def local_user(cls) -> "Actor":
        """The OS user running this process, on this host (CLI verbs)."""
        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = f"uid:{os.getuid()}"
        return cls(user, "user", _HOST)

    @classmethod
    def process(cls, name: str) -> "Actor":
        """A background job or the archive itself, on this host."""
        return cls(name, "process", _HOST)

    def as_dict(self) -> dict[str, str]:
        """The record's ``actor`` object."""
        return {"id": self.id, "kind": self.kind, "address": self.address}


@dataclass
class AuditScope:
    """What an :meth:`AuditLog.operation` block learned; written as one record when it ends."""

    patient_ids: list[str] = field(default_factory=list)
    study_uids: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    outcome: int | None = None      # None: 0 unless the block raised

    def ended(self, exc: BaseException | None) -> int:
        """The outcome of the block that ended with ``exc`` (None: it did not raise); its error is noted
        in ``details``."""
        if exc is None:
            return self.outcome or 0
        self.details.setdefault("error", "cancelled" if isinstance(exc, GeneratorExit) else str(exc)[:200])
        return outcome_for(exc)


#: json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str), built once
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def canonical(obj: Mapping[str, Any]) -> bytes:
    """Canonical JSON: sorted keys, no whitespace, UTF-8."""
    return _CANONICAL.encode(obj).encode("utf-8")


def record_hash(rec: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the record's canonical JSON without its ``hash`` key."""
    return hashlib.sha256(canonical({k: v for k, v in rec.items() if k != "hash"})).hexdigest()


def outcome_for(exc: BaseException) -> int:
    """PS3.15 outcome of an operation that raised ``exc``."""
    if isinstance(exc, (InvalidInput, NotFound, DuplicateConflict, GeneratorExit)):
        return 4
    if isinstance(exc, VnaError):
        return 8
    return 12


_second: tuple[int, str] = (-1, "")


def _now_iso() -> str:
    """The current UTC time as ``2026-11-28T03:42:13.123456Z`` (the text up to the second is formatted once a second)."""
    global _second
    sec, frac = divmod(time.time_ns() // 1000, 1_000_000)
    cached = _second
    if cached[0] != sec:
        cached = _second = (sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)))
    return f"{cached[1]}.{frac:06d}Z"


def _unique(values: Iterable[str]) -> list[str]:
    """The non-empty values, sorted, without repeats, at most _MAX_LIST of them."""
    if isinstance(values, list) and len(values) <= 1:   # the usual case: one instance's patient/study
        return [values[0]] if values and values[0] else []
    return sorted({v for v in values if v})[:_MAX_LIST]


class _Syslog:
    """RFC 5424 messages to one collector over UDP (RFC 5426) or TCP (RFC 6587 octet counting)."""

    def __init__(self, host: str, port: int, protocol: str, timeout: float = 2.0) -> None:
        self.host, self.port, self.protocol, self.timeout = host, port, protocol, timeout
        self._sock: socket.socket | None = None

    def _connect(self) -> socket.socket:
        if self._sock is None:
            if self.protocol == "tcp":
                self._sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
            else:
                info = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_DGRAM)[0]
                sock = socket.socket(info[0], socket.SOCK_DGRAM)
                sock.settimeout(self.timeout)
                sock.connect(info[4])
                self._sock = sock
        return self._sock

    @staticmethod
    def message(rec: Mapping[str, Any]) -> bytes:
        """One RFC 5424 message: facility 13 (log audit), the record as JSON in MSG."""
        severity = 6 if rec.get("outcome") == 0 else 4
        sd = (f'[vna-audit@32473 seq="{rec.get("seq")}" event="{rec.get("event_id")}" '
              f'outcome="{rec.get("outcome")}" hash="{rec.get("hash")}"]')
        head = f"<{13 * 8 + severity}>1 {rec.get('ts')} {_HOST[:255] or '-'} vna {os.getpid()} vna-audit {sd} "
        return head.encode("ascii", "replace") + b"\xef\xbb\xbf" + canonical(rec)

    def send(self, rec: Mapping[str, Any]) -> None:
        """Send one record; raises OSError (and drops the connection) on failure."""
        msg = self.message(rec)
        try:
            sock = self._connect()
            if self.protocol == "tcp":
                sock.sendall(str(len(msg)).encode("ascii") + b" " + msg)
            else:
                sock.send(msg)
        except OSError:
            self.close()
            raise

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None


class _Operation:
    """The block of :meth:`AuditLog.operation`: yields the scope, writes its record on exit."""

    __slots__ = ("audit", "event", "action", "actor", "event_type", "scope")

    def __init__(self, audit: AuditLog, event: Code, action: str, actor: Actor, event_type: Code | None,
                 scope: AuditScope) -> None:
        self.audit, self.event, self.action, self.actor, self.event_type, self.scope = \
            audit, event, action, actor, event_type, scope

    def __enter__(self) -> AuditScope:
        return self.scope

    def __exit__(self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        scope = self.scope
        outcome = scope.ended(exc)
        try:
            self.audit.record(self.event, self.action, self.actor, outcome=outcome,
                              event_type=self.event_type, patient_ids=scope.patient_ids,
                              study_uids=scope.study_uids, details=scope.details)
        except AuditUnavailable as aexc:
            if exc is None:
                raise  # the operation succeeded but cannot be audited: its caller must know
            log.error("audit record of a failed %s by %s could not be written: %s",
                      self.event.meaning, self.actor.id, aexc)
        # None: the block's exception (if any) propagates unchanged


class AuditLog:
    """The writer of one process (thread-safe; several processes may share the file). Close it when done.

    Disabled (``audit.enabled = false``) every method is a no-op.
    """

    def __init__(self, cfg: AuditConfig, path: Path, *, source: Mapping[str, Any] | None = None,
                 telemetry: Telemetry | None = None) -> None:
        self.cfg = cfg
        self.path = path
        self.enabled = cfg.enabled
        self.source = {"host": _HOST, "pid": os.getpid(), **(source or {})}
        self._telemetry = telemetry
        self._record_keys: dict[str, SeriesKey] = {}     # event id -> its vna.audit.records series
        self._lock = threading.RLock()
        self._fd: int | None = None
        self._seq = 0
        self._hash = GENESIS
        self._size = -1                  # file size after our last write (-1: re-read the tail)
        self._pending: deque[dict[str, Any]] = deque()    # not yet in the file (buffer policy)
        self._unsent: deque[dict[str, Any]] = deque()     # in the file, not yet forwarded
        self._file_error: str | None = None
        self._sink_error: str | None = None
        self._failed_at = 0.0
        self._last_alarm = 0.0
        self._last_probe = 0.0
        self._space_checked = 0.0
        self._space_error: str | None = None
        self._dirty = False
        self._torn: int = 0              # bytes of a torn last line removed (reported in the next record)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._syslog = (_Syslog(cfg.syslog_host, cfg.syslog_port, cfg.syslog_protocol)
                        if self.enabled and cfg.syslog_host else None)
        if not self.enabled:
            return
        try:
            self._open()
        except OSError as exc:
            self._mark_failed("file", exc)
        if telemetry is not None:
            telemetry.gauge("vna.audit.healthy", "1", "1 while the audit trail is written and forwarded",
                            lambda: [(1.0 if self.healthy else 0.0, {})])
            telemetry.gauge("vna.audit.buffered", "{record}", "audit records held in memory (not yet written "
                            "or forwarded)", lambda: [(float(len(self._pending) + len(self._unsent)), {})])
        self._thread = threading.Thread(target=self._background, name="vna-audit", daemon=True)
        self._thread.start()

    @classmethod
    def disabled(cls) -> "AuditLog":
        """A writer that records nothing (services built without an archive)."""
        return cls(AuditConfig(enabled=False), Path(os.devnull))

    # -- state ------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        """False while records cannot be written or forwarded (an alarm for health checks)."""
        return not self.enabled or (self._file_error is None and self._sink_error is None
                                    and not self._pending and not self._unsent)

    def status(self) -> dict[str, Any]:
        """Health details: policy, errors, records held in memory, last sequence number written."""
        return {"enabled": self.enabled, "healthy": self.healthy, "policy": self.cfg.on_failure,
                "path": str(self.path), "file_error": self._file_error, "forward_error": self._sink_error,
                "buffered": len(self._pending), "unforwarded": len(self._unsent), "last_seq": self._seq}

    # -- the API used by services and front-ends -----------------------------------------
    def require(self) -> None:
        """Raise AuditUnavailable if an operation must be refused now (call before touching anything).

        Under ``refuse``: while writing or forwarding fails (recovery is probed
        at most once a second) or the audit filesystem is below ``min_free_mb``.
        Under ``buffer``: only when the buffer is full.
        """
        if not self.enabled:
            return
        refuse = self.cfg.on_failure == "refuse"
        if self._file_error is None and self._sink_error is None and not self._pending and not self._unsent:
            if refuse and self.cfg.min_free_mb:
                self._check_space()
            return
        if not refuse and len(self._pending) + len(self._unsent) < self.cfg.buffer_max:
            return
        now = time.monotonic()
        if now - self._last_probe >= _PROBE_INTERVAL:
            self._last_probe = now
            with self._lock:
                self._flush()
            if self.healthy:
                return
        raise AuditUnavailable(f"audit trail unavailable ({self._why()}); operation refused")

    def record(self, event: Code, action: str, actor: Actor, *, outcome: int = 0, event_type: Code | None = None,
               patient_ids: Iterable[str] = (), study_uids: Iterable[str] = (),
               details: Mapping[str, Any] | None = None) -> None:
        """Append one record. Raises AuditUnavailable if it can be neither written nor buffered."""
        if not self.enabled:
            return
        body: dict[str, Any] = {
            "ts": _now_iso(), "event_id": event.code, "event": event.meaning, "action": action,
            "outcome": outcome, "actor": actor.as_dict(), "source": self.source,
            "patient_ids": _unique(patient_ids), "study_uids": _unique(study_uids), "details": dict(details or {}),
        }
        if event_type is not None:
            body["event_type"] = {"code": event_type.code, "meaning": event_type.meaning}
        self._submit(body)

    def operation(self, event: Code, action: str, actor: Actor, *, event_type: Code | None = None,
                  patient_ids: Iterable[str] = (), study_uids: Iterable[str] = (),
                  details: Mapping[str, Any] | None = None) -> AbstractContextManager[AuditScope]:
        """Audit the block as one operation: :meth:`require` first, one record at the end.

        The block fills the yielded scope (patients, studies, details,
        outcome). If it raises, the outcome follows :func:`outcome_for` and the
        exception propagates unchanged (a record that cannot be written then
        is logged at ERROR). If it succeeds and the record cannot be written,
        AuditUnavailable is raised: the caller answers a failure.
        """
        if not self.enabled:
            return nullcontext(AuditScope())
        self.require()
        return _Operation(self, event, action, actor, event_type,
                          AuditScope(list(patient_ids), list(study_uids), dict(details or {})))

    def close(self) -> None:
        """Stop the background thread, write what is buffered if possible, fsync, close."""
        if not self.enabled:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        with self._lock:
            self._flush()
            lost = len(self._pending) + len(self._unsent)
            if lost:
                log.error("audit: %d records still unwritten/unforwarded at shutdown (%s)", lost, self._why())
            if self._fd is not None:
                self._sync(self._fd)
                os.close(self._fd)
                self._fd = None
            if self._syslog is not None:
                self._syslog.close()

    # -- writing ----------------------------------------------------------------------
    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self._size = -1

    def _submit(self, body: dict[str, Any]) -> None:
        with self._lock:
            try:
                if self._file_error is not None or self._pending:
                    self._flush_file()
                rec = self._append(body)
            except OSError as exc:
                self._mark_failed("file", exc)
                self._hold(self._pending, body, "written")
                return
            self._forward(rec)

    def _hold(self, queue: deque[dict[str, Any]], item: dict[str, Any], what: str) -> None:
        if self.cfg.on_failure == "buffer" and len(self._pending) + len(self._unsent) < self.cfg.buffer_max:
            queue.append(item)
            return
        full = " (buffer full)" if self.cfg.on_failure == "buffer" else ""
        raise AuditUnavailable(f"audit record could not be {what}{full}: {self._why()}")

    def _append(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """Write one record at the end of the chain (lock held). Raises OSError, leaving the file as it was."""
        if self._fd is None:
            self._open()
        fd = self._fd
        assert fd is not None
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            self._sync_tail(fd)
            rec = dict(body)
            if self._torn:
                rec["details"] = {**rec.get("details", {}), "torn_tail_bytes_removed": self._torn}
            rec["seq"] = self._seq + 1
            rec["prev_hash"] = self._hash
            body_json = canonical(rec)
            digest = hashlib.sha256(body_json).hexdigest()
            rec["hash"] = digest
            line = body_json[:-1] + b',"hash":"' + digest.encode("ascii") + b'"}\n'   # the hash last
            start = max(self._size, 0)
            try:
                n = os.write(fd, line)
                if n != len(line):
                    raise OSError(errno.ENOSPC, f"short write to the audit log ({n} of {len(line)} bytes)")
                if self.cfg.fsync and self.cfg.fsync_interval == 0:
                    os.fdatasync(fd)
            except OSError:
                try:
                    os.ftruncate(fd, start)   # no partial record left behind
                except OSError:
                    pass
                self._size = -1
                raise
            self._size = start + n
            self._seq += 1
            self._hash = digest
            self._torn = 0
            self._dirty = True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
        if self._telemetry is not None:
            key = self._record_keys.get(body["event_id"])
            if key is None:
                key = self._record_keys.setdefault(body["event_id"], (("event_id", body["event_id"]),))
            self._telemetry.audit_records.add_key(1, key)
        return rec

    def _sync_tail(self, fd: int) -> None:
        """Learn the last record's seq and hash if another process appended (flock held)."""
        size = os.fstat(fd).st_size
        if size == self._size:
            return
        if size == 0:
            self._seq, self._hash, self._size = 0, GENESIS, 0
            return
        chunk = 65536
        pos = size
        tail = b""
        while pos > 0:
            step = min(chunk, pos)
            pos -= step
            tail = os.pread(fd, step, pos) + tail
            if tail.count(b"\n") >= 2 or (pos == 0):
                break
        if not tail.endswith(b"\n"):
            # a record torn by a crash mid-write: remove it; the next record says so
            cut = tail.rfind(b"\n") + 1
            torn = len(tail) - cut
            os.ftruncate(fd, size - torn)
            log.error("audit: removed a torn record of %d bytes at the end of %s", torn, self.path)
            self._torn += torn
            size -= torn
            tail = tail[:cut]
            if size == 0:
                self._seq, self._hash, self._size = 0, GENESIS, 0
                return
        last = tail[:-1].rsplit(b"\n", 1)[-1]
        try:
            rec = json.loads(last)
            self._seq, self._hash = int(rec["seq"]), str(rec["hash"])
        except (ValueError, KeyError, TypeError):
            # not a record (verify reports it); chain onto its bytes so that nothing after it can hide it
            log.error("audit: the last line of %s is not a record; chaining onto its digest", self.path)
            with open(self.path, "rb") as fh:
                lines = sum(1 for _ in fh)
            self._seq, self._hash = lines, hashlib.sha256(last).hexdigest()
        self._size = size

    def _flush_file(self) -> None:
        """Write the recovery alert and the buffered records (lock held). Raises OSError if still failing."""
        if self._file_error is not None:
            since = datetime.fromtimestamp(self._failed_at, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            alert = {
                "ts": _now_iso(), "event_id": SECURITY_ALERT.code, "event": SECURITY_ALERT.meaning, "action": "E",
                "outcome": 0, "actor": Actor.process("vna-audit").as_dict(), "source": self.source,
                "patient_ids": [], "study_uids": [],
                "details": {"failed_since": since, "error": self._file_error, "buffered": len(self._pending)},
                "event_type": {"code": AUDIT_RECORDING_STARTED.code, "meaning": AUDIT_RECORDING_STARTED.meaning},
            }
            rec = self._append(alert)
            log.warning("audit trail writable again after %.0f s (%d buffered records follow)",
                        time.time() - self._failed_at, len(self._pending))
            self._file_error = None
            self._forward(rec, quiet=True)
        while self._pending:
            body = self._pending[0]
            rec = self._append(body)
            self._pending.popleft()
            self._forward(rec, quiet=True)

    def _forward(self, rec: dict[str, Any], quiet: bool = False) -> None:
        """Send a written record to the collector, keeping order (lock held)."""
        if self._syslog is None:
            return
        self._unsent.append(rec)
        if len(self._unsent) > self.cfg.buffer_max:
            old = self._unsent.popleft()
            log.error("audit: record %s not forwarded to %s:%d (held too long; it is in the local trail)",
                      old.get("seq"), self.cfg.syslog_host, self.cfg.syslog_port)
        try:
            self._flush_sink()
        except OSError as exc:
            self._mark_failed("forward", exc)
            if quiet:
                return
            if self.cfg.on_failure == "refuse" or len(self._pending) + len(self._unsent) > self.cfg.buffer_max:
                # the record is in the local trail; the collector gets it once reachable
                raise AuditUnavailable(f"audit record {rec['seq']} could not be forwarded: {exc}") from None

    def _flush_sink(self) -> None:
        assert self._syslog is not None
        while self._unsent:
            self._syslog.send(self._unsent[0])
            self._unsent.popleft()
        if self._sink_error is not None:
            log.warning("audit collector %s:%d reachable again", self.cfg.syslog_host, self.cfg.syslog_port)
            self._sink_error = None

    def _flush(self) -> None:
        """Try to write and forward everything held (lock held); failures only update the state."""
        try:
            if self._file_error is not None or self._pending:
                self._flush_file()
        except OSError as exc:
            self._mark_failed("file", exc)
        if self._syslog is not None and (self._unsent or self._sink_error is not None):
            if not self._unsent:
                try:
                    self._syslog.close()
                    self._syslog._connect()  # probe
                    self._sink_error = None
                except OSError as exc:
                    self._mark_failed("forward", exc)
                return
            try:
                self._flush_sink()
            except OSError as exc:
                self._mark_failed("forward", exc)

    def _mark_failed(self, sink: str, exc: OSError) -> None:
        first = self._file_error is None and self._sink_error is None
        text = f"{exc.strerror or exc}" if isinstance(exc, OSError) else str(exc)
        if sink == "file":
            self._file_error = f"{self.path}: {text}"
        else:
            self._sink_error = f"{self.cfg.syslog_host}:{self.cfg.syslog_port}: {text}"
        if self._telemetry is not None:
            self._telemetry.audit_failures.add(1, {"sink": sink})
        now = time.time()
        if first:
            self._failed_at = now
        if first or now - self._last_alarm >= _ALARM_INTERVAL:
            self._last_alarm = now
            log.error("AUDIT TRAIL FAILING (%s): policy %s, %d records held in memory; %s",
                      self._why(), self.cfg.on_failure, len(self._pending) + len(self._unsent),
                      "operations are refused" if self.cfg.on_failure == "refuse" else
                      f"operations continue until {self.cfg.buffer_max} records are held")

    def _why(self) -> str:
        return "; ".join(e for e in (self._file_error, self._sink_error, self._space_error) if e) or "unknown"

    def _check_space(self) -> None:
        now = time.monotonic()
        if now - self._space_checked >= _PROBE_INTERVAL:
            self._space_checked = now
            try:
                st = os.statvfs(self.path.parent)
                free = st.f_bavail * st.f_frsize
            except OSError as exc:
                self._space_error = f"{self.path.parent}: {exc.strerror}"
            else:
                if free < self.cfg.min_free_mb * 1024 * 1024:
                    self._space_error = (f"{self.path.parent} has {free // (1024 * 1024)} MiB free, "
                                         f"below audit.min_free_mb = {self.cfg.min_free_mb}")
                    log.error("audit: %s; operations are refused", self._space_error)
                else:
                    self._space_error = None
        if self._space_error is not None:
            raise AuditUnavailable(f"audit trail unavailable ({self._space_error}); operation refused")

    def _sync(self, fd: int) -> None:
        if not self.cfg.fsync:
            return
        try:
            os.fdatasync(fd)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EROFS):   # not a syncable file (a device)
                log.error("audit: fsync of %s failed: %s", self.path, exc)

    def _background(self) -> None:
        """Batched fsync and retries of held records."""
        interval = min(self.cfg.fsync_interval or 1.0, 1.0)
        last_sync = time.monotonic()
        while not self._stop.wait(interval):
            fd = None
            with self._lock:
                if self._file_error is not None or self._pending or self._unsent or self._sink_error is not None:
                    self._flush()
                if self._dirty and self.cfg.fsync_interval > 0 and \
                        time.monotonic() - last_sync >= self.cfg.fsync_interval:
                    self._dirty = False
                    fd = self._fd
            if fd is not None:
                self._sync(fd)
                last_sync = time.monotonic()


# -- reading -----------------------------------------------------------------------------

@dataclass(frozen=True)
class VerifyResult:
    """The outcome of :func:`verify`. ``first_bad_seq``: the sequence number where the chain breaks."""

    intact: bool
    records: int
    head_seq: int = 0
    head_hash: str = GENESIS
    first_bad_seq: int | None = None
    line: int | None = None
    reason: str = ""
    incomplete_tail: bool = False

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"intact": self.intact, "records": self.records, "head_seq": self.head_seq,
                "head_hash": self.head_hash, "first_bad_seq": self.first_bad_seq, "line": self.line,
                "reason": self.reason, "incomplete_tail": self.incomplete_tail}


def _lines(path: Path) -> Iterator[tuple[int, bytes, bool]]:
    """(line number, bytes without newline, complete) for every line of the file."""
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            yield n, raw.rstrip(b"\n"), raw.endswith(b"\n")


def verify(path: Path) -> VerifyResult:
    """Check every record's hash, sequence and link to the previous one.

    Detects an edited record (its hash), a removed or inserted one (the next
    sequence number or ``prev_hash``) and a line that is not a record. A last
    line without its newline is a write in progress (or a crash): reported,
    not counted as tampering. Removing records from the *end* leaves a valid
    shorter chain: compare ``head_seq``/``head_hash`` with a copy kept
    elsewhere (the syslog collector). Raises OSError if the file cannot be read.
    """
    seq, prev, records = 0, GENESIS, 0
    for n, raw, complete in _lines(path):
        if not complete:
            return VerifyResult(True, records, seq, prev, incomplete_tail=True,
                                reason=f"line {n} is incomplete (a write in progress, or a crash)")
        expected = seq + 1
        try:
            rec = json.loads(raw)
            if not isinstance(rec, dict):
                raise ValueError("not an object")
            got_seq, got_hash, got_prev = int(rec["seq"]), str(rec["hash"]), str(rec["prev_hash"])
        except (ValueError, KeyError, TypeError):
            return VerifyResult(False, records, seq, prev, expected, n, f"line {n} is not an audit record")
        if got_seq != expected:
            what = "missing" if got_seq > expected else "out of order or duplicated"
            return VerifyResult(False, records, seq, prev, expected, n,
                                f"line {n} has seq {got_seq}, expected {expected}: record(s) {what}")
        if got_prev != prev:
            return VerifyResult(False, records, seq, prev, got_seq, n,
                                f"seq {got_seq}: prev_hash does not match record {seq} (a record was removed, "
                                "inserted or rewritten before it)")
        if record_hash(rec) != got_hash:
            return VerifyResult(False, records, seq, prev, got_seq, n, f"seq {got_seq}: content does not match "
                                "its hash (the record was edited)")
        seq, prev, records = got_seq, got_hash, records + 1
    return VerifyResult(True, records, seq, prev)


def iter_records(path: Path) -> Iterator[dict[str, Any]]:
    """Every complete, parsable record in file order (use :func:`verify` to trust them)."""
    for _n, raw, complete in _lines(path):
        if not complete:
            return
        try:
            rec = json.loads(raw)
        except ValueError:
            continue
        if isinstance(rec, dict):
            yield rec


def _names_patient(recorded: Iterable[str], patient: str) -> bool:
    """``patient`` is one of ``recorded``, or the PatientID of one recorded as ``ID^^^Issuer``."""
    return any(p == patient or p.partition("^^^")[0] == patient for p in recorded)


def search(path: Path, *, patient: str | None = None, study: str | None = None, actor: str | None = None,
           since: str | None = None, until: str | None = None, event: str | None = None) -> Iterator[dict[str, Any]]:
    """Records matching every given filter.

    ``patient``/``study``: exact match against any listed id/UID (a bare PatientID also
    matches the ``ID^^^Issuer`` entries of every domain); ``actor``:
    the actor id (case-insensitive) or its address; ``since``/``until``:
    inclusive bounds on ``ts`` (ISO 8601 strings in UTC, compared as text, so
    a date matches from its start); ``event``: an event id ("110104") or a
    word of its name ("query", case-insensitive).
    """
    ev = event.lower() if event else None
    who = actor.lower() if actor else None
    for rec in iter_records(path):
        if patient is not None and not _names_patient(rec.get("patient_ids", ()), patient):
            continue
        if study is not None and study not in rec.get("study_uids", ()):
            continue
        a = rec.get("actor") or {}
        if who is not None and who not in (str(a.get("id", "")).lower(), str(a.get("address", "")).lower()):
            continue
        ts = str(rec.get("ts", ""))
        if since is not None and ts < since:
            continue
        if until is not None and ts[:len(until)] > until:
            continue
        if ev is not None and ev != str(rec.get("event_id")) and ev not in str(rec.get("event", "")).lower():
            continue
        yield rec
