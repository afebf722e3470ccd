"""Event-driven waits for pynetdicom's two per-association reactor threads.

pynetdicom (3.0) polls: the DUL thread sleeps 1 ms whenever a loop found
nothing to do, and the acceptor's association thread sleeps 1 ms before every
check of its queues. With several associations that is thousands of thread
wake-ups (and GIL hand-offs) a second that do nothing but compete with the
threads doing work, and up to 2 ms of added latency per DIMSE message.

``install()`` replaces the two loops by copies that *block* instead:

- the DUL thread waits in ``poll()`` on its socket and on a wake-up socketpair
  that is written whenever another thread queues a primitive for it
  (``to_provider_queue``) or asks it to stop;
- the association thread waits on an Event that is set whenever the DUL hands
  it a DIMSE message (``dimse.msg_queue``) or an ACSE primitive
  (``to_user_queue``), when its reactor is asked to pause, and when it is killed.

Both waits are bounded by ``MAX_WAIT`` so timers (ARTIM, network idle timeout)
are still checked.

It also replaces ``DULServiceProvider._read_pdu_data`` (one buffer per PDU,
and each PDU offered first to the association's ``fast_store.FastStore`` when
one is attached) and counts the DIMSE services an association is running
(``_vna_serving``), which the fast path must not overtake. One fix to the
pause protocol: the association reactor takes a DIMSE message only while no
pause is requested (``_CheckpointEvent``), so a C-STORE-RSP meant for a waiting
``send_c_store`` (C-MOVE sub-operations) is never taken by the reactor.

Against hostile or broken peers (see ``_dul_read_pdu_data`` and
docs/conformance.md §5.1): every PDU is bounded before it is read, reads have
a deadline (the ACSE timeout from the connection's start until associated,
then the network timeout between bytes), what pynetdicom could not process is
refused before it sees it, and an exception in the DUL thread ends in an
A-ABORT, a close and one log line. An acceptor's DUL thread ends once its
connection is closed (releasing its ``limits.Connection``).

Everything else -- the state machine, the order of checks, the pause/kill
protocol -- is pynetdicom's own code, unchanged. The copies are
of pynetdicom 3.0.x; ``install()`` leaves any other version polling as before
and says so in the log.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import socket
import ssl
import struct
import threading
import time
from typing import Any, Callable

import pynetdicom
from pynetdicom import evt
from pynetdicom.association import LOGGER as _ASSOC_LOG
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import A_P_ABORT

from vna.dicom.fast_store import command_problem, split_pdvs

log = logging.getLogger(__name__)

MAX_WAIT = 0.05  # seconds: the longest a reactor sleeps before re-checking its timers
_SUPPORTED = ("3.0.",)
_installed = False


class _NotifyingQueue(queue.Queue):  # type: ignore[type-arg]
    """A queue.Queue that calls ``notify`` after every put (under the queue's lock)."""

    def __init__(self, notify: Callable[[], None]) -> None:
        super().__init__()
        self._notify = notify

    def _put(self, item: Any) -> None:
        super()._put(item)
        self._notify()


class _CheckpointEvent(threading.Event):
    """The association's reactor checkpoint: clearing it (a pause request) wakes the reactor.

    The reactor takes a DIMSE message only while holding ``take`` and seeing the
    checkpoint still set; ``clear()`` returns only once no such take is in
    progress. So once a pause request returns, the reactor takes no message
    until the checkpoint is set again -- the response the pausing thread (e.g.
    ``send_c_store``) waits for stays on the queue for it. ``take`` is never
    held while a request is served (C-GET sends from the reactor's own thread).
    """

    def __init__(self, wake: threading.Event) -> None:
        super().__init__()
        self._wake = wake
        self.take = threading.Lock()

    def clear(self) -> None:
        super().clear()
        self._wake.set()
        with self.take:  # wait out a take that saw the checkpoint still set
            pass


class _Waker:
    """The DUL thread's wake-up channel: a non-blocking socketpair.

    Writers never block (a full buffer already means "wake up"); after ``close``
    writes are ignored -- a closed socket object never writes to a reused fd.
    """

    def __init__(self) -> None:
        self.r, self.w = socket.socketpair()
        self.r.setblocking(False)
        self.w.setblocking(False)
        self._poll: Any = None
        self._fd = -1

    def poke(self) -> None:
        try:
            self.w.send(b"\0")
        except OSError:  # full (a wake-up is already pending) or closed
            pass

    def drain(self) -> None:
        try:
            while self.r.recv(4096):
                pass
        except OSError:
            pass

    def wait(self, sock: socket.socket | None, timeout: float) -> None:
        """Block until ``sock`` is readable, a poke arrives, or ``timeout`` passes."""
        fd = sock.fileno() if sock is not None else -1
        if self._poll is None or fd != self._fd:
            self._poll = select.poll()
            self._poll.register(self.r, select.POLLIN)
            if fd >= 0:
                self._poll.register(fd, select.POLLIN)  # not POLLPRI: urgent data is never read, it would spin
            self._fd = fd
        try:
            self._poll.poll(timeout * 1000)
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        self.r.close()
        self.w.close()


def _dul_idle_wait(dul: Any) -> None:
    """Instead of ``time.sleep(_run_loop_delay)``: block until there is something to do."""
    waker: _Waker = dul._vna_waker
    waker.drain()
    if not dul.event_queue.empty() or not dul.to_provider_queue.empty() or dul._kill_thread:
        return
    assoc_sock = dul.socket.socket if dul.socket is not None else None
    if isinstance(assoc_sock, ssl.SSLSocket) and assoc_sock.pending():
        return
    waker.wait(assoc_sock, MAX_WAIT)


def _dul_run_reactor(self: Any) -> None:
    """pynetdicom 3.0's ``DULServiceProvider.run_reactor`` with the idle sleep replaced by a wait.

    An exception (a PDU pynetdicom cannot process, an event invalid in the
    current state) ends the association with an A-ABORT and one log line.
    """
    self._vna_started = time.monotonic()
    try:
        self._idle_timer.start()
        sleep = False

        while True:
            # Let the assoc reactor off the leash
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
                sleep = True

            if sleep:
                _dul_idle_wait(self)

            if self._kill_thread:
                break

            # Check the ARTIM timer first so its event is placed on the queue
            #   ahead of any other events this loop
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")

            # Check the connection for incoming data
            try:
                # We can either encode and send a primitive **OR**
                #   receive and decode a PDU per loop of the reactor
                if self._process_recv_primitive():  # encode (sent by state machine)
                    pass
                elif self._is_transport_event():  # receive and decode PDU
                    self._idle_timer.restart()
            except Exception as exc:
                if _on_error(self, exc):
                    return

            # Check the event queue to see if there is anything to do
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                sleep = True
                continue

            try:
                self.state_machine.do_action(event)
            except Exception as exc:
                if _on_error(self, exc, event):
                    return
            sleep = False
            if self.state_machine.current_state == "Sta1" and self.assoc.is_acceptor and _closed(self):
                break  # the connection is over: nothing more can happen on it
    finally:
        self._vna_waker.close()
        fast = getattr(self, "_vna_fast_store", None)
        if fast is not None:
            try:
                fast.close()
            except Exception:  # never let clean-up hide why the thread ended
                log.exception("closing the C-STORE fast path failed")
        conn = getattr(self, "_vna_conn", None)
        if conn is not None:
            conn.close()
        assoc = self.assoc
        if assoc.is_acceptor and assoc.requestor.primitive is None and not assoc.is_established:
            # the association thread still waits (up to the ACSE timeout) for an A-ASSOCIATE-RQ
            # that can no longer come: let it end now (aborted, it negotiates nothing)
            assoc.is_aborted = True
            self.to_user_queue.put(A_P_ABORT())
        wake = getattr(self.assoc, "_vna_wake", None)
        if wake is not None:
            wake.set()  # the association reactor checks dul.is_alive()


def _closed(dul: Any) -> bool:
    """True once the DUL's connection is closed."""
    assoc_sock = dul.socket
    sock = assoc_sock.socket if assoc_sock is not None else None
    return sock is None or sock.fileno() < 0


def _peer(dul: Any) -> str:
    """The peer's address, for log lines."""
    conn = getattr(dul, "_vna_conn", None)
    if conn is not None:
        return str(conn.address)
    try:
        return str(dul.assoc.requestor.address if dul.assoc.is_acceptor else dul.assoc.acceptor.address)
    except Exception:  # not known yet
        return "?"


def _say(dul: Any, why: str, *args: Any) -> None:
    """One warning about this connection's peer (rate-limited per address when the server counts it)."""
    conn = getattr(dul, "_vna_conn", None)
    if conn is not None:
        conn.refused(why, *args)
    else:
        log.warning("DICOM peer %s: " + why, _peer(dul), *args)


def _abort_and_close(dul: Any, reason: int | None) -> None:
    """Send an A-ABORT (unless ``reason`` is None) and close the connection.

    The close queues Evt17, which takes the state machine to Sta1 from any
    other state (pynetdicom then tells the association and runs the
    EVT_CONN_CLOSE handlers); events that follow in Sta1 are dropped quietly.
    """
    dul._vna_aborted = True
    fast = getattr(dul, "_vna_fast_store", None)
    if fast is not None:
        fast.abandon("association aborted")
    assoc_sock = dul.socket
    sock = assoc_sock.socket if assoc_sock is not None else None
    if sock is None:
        return
    if reason is not None:
        abort_pdu = A_ABORT_RQ()
        abort_pdu.source = 0x02  # service provider
        abort_pdu.reason_diagnostic = reason
        try:
            sock.settimeout(1.0)  # a peer that does not read gets no A-ABORT, the close still happens
            sock.sendall(abort_pdu.encode())
        except (OSError, ValueError):
            pass
    assoc_sock.close()


def _on_error(dul: Any, exc: Exception, event: str | None = None) -> bool:
    """The DUL thread met an exception; True when the thread must end now.

    The first one aborts the association (A-ABORT, close, one log line; the
    traceback at DEBUG) and the reactor goes on so that the state machine
    processes the close. Events left over once in Sta1 are dropped; any other
    exception after the abort ends the thread.
    """
    state = dul.state_machine.current_state
    if not getattr(dul, "_vna_aborted", False):
        where = f"{event} in {state}" if event else state
        _say(dul, "association aborted: %s (%s: %s)", where, type(exc).__name__, exc)
        log.debug("the exception that aborted the association", exc_info=exc)
        try:
            _abort_and_close(dul, 0x00)
            return False
        except Exception:  # the connection is already gone
            log.debug("closing the connection failed", exc_info=True)
    elif event is not None and state == "Sta1":
        log.debug("event %s after the association was aborted: %s", event, exc)
        return False
    _end_now(dul)
    return True


def _end_now(dul: Any) -> None:
    """Mark the association aborted and end the DUL thread without the state machine."""
    fast = getattr(dul, "_vna_fast_store", None)
    if fast is not None:
        fast.abandon("association aborted")
    if dul.socket is not None and dul.socket.socket is not None:
        try:
            dul.socket.close()
        except Exception:
            pass
    # as the EVT_CONN_CLOSE handlers would: a C-STORE spool pynetdicom left behind is removed
    message = getattr(getattr(dul.assoc, "dimse", None), "message", None)
    spool = getattr(message, "_data_set_file", None)
    if spool is not None:
        try:
            spool.close()
            os.unlink(spool.name)
        except OSError:
            pass
    dul.assoc.is_aborted = True
    dul.assoc.is_established = False
    dul.assoc._kill = True
    dul._kill_thread = True


_PDU_HEADER = struct.Struct(">BBL")
_PDU_NAMES = {0x01: "A-ASSOCIATE-RQ", 0x02: "A-ASSOCIATE-AC", 0x03: "A-ASSOCIATE-RJ", 0x04: "P-DATA-TF",
              0x05: "A-RELEASE-RQ", 0x06: "A-RELEASE-RP", 0x07: "A-ABORT"}
MAX_UNASSOCIATED_PDU = 512 << 10  # bytes after the header: any PDU before the association is established
MAX_PDU_UNLIMITED = 64 << 20      # the same once associated, when we announced no maximum (dicom.max_pdu = 0)
MAX_COMMAND_SET = 64 << 10        # bytes of one command set, over all its fragments
DEFAULT_TIMEOUT = 60.0            # seconds, for an ACSE or network timeout of None
_STEP = 1 << 20                   # a PDU up to this long is read into one buffer at once, longer ones grow by it
_STEP_UNASSOCIATED = 64 << 10     # the same before the association is established


def _wait_time(deadline: float | None, idle: float | None) -> float | None:
    """Seconds the next wait for data may last (None: no bound); TimeoutError once ``deadline`` has passed."""
    wait = idle
    if deadline is not None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed")
        wait = left if wait is None else min(wait, left)
    return wait


def _wait_readable(sock: Any, timeout: float | None) -> bool:
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(None if timeout is None else max(1, int(timeout * 1000))))


