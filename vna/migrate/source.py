"""A legacy DIMSE archive as a migration source: C-FIND to enumerate, C-MOVE or C-GET to pull.

Uses pynetdicom's public API only (``AE.associate``, ``send_c_find``,
``send_c_move``, ``send_c_get``, ``evt.EVT_C_STORE``). Each thread keeps one
association for its C-FINDs and C-MOVEs (set up once, not per study), so
workers on several threads pull at once; a C-GET has its own association.
"""

from __future__ import annotations

import datetime as dt
import logging
import string
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.multival import MultiValue
from pynetdicom import AE, StoragePresentationContexts, build_role, evt
from pynetdicom.dimse_messages import C_FIND_RSP
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from vna.config import MigrateSource
from vna.dicom.commitment import nodelay
from vna.errors import VnaError

__all__ = ["SourceError", "FoundStudy", "PullResult", "DimseSource", "Window"]

log = logging.getLogger(__name__)

_PENDING = (0xFF00, 0xFF01)
#: final C-FIND statuses that mean "answers were cut short": split the window and ask again
_CAPPED = (0xA700, 0xB000, 0x0001, 0xFE00)  # 0xFE00: Orthanc at LimitFindResults


class SourceError(VnaError):
    """The source did not answer, or refused: ``status`` is its DIMSE status (-1: no answer)."""

    def __init__(self, message: str, status: int = -1, comment: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.comment = comment


#: characters a PatientID prefix is extended with when one minute of one day is still cut short: letters,
#: digits and punctuation no server reads as a wildcard (Orthanc matches with SQL LIKE: '%' and '_')
PID_CHARS = string.digits + string.ascii_uppercase + string.ascii_lowercase + "-.+/^#=,:;()"


@dataclass(frozen=True)
class Window:
    """A StudyDate range (inclusive), narrowed to a StudyTime range in minutes of one day, then to
    PatientIDs starting with ``pid_prefix`` (``by_pid``)."""

    start: dt.date
    end: dt.date
    minute_from: int = 0
    minute_to: int = 24 * 60 - 1
    by_pid: bool = False
    pid_prefix: str = ""
    pid_exact: bool = False

    def keys(self) -> tuple[str, str, str | None]:
        """(StudyDate, StudyTime, PatientID or None) matching values."""
        d0, d1 = self.start.strftime("%Y%m%d"), self.end.strftime("%Y%m%d")
        date = d0 if d0 == d1 else f"{d0}-{d1}"
        pid = (self.pid_prefix if self.pid_exact else f"{self.pid_prefix}*") if self.by_pid else None
        if (self.minute_from, self.minute_to) == (0, 24 * 60 - 1):
            return date, "", pid
        t0 = f"{self.minute_from // 60:02d}{self.minute_from % 60:02d}00"
        t1 = f"{self.minute_to // 60:02d}{self.minute_to % 60:02d}59"
        return date, f"{t0}-{t1}", pid

    def split(self) -> list[Window] | None:
        """Smaller windows covering this one (by date, then time of day, then PatientID prefix), or None.

        A study whose PatientID is empty or holds a character outside PID_CHARS is not found by
        the PatientID split: it is used only when one minute of one day is still cut short.
        """
        if self.start < self.end:
            mid = self.start + (self.end - self.start) // 2
            return [Window(self.start, mid), Window(mid + dt.timedelta(days=1), self.end)]
        if self.minute_from < self.minute_to:
            minute = (self.minute_from + self.minute_to) // 2
            return [Window(self.start, self.end, self.minute_from, minute),
                    Window(self.start, self.end, minute + 1, self.minute_to)]
        if self.pid_exact or len(self.pid_prefix) >= 64:
            return None
        same = (self.start, self.end, self.minute_from, self.minute_to, True)
        exact = [Window(*same, self.pid_prefix, True)] if self.pid_prefix else []
        return exact + [Window(*same, self.pid_prefix + c) for c in PID_CHARS]


@dataclass
class FoundStudy:
    """A study the source listed, with the counts its STUDY keys gave (-1: not given)."""

    study_uid: str
    study_date: str
    series: int = -1
    instances: int = -1


@dataclass
class PullResult:
    """The end of a C-MOVE/C-GET: final status, comment, failed SOP Instance UIDs, sub-operations done."""

    status: int
    comment: str = ""
    failed: list[str] = field(default_factory=list)
    completed: int = 0
    bytes: int = 0


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1


class _Received:
    """C-FIND responses that reached one association, counted as pynetdicom decodes them (EVT_DIMSE_RECV,
    on the association's own thread), whether or not they are then delivered to the request."""

    def __init__(self) -> None:
        self.find = 0

    def on_recv(self, event: Any) -> None:
        if isinstance(event.message, C_FIND_RSP):
            self.find += 1


def _status_of(status: Dataset) -> tuple[int, str]:
    if "Status" not in status:
        return -1, "no answer (association aborted or timed out)"
    return int(status.Status), str(status.get("ErrorComment", "") or "")


class DimseSource:
    """Queries and pulls from one configured source; ``calling_ae`` is vna's own AE title."""

    def __init__(self, src: MigrateSource, calling_ae: str) -> None:
        self.src = src
        self.calling_ae = calling_ae
        self.find_queries = 0
        self._local = threading.local()

    def _ae(self) -> AE:
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.src.timeout
        return ae

    def _assoc(self, ae: AE, **kwargs: Any) -> Any:
        """An established association with the source, Nagle off (a request's command and identifier are
        separate writes: with Nagle on, each waits for the peer's delayed ACK)."""
        handlers = [(evt.EVT_CONN_OPEN, nodelay), *kwargs.pop("evt_handlers", [])]
        assoc = ae.associate(self.src.host, self.src.port, ae_title=self.src.ae_title, evt_handlers=handlers,
                             **kwargs)
        if not assoc.is_established:
            raise SourceError(f"source {self.src.ae_title}: association not established "
                              f"({self.src.host}:{self.src.port})")
        return assoc

    def _kept(self) -> tuple[Any, bool]:
        """This thread's kept association (C-FIND and C-MOVE contexts): (association, reused)."""
        assoc: Any = getattr(self._local, "assoc", None)
        if assoc is not None and assoc.is_established:
            return assoc, True
        self.close()
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)  # a C-GET source may refuse it
        received = _Received()
        assoc = self._assoc(ae, evt_handlers=[(evt.EVT_DIMSE_RECV, received.on_recv)])
        self._local.assoc, self._local.received = assoc, received
        return assoc, False

    # -- C-FIND -------------------------------------------------------------------
    def find(self, identifier: Dataset) -> tuple[list[Dataset], int, str]:
        """One C-FIND (Study Root): (answers, final status, comment); status -1 when cut off.

        Runs on this thread's kept association (see :meth:`close`); a kept association that no
        longer answers is replaced once. When more responses reached the association than the
        request was given (pynetdicom's reactor can take a response that arrives while the request
        is being sent, and drops it), the answers are incomplete: the query is asked again on a
        new association, and SourceError is raised if that keeps happening.
        """
        for attempt in range(1, 5):
            assoc, reused = self._kept()
            received: _Received = self._local.received
            before = received.find
            self.find_queries += 1
            answers: list[Dataset] = []
            seen = 0
            final, comment = -1, "no final response"
            for status, ident in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind):
                code, comment = _status_of(status)
                seen += code != -1
                if code in _PENDING:
                    if ident is not None:
                        answers.append(ident)
                    continue
                final = code
            if received.find - before > seen:
                log.warning("source %s: %d C-FIND responses reached the association, %d were delivered: "
                            "asking again", self.src.ae_title, received.find - before, seen)
                self.close()
                continue
            if final == -1:
                self.close()
                if reused and attempt == 1 and not answers:
                    continue
            return answers, final, comment
        raise SourceError(f"source {self.src.ae_title}: C-FIND responses were lost on every attempt")

    def close(self) -> None:
        """Release this thread's kept association."""
        assoc = getattr(self._local, "assoc", None)
        self._local.assoc = None
        if assoc is not None:
            if assoc.is_established:
                assoc.release()
            else:
                assoc.abort()

    def _find_window(self, w: Window) -> tuple[list[Dataset], bool]:
        """Answers of one window, and whether the source cut them short."""
        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.StudyInstanceUID = ""
        q.StudyDate, q.StudyTime, pid = w.keys()
        if pid is not None:
            q.PatientID = pid
        q.NumberOfStudyRelatedSeries = ""
        q.NumberOfStudyRelatedInstances = ""
        answers, status, comment = self.find(q)
        if status == 0x0000:
            capped = bool(self.src.find_limit) and len(answers) >= self.src.find_limit
            return answers, capped
        if status in _CAPPED or status == -1:
            return answers, True
        raise SourceError(f"source {self.src.ae_title}: C-FIND failed with status 0x{status:04X}", status, comment)

    def _try(self, w: Window) -> tuple[list[Dataset], bool]:
        try:
            return self._find_window(w)
        except SourceError as exc:
            if exc.status != -1:
                raise
            return [], True  # no association or no answer: smaller windows may answer

    def _drill(self, w: Window) -> Iterator[Dataset]:
        """Answers of a window, split (date, time, PatientID) until each part is answered in full."""
        todo = [w]
        while todo:
            w = todo.pop()
            answers, capped = self._try(w)
            if capped:
                parts = w.split()
                if not parts:
                    raise SourceError(f"source {self.src.ae_title}: C-FIND of {w.keys()} is cut short even for "
                                      "one minute and one PatientID")
                log.info("source %s: window %s cut short after %d answers, splitting", self.src.ae_title,
                         w.keys(), len(answers))
                todo.extend(reversed(parts))
                continue
            yield from answers

    def studies(self, start: dt.date, end: dt.date) -> Iterator[FoundStudy]:
        """Every study with a StudyDate in [start, end], in date windows sized to stay under the source's cap.

        Windows walk forward in date order; one cut short is halved and asked again, the next one is
        sized from the density of the last (at most half the cap expected). A single day still cut
        short is split by time of day, then PatientID. Raises SourceError when nothing splits further.
        """
        seen: set[str] = set()
        cap = self.src.find_limit
        cur, size = start, (end - start).days + 1
        while cur <= end:
            last = cur + dt.timedelta(days=min(size, (end - cur).days + 1) - 1)
            w = Window(cur, last)
            answers, capped = self._try(w)
            if capped and size > 1:
                cap = max(cap, len(answers))
                log.info("source %s: window %s cut short after %d answers, halving", self.src.ae_title, w.keys(),
                         len(answers))
                size = max(1, ((last - cur).days + 1) // 2)
                continue
            if capped:
                answers = list(self._drill(w))
            for a in answers:
                uid = str(a.get("StudyInstanceUID", "") or "")
                if not uid or uid in seen:
                    continue
                seen.add(uid)
                yield FoundStudy(uid, str(a.get("StudyDate", "") or ""), _int(a.get("NumberOfStudyRelatedSeries")),
                                 _int(a.get("NumberOfStudyRelatedInstances")))
            span = (last - cur).days + 1
            cur = last + dt.timedelta(days=1)
            if not cap or not answers:
                size = span * 2
            else:
                size = max(1, min(span * 4, int(span * cap / 2 / len(answers))))

    def study_instances(self, study_uid: str) -> dict[str, tuple[str, str]]:
        """SOP Instance UID -> (Series Instance UID, SOP Class UID) of every instance the source lists."""
        q = Dataset()
        q.QueryRetrieveLevel = "SERIES"
        q.StudyInstanceUID = study_uid
        q.SeriesInstanceUID = ""
        series, status, comment = self.find(q)
        if status != 0x0000:
            raise SourceError(f"source {self.src.ae_title}: SERIES C-FIND failed (0x{status & 0xFFFF:04X})",
                              status, comment)
        out: dict[str, tuple[str, str]] = {}
        for s in series:
            series_uid = str(s.get("SeriesInstanceUID", "") or "")
            q = Dataset()
            q.QueryRetrieveLevel = "IMAGE"
            q.StudyInstanceUID = study_uid
            q.SeriesInstanceUID = series_uid
            q.SOPInstanceUID = ""
            q.SOPClassUID = ""
            images, status, comment = self.find(q)
            if status != 0x0000:
                raise SourceError(f"source {self.src.ae_title}: IMAGE C-FIND failed (0x{status & 0xFFFF:04X})",
                                  status, comment)
            for i in images:
                sop = str(i.get("SOPInstanceUID", "") or "")
                if sop:
                    out[sop] = (series_uid, str(i.get("SOPClassUID", "") or ""))
        return out

    # -- C-MOVE / C-GET --------------------------------------------------------------
    @staticmethod
    def _identifier(study_uid: str, series_uid: str = "", sops: list[str] | None = None) -> Dataset:
        q = Dataset()
        q.StudyInstanceUID = study_uid
        if sops:
            q.QueryRetrieveLevel = "IMAGE"
            q.SeriesInstanceUID = series_uid
            q.SOPInstanceUID = sops
        else:
            q.QueryRetrieveLevel = "STUDY"
        return q

    @staticmethod
    def _final(responses: Iterator[tuple[Dataset, Dataset | None]]) -> PullResult:
        result = PullResult(status=-1, comment="no final response")
        for status, ident in responses:
            code, comment = _status_of(status)
            result.completed = max(result.completed, _int(status.get("NumberOfCompletedSuboperations", 0)))
            if code in _PENDING:
                continue
            result.status, result.comment = code, comment
            if ident is not None and "FailedSOPInstanceUIDList" in ident:
                value = ident.FailedSOPInstanceUIDList
                values = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
                result.failed = [str(v) for v in values if v]
        return result

    def move(self, destination: str, study_uid: str, series_uid: str = "",
             sops: list[str] | None = None) -> PullResult:
        """C-MOVE the study (or these SOP instances of one series) to ``destination``, on this thread's
        kept association (one association per worker, set up once, not per study). A kept association
        that gives no response at all is replaced once; an answer cut off after it began is returned
        as it is (status -1)."""
        identifier = self._identifier(study_uid, series_uid, sops)
        for attempt in (1, 2):
            assoc, reused = self._kept()
            answered = [False]

            def responses() -> Iterator[tuple[Dataset, Dataset | None]]:
                for status, ident in assoc.send_c_move(identifier, destination,
                                                       StudyRootQueryRetrieveInformationModelMove):
                    answered[0] = answered[0] or "Status" in status
                    yield status, ident

            result = self._final(responses())
            if result.status == -1:
                self.close()
                if reused and attempt == 1 and not answered[0]:
                    continue
            return result
        raise AssertionError("unreachable")

    def get(self, study_uid: str, sop_classes: set[str], store: Callable[[Path, str], int],
            spool: Path, series_uid: str = "", sops: list[str] | None = None) -> PullResult:
        """C-GET the study (or these instances); each received instance is written to a Part 10 file
        under ``spool`` (as received, data set bytes untouched) and passed to ``store(path, sop_uid)``,
        whose return value is the C-STORE status."""
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        classes = sorted(c for c in sop_classes if c)[:100]
        if not classes or "" in sop_classes:  # the source did not say: offer the common storage classes
            common = [str(cx.abstract_syntax) for cx in StoragePresentationContexts]
            classes = (classes + [c for c in common if c not in classes])[:120]
        for c in classes:
            ae.add_requested_context(c)
        roles = [build_role(c, scp_role=True) for c in classes]
        received = {"bytes": 0}

        def on_store(event: Any) -> int:
            sop_uid = str(event.request.AffectedSOPInstanceUID)
            data = event.request.DataSet.getvalue()
            with tempfile.NamedTemporaryFile(dir=spool, suffix=".dcm", delete=False) as fh:
                meta = DicomBytesIO()
                write_file_meta_info(meta, event.file_meta)
                fh.write(b"\x00" * 128 + b"DICM" + meta.getvalue() + data)
                path = Path(fh.name)
            try:
                received["bytes"] += len(data)
                return store(path, sop_uid)
            finally:
                path.unlink(missing_ok=True)

        assoc = self._assoc(ae, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)])
        try:
            result = self._final(assoc.send_c_get(self._identifier(study_uid, series_uid, sops),
                                                  StudyRootQueryRetrieveInformationModelGet))
        finally:
            if assoc.is_established:
                assoc.release()
        result.bytes = received["bytes"]
        return result
