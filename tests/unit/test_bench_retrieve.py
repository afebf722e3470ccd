"""benchmarks.retrieve: its options, and a retrieve counts as complete only when the final response says so."""

from __future__ import annotations

import pytest

from benchmarks.retrieve import incomplete, parse_args, parse_final

GET_OK = """\
I: Received C-GET Response (Pending)
I:   Number of Remaining Suboperations : 1
I:   Number of Completed Suboperations : 4
I: Received C-GET Response (Success)
I: Final status report from last C-GET message:
I:   Number of Remaining Suboperations : 0
I:   Number of Completed Suboperations : 5
I:   Number of Failed Suboperations    : 0
I:   Number of Warning Suboperations   : 0
I: Releasing Association
"""

MOVE_OK = """\
I: Received Move Response 5 (Pending)
D: Remaining Suboperations       : 1
D: Completed Suboperations       : 4
D: Failed Suboperations          : 0
D: Warning Suboperations         : 0
D: DIMSE Status                  : 0xff00: Pending: Sub-operations are continuing
I: Received Final Move Response
D: Completed Suboperations       : 5
D: Failed Suboperations          : 0
D: Warning Suboperations         : 0
D: DIMSE Status                  : 0x0000: Success: Sub-operations complete - No failures or warnings
"""


def test_complete_retrieves_are_recognised() -> None:
    assert incomplete(GET_OK, 0, 5) is None
    assert incomplete(MOVE_OK, 0, 5) is None
    # a final C-MOVE response without Remaining: the last Pending's "Remaining 1" does not count
    assert parse_final(MOVE_OK).remaining is None


@pytest.mark.parametrize("output,code,expected", [
    (GET_OK, 0, 6),                                             # fewer than the study holds
    (GET_OK, 1, 5),                                             # the client failed
    (GET_OK.replace("Failed Suboperations    : 0", "Failed Suboperations    : 1"), 0, 5),
    (GET_OK.replace("(Success)", "(Warning)"), 0, 5),
    (MOVE_OK.replace("0x0000: Success", "0xb000: Warning"), 0, 5),
    (MOVE_OK.split("I: Received Final")[0], 0, 5),              # no final response
    ("", 0, 0),
])
def test_incomplete_retrieves_are_reported(output: str, code: int, expected: int) -> None:
    assert incomplete(output, code, expected) is not None


def test_arguments() -> None:
    args = parse_args([])
    assert (args.ct, args.small, args.ops, args.servers) == (100, 500, ["get", "move"], ["vna", "orthanc"])
    args = parse_args(["--servers", "vna,vna-python", "--ops", "move", "--repeat", "5", "--ct", "0"])
    assert (args.servers, args.ops, args.repeat, args.ct) == (["vna", "vna-python"], ["move"], 5, 0)
    for bad in (["--servers", "vna,pacs"], ["--ops", "find"], ["--repeat", "0"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_latency_table_gives_orthanc_over_vna() -> None:
    from benchmarks.retrieve import latency_table

    out = latency_table({"vna": {"echo": 20.0, "find": 25.0}, "orthanc": {"echo": 30.0, "find": 50.0}})
    vna_row = next(line for line in out.splitlines() if line.startswith("vna"))
    assert vna_row.split()[-2:] == ["1.50", "2.00"]
