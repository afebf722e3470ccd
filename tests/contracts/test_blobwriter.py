"""The filesystem store's native writer (vna_native.BlobDir) against its Python reference.

The same operations on two stores, one per writer, must leave the same files
(bytes, permission bits, no temporary name left) and raise the same errors with
the same messages: random contents, sizes, chunkings and keys (existing keys
with the same or other bytes, missing directories, a key under a blob),
``put_file`` copies and adoptions, fsync on and off, and the failures a disk
gives: read-only, full (a small tmpfs), a file size limit (short writes).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import resource
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vna.errors import BlobNotFound
from vna.storage.filesystem import FilesystemBlobStore


@pytest.fixture(autouse=True)
def _native_built() -> None:
    try:
        import vna_native  # noqa: F401
    except ImportError:
        pytest.fail("the native extension is not built: run `make install`")


def pair(base: Path, **kw: Any) -> tuple[FilesystemBlobStore, FilesystemBlobStore]:
    """A native and a Python store (same id, so the same error messages) under ``base``."""
    return (FilesystemBlobStore("fs", base / "native", native=True, **kw),
            FilesystemBlobStore("fs", base / "python", native=False, **kw))


def files(store: FilesystemBlobStore) -> dict[str, tuple[bytes, int]]:
    """Every file under the store's root (temporary names included): its bytes and permission bits."""
    out: dict[str, tuple[bytes, int]] = {}
    for dirpath, _dirs, names in os.walk(store.root):
        for name in names:
            path = Path(dirpath, name)
            out[str(path.relative_to(store.root))] = (path.read_bytes(), stat.S_IMODE(path.stat().st_mode))
    return out


def outcome(call: Callable[[], Any]) -> tuple[str, str]:
    """What a call did: ("ok", size) or (exception class, message)."""
    try:
        result = call()
    except Exception as exc:
        return type(exc).__name__, str(exc)
    return "ok", str(getattr(result, "size", result))


def data_of(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])]


KEYS = ["a", "a/b", "x/y/z.dcm", "x/y/w.dcm", "x/y", "deep/1/2/3/4.dcm"]
SIZES = st.one_of(st.integers(0, 64), st.integers(0, 200_000), st.sampled_from([1 << 20, (1 << 20) + 1]))
OPS = st.lists(st.tuples(st.sampled_from(["put", "put_file", "adopt"]), st.sampled_from(KEYS), SIZES,
                         st.integers(0, 3), st.lists(st.integers(0, 1 << 21), max_size=5)),
               min_size=1, max_size=8)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS, fsync=st.booleans(), file_mode=st.sampled_from([0o600, 0o640]))
def test_same_files_and_errors_as_the_reference(ops: list[tuple[str, str, int, int, list[int]]], fsync: bool,
                                                file_mode: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        stores = pair(base, fsync=fsync, file_mode=file_mode)
        for n, (op, key, size, seed, cuts) in enumerate(ops):
            data = data_of(size, seed)
            results = []
            for i, store in enumerate(stores):
                if op == "put":
                    results.append(outcome(lambda: store.put(key, iter(chunked(data, cuts)))))
                else:
                    spool = base / f"spool-{n}-{i}"  # on the stores' filesystem: adoption links it
                    spool.write_bytes(data)
                    results.append(outcome(lambda: store.put_file(key, spool, adopt=op == "adopt")))
            assert results[0] == results[1], (op, key, size)
        assert files(stores[0]) == files(stores[1])
        assert not os.listdir(stores[0].root / ".tmp")


@settings(max_examples=25, deadline=None)
@given(size=SIZES, seed=st.integers(0, 3), cuts=st.lists(st.integers(0, 1 << 21), max_size=6))
def test_native_put_reports_the_sha256_of_the_bytes(size: int, seed: int, cuts: list[int]) -> None:
    data = data_of(size, seed)
    with tempfile.TemporaryDirectory() as tmp:
        native, _ = pair(Path(tmp), fsync=False)
        pieces: list[Any] = chunked(data, cuts)
        pieces = [bytearray(p) if i % 2 else memoryview(p) if i % 3 else p for i, p in enumerate(pieces)]
        st_ = native.put("k/v", iter(pieces))
        assert (st_.size, st_.sha256) == (len(data), hashlib.sha256(data).hexdigest())
        assert native.local_path("k/v").read_bytes() == data


@contextlib.contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir()
    assert subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)]).returncode == 0
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)])


def test_full_disk_same_error_nothing_left(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "1m") as base:
        stores = pair(base)
        big = data_of(2 << 20, 1)
        src = tmp_path / "big.bin"  # on the large disk: put_file copies it
        src.write_bytes(big)
        calls: list[Callable[[FilesystemBlobStore], Any]] = [
            lambda s: s.put("a/b", iter([big[:4096], big[4096:]])),
            lambda s: s.put_file("a/b", src),
        ]
        for call in calls:
            results = [outcome(lambda: call(s)) for s in stores]
            assert results[0] == results[1] == ("StorageUnavailable", "fs: cannot write a/b: No space left on device")
        for s in stores:
            assert not os.listdir(s.root / ".tmp")
            with pytest.raises(BlobNotFound):
                s.stat("a/b")
            assert s.put("a/b", [b"fits"]).size == 4  # the space came back


