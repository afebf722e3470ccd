"""C-STORE requests received and answered in the DUL thread, without pynetdicom's per-PDU machinery.

pynetdicom turns every received P-DATA-TF PDU into a PDU object, an FSM event,
a primitive on a queue, a DIMSE message fragment on another queue, and answers
through the same layers backwards: for a small instance that Python work costs
more than storing it. ``FastStore`` takes over the common case only:

- the association is established (Sta6), pynetdicom's DIMSE layer is idle (no
  partial message, none queued, no service running, nothing queued to send, no
  release requested), and only pynetdicom's standard logging handlers are bound
  to the PDU/DIMSE notification events;
- the PDU's first PDV is a complete command set -- a C-STORE-RQ with a data set,
  on an accepted context where we are SCP, for the context's storage SOP class,
  with well-formed UIDs -- encoded as pynetdicom would write the spool header.

Anything else is left to pynetdicom untouched (the PDU is decoded as pynetdicom
would have decoded it). Once taken over, the data set fragments are written to a
spool file exactly as pynetdicom writes it (preamble, File Meta, data set bytes),
hashed (SHA-256) as they are written, the bound ``EVT_C_STORE`` handler is called
through ``evt.trigger`` with the same ``Event`` pynetdicom builds (its request
also carries a ``Spooled``, read with :func:`spooled_of`: the digest, the size
and when receiving began and ended), the spool file is removed, and the C-STORE-RSP
is written to the socket (byte-identical to pynetdicom's encoding; an answer
pynetdicom would encode differently is handed to pynetdicom's DIMSE layer).

Faults: a connection that closes or an A-ABORT / A-RELEASE that arrives during
the data set removes the spool file and is then handled by pynetdicom; a PDV
that does not belong to the data set being received is a protocol error (the
association is aborted, as pynetdicom does for an invalid PDU).
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import time
from pathlib import Path
from typing import Any, Callable

import pynetdicom
from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom._handlers import (standard_dimse_recv_handler, standard_dimse_sent_handler,
                                  standard_pdu_recv_handler, standard_pdu_sent_handler)
from pynetdicom.dimse_primitives import C_STORE

from vna.dicom.dimse_codec import encode_spool_meta
from vna.domain import UID_RE
from vna.services.ingest import Spooled
from vna.storage.filesystem import write_all

log = logging.getLogger(__name__)

_ELEM = struct.Struct("<HHI")
_PDV_HEAD = struct.Struct(">IBB")
_NOTIFY = {
    evt.EVT_DATA_RECV: (), evt.EVT_DATA_SENT: (), evt.EVT_PDU_RECV: (standard_pdu_recv_handler,),
    evt.EVT_PDU_SENT: (standard_pdu_sent_handler,), evt.EVT_DIMSE_RECV: (standard_dimse_recv_handler,),
    evt.EVT_DIMSE_SENT: (standard_dimse_sent_handler,),
}
_PREAMBLE = b"\0" * 128 + b"DICM"
_SPOOLED = "_vna_spooled"  # the attribute of the C_STORE request primitive that carries its Spooled
C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
NO_DATASET = 0x0101
HANDLER_FAILED = 0xC211  # what pynetdicom answers when the EVT_C_STORE handler raises


def spooled_of(request: Any) -> Spooled | None:
    """The ``Spooled`` of a C-STORE request received on the fast path; None for any other request."""
    return getattr(request, _SPOOLED, None)


def split_pdvs(body: memoryview) -> list[tuple[int, int, memoryview]] | None:
    """The PDVs of a P-DATA-TF body (after the 6-byte PDU header): (context id, control header, data).

    None when the items do not exactly fill the body or an item is shorter than its header.
    """
    out: list[tuple[int, int, memoryview]] = []
    pos, end = 0, len(body)
    while pos < end:
        if end - pos < 6:
            return None
        length, cx_id, mch = _PDV_HEAD.unpack_from(body, pos)
        if length < 2 or pos + 4 + length > end:
            return None
        out.append((cx_id, mch, body[pos + 6:pos + 4 + length]))
        pos += 4 + length
    return out


def decode_command(raw: bytes) -> dict[int, bytes] | None:
    """The elements of an Implicit VR Little Endian command set (group 0000) by element number, or None."""
    elems: dict[int, bytes] = {}
    pos, end = 0, len(raw)
    while pos < end:
        if end - pos < 8:
            return None
        group, elem, length = _ELEM.unpack_from(raw, pos)
        pos += 8
        if group != 0 or length > end - pos or elem in elems:
            return None
        elems[elem] = raw[pos:pos + length]
        pos += length
    return elems


# CommandField values pynetdicom's DIMSE layer knows (PS3.7 E.1): C-/N- requests and their responses, C-CANCEL
_COMMAND_FIELDS = frozenset({0x0001, 0x0010, 0x0020, 0x0021, 0x0030, 0x0100, 0x0110, 0x0120, 0x0130, 0x0140,
                             0x0150}) | frozenset(f | 0x8000 for f in (0x0001, 0x0010, 0x0020, 0x0021, 0x0030, 0x0100,
                                                                       0x0110, 0x0120, 0x0130, 0x0140, 0x0150)) | {0x0FFF}


def command_problem(raw: bytes) -> str | None:
    """Why pynetdicom's DIMSE layer could not process this complete command set, or None.

    None also when ``decode_command`` cannot read it (pynetdicom's own decoder
    then judges). A problem is a missing or unknown CommandField (0000,0100), a
    missing CommandDataSetType (0000,0800), a request without MessageID
    (0000,0110), a response without MessageIDBeingRespondedTo (0000,0120), or a
    C-STORE-RQ without AffectedSOPClassUID (0000,0002) or AffectedSOPInstanceUID
    (0000,1000).
    """
    elems = decode_command(raw)
    if elems is None:
        return None
    field = _us(elems, 0x0100)
    if field is None:
        return "a command set without CommandField (0000,0100)"
    if field not in _COMMAND_FIELDS:
        return f"a command set of unknown command 0x{field:04X}"
    if _us(elems, 0x0800) is None:
        return "a command set without CommandDataSetType (0000,0800)"
    if field == 0x0FFF:
        return None  # C-CANCEL-RQ: MessageIDBeingRespondedTo, checked by pynetdicom
    if field & 0x8000:
        if _us(elems, 0x0120) is None:
            return "a response without MessageIDBeingRespondedTo (0000,0120)"
    elif _us(elems, 0x0110) is None:
        return "a request without MessageID (0000,0110)"
    if field == C_STORE_RQ:
        for elem, keyword in ((0x0002, "AffectedSOPClassUID"), (0x1000, "AffectedSOPInstanceUID")):
            if not elems.get(elem, b"").strip(b"\0 "):
                return f"a C-STORE-RQ without {keyword} (0000,{elem:04X})"
    return None


def _us(elems: dict[int, bytes], elem: int) -> int | None:
    raw = elems.get(elem)
    return struct.unpack("<H", raw)[0] if raw is not None and len(raw) == 2 else None


def _uid(elems: dict[int, bytes], elem: int) -> str | None:
    raw = elems.get(elem)
    if raw is None:
        return None
    try:
        text = raw.decode("ascii").rstrip("\0 ")
    except UnicodeDecodeError:
        return None
    return text if len(text) <= 64 and UID_RE.match(text) else None


def _text(value: str, pad: bytes) -> bytes:
    raw = value.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def encode_store_rsp(msg_id: int, sop_class: str, sop_uid: str, status: int, comment: str | None) -> bytes:
    """The C-STORE-RSP command set pynetdicom encodes for these values (with group length)."""
    def el(elem: int, value: bytes) -> bytes:
        return _ELEM.pack(0, elem, len(value)) + value

    body = [el(0x0002, _text(sop_class, b"\0")), el(0x0100, struct.pack("<H", C_STORE_RSP)),
            el(0x0120, struct.pack("<H", msg_id)), el(0x0800, struct.pack("<H", NO_DATASET)),
            el(0x0900, struct.pack("<H", status))]
    if comment:
        body.append(el(0x0902, _text(comment, b" ")))
    body.append(el(0x1000, _text(sop_uid, b"\0")))
    rest = b"".join(body)
    return el(0x0000, struct.pack("<I", len(rest))) + rest


def _simple_answer(rsp: Any) -> tuple[int, str | None] | None:
    """(status, error comment) of a handler's answer that ``encode_store_rsp`` encodes exactly, else None."""
    if isinstance(rsp, int) and not isinstance(rsp, bool):
        return (rsp, None) if 0 <= rsp <= 0xFFFF else None
    if not isinstance(rsp, Dataset) or not set(rsp.keys()) <= {0x00000900, 0x00000902}:
        return None
    status = rsp.get("Status")
    comment = rsp.get("ErrorComment")
    if not isinstance(status, int) or not 0 <= status <= 0xFFFF or (comment is not None and not isinstance(comment, str)):
        return None
    if comment is not None:
        comment = comment.strip()
        if not comment or not comment.isascii() or len(comment) > 64 or "\\" in comment:
            return None if comment else (status, None)
    return status, comment


