"""vna.dicom.reactor: once a pause request has returned, the association reactor takes no DIMSE message.

The message waiting on the queue is the C-STORE-RSP a paused ``send_c_store``
is waiting for (issue 17). Run in a child interpreter like test_reactor.py.
The end-to-end check is tests/integration/test_move_stress.py.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

_CHECK = textwrap.dedent('''
    import threading
    from pynetdicom import AE
    from pynetdicom.association import Association

    import vna.dicom.server  # installs the reactor on import
    from vna.dicom import reactor

    assoc = Association(AE(), "requestor")
    checkpoint = assoc._reactor_checkpoint
    rsp = (1, "C-STORE-RSP")
    assoc.dimse.msg_queue.put(rsp)

    # paused: even a reactor that got past checkpoint.wait() leaves the message to the sender
    checkpoint.clear()
    assert reactor._take_msg(assoc) == (None, None)
    assert assoc.dimse.msg_queue.qsize() == 1

    # a pause request waits for a take already under way (it saw the checkpoint set)
    checkpoint.set()
    paused = threading.Event()
    with checkpoint.take:
        t = threading.Thread(target=lambda: (checkpoint.clear(), paused.set()))
        t.start()
        assert not paused.wait(0.2)  # clear() cannot return while the take is under way
    t.join(10)
    assert paused.is_set()

    # running again: the reactor takes it
    checkpoint.set()
    assert reactor._take_msg(assoc) == rsp
    print("ok")
''')


def test_no_message_taken_once_a_pause_request_returned() -> None:
    r = subprocess.run([sys.executable, "-c", _CHECK], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
