#!/usr/bin/env python3
"""Write the fuzz targets' seed corpora (a few small, well-formed inputs each) into DIR/<target>/.

Stdlib only. Usage: seeds.py DIR. Existing files are kept (libFuzzer adds to the corpus).
"""
import struct
import sys
from pathlib import Path

APP = b"1.2.840.10008.3.1.1.1"
VERIFICATION = b"1.2.840.10008.1.1"
CT = b"1.2.840.10008.5.1.4.1.1.2"
MR = b"1.2.840.10008.5.1.4.1.1.4"
IMPLICIT = b"1.2.840.10008.1.2"
EXPLICIT = b"1.2.840.10008.1.2.1"


def item(kind: int, value: bytes) -> bytes:
    return bytes([kind, 0]) + struct.pack(">H", len(value)) + value


def pdu(kind: int, body: bytes) -> bytes:
    return bytes([kind, 0]) + struct.pack(">I", len(body)) + body


def user_info(max_pdu: int, roles=()) -> bytes:
    user = item(0x51, struct.pack(">I", max_pdu)) + item(0x52, b"1.2.3.4")
    for uid, scu, scp in roles:
        user += item(0x54, struct.pack(">H", len(uid)) + uid + bytes([scu, scp]))
    return item(0x50, user + item(0x55, b"SEED_1"))


def associate_rq(calling: bytes = b"STORESCU") -> bytes:
    body = struct.pack(">HH", 1, 0) + b"VNA".ljust(16) + calling.ljust(16) + bytes(32)
    body += item(0x10, APP)
    for cid, abstract, tss in [(1, VERIFICATION, [IMPLICIT]), (3, CT, [IMPLICIT, EXPLICIT]),
                               (5, MR, [EXPLICIT]), (7, b"1.2.3.4", [IMPLICIT])]:
        value = bytes([cid, 0, 0, 0]) + item(0x30, abstract)
        for ts in tss:
            value += item(0x40, ts)
        body += item(0x20, value)
    return body + user_info(16384, [(MR, 1, 1)])


def associate_ac(results=((1, 0, IMPLICIT), (3, 3, b""))) -> bytes:
    body = struct.pack(">HH", 1, 0) + b"VNA".ljust(16) + b"STORESCU".ljust(16) + bytes(32)
    body += item(0x10, APP)
    for cid, result, ts in results:
        body += item(0x21, bytes([cid, 0, result, 0]) + item(0x40, ts))
    return body + user_info(32768, [(MR, 0, 1)])


def element(elem: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0, elem, len(value)) + value


def us(v: int) -> bytes:
    return struct.pack("<H", v)


def even(v: bytes, pad: bytes = b"\0") -> bytes:
    return v + pad if len(v) % 2 else v


def command(*elements: bytes) -> bytes:
    body = b"".join(elements)
    return element(0, struct.pack("<I", len(body))) + body


def echo_rq(msg: int = 1) -> bytes:
    return command(element(2, even(VERIFICATION)), element(0x100, us(0x30)),
                   element(0x110, us(msg)), element(0x800, us(0x101)))


def store_rq(msg: int = 7) -> bytes:
    return command(element(2, even(CT)), element(0x100, us(1)), element(0x110, us(msg)),
                   element(0x700, us(0)), element(0x800, us(1)), element(0x1000, even(b"1.2.3.45")),
                   element(0x1030, b"MOVER "), element(0x1031, us(3)))


def store_rsp(msg: int = 9, status: int = 0) -> bytes:
    return command(element(2, even(CT)), element(0x100, us(0x8001)), element(0x120, us(msg)),
                   element(0x800, us(0x101)), element(0x900, us(status)),
                   element(0x901, struct.pack("<HH", 0x10, 0x20)),
                   element(0x902, even(b"seed comment", b" ")), element(0x1000, even(b"1.2.3.45")))


def cancel_rq(msg: int = 9) -> bytes:
    return command(element(0x100, us(0x0FFF)), element(0x120, us(msg)), element(0x800, us(0x101)))


