"""Validate each distinct UID string once, not every time a pydicom UID is built from it.

pydicom checks the value of every ``UID(...)`` it constructs (length and a
regular expression). pynetdicom builds UIDs from the same few hundred strings
over and over: every presentation context a peer proposes, every transfer
syntax we support, every command set -- about half of the CPU of negotiating
an association with a storescu that proposes its default ~120 contexts.

``install()`` wraps ``UID.__new__``: a string that once passed pydicom's own UI
validation (checked in RAISE mode, so nothing that would have warned or raised
is remembered) is made into a UID directly. Everything else takes pydicom's
path unchanged. It also memoises pynetdicom's ``set_uid`` (its own validator,
then pydicom's again) for the values it returned without raising; the same
UID object is returned for the same arguments (UIDs are immutable). Both
memories are bounded (cleared when full).
"""

from __future__ import annotations

from typing import Any

import pynetdicom.ae
import pynetdicom.dimse_primitives
import pynetdicom.pdu_items
import pynetdicom.pdu_primitives
import pynetdicom.presentation
import pynetdicom.utils
from pydicom import config
from pydicom.uid import UID
from pydicom.valuerep import validate_value

MAX_REMEMBERED = 20_000
_valid: set[str] = set()
_set_uid_memo: dict[tuple[Any, ...], UID] = {}
_SET_UID_USERS = (pynetdicom.utils, pynetdicom.ae, pynetdicom.dimse_primitives, pynetdicom.pdu_items,
                  pynetdicom.pdu_primitives, pynetdicom.presentation)
_installed = False


def install() -> None:
    """Idempotent."""
    global _installed
    if _installed:
        return
    original = UID.__new__

    def new(cls: type[UID], val: Any, validation_mode: int | None = None) -> UID:
        if type(val) not in (str, UID) or hasattr(val, "_PRIVATE_TS_ENCODING"):
            return original(cls, val, validation_mode)
        if val not in _valid:
            try:  # the one validation of this string: a valid one needs no other
                validate_value("UI", val, config.RAISE)
            except ValueError:  # pydicom warns or raises as its validation mode says, every time
                return original(cls, val, validation_mode)
            if len(_valid) >= MAX_REMEMBERED:
                _valid.clear()
            _valid.add(str(val))
        return str.__new__(cls, val.strip())

    UID.__new__ = new  # type: ignore[method-assign]
    _memoise_set_uid()
    _installed = True


def _memoise_set_uid() -> None:
    original = pynetdicom.utils.set_uid

    def set_uid(value: Any, name: str, allow_empty: bool = True, allow_none: bool = True,
                validate: bool = True) -> UID | None:
        key = (value, name, allow_empty, allow_none, validate) \
            if type(value) in (str, bytes, UID) and not hasattr(value, "_PRIVATE_TS_ENCODING") else None
        if key is not None:
            hit = _set_uid_memo.get(key)
            if hit is not None:
                return hit
        out = original(value, name, allow_empty, allow_none, validate)
        if key is not None and out is not None:
            if len(_set_uid_memo) >= MAX_REMEMBERED:
                _set_uid_memo.clear()
            _set_uid_memo[key] = out
        return out

    for module in _SET_UID_USERS:
        if getattr(module, "set_uid", None) is original:
            module.set_uid = set_uid  # type: ignore[attr-defined]