def _recv_into(sock: Any, buf: bytearray, start: int, deadline: float | None = None,
               idle: float | None = None) -> int:
    """Fill ``buf[start:]`` from ``sock``; returns the bytes now in ``buf`` (short: the peer closed).

    Raises TimeoutError when no byte arrived for ``idle`` seconds or the
    monotonic ``deadline`` passed (None: no bound).
    """
    view = memoryview(buf)
    pos, end = start, len(buf)
    tls = isinstance(sock, ssl.SSLSocket)
    while pos < end:
        if tls:  # flags are refused on TLS sockets: a timeout per call instead
            sock.settimeout(_wait_time(deadline, idle))
            n = sock.recv_into(view[pos:], end - pos)
        else:
            try:
                n = sock.recv_into(view[pos:], end - pos, socket.MSG_DONTWAIT)
            except BlockingIOError:
                if not _wait_readable(sock, _wait_time(deadline, idle)):
                    raise TimeoutError("no data") from None
                continue
        if not n:
            break
        pos += n
    return pos


def _limits(dul: Any) -> tuple[bool, int, float | None, float | None, int]:
    """(associated, largest PDU length field, deadline, idle timeout, buffer step) for the next PDU read.

    Before the association is established every PDU is bounded by
    ``MAX_UNASSOCIATED_PDU`` and all reads by the ACSE timeout counted from the
    connection's start; afterwards by the maximum PDU length we announced
    (plus a header's slack) and by the network timeout between two reads.
    """
    assoc = dul.assoc
    if not getattr(dul, "_vna_associated", False):
        if dul.state_machine.current_state != "Sta6":
            started = getattr(dul, "_vna_started", None) or time.monotonic()
            acse = assoc.acse_timeout
            deadline = started + (DEFAULT_TIMEOUT if acse is None else float(acse))
            return False, MAX_UNASSOCIATED_PDU, deadline, None, _STEP_UNASSOCIATED
        dul._vna_associated = True
    local = assoc.acceptor if assoc.is_acceptor else assoc.requestor
    max_pdu = local.maximum_length or 0
    network = assoc.network_timeout
    return (True, max_pdu + 6 if max_pdu else MAX_PDU_UNLIMITED, None,
            DEFAULT_TIMEOUT if network is None else float(network), _STEP)


