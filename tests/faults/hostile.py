"""A raw DICOM peer for the hostile-peer tests: hand-built PDUs on a plain socket, no state machine;
and the waits and spool look-ups those tests share."""

from __future__ import annotations

import socket
import struct
import time
from io import BytesIO
from pathlib import Path
from typing import Callable

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, ImplementationClassUIDNotification, MaximumLengthNotification
from pynetdicom.presentation import build_context

from tests.conftest import VnaServer

VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def associate_rq(contexts: list[tuple[str, list[str]]], calling: str = "RAWSCU", called: str = "VNA",
                 max_pdu: int = 16384) -> bytes:
    """An encoded A-ASSOCIATE-RQ proposing ``contexts`` (abstract syntax, transfer syntaxes), ids 1, 3, 5..."""
    prim = A_ASSOCIATE()
    prim.application_context_name = "1.2.840.10008.3.1.1.1"
    prim.calling_ae_title = calling
    prim.called_ae_title = called
    ml = MaximumLengthNotification()
    ml.maximum_length_received = max_pdu
    ic = ImplementationClassUIDNotification()
    ic.implementation_class_uid = "1.2.826.0.1.3680043.10.1137.99"
    prim.user_information = [ml, ic]
    cxs = []
    for i, (abstract, syntaxes) in enumerate(contexts):
        cx = build_context(abstract, syntaxes)
        cx.context_id = 2 * i + 1
        cxs.append(cx)
    prim.presentation_context_definition_list = cxs
    rq = A_ASSOCIATE_RQ()
    rq.from_primitive(prim)
    return bytes(rq.encode())


def command_set(**elements: object) -> bytes:
    """An Implicit VR Little Endian command set (group 0000) with its group length."""
    ds = Dataset()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = True
    write_dataset(fp, ds)
    body = fp.getvalue()
    return struct.pack("<HHIL", 0, 0, 4, len(body)) + body


def p_data(pdvs: list[tuple[int, int, bytes]]) -> bytes:
    """A P-DATA-TF PDU of PDVs (context id, message control header, fragment)."""
    items = b"".join(struct.pack(">LBB", len(data) + 2, cx, mch) + data for cx, mch, data in pdvs)
    return struct.pack(">BBL", 0x04, 0, len(items)) + items


RELEASE_RQ = b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00"


class RawPeer:
    """One TCP connection to the server, read and written PDU by PDU."""

    def __init__(self, port: int, source: str = "127.0.0.1", timeout: float = 30.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                             source_address=(source, 0))

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "RawPeer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _recv_exactly(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError(f"closed after {len(out)} of {n} bytes")
            out += chunk
        return bytes(out)

    def recv_pdu(self) -> tuple[int, bytes]:
        """The next PDU: (type, variable part). ConnectionError when the server closed the connection."""
        head = self._recv_exactly(6)
        pdu_type, _, length = struct.unpack(">BBL", head)
        return pdu_type, self._recv_exactly(length)

    def associate(self, contexts: list[tuple[str, list[str]]]) -> dict[int, str]:
        """Associate; returns the accepted context ids with their transfer syntax."""
        self.send(associate_rq(contexts))
        pdu_type, body = self.recv_pdu()
        assert pdu_type == 0x02, f"association not accepted (PDU type 0x{pdu_type:02X})"
        ac = A_ASSOCIATE_AC()
        ac.decode(struct.pack(">BBL", 2, 0, len(body)) + body)
        return {cx.context_id: str(cx.transfer_syntax[0]) for cx in ac.presentation_context if cx.result == 0}

    def response(self) -> Dataset | int:
        """The command set of the next DIMSE response, or the PDU type of anything else (e.g. 0x07 A-ABORT)."""
        from pynetdicom.dsutils import decode

        cmd = b""
        while True:
            pdu_type, body = self.recv_pdu()
            if pdu_type != 0x04:
                return pdu_type
            pos = 0
            while pos < len(body):
                length, _cx, mch = struct.unpack_from(">LBB", body, pos)
                cmd += body[pos + 6:pos + 4 + length]
                pos += 4 + length
                if mch & 0x03 == 0x03:
                    return decode(BytesIO(cmd), True, True)

    def closed_by_server(self, within: float) -> bool:
        """True once the server has closed the connection (reads until EOF or reset), polling up to ``within`` s."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, min(1.0, deadline - time.monotonic())))
            try:
                if not self.sock.recv(65536):
                    return True
            except TimeoutError:
                continue
            except OSError:
                return True
        return False


def spool(srv: VnaServer) -> list[Path]:
    """The files in the server's incoming spool, sorted."""
    incoming = srv.data_dir / "spool" / "incoming"
    return sorted(incoming.iterdir()) if incoming.exists() else []


def wait_for(cond: Callable[[], bool], within: float, what: str) -> None:
    """Poll ``cond`` until it holds; AssertionError naming ``what`` after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within} s")
        time.sleep(0.05)
