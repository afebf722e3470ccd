"""vna.dicom.uid_cache: the same UIDs and the same errors, validated once per distinct string.

Run in a child interpreter: the install patches pydicom and pynetdicom process-wide.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

_CHECK = textwrap.dedent('''
    import warnings
    from pydicom import config
    from pydicom.uid import UID
    import pynetdicom.pdu_items, pynetdicom.presentation, pynetdicom.utils

    from vna.dicom import uid_cache
    uid_cache.install()
    uid_cache.install()  # idempotent

    a, b = UID("1.2.840.10008.1.2.1"), UID("1.2.840.10008.1.2.1")
    assert a == b == "1.2.840.10008.1.2.1" and type(a) is UID and a is not b
    assert a.is_transfer_syntax and not a.is_implicit_VR and a.name == "Explicit VR Little Endian"
    assert UID(" 1.2.3 ") == "1.2.3"
    for _ in range(2):  # an invalid value is never remembered: it raises (or warns) every time
        try:
            UID("1.2.abc", config.RAISE)
            raise SystemExit("invalid UID accepted in RAISE mode")
        except ValueError:
            pass
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            UID("1.2.abc")
        assert w, "no warning for an invalid UID"

    set_uid = pynetdicom.utils.set_uid
    assert pynetdicom.pdu_items.set_uid is set_uid and pynetdicom.presentation.set_uid is set_uid
    assert set_uid(b"1.2.3", "x") == set_uid("1.2.3", "x") == "1.2.3"
    assert set_uid(None, "x") is None
    for _ in range(2):
        for bad in ("1.2.abc" * 20, ""):
            try:
                set_uid(bad, "x", allow_empty=False)
                raise SystemExit("invalid value accepted by set_uid: " + repr(bad))
            except ValueError:
                pass
    print("ok")
''')


def test_uid_cache_keeps_results_and_errors() -> None:
    r = subprocess.run([sys.executable, "-c", _CHECK], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout[-1000:] + r.stderr[-2000:]