def _read_pdu(sock: Any, header: bytearray, pdu_length: int, step: int, deadline: float | None,
              idle: float | None) -> bytearray:
    """The PDU whose header is ``header``; shorter when the peer closed. The buffer grows as bytes arrive."""
    if pdu_length <= step:
        bytestream = bytearray(6 + pdu_length)
        bytestream[:6] = header
        got = _recv_into(sock, bytestream, 6, deadline, idle)
        if got < len(bytestream):
            del bytestream[got:]
        return bytestream
    bytestream = header
    while len(bytestream) < 6 + pdu_length:
        start = len(bytestream)
        bytestream += bytes(min(6 + pdu_length - start, step))
        got = _recv_into(sock, bytestream, start, deadline, idle)
        if got < len(bytestream):
            del bytestream[got:]
            break
    return bytestream


def _expected(dul: Any, pdu_type: int) -> bool:
    """Whether an acceptor not yet associated may receive this PDU: one A-ASSOCIATE-RQ first, an A-ABORT any time."""
    if pdu_type == 0x07:
        return True
    if pdu_type != 0x01 or getattr(dul, "_vna_rq_seen", False):
        return False
    dul._vna_rq_seen = True
    return True


_TEXT_ITEMS = {0x10: "Application Context Name", 0x30: "Abstract Syntax", 0x40: "Transfer Syntax",
               0x52: "Implementation Class UID", 0x55: "Implementation Version Name"}
