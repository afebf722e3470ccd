"""The BlobStore contract, run against every adapter: filesystem and S3 (real SeaweedFS).

Plus S3-specific behaviour: server-verified SHA-256 checksums, multipart
uploads, key prefix, storage class, and an unreachable endpoint.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import socket
import stat
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from botocore.exceptions import BotoCoreError, ClientError

from vna.checksum import CHUNK
from vna.config import S3Config
from vna.errors import (
    BlobExists,
    BlobNotFound,
    IntegrityError,
    StorageError,
    StorageUnavailable,
)
from vna.storage.base import BlobStore
from vna.storage.filesystem import FilesystemBlobStore
from vna.storage.s3 import S3BlobStore, map_error

MiB = 1 << 20


@pytest.fixture(params=["filesystem-native", "filesystem-python", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    if request.param.startswith("filesystem"):
        fs = FilesystemBlobStore("fs", tmp_path / "fs", native=request.param == "filesystem-native")
        assert fs.native == (request.param == "filesystem-native")
        return fs
    s3: S3BlobStore = request.getfixturevalue("s3_store")
    return s3


#: the filesystem store's two writers: the native one (vna_native.BlobDir) and the Python reference
WRITERS = pytest.mark.parametrize("native", [True, False], ids=["native", "python"])


def chunked(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def read(store: BlobStore, key: str, offset: int = 0, length: int | None = None) -> bytes:
    return b"".join(store.open(key, offset, length))


def blob(n: int, seed: int = 1) -> bytes:
    return (hashlib.sha256(str(seed).encode()).digest() * (n // 32 + 1))[:n] if n < 4096 else os.urandom(n)


# --- the contract --------------------------------------------------------------


def test_is_a_blobstore(store: BlobStore) -> None:
    assert isinstance(store, BlobStore)


@pytest.mark.parametrize("size", [0, 11, 3 * MiB + 17], ids=["empty", "small", "3MiB"])
def test_put_open_roundtrip(store: BlobStore, size: int) -> None:
    data = blob(size)
    st = store.put("st/1.2.3/obj", chunked(data, 256 * 1024 + 7))
    assert st.key == "st/1.2.3/obj"
    assert st.size == size
    assert st.sha256 in (None, hashlib.sha256(data).hexdigest())
    chunks = list(store.open("st/1.2.3/obj"))
    assert b"".join(chunks) == data
    if size > CHUNK:
        assert len(chunks) >= 2, "large blobs must stream in several chunks"


def test_put_accepts_any_chunking(store: BlobStore) -> None:
    data = blob(3 * MiB)
    store.put("a", [data[:1], b"", data[1:MiB], data[MiB:]])
    assert read(store, "a") == data


RANGES = [
    (0, None), (10, None), (10, 100), (CHUNK - 5, 10), (0, CHUNK + 1),
    (2 * MiB + 3, None), (3 * MiB - 3, 10), (3 * MiB, None), (3 * MiB + 100, 5), (5, 0),
]


@pytest.mark.parametrize("offset,length", RANGES)
def test_ranged_open(store: BlobStore, offset: int, length: int | None) -> None:
    data = blob(3 * MiB)
    store.put("r", chunked(data, MiB))
    end = None if length is None else offset + length
    assert read(store, "r", offset, length) == data[offset:end]


def test_ranged_open_on_empty_blob(store: BlobStore) -> None:
    store.put("e", [])
    assert read(store, "e") == b""
    assert read(store, "e", 0, 10) == b""
    assert read(store, "e", 5) == b""


def test_stat(store: BlobStore) -> None:
    data = blob(100_000)
    store.put("s/x", [data])
    st = store.stat("s/x")
    assert st.key == "s/x" and st.size == len(data)
    assert st.sha256 in (None, hashlib.sha256(data).hexdigest())
    assert st.modified is None or abs(st.modified - time.time()) < 300
    with pytest.raises(BlobNotFound):
        store.stat("s/missing")


def test_put_existing_key_refused_original_untouched(store: BlobStore) -> None:
    store.put("dup", [b"original"])
    with pytest.raises(BlobExists):
        store.put("dup", [b"replacement bytes"])
    with pytest.raises(BlobExists):
        store.put("dup", [])
    assert read(store, "dup") == b"original"
    assert store.stat("dup").size == len(b"original")


def test_delete_is_idempotent(store: BlobStore) -> None:
    store.delete("never/existed")
    store.put("d", [b"x"])
    store.delete("d")
    store.delete("d")
    assert list(store.iter_keys()) == []


def test_delete_then_open_is_not_found(store: BlobStore) -> None:
    store.put("gone", [b"bytes"])
    store.delete("gone")
    with pytest.raises(BlobNotFound):
        read(store, "gone")
    with pytest.raises(BlobNotFound):
        store.stat("gone")
    with pytest.raises(BlobNotFound):
        store.open("never/existed")  # raised by open itself, not on first read


def test_quarantine_moves_blob_out_of_service(store: BlobStore) -> None:
    store.put("q/1", [b"suspect"])
    store.put("q/2", [b"fine"])
    qkey = store.quarantine("q/1")
    assert qkey != "q/1"
    assert sorted(store.iter_keys()) == ["q/2"]
    assert qkey not in set(store.iter_keys(""))
    with pytest.raises(BlobNotFound):
        store.open("q/1")
    with pytest.raises(BlobNotFound):
        store.stat("q/1")
    assert read(store, qkey) == b"suspect"  # kept for forensics
    with pytest.raises(BlobNotFound):
        store.quarantine("q/1")
    store.put("q/1", [b"repaired"])  # the key is free again
    assert read(store, "q/1") == b"repaired"


def test_iter_keys_with_prefix(store: BlobStore) -> None:
    for key in ("a/1", "a/2", "ab/3", "b/4", "b/c/5"):
        store.put(key, [key.encode()])
    assert sorted(store.iter_keys()) == ["a/1", "a/2", "ab/3", "b/4", "b/c/5"]
    assert sorted(store.iter_keys("a/")) == ["a/1", "a/2"]
    assert sorted(store.iter_keys("a")) == ["a/1", "a/2", "ab/3"]
    assert sorted(store.iter_keys("b/c/")) == ["b/c/5"]
    assert list(store.iter_keys("zzz/")) == []


def test_iter_keys_empty_store(store: BlobStore) -> None:
    assert list(store.iter_keys()) == []


@pytest.mark.parametrize("key", ["../x", "/abs", "a//b", "a/../b", "", "a/./b", "sp ace", "a\\b", ".tmp/x", "a/.hidden"])
def test_unsafe_keys_rejected(store: BlobStore, key: str) -> None:
    with pytest.raises(ValueError):
        store.put(key, [b"x"])
    with pytest.raises(ValueError):
        store.open(key)
    with pytest.raises(ValueError):
        store.stat(key)
    with pytest.raises(ValueError):
        store.delete(key)
    with pytest.raises(ValueError):
        store.quarantine(key)


class Boom(Exception):
    pass


def failing_chunks(good: int) -> Iterator[bytes]:
    sent = 0
    while sent < good:
        yield blob(min(MiB, good - sent), seed=sent)
        sent += MiB
    raise Boom("source failed mid-way")


def test_failed_source_leaves_nothing(store: BlobStore) -> None:
    with pytest.raises(Boom):
        store.put("partial", failing_chunks(2 * MiB))
    with pytest.raises(BlobNotFound):
        store.stat("partial")
    assert list(store.iter_keys()) == []
    store.put("partial", [b"complete"])  # the key was never taken
    assert read(store, "partial") == b"complete"


# --- S3-specific ---------------------------------------------------------------


def test_s3_stat_carries_sha256(s3_store: S3BlobStore) -> None:
    for size in (0, 5, 2 * MiB):
        data = blob(size)
        key = f"sha/{size}"
        st = s3_store.put(key, chunked(data, MiB))
        assert st.sha256 == hashlib.sha256(data).hexdigest()
        assert s3_store.stat(key).sha256 == st.sha256


def test_s3_wrong_checksum_refused_by_server(s3_store: S3BlobStore) -> None:
    data = b"the bytes actually sent"
    with pytest.raises(IntegrityError) as info:
        s3_store._put_object("bad", data, hashlib.sha256(b"other bytes").digest())
    assert isinstance(info.value.__cause__, ClientError)
    with pytest.raises(BlobNotFound):
        s3_store.stat("bad")
    s3_store._put_object("good", data, hashlib.sha256(data).digest())
    assert read(s3_store, "good") == data


def test_s3_server_verifies_part_checksums(s3_store: S3BlobStore) -> None:
    """Directly via boto3: the server refuses a multipart part whose SHA-256 is wrong."""
    client, bucket = s3_store._s3, s3_store.bucket
    upload = client.create_multipart_upload(Bucket=bucket, Key="mp", ChecksumAlgorithm="SHA256")["UploadId"]
    try:
        with pytest.raises(ClientError) as info:
            client.upload_part(Bucket=bucket, Key="mp", UploadId=upload, PartNumber=1, Body=b"abc",
                               ChecksumAlgorithm="SHA256",
                               ChecksumSHA256=base64.b64encode(hashlib.sha256(b"abd").digest()).decode())
        assert info.value.response["Error"]["Code"] == "BadDigest"
        assert isinstance(map_error(info.value, "t"), IntegrityError)
    finally:
        client.abort_multipart_upload(Bucket=bucket, Key="mp", UploadId=upload)


@pytest.fixture
def s3_multipart(s3_config: S3Config, s3_boto_session: Any) -> S3BlobStore:
    """Multipart above 5 MiB, 5 MiB parts (the S3 minimum), to exercise the large-object path."""
    return S3BlobStore("s3mp", s3_config, multipart_threshold=5 * MiB, part_size=5 * MiB,
                       session=s3_boto_session)


def test_s3_multipart_roundtrip(s3_multipart: S3BlobStore) -> None:
    data = os.urandom(12 * MiB + 3)
    st = s3_multipart.put("big", chunked(data, MiB + 1))
    assert (st.size, st.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert read(s3_multipart, "big") == data
    assert read(s3_multipart, "big", 5 * MiB - 7, 20) == data[5 * MiB - 7 : 5 * MiB + 13]
    stat = s3_multipart.stat("big")
    assert stat.size == len(data)
    assert stat.sha256 in (None, st.sha256)  # composite checksums are not a SHA-256 of the bytes
    with pytest.raises(BlobExists):
        s3_multipart.put("big", chunked(os.urandom(11 * MiB), MiB))
    assert read(s3_multipart, "big") == data
    assert not s3_multipart._s3.list_multipart_uploads(Bucket=s3_multipart.bucket).get("Uploads")


def test_s3_multipart_exists_check_is_authoritative_at_completion(s3_multipart: S3BlobStore) -> None:
    """A key created while a multipart upload is in flight still wins (If-None-Match on complete)."""
    data = os.urandom(11 * MiB)

    def source() -> Iterator[bytes]:
        yield data[: 6 * MiB]
        s3_multipart.put("race", [b"first writer"])  # lands after the early existence check
        yield data[6 * MiB :]

    with pytest.raises(BlobExists):
        s3_multipart.put("race", source())
    assert read(s3_multipart, "race") == b"first writer"
    assert not s3_multipart._s3.list_multipart_uploads(Bucket=s3_multipart.bucket).get("Uploads")


def test_s3_multipart_failed_source_aborts_upload(s3_multipart: S3BlobStore) -> None:
    with pytest.raises(Boom):
        s3_multipart.put("partial", failing_chunks(12 * MiB))
    with pytest.raises(BlobNotFound):
        s3_multipart.stat("partial")
    assert list(s3_multipart.iter_keys()) == []
    assert not s3_multipart._s3.list_multipart_uploads(Bucket=s3_multipart.bucket).get("Uploads")


def test_s3_quarantine_large_object_part_by_part(s3_multipart: S3BlobStore) -> None:
    data = os.urandom(11 * MiB)
    s3_multipart.put("big", [data])
    s3_multipart.max_single_copy = 0  # force UploadPartCopy
    qkey = s3_multipart.quarantine("big")
    assert read(s3_multipart, qkey) == data
    assert list(s3_multipart.iter_keys()) == []


def test_s3_quarantine_keeps_sha256(s3_store: S3BlobStore) -> None:
    st = s3_store.put("k", [b"payload"])
    qkey = s3_store.quarantine("k")
    assert qkey.startswith("quarantine/k.")
    assert s3_store.stat(qkey).sha256 == st.sha256


def test_s3_quarantine_prefix_is_reserved(s3_store: S3BlobStore) -> None:
    with pytest.raises(ValueError):
        s3_store.put("quarantine/x", [b"x"])


def test_s3_keys_live_under_prefix(s3_config: S3Config, s3_boto_session: Any) -> None:
    store = S3BlobStore("s3p", replace(s3_config, prefix="site-a/cold/"), session=s3_boto_session)
    other = S3BlobStore("s3o", replace(s3_config, prefix="site-b"), session=s3_boto_session)
    store.put("x/1", [b"a"])
    other.put("x/1", [b"b"])
    raw = sorted(o["Key"] for o in store._s3.list_objects_v2(Bucket=store.bucket)["Contents"])
    assert raw == ["site-a/cold/x/1", "site-b/x/1"]
    assert list(store.iter_keys()) == ["x/1"]
    assert read(store, "x/1") == b"a" and read(other, "x/1") == b"b"
    store.quarantine("x/1")
    assert list(store.iter_keys()) == [] and list(other.iter_keys()) == ["x/1"]


def test_s3_storage_class_from_config(s3_config: S3Config, s3_boto_session: Any) -> None:
    store = S3BlobStore("s3ia", replace(s3_config, storage_class="STANDARD_IA"), session=s3_boto_session)
    store.put("ia", [b"x"])
    head = store._s3.head_object(Bucket=store.bucket, Key="ia")
    assert head.get("StorageClass") == "STANDARD_IA"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_s3_unreachable_store_is_unavailable() -> None:
    cfg = S3Config(endpoint_url=f"http://127.0.0.1:{_closed_port()}", bucket="nowhere",
                   access_key="k", secret_key="s", max_attempts=1, connect_timeout=0.5, read_timeout=0.5)
    store = S3BlobStore("down", cfg)
    calls: list[Callable[[], object]] = [
        lambda: store.put("k", [b"x"]),
        lambda: store.open("k"),
        lambda: store.open("k", 5, 10),
        lambda: store.stat("k"),
        lambda: store.delete("k"),
        lambda: store.quarantine("k"),
        lambda: list(store.iter_keys()),
        lambda: store.create_bucket_if_missing(),
    ]
    for call in calls:
        with pytest.raises(StorageUnavailable) as info:
            call()
        assert isinstance(info.value.__cause__, BotoCoreError)


def test_s3_missing_bucket_is_unavailable(s3_endpoint: str, s3_boto_session: Any) -> None:
    cfg = S3Config(endpoint_url=s3_endpoint, bucket="vna-test-no-such-bucket", access_key="k",
                   secret_key="s", max_attempts=1)
    store = S3BlobStore("nobucket", cfg, session=s3_boto_session)
    with pytest.raises(StorageUnavailable):
        store.put("k", [b"x"])
    with pytest.raises(StorageUnavailable):
        list(store.iter_keys())


@pytest.mark.parametrize("code,status,expected", [
    ("NoSuchKey", 404, BlobNotFound),
    ("404", 404, BlobNotFound),
    ("PreconditionFailed", 412, BlobExists),
    ("BadDigest", 400, IntegrityError),
    ("InvalidDigest", 400, IntegrityError),
    ("SlowDown", 503, StorageUnavailable),
    ("InternalError", 500, StorageUnavailable),
    ("AccessDenied", 403, StorageUnavailable),
    ("InvalidAccessKeyId", 403, StorageUnavailable),
    ("NoSuchBucket", 404, StorageUnavailable),
    ("InvalidArgument", 400, StorageError),
])
def test_s3_error_mapping_table(code: str, status: int, expected: type[Exception]) -> None:
    exc = ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                      "PutObject")
    mapped = map_error(exc, "s3: put k")
    assert type(mapped) is expected
    assert "s3: put k" in str(mapped)


@WRITERS
def test_filesystem_put_file_same_and_other_filesystem(tmp_path: Path, native: bool) -> None:
    """put_file copies in the kernel; across filesystems (EXDEV) it falls back to sendfile."""
    import subprocess

    from vna.storage.filesystem import FilesystemBlobStore

    src = tmp_path / "src.bin"
    src.write_bytes(bytes(range(256)) * 4099)
    other = tmp_path / "tmpfs"
    other.mkdir()
    assert subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(other)]).returncode == 0
    try:
        for root in (tmp_path / "same", other):
            store = FilesystemBlobStore("fs", root, native=native)
            stat = store.put_file("a/b", src)
            assert stat.size == src.stat().st_size
            assert b"".join(store.open("a/b")) == src.read_bytes()
            with pytest.raises(BlobExists):
                store.put_file("a/b", src)
    finally:
        subprocess.run(["umount", "-l", str(other)])


@WRITERS
def test_filesystem_adopts_a_spool_file_on_its_filesystem_and_copies_otherwise(tmp_path: Path, native: bool) -> None:
    """put_file(adopt=True): the spool file becomes the blob (one inode, fsynced, its file_mode); elsewhere a copy."""
    store = FilesystemBlobStore("r1", tmp_path / "r1", file_mode=0o640, native=native)
    data = blob(50_000, seed=3)
    spool = tmp_path / "spool.dcm"
    spool.write_bytes(data)
    spool.chmod(0o600)
    assert store.put_file("a/b/c.dcm", spool, adopt=True).size == len(data)
    stored = store.local_path("a/b/c.dcm")
    assert stored.stat().st_ino == spool.stat().st_ino and stat.S_IMODE(stored.stat().st_mode) == 0o640
    spool.unlink()  # the caller removes its spool name; the blob stays
    assert read(store, "a/b/c.dcm") == data
    with pytest.raises(BlobExists):  # create-new holds for adoption too
        again = tmp_path / "again.dcm"
        again.write_bytes(b"other")
        store.put_file("a/b/c.dcm", again, adopt=True)
    assert read(store, "a/b/c.dcm") == data
    # without adopt, or from another filesystem (/dev/shm is tmpfs): a copy with its own inode
    other = tmp_path / "other.dcm"
    other.write_bytes(data)
    store.put_file("a/b/d.dcm", other)
    assert store.local_path("a/b/d.dcm").stat().st_ino != other.stat().st_ino
    shm = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        (shm / "x.dcm").write_bytes(data)
        store.put_file("a/b/e.dcm", shm / "x.dcm", adopt=True)
        assert read(store, "a/b/e.dcm") == data and os.stat(shm / "x.dcm").st_nlink == 1
    finally:
        shutil.rmtree(shm)


@WRITERS
def test_tier_write_file_lets_one_replica_adopt_and_copies_to_the_others(tmp_path: Path, native: bool) -> None:
    from vna.codec import IdentityCodec
    from vna.domain import Tier
    from vna.storage.accessor import TierAccessor

    stores = [FilesystemBlobStore(f"r{i}", tmp_path / f"r{i}", native=native) for i in range(3)]
    hot = TierAccessor(Tier.HOT, stores, 3, IdentityCodec())
    data = blob(20_000, seed=4)
    spool = tmp_path / "spool.dcm"
    spool.write_bytes(data)
    writes = hot.write_file("k/x.dcm", spool, hashlib.sha256(data).hexdigest(), len(data), adopt=True)
    hot.close()
    assert all(w.ok for w in writes)
    inodes = [s.local_path("k/x.dcm").stat().st_ino for s in stores]
    assert inodes.count(spool.stat().st_ino) == 1 and len(set(inodes)) == 3  # independent copies
    assert all(s.local_path("k/x.dcm").read_bytes() == data for s in stores)
