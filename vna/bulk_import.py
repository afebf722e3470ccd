"""``vna store``: bulk import of Part 10 files — parallel, resumable, with progress, a report; DICOMDIR understood.

Every file goes through the one ingest path (:meth:`vna.services.ingest.Ingest.ingest_file`); a file counts
stored only once ingest returned (W verified copies, indexed). ``jobs`` threads ingest concurrently.

Resumable: each import records in a journal (SQLite) one row per file stored or found duplicate —
written after ingest returned, never before — with the file's absolute path, size and mtime and the SOP
Instance UID and content digest ingest answered. A run that examined every file without a failure deletes its
journal; a run that was killed, interrupted or had failures keeps it, and the next run over the same paths
skips each file recorded done whose size and mtime are unchanged and whose instance the index still holds with
the recorded digest. Everything else is sent again (ingest is idempotent: a re-send is a duplicate). A record
lost with the tail of the journal (power loss) only means that file is sent again.

DICOMDIR: a file named ``DICOMDIR`` (any case), given or found in a directory, is read (``pydicom.dcmread``,
its Directory Record Sequence) and the files it references are imported, whatever their names, resolved
case-insensitively (CD file systems). The DICOMDIR itself is not imported. Files under its directory that it
does not reference are imported when they are Part 10 files and otherwise *ignored* (the viewer on a patient
CD), not failed.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import logging
import os
import queue
import re
import signal
import sqlite3
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Iterator, Sequence

from vna.dicom.status import (
    CANNOT_UNDERSTAND,
    DUPLICATE_SOP_INSTANCE,
    INVALID_UID,
    OUT_OF_RESOURCES,
    status_for,
)
from vna.errors import VnaError
from vna.progress import ProgressDisplay

if TYPE_CHECKING:
    from vna.archive import Archive
    from vna.config import Config

__all__ = ["ImportJournal", "ImportReport", "ImportItem", "BulkImport", "import_items", "default_jobs",
           "journal_path", "failure_reason"]

log = logging.getLogger(__name__)

#: failed (and ignored) files the report lists one by one; past it they are only counted
LISTED = 100_000

#: a Part 10 file starts with a 128-byte preamble and "DICM"
_PART10_HEADER = 132

#: the DIMSE status categories of PS3.4 Annex B for the statuses a store can fail with
_CATEGORY = {
    OUT_OF_RESOURCES: "Refused: Out of Resources",
    CANNOT_UNDERSTAND: "Error: Cannot understand",
    INVALID_UID: "Error: Cannot understand",
    DUPLICATE_SOP_INSTANCE: "Failure: Duplicate SOP Instance",
}


def default_jobs() -> int:
    """Threads ingesting at once by default: twice the CPUs, from 4 to 8 (ingest waits on the fsync of W copies
    more than on the CPU)."""
    return max(4, min(8, 2 * (os.cpu_count() or 1)))


# -- what to import ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImportItem:
    """One file to import. ``listed_by``: the DICOMDIR that references it; ``unlisted``: under a DICOMDIR's
    directory but not referenced (ignored unless a Part 10 file); ``error``: why it cannot even be tried."""

    path: Path
    listed_by: Path | None = None
    unlisted: bool = False
    error: str = ""


def _is_dicomdir(name: str) -> bool:
    return name.casefold() in ("dicomdir", "dicomdir.", "dicomdir;1")


def _cd_name(name: str) -> str:
    """A file name as an ISO 9660 CD may spell it: any case, with a ``;1`` version or a trailing dot."""
    n = name.casefold()
    if n.endswith(";1"):
        n = n[:-2]
    return n.rstrip(".")


def _resolve_case(root: Path, parts: Sequence[str], listings: dict[Path, dict[str, str]]) -> Path:
    """``root/parts...``, each component matched case-insensitively when not found as spelled
    (``listings``: the directories listed so far, by CD name)."""
    p = root
    for part in parts:
        exact = p / part
        if exact.exists() or not p.is_dir():
            p = exact
            continue
        if p not in listings:
            try:
                listings[p] = {_cd_name(e): e for e in sorted(os.listdir(p), reverse=True)}
            except OSError:
                listings[p] = {}
        p = p / listings[p].get(_cd_name(part), part)
    return p


def read_dicomdir(dicomdir: Path) -> list[ImportItem]:
    """The files a DICOMDIR references (in record order, each once), or one item saying why it cannot be read."""
    from pydicom import dcmread

    root = dicomdir.parent
    try:
        ds = dcmread(dicomdir)
        if "DirectoryRecordSequence" not in ds:
            return [ImportItem(dicomdir, error="not a readable DICOMDIR: it has no Directory Record Sequence")]
        records = ds.DirectoryRecordSequence
    except Exception as exc:  # pydicom raises many kinds on a damaged file: this one is reported failed
        reason = (exc.strerror or str(exc)).lower() if isinstance(exc, OSError) else str(exc)
        return [ImportItem(dicomdir, error=f"not a readable DICOMDIR: {_plain(reason)}")]
    items: list[ImportItem] = []
    seen: set[Path] = set()
    listings: dict[Path, dict[str, str]] = {}
    for rec in records:
        fid = rec.get("ReferencedFileID")
        if not fid:
            continue
        parts = [str(fid)] if isinstance(fid, str) else [str(x) for x in fid]
        if any(p in ("", ".", "..") or "/" in p or "\\" in p for p in parts):
            shown = "\\".join(parts)
            items.append(ImportItem(root / "/".join(parts), listed_by=dicomdir,
                                    error=f"the DICOMDIR references {shown!r}, outside its directory"))
            continue
        path = _resolve_case(root, parts, listings)
        if path not in seen:
            seen.add(path)
            items.append(ImportItem(path, listed_by=dicomdir))
    return items


def import_items(paths: Sequence[str]) -> Iterator[ImportItem]:
    """The files named, directories walked in name order, DICOMDIRs expanded (a missing path is yielded as is).

    Memory: the files referenced by the DICOMDIRs met, not the whole tree.
    """
    for name in paths:
        p = Path(name)
        if p.is_dir():
            yield from _walk(p)
        elif _is_dicomdir(p.name) and p.is_file():
            yield from read_dicomdir(p)
        else:
            yield ImportItem(p)


def _walk(top: Path) -> Iterator[ImportItem]:
    listed: set[Path] = set()
    file_sets: list[str] = []  # directories holding a DICOMDIR (with a trailing separator)
    errors: list[OSError] = []
    for dirpath, dirnames, filenames in os.walk(top, onerror=errors.append):
        while errors:  # a directory that cannot be listed: one failed line, the walk goes on
            exc = errors.pop(0)
            yield ImportItem(Path(exc.filename or dirpath), error=f"directory not readable: "
                                                                 f"{(exc.strerror or str(exc)).lower()}")
        dirnames.sort()
        d = Path(dirpath)
        for f in sorted(filenames):
            if _is_dicomdir(f) and (d / f).is_file():
                for item in read_dicomdir(d / f):
                    if item.path not in listed:
                        listed.add(item.path)
                        yield item
                file_sets.append(os.path.join(dirpath, ""))
        inside = any(os.path.join(dirpath, "").startswith(root) for root in file_sets)
        for f in sorted(filenames):
            q = d / f
            if _is_dicomdir(f) or q in listed or not q.is_file():
                continue
            yield ImportItem(q, unlisted=inside)
    for exc in errors:
        yield ImportItem(Path(exc.filename or top), error=f"directory not readable: "
                                                        f"{(exc.strerror or str(exc)).lower()}")


# -- why a file was not stored ------------------------------------------------------------------------------
def _plain(text: str) -> str:
    return re.sub(r"\s*Use force=True to force reading\.?", "", text)


def _head(path: Path) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(_PART10_HEADER)
    except OSError:
        return b""


def failure_reason(path: Path, exc: Exception) -> str:
    """Why ``path`` was not stored, in words for an operator (no library hints)."""
    if isinstance(exc, OSError):
        return (exc.strerror or str(exc)).lower()
    head = _head(path)
    if len(head) < _PART10_HEADER:
        return f"truncated: {len(head)} bytes, shorter than a DICOM Part 10 header ({_PART10_HEADER} bytes)"
    if head[128:] != b"DICM":
        return "not a DICOM Part 10 file (no 'DICM' after the 128-byte preamble)"
    return _plain(str(exc))


def _status(exc: Exception | None) -> tuple[int | None, str]:
    """The DIMSE status a C-STORE of the same data would have been answered with, and its category."""
    if exc is None or isinstance(exc, OSError):
        return None, "Unreadable file"
    status = status_for(exc) if isinstance(exc, VnaError) else None
    if status is None:
        return None, "Failure: Unable to process"
    return status, _CATEGORY.get(status, "Failure: Unable to process")


# -- the journal ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Done:
    size: int
    mtime_ns: int
    sop_uid: str
    sha256: str


def journal_path(cfg: Config, paths: Sequence[str]) -> Path:
    """The default journal of an import of ``paths``: under the data dir, one per set of paths named."""
    key = "\0".join(sorted(os.path.abspath(p) for p in paths))
    return cfg.resolve("imports") / f"store-{hashlib.sha256(key.encode()).hexdigest()[:16]}.journal"


class ImportJournal:
    """What earlier runs of an import stored and what this run stores: a SQLite file, one row per file.

    Looked up one file at a time (memory does not grow with the import). Each record is committed on its
    own (WAL, ``synchronous=NORMAL``): it survives a kill -9 of this process; a power loss may lose the last
    ones, whose files are then sent again. Held under an exclusive lock (``flock``) while open: a second
    import using the same journal is refused (VnaError). ``fresh``: forget the earlier runs. Thread-safe.
    """

    def __init__(self, path: Path, paths: Sequence[str], fresh: bool = False) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lockfile = open(path.with_name(path.name + ".lock"), "a+b")
        try:
            fcntl.flock(self._lockfile, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lockfile.close()
            raise VnaError(f"another vna store is running with the import journal {path}") from None
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS import (paths TEXT NOT NULL)")
            self._db.execute("CREATE TABLE IF NOT EXISTS done (path TEXT PRIMARY KEY, size INTEGER NOT NULL,"
                             " mtime_ns INTEGER NOT NULL, sop_uid TEXT NOT NULL, sha256 TEXT NOT NULL,"
                             " run INTEGER NOT NULL)")
            if fresh:
                self._db.execute("DELETE FROM done")
            if self._db.execute("SELECT count(*) FROM import").fetchone()[0] == 0:
                self._db.execute("INSERT INTO import VALUES (?)", (json.dumps([os.path.abspath(p) for p in paths]),))
            self.earlier: int = self._db.execute("SELECT count(*) FROM done").fetchone()[0]
            self._run: int = self._db.execute("SELECT coalesce(max(run), 0) + 1 FROM done").fetchone()[0]
        except sqlite3.Error as exc:
            self._lockfile.close()
            raise VnaError(f"the import journal {path} cannot be used: {exc} (--fresh does not help: remove it, "
                           f"or name another with --journal)") from None
        self._records = self.earlier

    def done(self, key: str) -> _Done | None:
        """The record of an earlier run for the file at absolute path ``key``."""
        with self._lock:
            row = self._db.execute("SELECT size, mtime_ns, sop_uid, sha256 FROM done WHERE path = ? AND run < ?",
                                   (key, self._run)).fetchone()
        return None if row is None else _Done(int(row[0]), int(row[1]), str(row[2]), str(row[3]))

    def record(self, key: str, st: os.stat_result, sop_uid: str, sha256: str) -> None:
        """Record (committed) that the file ``key`` (``st`` taken before it was read) is stored as ``sop_uid``."""
        with self._lock:
            self._records += 1
            self._db.execute("INSERT OR REPLACE INTO done VALUES (?, ?, ?, ?, ?, ?)",
                             (key, st.st_size, st.st_mtime_ns, sop_uid, sha256, self._run))

    def close(self, complete: bool) -> None:
        """Close; ``complete`` (every file examined, none failed): delete the journal, the import is over.

        A journal recording no file is deleted too: it would skip nothing.
        """
        self._db.close()
        if complete or not self._records:
            for p in (self.path, self.path.with_name(self.path.name + "-wal"),
                      self.path.with_name(self.path.name + "-shm"), Path(self._lockfile.name)):
                p.unlink(missing_ok=True)
            try:
                self.path.parent.rmdir()  # only when no other import left its journal
            except OSError:
                pass
        self._lockfile.close()


# -- the report -----------------------------------------------------------------------------------------------
@dataclass
class ImportReport:
    """What one ``vna store`` run did; ``--report`` writes :meth:`as_dict` as JSON."""

    paths: list[str]
    journal: str
    jobs: int
    files: int = 0
    examined: int = 0
    stored: int = 0
    duplicates: int = 0
    skipped: int = 0
    bytes: int = 0
    interrupted: bool = False
    failures: int = 0
    ignores: int = 0
    #: the first LISTED failed and ignored files (the counts above count them all)
    failed: list[dict[str, Any]] = field(default_factory=list)
    ignored: list[dict[str, str]] = field(default_factory=list)
    started_at: float = field(default_factory=time.time)
    finished_at: float = 0.0

    @property
    def complete(self) -> bool:
        """Every file examined and none failed."""
        return not self.failures and not self.interrupted and self.examined >= self.files

    def summary(self) -> str:
        """The last line of ``vna store``: the counts, then what was skipped, ignored or left."""
        line = (f"{self.stored} stored, {self.duplicates} duplicate{'' if self.duplicates == 1 else 's'}, "
                f"{self.failures} failed")
        notes = []
        if self.skipped:
            notes.append(f"{self.skipped} skipped (stored by an earlier run)")
        if self.ignores:
            notes.append(f"{self.ignores} ignored (not DICOM, not referenced by the DICOMDIR)")
        if self.interrupted:
            left = f", {self.files - self.examined} of {self.files} files not examined" if self.files else ""
            notes.append(f"interrupted{left}: run again to resume")
        return "; ".join([line, *notes])

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form: totals, then one entry per failed and per ignored file."""
        return {"job": "store", "paths": self.paths, "journal": self.journal, "jobs": self.jobs,
                "started_at": self.started_at, "finished_at": self.finished_at, "interrupted": self.interrupted,
                "complete": self.complete,
                "totals": {"files": self.files, "examined": self.examined, "stored": self.stored,
                           "duplicates": self.duplicates, "skipped": self.skipped, "failed": self.failures,
                           "ignored": self.ignores, "bytes": self.bytes},
                "failed": self.failed, "ignored": self.ignored,
                "not_listed": {"failed": self.failures - len(self.failed), "ignored": self.ignores - len(self.ignored)}}