_UID_FIRST_ITEMS = {0x54: "SCP/SCU Role Selection", 0x56: "SOP Class Extended Negotiation",
                    0x57: "SOP Class Common Extended Negotiation"}


def _associate_problem(pdu: bytearray) -> str | None:
    """Why pynetdicom could not decode this A-ASSOCIATE-RQ/-AC's text fields (non-ASCII bytes), or None.

    pynetdicom logs a traceback for each such field before it refuses the PDU;
    found here, the PDU is refused with one line. The item structure itself is
    left to pynetdicom's decoder.
    """
    body = memoryview(pdu)[6:]
    if len(body) < 68:
        return None
    if pdu[0] == 0x01 and not bytes(body[4:36]).isascii():  # in an -AC these fields are not to be tested
        return "non-ASCII bytes in an AE title"
    return _items_problem(body[68:], nested=False)


def _items_problem(data: memoryview, nested: bool) -> str | None:
    pos = 0
    while pos + 4 <= len(data):
        item_type, length = data[pos], int.from_bytes(data[pos + 2:pos + 4], "big")
        value = data[pos + 4:pos + 4 + length]
        name = _TEXT_ITEMS.get(item_type)
        if name is not None and not bytes(value).isascii():
            return f"non-ASCII bytes in its {name}"
        name = _UID_FIRST_ITEMS.get(item_type)
        if nested and name is not None and len(value) >= 2:
            if not bytes(value[2:2 + int.from_bytes(value[:2], "big")]).isascii():
                return f"non-ASCII bytes in the UID of its {name} item"
        if not nested and item_type in (0x20, 0x21, 0x50):
            problem = _items_problem(value[4:] if item_type != 0x50 else value, nested=True)
            if problem is not None:
                return problem
        pos += 4 + length
    return None


