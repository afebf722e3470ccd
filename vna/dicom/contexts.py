"""Presentation contexts of the association server."""

from __future__ import annotations

import copy
from typing import Any

from pynetdicom.presentation import PresentationContext

__all__ = ["Contexts"]


class Contexts(list):  # type: ignore[type-arg]
    """The server's supported presentation contexts, copied cheaply for each association.

    pynetdicom deep-copies the list for every association it accepts: ~130
    storage SOP classes x ~35 transfer syntaxes, every UID re-validated by a
    regular expression -- about 0.1 s of CPU (holding the GIL) per
    association. A context's own fields are what negotiation may change, so a
    copy of each context with its own transfer syntax list is as good.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> list[PresentationContext]:
        out = []
        for cx in self:
            c = copy.copy(cx)
            c._transfer_syntax = list(cx._transfer_syntax)  # noqa: SLF001
            out.append(c)
        return out