def pdv(cid: int, control: int, data: bytes) -> bytes:
    return struct.pack(">I", len(data) + 2) + bytes([cid, control]) + data


def meta(elem: int, vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH", 2, elem) + vr + struct.pack("<H", len(value)) + value


def part10() -> bytes:
    group = (struct.pack("<HH", 2, 1) + b"OB\0\0" + struct.pack("<I", 2) + b"\0\1"
             + meta(2, b"UI", even(CT)) + meta(3, b"UI", even(b"1.2.3.45"))
             + meta(0x10, b"UI", even(EXPLICIT)) + meta(0x12, b"UI", even(b"1.2.3"))
             + meta(0x13, b"SH", even(b"SEED", b" ")))
    head = bytes(128) + b"DICM" + struct.pack("<HH", 2, 0) + b"UL" + struct.pack("<HI", 4, len(group))
    data = struct.pack("<HH", 8, 0x16) + b"UI" + struct.pack("<H", len(even(CT))) + even(CT)
    data += struct.pack("<HH", 0x7FE0, 0x10) + b"OB\0\0" + struct.pack("<I", 8) + bytes(range(8))
    return head + group + data


def seeds() -> dict[str, dict[str, bytes]]:
    dataset = part10()[132 + 12 + 100:]  # some data set bytes
    return {
        "associate_rq": {"rq": associate_rq()},
        "associate_ac": {"ac": associate_ac()},
        "dimse_command": {"echo": echo_rq(), "store": store_rq()},
        "pdata": {
            "two": bytes([64]) + pdv(1, 3, echo_rq()) + pdv(3, 0, b"ab") + pdv(3, 2, b""),
            "fragments": bytes([9]) + b"".join(pdv(3, 0, b"xy") for _ in range(40)) + pdv(3, 2, b""),
            "unlimited": bytes([0]) + pdv(3, 1, store_rq()[:20]) + pdv(3, 3, store_rq()[20:]),
        },
        "file_meta": {"part10": part10()},
        "part10": {"part10": part10()},
        "store_rsp": {
            "ok": bytes([200]) + pdu(4, pdv(3, 3, store_rsp())),
            "cancel": bytes([7]) + pdu(4, pdv(3, 3, cancel_rq())) + pdu(4, pdv(3, 1, store_rsp(9, 0xB000)[:30]))
            + pdu(4, pdv(3, 3, store_rsp(9, 0xB000)[30:])),
            "abort": bytes([1]) + pdu(7, bytes([0, 0, 2, 6])),
        },
        "requestor": {
            "store": pdu(2, associate_ac(((1, 0, EXPLICIT), (3, 0, IMPLICIT), (5, 3, EXPLICIT))))
            + pdu(4, pdv(1, 3, store_rsp(1))) + pdu(6, bytes(4)),
            "cancel": pdu(2, associate_ac(((1, 0, EXPLICIT),))) + pdu(4, pdv(1, 3, cancel_rq(1)))
            + pdu(4, pdv(1, 1, store_rsp(1, 0xB000)[:30]) + pdv(1, 3, store_rsp(1, 0xB000)[30:]))
            + pdu(5, bytes(4)) + pdu(6, bytes(4)),
            "reject": pdu(3, bytes([0, 1, 1, 3])),
            "abort": pdu(7, bytes([0, 0, 2, 0])),
        },
        "listener": {
            "echo": pdu(1, associate_rq()) + pdu(4, pdv(1, 3, echo_rq())) + pdu(5, bytes(4)),
            "store": pdu(1, associate_rq()) + pdu(4, pdv(3, 3, store_rq()))
            + pdu(4, pdv(3, 0, dataset[:10]) + pdv(3, 2, dataset[10:])) + pdu(5, bytes(4)),
            "reject": pdu(1, associate_rq(b"REJECTME")),
            "abort": pdu(1, associate_rq()) + pdu(7, bytes([0, 0, 0, 0])),
        },
    }


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    for target, files in seeds().items():
        d = Path(argv[1]) / target
        d.mkdir(parents=True, exist_ok=True)
        for name, raw in files.items():
            (d / f"seed-{name}").write_bytes(raw)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
