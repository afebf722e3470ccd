"""vna.dicom.reactor: pynetdicom's polling reactors are replaced by blocking ones (and the codec installed).

Run in a child interpreter: installing the reactor (and importing vna.dicom.server,
which configures pynetdicom) must not change the SCUs of the other tests.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

_CHECK = textwrap.dedent('''
    import threading
    from pynetdicom import AE
    from pynetdicom.association import Association
    from pynetdicom.dul import DULServiceProvider

    import vna.dicom.server  # installs the reactor on import
    from vna.dicom import reactor

    assert reactor.installed()
    assert DULServiceProvider.run_reactor is reactor._dul_run_reactor
    assert Association._run_reactor is reactor._assoc_run_reactor
    import pynetdicom.dimse_messages
    assert pynetdicom.dimse_messages.encode.__module__ == "vna.dicom.dimse_codec"  # and its fast encoders

    # a put on any queue a reactor waits for wakes it; a pause request does too
    assoc = Association(AE(), "requestor")
    wake = assoc._vna_wake
    for put in (lambda: assoc.dimse.msg_queue.put((1, None)), lambda: assoc.dul.to_user_queue.put(None),
                assoc._reactor_checkpoint.clear):
        wake.clear()
        put()
        assert wake.is_set(), put
    waker = assoc.dul._vna_waker
    assoc.dul.to_provider_queue.put(None)
    assert waker.r.recv(16) == b"\\0"  # the DUL thread's poll() would return
    waker.close()
    waker.poke()  # after close: ignored, never written to a reused descriptor
    print("ok")
''')


def test_reactor_installed_and_queues_wake_the_waiting_threads() -> None:
    r = subprocess.run([sys.executable, "-c", _CHECK], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
