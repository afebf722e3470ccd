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
Everything else -- the state machine, the order of checks, the pause/kill
protocol -- is pynetdicom's own code, unchanged. The copies are
of pynetdicom 3.0.x; ``install()`` leaves any other version polling as before
and says so in the log.
"""

from __future__ import annotations

import logging
import queue
import select
import socket
import ssl
import struct
import threading
from typing import Any, Callable

import pynetdicom
from pynetdicom import evt
from pynetdicom.association import LOGGER as _ASSOC_LOG
from pynetdicom.association import Association
from pynetdicom.dul import LOGGER as _DUL_LOG
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ

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
    """pynetdicom 3.0's ``DULServiceProvider.run_reactor`` with the idle sleep replaced by a wait."""
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
                _DUL_LOG.error("Exception in DUL.run(), aborting association")
                _DUL_LOG.exception(exc)
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                self.socket.send(abort_pdu.encode())
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                return

            # Check the event queue to see if there is anything to do
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                sleep = True
                continue

            self.state_machine.do_action(event)
            sleep = False
    finally:
        self._vna_waker.close()
        fast = getattr(self, "_vna_fast_store", None)
        if fast is not None:
            try:
                fast.close()
            except Exception:  # never let clean-up hide why the thread ended
                log.exception("closing the C-STORE fast path failed")
        wake = getattr(self.assoc, "_vna_wake", None)
        if wake is not None:
            wake.set()  # the association reactor checks dul.is_alive()


_PDU_HEADER = struct.Struct(">BBL")
_PREALLOCATE = 1 << 20  # a PDU up to this long is read into one buffer of its size at once


def _recv_into(sock: Any, buf: bytearray, start: int) -> int:
    """Fill ``buf[start:]`` from ``sock``; returns the bytes now in ``buf`` (short: the peer closed)."""
    view = memoryview(buf)
    pos, end = start, len(buf)
    while pos < end:
        n = sock.recv_into(view[pos:], end - pos)
        if not n:
            break
        pos += n
    return pos


def _dul_read_pdu_data(self: Any) -> None:
    """pynetdicom 3.0's ``DULServiceProvider._read_pdu_data``, reading each PDU with one buffer.

    A PDU is offered to the association's ``FastStore`` (when one is attached)
    before pynetdicom decodes it; everything else -- events, errors, log lines --
    is pynetdicom's.
    """
    sock = self.socket.socket
    fast = getattr(self, "_vna_fast_store", None)

    def fail(event: str, why: str, exc: BaseException | None = None) -> None:
        if exc is not None:
            _DUL_LOG.error("Connection closed before the entire PDU was received")
            _DUL_LOG.exception(exc)
        if fast is not None:
            fast.abandon(why)
        self.event_queue.put(event)

    header = bytearray(6)
    try:
        got = _recv_into(sock, header, 0)
    except (OSError, TimeoutError) as exc:
        return fail("Evt17", "connection lost", exc)
    if got < 6:
        return fail("Evt17", "connection closed")
    pdu_type, _, pdu_length = _PDU_HEADER.unpack(header)
    if pdu_type not in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07):
        _DUL_LOG.error(f"Unknown PDU type received '0x{pdu_type:02X}'")
        return fail("Evt19", "invalid PDU")
    try:
        if pdu_length <= _PREALLOCATE:
            bytestream = bytearray(6 + pdu_length)
            bytestream[:6] = header
            got = _recv_into(sock, bytestream, 6)
            if got < len(bytestream):
                del bytestream[got:]
        else:  # grown as the bytes arrive: an absurd length field costs no memory up front
            bytestream = header
            while len(bytestream) < 6 + pdu_length:
                start = len(bytestream)
                bytestream += bytes(min(6 + pdu_length - start, _PREALLOCATE))
                got = _recv_into(sock, bytestream, start)
                if got < len(bytestream):
                    del bytestream[got:]
                    break
    except (OSError, TimeoutError) as exc:
        return fail("Evt17", "connection lost", exc)
    if len(bytestream) != 6 + pdu_length:
        _DUL_LOG.error(f"The received PDU is shorter than expected ({len(bytestream)} of "
                       f"{6 + pdu_length} bytes received)")
        return fail("Evt17", "connection closed")
    if fast is not None and fast.feed(self, pdu_type, bytestream):
        return
    try:
        pdu, event = self._decode_pdu(bytestream)
        self.event_queue.put(event)
    except Exception as exc:
        _DUL_LOG.error("Unable to decode the received PDU data")
        _DUL_LOG.exception(exc)
        self.event_queue.put("Evt19")
        return
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