def _command_problem(dul: Any, pdu: bytearray) -> str | None:
    """Why pynetdicom's DIMSE layer could not process the command set this P-DATA-TF completes, or None.

    Command fragments are collected across PDUs (``_vna_command``); a command
    set longer than ``MAX_COMMAND_SET`` is a problem too.
    """
    pdvs = split_pdvs(memoryview(pdu)[6:])
    if pdvs is None:
        return None  # pynetdicom's decoder refuses it
    for _cx, mch, data in pdvs:
        if not mch & 1:
            continue
        pending: bytearray | None = getattr(dul, "_vna_command", None)
        if pending is not None and len(pending) + len(data) > MAX_COMMAND_SET:
            dul._vna_command = None
            return f"a command set longer than {MAX_COMMAND_SET} bytes"
        if not mch & 2:
            dul._vna_command = (pending or bytearray()) + data
            continue
        raw = bytes(pending) + bytes(data) if pending else bytes(data)
        dul._vna_command = None
        problem = command_problem(raw)
        if problem is not None:
            return problem
    return None


def _dul_read_pdu_data(self: Any) -> None:
    """pynetdicom 3.0's ``DULServiceProvider._read_pdu_data``, bounded, reading each PDU with one buffer.

    A PDU longer than allowed (see ``_limits``), of an unknown type, that
    cannot be decoded, or carrying a command set pynetdicom could not process
    ends the association at once: A-ABORT, close, one (rate-limited) log line.
    A connection that does not complete its A-ASSOCIATE within the ACSE
    timeout, or stalls in the middle of a PDU for the network timeout, is
    closed the same way. A PDU is offered to the association's ``FastStore``
    (when one is attached) before pynetdicom decodes it.
    """
    sock = self.socket.socket
    fast = getattr(self, "_vna_fast_store", None)
    associated, limit, deadline, idle, step = _limits(self)

    def lost(why: str) -> None:
        if fast is not None:
            fast.abandon(why)
        self.socket.close()  # queues Evt17

    def refuse(reason: int | None, why: str, *args: Any) -> None:
        _say(self, ("association aborted: " if associated else "connection closed: ") + why, *args)
        _abort_and_close(self, reason)

    header = bytearray(6)
    try:
        got = _recv_into(sock, header, 0, deadline, idle)
        if got == 6:
            pdu_type, _, pdu_length = _PDU_HEADER.unpack(header)
            name = _PDU_NAMES.get(pdu_type)
            if name is None:
                return refuse(0x01, "not a DICOM PDU (type 0x%02X)", pdu_type)
            if pdu_length > limit:
                return refuse(0x06, "%s of %d bytes, more than the %d allowed %s", name, pdu_length, limit,
                              "(dicom.max_pdu)" if associated else "before association")
            if not associated and self.assoc.is_acceptor and not _expected(self, pdu_type):
                return refuse(0x02, "%s before the association was established", name)
            bytestream = _read_pdu(sock, header, pdu_length, step, deadline, idle)
    except TimeoutError:
        if not associated:
            return refuse(None, "no A-ASSOCIATE within %.0f s (dicom.acse_timeout)",
                          (deadline or 0) - getattr(self, "_vna_started", 0))
        return refuse(0x00, "no data for %.0f s in the middle of a PDU (dicom.network_timeout)", idle or 0)
    except (OSError, ValueError) as exc:
        _say(self, "connection lost in the middle of a PDU (%s)", exc)
        return lost("connection lost")
    finally:
        if isinstance(sock, ssl.SSLSocket):
            try:
                sock.settimeout(None)
            except OSError:
                pass
    if got < 6:
        if got:
            _say(self, "connection closed in the middle of a PDU header")
        return lost("connection closed")
    if len(bytestream) != 6 + pdu_length:
        _say(self, "connection closed in the middle of a %s (%d of %d bytes received)", name, len(bytestream),
             6 + pdu_length)
        return lost("connection closed")
    if fast is not None and fast.feed(self, pdu_type, bytestream):
        return
    if pdu_type == 0x04 and associated:
        problem = _command_problem(self, bytestream)
        if problem is not None:
            return refuse(0x00, problem.replace("%", "%%"))  # the problem is the kind of line (rate limits)
    elif pdu_type in (0x01, 0x02):
        problem = _associate_problem(bytestream)
        if problem is not None:
            return refuse(0x06, f"{name} with {problem}".replace("%", "%%"))
    try:
        pdu, event = self._decode_pdu(bytestream)
    except Exception as exc:
        log.debug("undecodable PDU", exc_info=exc)
        return refuse(0x06, "undecodable %s (%s: %s)", name, type(exc).__name__, exc)
    self.event_queue.put(event)
    self._recv_pdu.put(pdu)


