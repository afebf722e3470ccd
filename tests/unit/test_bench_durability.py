"""benchmarks.durability: strace lines are counted once per sync call and sorted by what they synced."""

from __future__ import annotations

from pathlib import Path

from benchmarks.durability import classify, count_syncs


def test_sync_calls_are_sorted_by_what_they_sync(tmp_path: Path) -> None:
    (tmp_path / "r1" / "1.2").mkdir(parents=True)
    d = tmp_path / "r1" / "1.2"
    out = "\n".join([
        f"101   fsync(7<{tmp_path}/spool/in.3.dcm>) = 0",
        f"102   fsync(9<{d}> <unfinished ...>",
        f"101   fdatasync(8<{tmp_path}/index.db-wal>) = 0",
        "102   <... fsync resumed>)           = 0",
        f"103   fdatasync(5<{tmp_path}/orthanc-index/index>) = 0",
        f"103   fdatasync(6<{tmp_path}/audit/audit.jsonl>) = 0",
        f"104   sync_file_range(4<{tmp_path}/x/y.tmp (deleted)>, 0, 0, 2) = 0",
        "104   fsync(3<socket:[1234]>) = -1 EINVAL (Invalid argument)",
        f"105   openat(AT_FDCWD<{tmp_path}>, \"f\", O_RDONLY) = 3<{tmp_path}/f>",
    ])
    assert count_syncs(out) == {"data": 2, "directory": 1, "index": 2, "audit": 1, "other": 1}


def test_index_files_of_sqlite_and_orthanc() -> None:
    for name in ("/d/index.db", "/d/index.db-wal", "/d/x.sqlite3-journal", "/o/orthanc-index/index-wal"):
        assert classify(name) == "index", name
    assert classify("/o/storage/8f/79/8f7997ec") == "data"