def test_read_only_filesystem_same_error(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "ro", "4m") as base:
        stores = pair(base)
        spool = base / "spool.dcm"
        spool.write_bytes(b"spooled")
        assert subprocess.run(["mount", "-o", "remount,ro", str(base)]).returncode == 0
        calls: list[Callable[[FilesystemBlobStore], Any]] = [
            lambda s: s.put("k", [b"x"]),
            lambda s: s.put_file("k", spool),
            lambda s: s.put_file("k", spool, adopt=True),
        ]
        for call in calls:
            results = [outcome(lambda: call(s)) for s in stores]
            assert results[0] == results[1] == ("StorageUnavailable", "fs: cannot write k: Read-only file system")


def test_file_size_limit_short_write_is_an_error(tmp_path: Path) -> None:
    """Past RLIMIT_FSIZE a write is short, the next one fails (EFBIG): no blob, no temporary name."""
    stores = pair(tmp_path)
    big = data_of(300_000, 2)
    src = tmp_path / "src.bin"
    src.write_bytes(big)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))
    try:
        put = [outcome(lambda: s.put("k", [big])) for s in stores]
        copy = [outcome(lambda: s.put_file("c", src)) for s in stores]
        small = [outcome(lambda: s.put("ok", [big[:50_000]])) for s in stores]
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert put[0] == put[1] == ("StorageUnavailable", "fs: cannot write k: File too large")
    assert copy[0] == copy[1] == ("StorageUnavailable", "fs: cannot write c: File too large")
    assert small[0] == small[1] == ("ok", "50000")
    assert files(stores[0]) == files(stores[1]) == {"ok": (big[:50_000], 0o600)}


def test_missing_root_same_error(tmp_path: Path) -> None:
    stores = pair(tmp_path)
    for s in stores:
        os.rmdir(s.root / ".tmp")
        os.rmdir(s.root)
    results = [outcome(lambda: s.put("a/b", [b"x"])) for s in stores]
    assert results[0] == results[1] == ("StorageUnavailable", "fs: cannot write a/b: No such file or directory")


@pytest.mark.parametrize("fake_module,message", [
    ("raise ImportError('not built in this test')\n", "the native blob writer needs the native extension vna_native"),
    ("Listener = None\n", "the native blob writer: the installed vna_native predates it"),
], ids=["missing", "older-build"])
def test_native_required_but_missing_says_how_to_build(tmp_path: Path, fake_module: str, message: str) -> None:
    """Without the extension (or with a build older than the writer): native=True raises ConfigError naming
    the build; the default takes the reference."""
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "vna_native.py").write_text(fake_module)
    script = (
        "import sys\n"
        "from vna.errors import ConfigError\n"
        "from vna.storage.filesystem import FilesystemBlobStore as F\n"
        f"assert not F('fs', sys.argv[1]).native\n"
        "try:\n"
        "    F('fs', sys.argv[1], native=True)\n"
        "except ConfigError as exc:\n"
        "    print(exc)\n"
    )
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path / "s")], capture_output=True, text=True,
                       timeout=60, env={**os.environ, "PYTHONPATH": f"{fake}{os.pathsep}{root}"})
    assert r.returncode == 0, r.stderr
    assert message in r.stdout
    assert "make install" in r.stdout


def test_tier_write_file_same_replica_outcomes_and_quorum(tmp_path: Path) -> None:
    """W-of-N through TierAccessor.write_file: one native call on the native stores, per-replica calls on the
    reference ones; a read-only replica and a replica that has the key fail alike, quorum and compensation too."""
    from vna.codec import IdentityCodec
    from vna.domain import Tier
    from vna.errors import QuorumNotMet
    from vna.storage.accessor import TierAccessor

    data = data_of(70_000, 5)
    sha = hashlib.sha256(data).hexdigest()
    outcomes = []
    for native in (True, False):
        base = tmp_path / ("native" if native else "python")
        base.mkdir()
        with tmpfs(base / "ro", "4m") as ro:
            stores = [FilesystemBlobStore(f"r{i}", root, native=native)
                      for i, root in enumerate([base / "r0", ro / "r1", base / "r2"])]
            assert subprocess.run(["mount", "-o", "remount,ro", str(ro)]).returncode == 0
            stores[2].put("k/x.dcm", [b"already here"])
            spool = base / "spool.dcm"
            spool.write_bytes(data)
            tier = TierAccessor(Tier.HOT, stores, 1, IdentityCodec())
            assert tier._native_files == native
            writes = tier.write_file("k/x.dcm", spool, sha, len(data), adopt=True)
            adopted = stores[0].local_path("k/x.dcm").stat().st_ino == spool.stat().st_ino
            strict = TierAccessor(Tier.HOT, stores, 3, IdentityCodec())
            spool2 = base / "spool2.dcm"
            spool2.write_bytes(data)
            quorum = outcome(lambda: strict.write_file("k/y.dcm", spool2, sha, len(data), adopt=True))
            left = sorted(stores[0].iter_keys())
            tier.close()
            strict.close()
        outcomes.append((writes, adopted, quorum, left))
    assert outcomes[0] == outcomes[1]
    writes, adopted, quorum, left = outcomes[0]
    assert [(w.store_id, w.ok) for w in writes] == [("r0", True), ("r1", False), ("r2", False)]
    assert writes[1].error == "r1: cannot write k/x.dcm: Read-only file system"
    assert writes[2].error == "r2: k/x.dcm already exists"
    assert adopted and quorum[0] == QuorumNotMet.__name__ and left == ["k/x.dcm"]  # k/y.dcm compensated
