"""vna.domain.validate_uid: the one check every UID passes before it names a key or an index row."""

from __future__ import annotations

import pytest

from vna.domain import validate_uid
from vna.errors import InvalidUID


@pytest.mark.parametrize("value", ["1.2.3\n", "1.2.3\n\x00", "1.2.a", "../1.2", "1..2", ".", "1.2.", "1" * 65])
def test_not_uids_are_refused(value: str) -> None:
    with pytest.raises(InvalidUID):
        validate_uid(value, "SeriesInstanceUID")


def test_uids_are_returned_stripped_and_strictness_is_about_leading_zeros() -> None:
    assert validate_uid("1.2.840.10008\x00", "x") == "1.2.840.10008"
    assert validate_uid(" 1.02.3 ", "x") == "1.02.3"
    with pytest.raises(InvalidUID):
        validate_uid("1.02.3", "x", strict=True)
