"""S3BlobStore: the BlobStore port on any S3-compatible endpoint (AWS, Ceph RGW, MinIO, SeaweedFS).

Every write carries a SHA-256 checksum computed locally and verified by the
server; create-new is enforced by the server with ``If-None-Match: *``.
Errors from botocore/boto3 are translated into the vna error tree in one
place, :func:`map_error`.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import logging
import re
import time
import uuid
from datetime import datetime
from typing import Any, Iterable, Iterator

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import (
    BotoCoreError,
    ChecksumError,
    ClientError,
    FlexibleChecksumError,
    ParamValidationError,
)

from vna.checksum import CHUNK
from vna.config import S3Config
from vna.domain import BlobStat
from vna.errors import (
    BlobExists,
    BlobNotFound,
    ConfigError,
    IntegrityError,
    StorageError,
    StorageUnavailable,
    VnaError,
)
from vna.storage.base import safe_key

__all__ = ["S3BlobStore", "map_error", "QUARANTINE_PREFIX", "MULTIPART_THRESHOLD", "PART_SIZE"]

log = logging.getLogger(__name__)

QUARANTINE_PREFIX = "quarantine/"
MULTIPART_THRESHOLD = 64 << 20   # objects larger than this go up as multipart uploads
PART_SIZE = 64 << 20             # multipart part size (S3 minimum 5 MiB, at most 10 000 parts)
MAX_PARTS = 10_000
MAX_SINGLE_COPY = 5 << 30        # CopyObject limit; larger objects are copied part by part
META_SHA256 = "vna-sha256"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")

# --- the one mapping from botocore / boto3 exceptions to vna errors -------------

_NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_EXISTS_CODES = frozenset({"PreconditionFailed", "412"})
_INTEGRITY_CODES = frozenset({"BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch"})
_UNAVAILABLE_CODES = frozenset({
    # throttling / transient
    "SlowDown", "Throttling", "ThrottlingException", "RequestThrottled", "RequestLimitExceeded",
    "RequestTimeout", "InternalError", "ServiceUnavailable", "503", "500",
    "ConditionalRequestConflict",  # a concurrent conditional write to the key; retry later
    # credentials / access / wiring
    "AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
    "InvalidToken", "TokenRefreshRequired", "RequestTimeTooSkewed", "AllAccessDisabled",
    "NoSuchBucket", "AuthorizationHeaderMalformed", "PermanentRedirect",
})


def map_error(exc: Exception, what: str) -> VnaError:
    """Translate a botocore/boto3 exception into the vna error tree.

    =====================================================  ==================
    NoSuchKey, 404                                         BlobNotFound
    PreconditionFailed, 412                                BlobExists
    BadDigest, InvalidDigest, response checksum mismatch   IntegrityError
    connection / timeout / 5xx / throttling / credentials  StorageUnavailable
    / access denied / missing bucket
    any other client or botocore error                     StorageError
    =====================================================  ==================

    ``what`` (store id, operation, key) prefixes the message. The result is
    meant to be raised ``from exc``.
    """
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {}) or {}
        code = str(err.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        msg = f"{what}: {code or status} {err.get('Message', '')}".rstrip()
        if code in _NOT_FOUND_CODES or (status == 404 and code != "NoSuchBucket"):
            return BlobNotFound(msg)
        if code in _EXISTS_CODES or status == 412:
            return BlobExists(msg)
        if code in _INTEGRITY_CODES:
            return IntegrityError(msg)
        if code in _UNAVAILABLE_CODES or status >= 500 or status in (403, 429):
            return StorageUnavailable(msg)
        return StorageError(msg)
    if isinstance(exc, (FlexibleChecksumError, ChecksumError)):
        return IntegrityError(f"{what}: {exc}")
    if isinstance(exc, ParamValidationError):
        return StorageError(f"{what}: {exc}")
    if isinstance(exc, BotoCoreError):
        # EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError,
        # ConnectionClosedError, ResponseStreamingError, IncompleteReadError,
        # NoCredentialsError, PartialCredentialsError, CredentialRetrievalError, ...
        return StorageUnavailable(f"{what}: {type(exc).__name__}: {exc}")
    return StorageError(f"{what}: {type(exc).__name__}: {exc}")


@contextlib.contextmanager
def _mapped(what: str) -> Iterator[None]:
    try:
        yield
    except (ClientError, BotoCoreError) as exc:
        raise map_error(exc, what) from exc


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


def _sha256_of(head: dict[str, Any]) -> str | None:
    """The full-object SHA-256 (hex) recorded for an object, if any."""
    meta = head.get("Metadata") or {}
    value = str(meta.get(META_SHA256, "")).lower()
    if _HEX64.match(value):
        return value
    checksum = head.get("ChecksumSHA256")
    # "<b64>-N" is a composite checksum of a multipart upload, not of the bytes.
    if isinstance(checksum, str) and "-" not in checksum and head.get("ChecksumType") != "COMPOSITE":
        try:
            raw = base64.b64decode(checksum, validate=True)
        except (binascii.Error, ValueError):
            return None
        if len(raw) == 32:
            return raw.hex()
    return None


class S3BlobStore:
    """Blobs as objects under ``cfg.prefix`` in ``cfg.bucket``.

    ``put`` buffers up to ``multipart_threshold`` bytes in memory while hashing
    and sends one PutObject with ``ChecksumSHA256`` and ``If-None-Match: *``;
    larger blobs stream as a multipart upload with a SHA-256 per part, completed
    with ``If-None-Match: *`` and aborted on any failure, so nothing is ever
    visible under the key unless the whole blob was accepted. Single-part
    objects carry their SHA-256 in user metadata ``vna-sha256`` (and as the S3
    checksum); multipart objects only carry S3's composite checksum, so
    :meth:`stat` reports ``sha256=None`` for them (``put`` returns it).

    Thread-safe (one boto3 client, shared). No retries here beyond botocore's
    "standard" mode with ``cfg.max_attempts``.
    """

    def __init__(
        self,
        store_id: str,
        cfg: S3Config,
        *,
        multipart_threshold: int = MULTIPART_THRESHOLD,
        part_size: int = PART_SIZE,
        session: Any = None,
    ) -> None:
        """``session``: a ``boto3.session.Session`` to build the client from (reuses its
        loaded service models; clients must not be created from one session
        concurrently). Default: a new session. Raises ConfigError."""
        if not cfg.bucket:
            raise ConfigError(f"{store_id}: S3 bucket is not set")
        if part_size < 5 << 20 or multipart_threshold < 0:
            raise ConfigError(f"{store_id}: part_size must be >= 5 MiB and the threshold >= 0")
        self.store_id = store_id
        self.cfg = cfg
        self.bucket = cfg.bucket
        prefix = cfg.prefix.strip("/")
        if prefix:
            try:
                safe_key(prefix)
            except ValueError:
                raise ConfigError(f"{store_id}: unsafe S3 prefix {cfg.prefix!r}") from None
            prefix += "/"
        self.prefix = prefix
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        self.max_single_copy = MAX_SINGLE_COPY
        botocfg = BotoConfig(
            region_name=cfg.region or None,
            retries={"mode": "standard", "max_attempts": max(1, cfg.max_attempts)},
            connect_timeout=cfg.connect_timeout,
            read_timeout=cfg.read_timeout,
            # Non-AWS endpoints rarely have wildcard DNS for virtual-hosted buckets.
            s3={"addressing_style": "path" if cfg.endpoint_url else "auto"},
        )
        creds: dict[str, str] = {}
        if cfg.access_key:
            creds = {"aws_access_key_id": cfg.access_key, "aws_secret_access_key": cfg.secret_key}
        try:
            if session is None:
                session = boto3.session.Session()
            self._s3: Any = session.client("s3", endpoint_url=cfg.endpoint_url or None,
                                           config=botocfg, **creds)
        except (ValueError, BotoCoreError) as exc:
            raise ConfigError(f"{store_id}: invalid S3 settings: {exc}") from exc

    def __repr__(self) -> str:
        return f"S3BlobStore({self.store_id!r}, {self.cfg.endpoint_url or 'aws'!r}, {self.bucket!r}, {self.prefix!r})"

    # --- keys ---------------------------------------------------------------

    def _obj(self, key: str) -> str:
        return self.prefix + safe_key(key)

    def _what(self, op: str, key: str) -> str:
        return f"{self.store_id}: {op} {key}"

    # --- put ----------------------------------------------------------------

    def put(self, key: str, chunks: Iterable[bytes]) -> BlobStat:
        """Store the chunks under ``key``; atomic and create-new.

        Raises BlobExists (key present; it is left untouched), IntegrityError
        (the server computed a different SHA-256), StorageUnavailable, and
        ValueError for an unsafe or reserved key. An exception from ``chunks``
        propagates unchanged and leaves nothing under the key.
        """
        obj = self._obj(key)
        if obj.startswith(self.prefix + QUARANTINE_PREFIX):
            raise ValueError(f"blob key {key!r} is under the reserved {QUARANTINE_PREFIX!r} prefix")
        hasher = hashlib.sha256()
        buf: list[bytes] = []
        size = 0
        it = iter(chunks)
        for data in it:
            if not data:
                continue
            hasher.update(data)
            buf.append(bytes(data))
            size += len(data)
            if size > self.multipart_threshold:
                return self._put_multipart(key, obj, buf, size, it, hasher)
        digest = hasher.digest()
        self._put_object(key, b"".join(buf), digest)
        return BlobStat(key=key, size=size, sha256=digest.hex())

    def _put_object(self, key: str, body: bytes, sha256: bytes) -> None:
        """One create-new PutObject of ``body`` declaring ``sha256`` (raw digest).

        A seam for tests: a wrong ``sha256`` must be refused by the server
        (IntegrityError) and leave nothing under the key.
        """
        extra: dict[str, Any] = {}
        if self.cfg.storage_class:
            extra["StorageClass"] = self.cfg.storage_class
        with _mapped(self._what("put", key)):
            self._s3.put_object(
                Bucket=self.bucket, Key=self._obj(key), Body=body, IfNoneMatch="*",
                ChecksumAlgorithm="SHA256", ChecksumSHA256=_b64(sha256),
                Metadata={META_SHA256: sha256.hex()}, **extra,
            )

    def _put_multipart(
        self, key: str, obj: str, buf: list[bytes], size: int, rest: Iterator[bytes], hasher: Any,
    ) -> BlobStat:
        # Refuse early rather than after uploading gigabytes; the authoritative
        # check is If-None-Match on completion.
        with contextlib.suppress(BlobNotFound):
            self.stat(key)
            raise BlobExists(f"{self.store_id}: {key} already exists")
        extra: dict[str, Any] = {}
        if self.cfg.storage_class:
            extra["StorageClass"] = self.cfg.storage_class
        with _mapped(self._what("put", key)):
            upload_id = self._s3.create_multipart_upload(
                Bucket=self.bucket, Key=obj, ChecksumAlgorithm="SHA256", **extra,
            )["UploadId"]
        parts: list[dict[str, Any]] = []
        try:
            pending = bytearray(b"".join(buf))
            buf.clear()
            done = False
            while not done:
                while len(pending) < self.part_size:
                    data = next(rest, None)
                    if data is None:
                        done = True
                        break
                    hasher.update(data)
                    size += len(data)
                    pending += data
                while len(pending) >= self.part_size or (done and pending):
                    part = bytes(pending[: self.part_size])
                    del pending[: self.part_size]
                    parts.append(self._upload_part(key, obj, upload_id, len(parts) + 1, part))
            with _mapped(self._what("put", key)):
                self._s3.complete_multipart_upload(
                    Bucket=self.bucket, Key=obj, UploadId=upload_id, IfNoneMatch="*",
                    MultipartUpload={"Parts": parts},
                )
        except BaseException:
            self._abort(key, obj, upload_id)
            raise
        return BlobStat(key=key, size=size, sha256=hasher.hexdigest())

    def _upload_part(self, key: str, obj: str, upload_id: str, number: int, body: bytes) -> dict[str, Any]:
        if number > MAX_PARTS:
            raise StorageError(f"{self.store_id}: {key} needs more than {MAX_PARTS} parts of {self.part_size} bytes")
        checksum = _b64(hashlib.sha256(body).digest())
        with _mapped(self._what(f"put part {number} of", key)):
            resp = self._s3.upload_part(
                Bucket=self.bucket, Key=obj, UploadId=upload_id, PartNumber=number, Body=body,
                ChecksumAlgorithm="SHA256", ChecksumSHA256=checksum,
            )
        return {"PartNumber": number, "ETag": resp["ETag"], "ChecksumSHA256": checksum}

    def _abort(self, key: str, obj: str, upload_id: str) -> None:
        try:
            self._s3.abort_multipart_upload(Bucket=self.bucket, Key=obj, UploadId=upload_id)
        except (ClientError, BotoCoreError) as exc:
            # The upload stays invisible; a bucket lifecycle rule or the
            # server's stale-upload cleanup removes its parts.
            log.warning("%s: abort of multipart upload %s for %s failed: %s",
                        self.store_id, upload_id, key, map_error(exc, "abort"))

    # --- read ---------------------------------------------------------------

    def open(self, key: str, offset: int = 0, length: int | None = None) -> Iterator[bytes]:
        """Yield ``length`` bytes (or to the end) from ``offset`` with a ranged GET.

        The request is made before the first chunk is asked for, so BlobNotFound
        and StorageUnavailable are raised by ``open`` itself; read failures
        while iterating raise StorageUnavailable. Reading past the end yields
        fewer (or no) bytes.
        """
        obj = self._obj(key)
        if offset < 0 or (length is not None and length < 0):
            raise ValueError(f"bad range offset={offset} length={length}")
        if length == 0:
            self.stat(key)
            return iter(())
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": obj}
        if length is not None:
            args["Range"] = f"bytes={offset}-{offset + length - 1}"
        elif offset:
            args["Range"] = f"bytes={offset}-"
        try:
            with _mapped(self._what("open", key)):
                resp = self._s3.get_object(**args)
        except StorageError as exc:
            cause = exc.__cause__
            if (isinstance(cause, ClientError)
                    and cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 416):
                return iter(())  # the object exists; the range starts at or past its end
            raise
        return self._stream(key, resp["Body"])

    def _stream(self, key: str, body: Any) -> Iterator[bytes]:
        try:
            with _mapped(self._what("read", key)):
                while True:
                    data = body.read(CHUNK)
                    if not data:
                        return
                    yield data
        finally:
            body.close()

    def stat(self, key: str) -> BlobStat:
        """Size, last-modified time and, when the object carries one, its full-object SHA-256."""
        with _mapped(self._what("stat", key)):
            head = self._s3.head_object(Bucket=self.bucket, Key=self._obj(key), ChecksumMode="ENABLED")
        modified = head.get("LastModified")
        return BlobStat(key=key, size=int(head["ContentLength"]), sha256=_sha256_of(head),
                        modified=modified.timestamp() if isinstance(modified, datetime) else None)

    # --- delete / quarantine / list -----------------------------------------

    def delete(self, key: str) -> None:
        """Remove the object; idempotent (an absent key is not an error)."""
        try:
            with _mapped(self._what("delete", key)):
                self._s3.delete_object(Bucket=self.bucket, Key=self._obj(key))
        except BlobNotFound:
            return

    def quarantine(self, key: str) -> str:
        """Copy the blob to ``quarantine/<key>.<ts>.<rand>`` then delete it; returns that key.

        Raises BlobNotFound if absent. If the delete fails after the copy, both
        exist and StorageUnavailable is raised; calling again is safe.
        """
        obj = self._obj(key)
        qkey = f"{QUARANTINE_PREFIX}{safe_key(key)}.{int(time.time())}.{uuid.uuid4().hex[:8]}"
        with _mapped(self._what("quarantine", key)):
            head = self._s3.head_object(Bucket=self.bucket, Key=obj)
        extra: dict[str, Any] = {}
        if head.get("StorageClass"):
            extra["StorageClass"] = head["StorageClass"]
        size = int(head["ContentLength"])
        if size <= self.max_single_copy:
            with _mapped(self._what("quarantine", key)):
                self._s3.copy_object(
                    Bucket=self.bucket, Key=self.prefix + qkey, MetadataDirective="COPY",
                    CopySource={"Bucket": self.bucket, "Key": obj}, ChecksumAlgorithm="SHA256", **extra,
                )
        else:
            self._copy_multipart(key, obj, self.prefix + qkey, size, head, extra)
        self.delete(key)
        return qkey

    def _copy_multipart(self, key: str, src: str, dst: str, size: int, head: dict[str, Any],
                        extra: dict[str, Any]) -> None:
        what = self._what("quarantine", key)
        with _mapped(what):
            upload_id = self._s3.create_multipart_upload(
                Bucket=self.bucket, Key=dst, ChecksumAlgorithm="SHA256",
                Metadata=head.get("Metadata") or {}, **extra,
            )["UploadId"]
        try:
            parts = []
            for number, start in enumerate(range(0, size, self.part_size), 1):
                end = min(start + self.part_size, size) - 1
                with _mapped(what):
                    resp = self._s3.upload_part_copy(
                        Bucket=self.bucket, Key=dst, UploadId=upload_id, PartNumber=number,
                        CopySource={"Bucket": self.bucket, "Key": src},
                        CopySourceRange=f"bytes={start}-{end}",
                    )
                part = {"PartNumber": number, "ETag": resp["CopyPartResult"]["ETag"]}
                if resp["CopyPartResult"].get("ChecksumSHA256"):
                    part["ChecksumSHA256"] = resp["CopyPartResult"]["ChecksumSHA256"]
                parts.append(part)
            with _mapped(what):
                self._s3.complete_multipart_upload(
                    Bucket=self.bucket, Key=dst, UploadId=upload_id, MultipartUpload={"Parts": parts},
                )
        except BaseException:
            self._abort(key, dst, upload_id)
            raise

    def iter_keys(self, prefix: str = "") -> Iterator[str]:
        """Every key starting with ``prefix`` (plain string prefix), quarantine excluded.

        Keys come in S3 listing order (lexicographic by UTF-8 bytes).
        """
        quarantine = self.prefix + QUARANTINE_PREFIX
        paginator = self._s3.get_paginator("list_objects_v2")
        with _mapped(self._what("list", prefix or "*")):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                for item in page.get("Contents") or []:
                    name = str(item["Key"])
                    if name.startswith(quarantine) or not name.startswith(self.prefix):
                        continue
                    yield name[len(self.prefix):]

    # --- ops ----------------------------------------------------------------

    def create_bucket_if_missing(self) -> bool:
        """Create ``cfg.bucket`` unless it exists; True if it was created (for tests and ops)."""
        what = f"{self.store_id}: create bucket {self.bucket}"
        try:
            with _mapped(what):
                self._s3.head_bucket(Bucket=self.bucket)
            return False
        except BlobNotFound:
            pass
        except StorageUnavailable as exc:
            cause = exc.__cause__
            if not (isinstance(cause, ClientError) and cause.response.get("Error", {}).get("Code") == "NoSuchBucket"):
                raise
        args: dict[str, Any] = {"Bucket": self.bucket}
        if self.cfg.region and self.cfg.region != "us-east-1":
            args["CreateBucketConfiguration"] = {"LocationConstraint": self.cfg.region}
        try:
            with _mapped(what):
                self._s3.create_bucket(**args)
        except StorageError as exc:
            cause = exc.__cause__
            if isinstance(cause, ClientError) and cause.response.get("Error", {}).get("Code") in (
                "BucketAlreadyOwnedByYou", "BucketAlreadyExists"
            ):
                return False
            raise
        return True
