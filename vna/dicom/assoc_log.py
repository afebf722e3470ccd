"""One INFO line per DICOM association, and rate-limited lines about unknown C-MOVE destinations.

The association line says who (calling AE title, address), how it ended
(released, aborted, closed), how long it lasted, which services it used and
how often, the instances stored and sent, and the failures. It never names a
patient, a study or an instance: those are in the audit trail.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from pydicom.dataset import Dataset
from pynetdicom import evt

from vna.dicom import status as st

__all__ = ["AssociationLog", "OncePerName"]

log = logging.getLogger("vna.dicom.server")

#: statuses that are not failures (Success, Pending, Cancel; warnings are 0xBxxx)
_NOT_FAILED = (st.SUCCESS, st.PENDING, st.CANCEL, 0xFF01)


def _status(rsp: Any) -> int:
    if isinstance(rsp, Dataset):
        return int(rsp.get("Status", st.UNABLE_TO_PROCESS))
    if isinstance(rsp, tuple):
        return int(rsp[0]) if rsp and isinstance(rsp[0], int) else st.SUCCESS
    return int(rsp) if isinstance(rsp, int) else st.SUCCESS


def _failed(status: int) -> bool:
    return status not in _NOT_FAILED and status >> 12 != 0xB


@dataclass
class _Record:
    calling: str
    address: str
    started: float
    ended: str = "closed"
    services: Counter[str] = field(default_factory=Counter)
    stored: int = 0
    sent: int = 0
    failures: int = 0


class AssociationLog:
    """Counts what each association does and logs one line when its connection closes.

    Bind :meth:`handlers` with the server's handlers and wrap each DIMSE
    handler with :meth:`counted`; retrieve handlers report their
    sub-operations with :meth:`sent`. Rejected associations (never accepted)
    get no line here: the rejection is logged where it is decided.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._open: dict[int, _Record] = {}
        self._lock = threading.Lock()

    def handlers(self) -> list[tuple[Any, Callable[[evt.Event], None]]]:
        """The event bindings: accepted (start counting), released/aborted (how it ended), closed (log)."""
        return [(evt.EVT_ACCEPTED, self._accepted), (evt.EVT_RELEASED, self._ended),
                (evt.EVT_ABORTED, self._ended), (evt.EVT_CONN_CLOSE, self._closed)]

    def _record(self, event: evt.Event) -> _Record | None:
        with self._lock:
            return self._open.get(id(event.assoc))

    def _accepted(self, event: evt.Event) -> None:
        r = event.assoc.requestor
        rec = _Record(str(r.ae_title).strip(), f"{r.address}:{r.port}", self._clock())
        with self._lock:
            self._open[id(event.assoc)] = rec

    def _ended(self, event: evt.Event) -> None:
        rec = self._record(event)
        if rec is not None:
            rec.ended = "released" if event.event is evt.EVT_RELEASED else "aborted"

    def _closed(self, event: evt.Event) -> None:
        with self._lock:
            rec = self._open.pop(id(event.assoc), None)
        if rec is None:
            return
        used = ", ".join(f"{op.upper()} {n}" for op, n in sorted(rec.services.items())) or "no service"
        log.info("association from %s (%s) %s after %.2f s: %s; stored %d, sent %d, failures %d",
                 rec.calling, rec.address, rec.ended, self._clock() - rec.started, used, rec.stored, rec.sent,
                 rec.failures)

    def counted(self, op: str, handler: Callable[[evt.Event], Any], generator: bool = False
                ) -> Callable[[evt.Event], Any]:
        """``handler`` with its use, and its failure status, counted for its association."""
        def run(event: evt.Event) -> Any:
            rsp = handler(event)
            rec = self._record(event)
            if rec is not None:
                rec.services[op] += 1
                failed = _failed(_status(rsp))
                rec.failures += failed
                rec.stored += op == "c-store" and not failed
            return rsp

        def run_generator(event: evt.Event) -> Iterator[Any]:
            rec = self._record(event)
            if rec is not None:
                rec.services[op] += 1
            for item in handler(event):
                if (rec is not None and isinstance(item, tuple) and len(item) == 2
                        and (item[0] is None or (isinstance(item[0], int) and _failed(item[0])))):
                    rec.failures += 1
                yield item

        return run_generator if generator else run

    def sent(self, event: evt.Event, completed: int, failed: int) -> None:
        """Count the sub-operations of a C-GET or C-MOVE of the event's association."""
        rec = self._record(event)
        if rec is not None:
            rec.sent += completed
            rec.failures += failed


class OncePerName:
    """True the first time a name is seen, then once per ``interval`` seconds per name (bounded memory)."""

    def __init__(self, interval: float = 3600.0, max_names: int = 1024,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.max_names = max_names
        self._clock = clock
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def __call__(self, name: str) -> bool:
        now = self._clock()
        with self._lock:
            last = self._last.get(name)
            if last is not None and now - last < self.interval:
                return False
            if len(self._last) >= self.max_names:
                self._last.clear()
            self._last[name] = now
            return True
