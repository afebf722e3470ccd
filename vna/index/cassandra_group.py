"""Group commit for the Cassandra index: plain writes of concurrent callers in shared unlogged batches.

Each caller submits a *unit* (statements that stay together in one batch) and
waits for it; a flusher thread sends whatever units are queued as one unlogged
batch (bounded in statements and bytes, under Cassandra's batch size guardrail),
several batches in flight at once. A failed batch fails every unit in it (each
may or may not have applied: the same uncertainty as a single failed write).
Mutations of one partition key in one batch are applied atomically per replica.
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Sequence

from cassandra.cluster import Session
from cassandra.query import BatchStatement, BatchType, PreparedStatement

from vna.errors import IndexUnavailable

__all__ = ["WriteGroups"]

_MAX_STATEMENTS = 120
_MAX_BYTES = 40_000  # below the default batch_size_fail_threshold (50 KiB)
_IN_FLIGHT = 8


@dataclass
class _Unit:
    statements: Sequence[tuple[PreparedStatement, tuple[Any, ...]]]
    size: int
    done: Future[None]


def _size(params: tuple[Any, ...]) -> int:
    return sum(len(p) if isinstance(p, (str, bytes)) else 16 for p in params) + 32


class WriteGroups:
    """The flusher of one session's shared batches; ``write`` blocks until the unit's batch is acknowledged."""

    def __init__(self, session: Session) -> None:
        self._session = session
        self._queue: deque[_Unit] = deque()
        self._cv = threading.Condition()
        self._slots = threading.Semaphore(_IN_FLIGHT)
        self._closed = False
        self._thread: threading.Thread | None = None

    def write(self, statements: Sequence[tuple[PreparedStatement, tuple[Any, ...]]]) -> None:
        """Send the statements (one unit) in a shared batch; raise what the batch raised."""
        unit = _Unit(statements, sum(_size(p) for _s, p in statements), Future())
        with self._cv:
            if self._closed:
                raise IndexUnavailable("Cassandra index: closed")
            self._queue.append(unit)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="vna-cass-group", daemon=True)
                self._thread.start()
            self._cv.notify()
        unit.done.result()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()

    def _take(self) -> list[_Unit] | None:
        with self._cv:
            while not self._queue:
                if self._closed:
                    return None
                self._cv.wait()
            units: list[_Unit] = []
            count = size = 0
            while self._queue:
                u = self._queue[0]
                if units and (count + len(u.statements) > _MAX_STATEMENTS or size + u.size > _MAX_BYTES):
                    break
                units.append(self._queue.popleft())
                count += len(u.statements)
                size += u.size
            return units

    def _loop(self) -> None:
        while True:
            self._slots.acquire()
            units = self._take()
            if units is None:
                self._slots.release()
                return
            batch = BatchStatement(batch_type=BatchType.UNLOGGED)
            for u in units:
                for stmt, params in u.statements:
                    batch.add(stmt, params)
            try:
                future = self._session.execute_async(batch)
            except BaseException as exc:  # noqa: BLE001 - handed to every waiting caller
                self._finish(units, exc)
                continue
            future.add_callbacks(lambda _rows, us=units: self._finish(us, None),
                                 lambda exc, us=units: self._finish(us, exc))

    def _finish(self, units: list[_Unit], exc: BaseException | None) -> None:
        self._slots.release()
        for u in units:
            if exc is None:
                u.done.set_result(None)
            else:
                u.done.set_exception(exc)