class _Serving:
    """Counts a DIMSE service as running on an association (``_vna_serving``) for the block."""

    __slots__ = ("assoc",)

    def __init__(self, assoc: Any) -> None:
        self.assoc = assoc

    def __enter__(self) -> None:
        with self.assoc._vna_serving_lock:
            self.assoc._vna_serving += 1

    def __exit__(self, *exc: object) -> None:
        with self.assoc._vna_serving_lock:
            self.assoc._vna_serving -= 1


def _dul_kill(self: Any) -> None:
    """Kill the DUL reactor and stop the thread (and wake it so it notices)."""
    self._kill_thread = True
    self._vna_waker.poke()


def _take_msg(assoc: Any) -> tuple[int | None, Any]:
    """The next DIMSE message for the reactor to serve, or ``(None, None)``.

    Nothing is taken once a pause has been requested: ``Event.wait()`` returns
    True when the checkpoint was set at wake-up even if it was cleared again
    since, and a pausing thread may see a stale ``_is_paused`` -- so the
    checkpoint is checked again, under the lock its ``clear()`` waits for.
    """
    checkpoint: _CheckpointEvent = assoc._reactor_checkpoint
    with checkpoint.take:
        if not checkpoint.is_set():
            return None, None
        return assoc.dimse.get_msg(block=False)  # type: ignore[no-any-return]


