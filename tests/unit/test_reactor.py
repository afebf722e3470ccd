"""vna.dicom.reactor: pynetdicom's polling reactors are replaced by blocking ones."""

from __future__ import annotations

import threading

from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider

import vna.dicom.server  # noqa: F401  (installs the reactor on import)
from vna.dicom import reactor


def test_installed_for_this_pynetdicom() -> None:
    assert reactor.installed()
    assert DULServiceProvider.run_reactor is reactor._dul_run_reactor
    assert Association._run_reactor is reactor._assoc_run_reactor


def test_queues_wake_the_waiting_threads() -> None:
    """A put on any queue a reactor waits for wakes it; a pause request does too."""
    assoc = Association(AE(), "requestor")
    wake: threading.Event = assoc._vna_wake  # type: ignore[attr-defined]
    for put in (lambda: assoc.dimse.msg_queue.put((1, None)), lambda: assoc.dul.to_user_queue.put(None),
                assoc._reactor_checkpoint.clear):
        wake.clear()
        put()
        assert wake.is_set()
    waker = assoc.dul._vna_waker  # type: ignore[attr-defined]
    assoc.dul.to_provider_queue.put(None)
    assert waker.r.recv(16) == b"\0"  # the DUL thread's poll() would return
    waker.close()
    waker.poke()  # after close: ignored, never written to a reused descriptor