# -- the import -----------------------------------------------------------------------------------------------
class BulkImport:
    """One import of ``paths`` into ``archive`` with ``jobs`` threads; :meth:`run` returns its report.

    Per-file lines go to ``out`` (``stored|duplicate|skipped PATH SOP_UID``) and ``err`` (``failed PATH:
    reason``, ``ignored PATH: reason``), one whole line at a time.
    """

    def __init__(self, archive: Archive, paths: Sequence[str], journal: ImportJournal, jobs: int,
                 progress: ProgressDisplay, out: IO[str] = sys.stdout, err: IO[str] = sys.stderr) -> None:
        self.archive = archive
        self.paths = list(paths)
        self.journal = journal
        self.jobs = max(1, jobs)
        self.progress = progress
        self.out, self.err = out, err
        self.report = ImportReport([os.path.abspath(p) for p in paths], str(journal.path), self.jobs)
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def run(self) -> ImportReport:
        """Import every file; :meth:`stop` or a KeyboardInterrupt lets the files in flight finish and marks the
        report interrupted."""
        todo: queue.Queue[ImportItem | None] = queue.Queue(maxsize=4 * self.jobs)
        workers: list[threading.Thread] = []
        try:
            for _ in import_items(self.paths):
                if self._stop.is_set():
                    break
                self.report.files += 1
            self.progress.begin("storing files", self.report.files, "files")
            for i in range(self.jobs):
                workers.append(threading.Thread(target=self._worker, args=(todo,), name=f"vna-store-{i}",
                                                daemon=True))
                workers[-1].start()
            for item in import_items(self.paths):
                while not self._stop.is_set():
                    try:
                        todo.put(item, timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    break
        except KeyboardInterrupt:
            self._stop.set()
        finally:
            sent = 0  # one end mark per worker, whichever takes it (workers drain the queue once stopped)
            while sent < len(workers) and any(w.is_alive() for w in workers):
                try:
                    todo.put(None, timeout=0.2)
                    sent += 1
                except queue.Full:
                    continue
                except KeyboardInterrupt:
                    self._stop.set()
            for w in workers:
                while w.is_alive():
                    try:
                        w.join(0.2)
                    except KeyboardInterrupt:
                        self._stop.set()
        self.report.interrupted = self._stop.is_set() and self.report.examined < self.report.files
        self.report.finished_at = time.time()
        return self.report

    def stop(self) -> None:
        """Stop early (safe from a signal handler): the files in flight finish, no new one starts."""
        self._stop.set()

    def _worker(self, todo: queue.Queue[ImportItem | None]) -> None:
        try:
            while True:
                item = todo.get()
                if item is None:
                    return
                if self._stop.is_set():
                    continue  # drain: the run was interrupted
                try:
                    self._one(item)
                except Exception as exc:  # a defect: reported on this file, logged with its traceback
                    log.exception("store: unexpected error on %s", item.path)
                    self._failed(item, exc, f"internal error: {type(exc).__name__}: {exc}")
        finally:
            self.archive.index.release_thread()

    def _one(self, item: ImportItem) -> None:
        if item.error:
            self._failed(item, None, item.error)
            return
        try:
            st = os.stat(item.path)
        except OSError as exc:
            self._failed(item, exc, failure_reason(item.path, exc))
            return
        if item.unlisted and _head(item.path)[128:] != b"DICM":
            self._finish(item, "ignored", "not a DICOM Part 10 file, not referenced by the DICOMDIR")
            return
        key = os.path.abspath(item.path)
        before = self.journal.done(key)
        if before is not None and (before.size, before.mtime_ns) == (st.st_size, st.st_mtime_ns):
            rec = self.archive.index.get_instance(before.sop_uid)
            if rec is not None and rec.content_sha256 == before.sha256:
                self._finish(item, "skipped", before.sop_uid)
                return
        try:
            r = self.archive.ingest.ingest_file(item.path, source_ae="vna-cli")
        except (VnaError, OSError) as exc:
            self._failed(item, exc, failure_reason(item.path, exc))
            return
        self.journal.record(key, st, r.sop_uid, r.content_sha256)  # before the line saying it is stored
        self._finish(item, "duplicate" if r.duplicate else "stored", r.sop_uid, 0 if r.duplicate else r.size)

    def _failed(self, item: ImportItem, exc: Exception | None, reason: str) -> None:
        if item.listed_by is not None and not item.error:
            reason += f" (referenced by {item.listed_by})"
        status, category = _status(exc)
        entry = {"path": str(item.path), "reason": reason,
                 "dimse_status": None if status is None else f"0x{status:04X}", "category": category}
        self._finish(item, "failed", reason, entry=entry)

    def _finish(self, item: ImportItem, outcome: str, detail: str, nbytes: int = 0,
                entry: dict[str, Any] | None = None) -> None:
        with self._lock:
            r = self.report
            r.examined += 1
            if outcome == "stored":
                r.stored += 1
                r.bytes += nbytes
            elif outcome == "duplicate":
                r.duplicates += 1
            elif outcome == "skipped":
                r.skipped += 1
            elif outcome == "failed":
                r.failures += 1
                if entry is not None and len(r.failed) < LISTED:
                    r.failed.append(entry)
            elif outcome == "ignored":
                r.ignores += 1
                if len(r.ignored) < LISTED:
                    r.ignored.append({"path": str(item.path), "reason": detail})
            if outcome in ("failed", "ignored"):
                print(f"{outcome} {item.path}: {detail}", file=self.err, flush=True)
            else:
                print(f"{outcome} {item.path} {detail}", file=self.out, flush=True)
            self.progress.advance()


def store_main(args: argparse.Namespace) -> int:
    """``vna store``: exit 0 when every file is stored (or was, or is ignored), 1 if any failed or the run was
    interrupted, 2 on a usage error."""
    from vna.archive import Archive
    from vna.cli_support import load
    from vna.progress import progress_for

    if args.jobs is not None and args.jobs < 1:
        print("vna store: --jobs must be >= 1", file=sys.stderr)
        return 2
    cfg = load(args)
    if args.report:
        try:
            Path(args.report).write_text("", encoding="utf-8")  # a report that cannot be written: say so first
        except OSError as exc:
            print(f"vna store: cannot write the report {args.report}: {(exc.strerror or str(exc)).lower()}",
                  file=sys.stderr)
            return 2
    logging.getLogger("pydicom").setLevel(logging.ERROR)  # the failure line says what matters
    jpath = Path(args.journal) if args.journal else journal_path(cfg, args.paths)
    journal = ImportJournal(jpath, args.paths, fresh=args.fresh)
    if journal.earlier:
        log.info("store: resuming: %d files recorded stored in %s", journal.earlier, jpath)
    report: ImportReport | None = None
    try:
        archive = Archive(cfg)
    except BaseException:
        journal.close(complete=False)
        raise
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with warnings.catch_warnings(), progress_for("store", args) as progress:
            warnings.filterwarnings("ignore", module="pydicom")
            job = BulkImport(archive, args.paths, journal, args.jobs or default_jobs(), progress)
            signal.signal(signal.SIGTERM, lambda *_: job.stop())  # as Ctrl-C: the files in flight finish
            report = job.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
        archive.close()
        journal.close(complete=report is not None and report.complete)
    if args.report:
        Path(args.report).write_text(json.dumps(report.as_dict(), indent=2) + "\n", encoding="utf-8")
    print(report.summary(), flush=True)
    return 0 if report.complete else 1


def add_store_flags(p: argparse.ArgumentParser) -> None:
    """The flags of ``vna store`` beyond the common ones and ``--progress-every``."""
    p.add_argument("--jobs", "-j", type=int, default=None,
                   help=f"files ingested at once (default {default_jobs()}: twice the CPUs, from 4 to 8)")
    p.add_argument("--journal", default=None, metavar="PATH",
                   help="the import journal (default: under the data dir, one per set of paths): a re-run "
                        "after an interrupted or failed run skips the files it records stored")
    p.add_argument("--fresh", action="store_true", help="forget what an earlier run recorded: send every file")
    p.add_argument("--report", default=None, metavar="PATH",
                   help="write a JSON report: totals, and each failed file with its reason and DIMSE status")