def _assoc_run_reactor(self: Any) -> None:
    """pynetdicom 3.0's ``Association._run_reactor`` (acceptor and requestor) with the 1 ms sleep
    replaced by a wait, and a message taken only while no pause is requested (``_take_msg``)."""
    self._is_paused = False
    wake: threading.Event = self._vna_wake
    while not self._kill:
        wake.clear()
        if (self.dimse.msg_queue.empty() and self.dul.to_user_queue.empty()
                and self._reactor_checkpoint.is_set() and self.dul.is_alive()):
            wake.wait(MAX_WAIT)

        self._is_paused = True
        self._reactor_checkpoint.wait()
        self._is_paused = False

        # counted from before the message leaves its queue, so the C-STORE fast path never
        # sees "queue empty, nothing served" while a request is on its way to its service
        with _Serving(self):
            context_id, msg = _take_msg(self)
            if msg:
                self._serve_request(msg, context_id)

        if self.is_established and self.acse.is_release_requested():
            self.acse.send_release(is_response=True)
            _ASSOC_LOG.info("Association Released")
            self.is_released = True
            self.is_established = False
            evt.trigger(self, evt.EVT_RELEASED, {})
            self.kill()
            return

        if self.acse.is_aborted():
            log_msg = "Association Aborted"
            if self.acse.is_aborted("a-p-abort"):
                log_msg += " (A-P-ABORT)"
            _ASSOC_LOG.info(log_msg)
            self.dul.receive_pdu(wait=False)
            self.is_aborted = True
            self.is_established = False
            evt.trigger(self, evt.EVT_ABORTED, {})
            self.kill()
            return

        if not self.dul.is_alive():
            self.kill()
            return

        if self.dul.idle_timer_expired():
            _ASSOC_LOG.error("Network timeout reached")
            if self.network_timeout_response == "A-RELEASE":
                self._is_paused = True
                self._reactor_checkpoint.wait()
                self.release()
                self._is_paused = False
            else:
                self.abort()

            self.kill()
            return


def install() -> bool:
    """Make every Association created from now on use the event-driven reactors.

    Idempotent. Returns False (and keeps pynetdicom's polling) for a pynetdicom
    version whose loops these copies were not taken from.
    """
    global _installed
    if _installed:
        return True
    if not pynetdicom.__version__.startswith(_SUPPORTED):
        log.warning("pynetdicom %s: event-driven reactor not installed (made for %s); polling as before",
                    pynetdicom.__version__, "/".join(_SUPPORTED))
        return False

    original_init = Association.__init__
    original_kill = Association.kill
    original_serve = Association._serve_request

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        wake = threading.Event()
        self._vna_wake = wake
        checkpoint = _CheckpointEvent(wake)
        checkpoint.set()
        self._reactor_checkpoint = checkpoint
        self.dimse.msg_queue = _NotifyingQueue(wake.set)
        dul = self.dul
        dul._vna_waker = _Waker()
        dul.to_user_queue = _NotifyingQueue(wake.set)
        dul.to_provider_queue = _NotifyingQueue(dul._vna_waker.poke)
        self._vna_serving = 0
        self._vna_serving_lock = threading.Lock()

    def kill(self: Any) -> None:
        wake = getattr(self, "_vna_wake", None)
        if wake is not None:
            self._kill = True
            wake.set()
            # stop_dul() sets the DUL's flag directly and waits for its thread: wake it first
            self.dul._vna_waker.poke()
        original_kill(self)

    def serve_request(self: Any, msg: Any, context_id: int) -> None:
        # counted so that the C-STORE fast path never answers while a service is running (this
        # also covers the N-EVENT-REPORT requests pynetdicom serves in a thread of their own)
        with _Serving(self):
            original_serve(self, msg, context_id)

    Association.__init__ = init  # type: ignore[method-assign]
    Association._serve_request = serve_request  # type: ignore[method-assign]
    DULServiceProvider._read_pdu_data = _dul_read_pdu_data  # type: ignore[method-assign]
    Association.kill = kill  # type: ignore[method-assign]
    Association._run_reactor = _assoc_run_reactor  # type: ignore[method-assign]
    DULServiceProvider.run_reactor = _dul_run_reactor  # type: ignore[method-assign]
    DULServiceProvider.kill_dul = _dul_kill  # type: ignore[method-assign]
    _installed = True
    return True


def installed() -> bool:
    """True once ``install()`` has replaced the reactors."""
    return _installed
