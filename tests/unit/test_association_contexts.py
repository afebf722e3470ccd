"""Each accepted association gets its own copy of the supported presentation contexts, made cheaply."""

from __future__ import annotations

import copy

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AllStoragePresentationContexts, build_context

from vna.dicom.contexts import Contexts


def test_copies_are_equal_and_independent() -> None:
    originals = [build_context(cx.abstract_syntax, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
                 for cx in AllStoragePresentationContexts[:20]]
    for cx in originals[:5]:
        cx.scu_role, cx.scp_role = True, True
    contexts = Contexts(originals)
    copies = copy.deepcopy(contexts)  # what pynetdicom's RequestHandler does per association
    assert type(copies) is list and len(copies) == len(originals)
    for c, o in zip(copies, originals):
        assert c is not o
        assert (c.abstract_syntax, c.transfer_syntax, c.scu_role, c.scp_role, c.context_id) == \
            (o.abstract_syntax, o.transfer_syntax, o.scu_role, o.scp_role, o.context_id)
    # negotiation of one association must not leak into the server's contexts or other associations
    copies[0].transfer_syntax = [ImplicitVRLittleEndian]
    copies[1].add_transfer_syntax("1.2.840.10008.1.2.4.50")
    copies[2].context_id = 7
    assert originals[0].transfer_syntax == [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    assert "1.2.840.10008.1.2.4.50" not in originals[1].transfer_syntax
    assert originals[2].context_id is None
    assert copy.deepcopy(contexts)[1].transfer_syntax == [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
