"""Connection limits of the DICOM port, and rate-limited log lines about refused peers.

A connection is *half-open* from its accept until its A-ASSOCIATE-RQ is
admitted, then *associated* until its association ends. The two are counted
apart: half-open connections (``dicom.max_half_open_connections``) cannot take
the association slots (``dicom.max_associations``), and one peer address holds
at most ``dicom.max_connections_per_address`` connections of either kind.

``RefusalLog`` writes the first refusal of a kind from an address at once and
folds the following ones of the same minute into a count carried by the next
line of that kind and address.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

__all__ = ["Connection", "ConnectionLimits", "RefusalLog"]

log = logging.getLogger(__name__)

_WINDOW = 60.0          # seconds: one log line per address and window, the rest counted
_MAX_TRACKED = 4096     # addresses remembered by RefusalLog (the oldest windows are forgotten first)


class RefusalLog:
    """Per peer address and kind of refusal: the first of a window is logged, the rest of the window counted."""

    def __init__(self, logger: logging.Logger = log, window: float = _WINDOW) -> None:
        self._log = logger
        self._window = window
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}   # (address, why) -> (window start, not logged)

    def refuse(self, address: str, why: str, *args: Any) -> None:
        """Log ``why % args`` for ``address`` unless an earlier line of this kind (``why``) and window covers it."""
        now = time.monotonic()
        key = (address, why)
        with self._lock:
            start, hidden = self._seen.get(key, (-self._window, 0))
            if now - start < self._window:
                self._seen[key] = (start, hidden + 1)
                return
            if len(self._seen) >= _MAX_TRACKED:
                for old in sorted(self._seen, key=lambda k: self._seen[k][0])[:_MAX_TRACKED // 4]:
                    del self._seen[old]
            self._seen[key] = (now, 0)
        more = f" ({hidden} more like it from this address in the last {self._window:.0f} s)" if hidden else ""
        self._log.warning("DICOM peer %s: " + why + "%s", address, *args, more)


class Connection:
    """One accepted connection, counted in its ``ConnectionLimits`` until ``close``."""

    __slots__ = ("address", "limits", "associated", "closed")

    def __init__(self, address: str, limits: "ConnectionLimits") -> None:
        self.address = address
        self.limits = limits
        self.associated = False
        self.closed = False

    def refused(self, why: str, *args: Any) -> None:
        """A rate-limited log line about this peer."""
        self.limits.refusals.refuse(self.address, why, *args)

    def associate(self) -> bool:
        """Take an association slot (False: all taken, the connection stays half-open)."""
        return self.limits._associate(self)

    def close(self) -> None:
        """The connection is over (idempotent)."""
        self.limits._close(self)


class ConnectionLimits:
    """Counts the open connections of the DICOM port (thread-safe)."""

    def __init__(self, max_associations: int, max_half_open: int, max_per_address: int,
                 refusals: RefusalLog | None = None) -> None:
        self.max_associations = max_associations
        self.max_half_open = max_half_open
        self.max_per_address = max_per_address
        self.refusals = refusals or RefusalLog()
        self._lock = threading.Lock()
        self._per_address: dict[str, int] = {}
        self._by_socket: dict[Any, Connection] = {}
        self.half_open = 0
        self.associated = 0

    def open(self, sock: Any, address: str) -> Connection | None:
        """Count a new connection; None (and a rate-limited log line) when a limit refuses it."""
        with self._lock:
            n = self._per_address.get(address, 0)
            if self.max_per_address and n >= self.max_per_address:
                why = "connection refused: %d connections open from this address (dicom.max_connections_per_address)"
                arg = n
            elif self.max_half_open and self.half_open >= self.max_half_open:
                why = "connection refused: %d connections not yet associated (dicom.max_half_open_connections)"
                arg = self.half_open
            else:
                self._per_address[address] = n + 1
                self.half_open += 1
                conn = Connection(address, self)
                self._by_socket[sock] = conn
                return conn
        self.refusals.refuse(address, why, arg)
        return None

    def claim(self, sock: Any) -> Connection | None:
        """The connection counted for ``sock`` by ``open`` (once; None if none or already claimed)."""
        with self._lock:
            return self._by_socket.pop(sock, None)

    def counts(self) -> tuple[int, int]:
        """(half-open, associated) connections now."""
        with self._lock:
            return self.half_open, self.associated

    def _associate(self, conn: Connection) -> bool:
        with self._lock:
            if conn.closed or conn.associated:
                return conn.associated
            if self.associated >= self.max_associations:
                return False
            conn.associated = True
            self.half_open -= 1
            self.associated += 1
            return True

    def _close(self, conn: Connection) -> None:
        with self._lock:
            if conn.closed:
                return
            conn.closed = True
            if conn.associated:
                self.associated -= 1
            else:
                self.half_open -= 1
            n = self._per_address.get(conn.address, 1) - 1
            if n > 0:
                self._per_address[conn.address] = n
            else:
                self._per_address.pop(conn.address, None)