class _Receiving:
    """The C-STORE-RQ whose data set is being spooled."""

    __slots__ = ("cx", "cx_id", "msg_id", "priority", "sop_class", "sop_uid", "move_ae", "move_id", "fd", "path",
                 "failure", "sha256", "size", "started_ns")

    def __init__(self, cx: Any, cx_id: int, msg_id: int, priority: int, sop_class: str, sop_uid: str,
                 move_ae: str | None, move_id: int | None, fd: int, path: str, head: bytes, started_ns: int) -> None:
        self.cx, self.cx_id, self.msg_id, self.priority = cx, cx_id, msg_id, priority
        self.sop_class, self.sop_uid, self.move_ae, self.move_id = sop_class, sop_uid, move_ae, move_id
        self.fd, self.path = fd, path
        self.failure: OSError | None = None
        self.sha256 = hashlib.sha256(head)  # of every byte written to the spool file, as it is written
        self.size = len(head)
        self.started_ns = started_ns


class FastStore:
    """One association's C-STORE fast path; used by its DUL thread only (see ``reactor``).

    ``storage_classes`` are the SOP classes it may take over; data sets are
    spooled in ``spool_dir``; ``on_close`` runs in the DUL thread when that
    thread ends (e.g. to close a per-thread index connection the handler opened
    there).
    """

    def __init__(self, storage_classes: frozenset[str], spool_dir: Path,
                 on_close: Callable[[], None] | None = None) -> None:
        self.storage_classes = storage_classes
        self.spool_dir = str(spool_dir)
        self.on_close = on_close
        self._prefix = f"fs{os.getpid()}-{id(self):x}"
        self._seq = 0
        self.current: _Receiving | None = None

    # -- called by the DUL reactor ------------------------------------------------
    def feed(self, dul: Any, pdu_type: int, pdu: bytearray) -> bool:
        """Offer a received PDU (header included). True: handled here; False: pynetdicom decodes it."""
        if self.current is not None:
            if pdu_type != 0x04:
                self.abandon("a %s PDU arrived during its data set" % _PDU_NAMES.get(pdu_type, hex(pdu_type)))
                return False
            pdvs = split_pdvs(memoryview(pdu)[6:])
            if pdvs is None:
                self.abandon("malformed P-DATA-TF")
                return False  # pynetdicom rejects it the same way
            self._data(dul, pdvs)
            return True
        if pdu_type != 0x04:
            return False
        pdvs = split_pdvs(memoryview(pdu)[6:])
        if not pdvs or pdvs[0][1] & 3 != 3 or not self._begin(dul, pdvs[0]):
            return False
        self._data(dul, pdvs[1:])
        return True

    def abandon(self, why: str) -> None:
        """Forget the C-STORE being received and remove its spool file (idempotent)."""
        cur, self.current = self.current, None
        if cur is None:
            return
        log.info("C-STORE of %s not completed (%s); spool removed", cur.sop_uid, why)
        _close_and_remove(cur.fd, cur.path)

    def close(self) -> None:
        """The DUL thread is ending."""
        self.abandon("association ended")
        if self.on_close is not None:
            self.on_close()

    # -- internals ------------------------------------------------------------------
    def _begin(self, dul: Any, pdv: tuple[int, int, memoryview]) -> bool:
        started_ns = time.time_ns()
        assoc = dul.assoc
        if (dul.state_machine.current_state != "Sta6" or assoc.dimse.message is not None
                or not assoc.dimse.msg_queue.empty() or not dul.to_provider_queue.empty()
                or getattr(assoc, "_vna_serving", 0) or assoc._sent_release or not _standard_notifications(assoc)
                or assoc.acceptor.accepted_common_extended):
            return False
        cx_id, _, data = pdv
        cx = assoc._accepted_cx.get(cx_id)
        if cx is None or not cx.as_scp or cx.abstract_syntax not in self.storage_classes:
            return False
        elems = decode_command(bytes(data))
        if elems is None or _us(elems, 0x0100) != C_STORE_RQ:
            return False
        msg_id, priority, ds_type = _us(elems, 0x0110), _us(elems, 0x0700), _us(elems, 0x0800)
        sop_class, sop_uid = _uid(elems, 0x0002), _uid(elems, 0x1000)
        if (msg_id is None or priority not in (0, 1, 2) or ds_type is None or ds_type == NO_DATASET
                or sop_class is None or sop_class != cx.abstract_syntax or sop_uid is None
                or not set(elems) <= {0x0000, 0x0002, 0x0100, 0x0110, 0x0700, 0x0800, 0x1000, 0x1030, 0x1031}):
            return False
        move_ae, move_id = None, _us(elems, 0x1031)
        if 0x1030 in elems:
            try:
                move_ae = elems[0x1030].decode("ascii").strip() or None
            except UnicodeDecodeError:
                return False
        if (0x1031 in elems) != (move_id is not None):
            return False
        meta = encode_spool_meta(sop_class, sop_uid, cx.transfer_syntax[0], pynetdicom.PYNETDICOM_IMPLEMENTATION_UID,
                                 pynetdicom.PYNETDICOM_IMPLEMENTATION_VERSION)
        if meta is None:
            return False
        try:
            fd, path = self._spool_file()
        except OSError as exc:
            log.warning("C-STORE fast path: cannot create a spool file (%s); pynetdicom receives it", exc)
            return False
        head = _PREAMBLE + meta
        try:
            write_all(fd, head)
        except OSError:
            _close_and_remove(fd, path)
            return False  # pynetdicom meets the same full disk and answers with its own error
        self.current = _Receiving(cx, cx_id, msg_id, priority, sop_class, sop_uid, move_ae, move_id, fd, path,
                                  head, started_ns)
        return True

    def _spool_file(self) -> tuple[int, str]:
        """A new spool file (mode 0600), named by process, association and sequence -- cheaper than mkstemp's
        random names, unique because only this thread names files with this object's prefix."""
        while True:
            self._seq += 1
            path = os.path.join(self.spool_dir, f"{self._prefix}-{self._seq}.dcm")
            try:
                return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), path
            except FileExistsError:  # a stale file of an earlier process with this pid
                continue

    def _data(self, dul: Any, pdvs: list[tuple[int, int, memoryview]]) -> None:
        for cx_id, mch, data in pdvs:
            cur = self.current
            if cur is None or mch & 1 or cx_id != cur.cx_id:
                self.abandon("a PDV of another message arrived during its data set")
                log.error("protocol error from %s: PDV (context %d, header 0x%02X) out of place",
                          dul.assoc.requestor.ae_title, cx_id, mch)
                dul.event_queue.put("Evt19")  # invalid PDU: pynetdicom aborts the association
                return
            if cur.failure is None:
                try:
                    write_all(cur.fd, data)
                except OSError as exc:
                    cur.failure = exc  # the rest of the data set is read and dropped, then answered
                else:
                    cur.sha256.update(data)
                    cur.size += len(data)
            if mch & 2:
                self._complete(dul)

    def _complete(self, dul: Any) -> None:
        """The data set is complete: run the handler (unless spooling failed), answer, remove the spool."""
        cur = self.current
        assert cur is not None
        self.current = None
        assoc = dul.assoc
        failure = cur.failure
        try:
            os.close(cur.fd)
        except OSError as exc:
            failure = failure or exc
        rsp: Any
        try:
            if failure is not None:
                log.error("C-STORE of %s: spooling failed: %s", cur.sop_uid, failure)
                rsp = _failure(0xA700, "spooling the data set failed")  # out of resources
            else:
                req = C_STORE()
                req.MessageID = cur.msg_id
                req.AffectedSOPClassUID = cur.sop_class
                req.AffectedSOPInstanceUID = cur.sop_uid
                req.Priority = cur.priority
                if cur.move_ae is not None:
                    req.MoveOriginatorApplicationEntityTitle = cur.move_ae
                if cur.move_id is not None:
                    req.MoveOriginatorMessageID = cur.move_id
                req._dataset_path = Path(cur.path)  # noqa: SLF001 -- what Event.dataset_path reads
                req._dataset_file = None  # noqa: SLF001
                setattr(req, _SPOOLED, Spooled(cur.sha256.hexdigest(), cur.size, cur.started_ns, time.time_ns()))
                # the handler runs in this (the DUL) thread: the network idle timer, which the
                # association thread checks, must not expire while it works (as under pynetdicom)
                timer = dul._idle_timer  # noqa: SLF001
                idle_timeout, timer.timeout = timer.timeout, None
                try:
                    rsp = evt.trigger(assoc, evt.EVT_C_STORE, {"request": req, "context": cur.cx.as_tuple})
                except Exception:
                    log.exception("Exception in handler bound to 'evt.EVT_C_STORE'")
                    rsp = HANDLER_FAILED
                finally:
                    timer.timeout = idle_timeout
                    timer.restart()
        finally:
            try:
                os.unlink(cur.path)
            except OSError:
                pass
        if dul.state_machine.current_state != "Sta6" or not assoc.is_established:
            return  # aborted or released meanwhile: no answer, as pynetdicom
        self._answer(dul, cur, rsp)

    def _answer(self, dul: Any, cur: _Receiving, rsp: Any) -> None:
        simple = _simple_answer(rsp)
        max_pdu = dul.assoc.requestor.maximum_length or 0
        if simple is not None:
            cmd = encode_store_rsp(cur.msg_id, cur.sop_class, cur.sop_uid, *simple)
            if not max_pdu or len(cmd) + 6 <= max_pdu:
                item = _PDV_HEAD.pack(len(cmd) + 2, cur.cx_id, 0x03) + cmd
                dul.socket.send(struct.pack(">BBI", 0x04, 0, len(item)) + item)
                return
        # anything else the way pynetdicom answers (validated, encoded and sent by its layers)
        from pynetdicom.service_class import StorageServiceClass

        out = C_STORE()
        out.MessageID = cur.msg_id
        out.MessageIDBeingRespondedTo = cur.msg_id
        out.AffectedSOPInstanceUID = cur.sop_uid
        out.AffectedSOPClassUID = cur.sop_class
        out = StorageServiceClass(dul.assoc).validate_status(rsp, out)
        dul.assoc.dimse.send_msg(out, cur.cx_id)


def _failure(status: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = comment
    return ds


def _standard_notifications(assoc: Any) -> bool:
    """True when nothing but pynetdicom's standard logging handlers listens to PDU/DIMSE traffic."""
    for event, allowed in _NOTIFY.items():
        for handler, _args in assoc.get_handlers(event) or ():
            if handler not in allowed:
                return False
    return True


def _close_and_remove(fd: int, path: str) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
    try:
        os.unlink(path)
    except OSError:
        pass


_PDU_NAMES = {0x01: "A-ASSOCIATE-RQ", 0x02: "A-ASSOCIATE-AC", 0x03: "A-ASSOCIATE-RJ", 0x05: "A-RELEASE-RQ",
              0x06: "A-RELEASE-RP", 0x07: "A-ABORT"}
