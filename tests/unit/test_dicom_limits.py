"""vna.dicom.limits: connection counting and rate-limited refusal lines (real objects, a real logger)."""

from __future__ import annotations

import logging
import socket

import pytest

from vna.dicom.limits import ConnectionLimits, RefusalLog


def test_refusals_are_logged_once_per_address_kind_and_window(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test.limits")
    refusals = RefusalLog(logger, window=3600)
    with caplog.at_level(logging.WARNING, logger="test.limits"):
        for _ in range(50):
            refusals.refuse("10.0.0.1", "bad PDU %d", 7)
        refusals.refuse("10.0.0.1", "too slow")
        refusals.refuse("10.0.0.2", "bad PDU %d", 7)
    assert [r.getMessage() for r in caplog.records] == [
        "DICOM peer 10.0.0.1: bad PDU 7", "DICOM peer 10.0.0.1: too slow", "DICOM peer 10.0.0.2: bad PDU 7"]


def test_the_next_window_carries_the_count(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test.limits")
    refusals = RefusalLog(logger, window=0.0)  # every line opens a new window
    with caplog.at_level(logging.WARNING, logger="test.limits"):
        refusals.refuse("10.0.0.1", "bad")
        refusals.refuse("10.0.0.1", "bad")
    assert [r.getMessage() for r in caplog.records] == ["DICOM peer 10.0.0.1: bad"] * 2
    refusals = RefusalLog(logger, window=3600)
    refusals._seen[("10.0.0.1", "bad")] = (-10_000.0, 41)  # a window that has ended with 41 not logged
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="test.limits"):
        refusals.refuse("10.0.0.1", "bad")
    assert caplog.records[0].getMessage() == "DICOM peer 10.0.0.1: bad (41 more like it from this address in the last 3600 s)"


def test_half_open_connections_do_not_take_association_slots() -> None:
    limits = ConnectionLimits(max_associations=2, max_half_open=3, max_per_address=2)
    socks = [socket.socket() for _ in range(8)]
    try:
        a = [limits.open(s, f"10.0.0.{i // 2}") for i, s in enumerate(socks[:6])]  # 3 addresses x 2
        assert all(c is not None for c in a[:3]) and a[3] is None  # the 4th half-open one is refused
        assert limits.counts() == (3, 0)
        assert a[0] is not None and a[1] is not None and a[2] is not None
        assert limits.claim(socks[0]) is a[0] and limits.claim(socks[0]) is None
        assert a[0].associate() and a[1].associate() and not a[2].associate()  # 2 association slots
        assert limits.counts() == (1, 2)
        assert limits.open(socks[6], "10.0.0.0") is None  # 10.0.0.0 holds 2 connections already
        a[0].close()
        a[0].close()  # idempotent
        assert limits.counts() == (1, 1)
        assert a[2].associate()
        c = limits.open(socks[7], "10.0.0.0")
        assert c is not None and limits.counts() == (1, 2)
        for conn in (a[1], a[2], c):
            conn.close()
        assert limits.counts() == (0, 0) and limits._per_address == {}
    finally:
        for s in socks:
            s.close()
