"""FilesystemBlobStore: one directory, atomic create-new writes with fsync."""

from __future__ import annotations

import errno
import os
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Iterable, Iterator, Sequence

from vna.checksum import read_chunks
from vna.dicom import native as native_ext
from vna.domain import BlobStat
from vna.errors import BlobExists, BlobNotFound, ConfigError, StorageError, StorageUnavailable
from vna.storage.base import safe_key

if TYPE_CHECKING:
    from vna_native import BlobDir

__all__ = ["FilesystemBlobStore", "native_replicas", "put_file_replicas", "write_all"]

_TMP = ".tmp"
_NO_COPY_RANGE = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP}
_QUARANTINE = ".quarantine"
_NEEDED_BY = "the native blob writer"
_NO_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP}  # a hard link is not possible here


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Write all of ``data`` to ``fd`` (``os.write`` may write less than asked)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _fsync_dir(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FilesystemBlobStore:
    """Blobs as files under ``root``.

    ``put`` writes ``root/.tmp/<random>``, fsyncs it, hard-links it to the final
    path (the link fails if the key exists: create-new), removes the temp name
    and fsyncs the directories it touched. A crash leaves at most a temp file,
    never a partial blob under a key.

    ``native``: write through the native writer of ``vna_native`` (``BlobDir``,
    GIL released, SHA-256 of ``put``'s bytes in its ``BlobStat``); False: the
    Python reference implementation below; None: native when the extension is
    installed. Both keep the same contract, checked by the same tests.
    """

    def __init__(self, store_id: str, root: Path, *, fsync: bool = True, file_mode: int = 0o600,
                 native: bool | None = None) -> None:
        self.store_id = store_id
        self.root = Path(root)
        self.fsync = fsync
        self.file_mode = file_mode  # of every blob (archive.permissions): 0o600 owner, 0o640 group
        self._root_dev: int | None = None  # st_dev of the store's filesystem, once known
        self._root_s = str(self.root)
        try:
            (self.root / _TMP).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageUnavailable(f"{store_id}: cannot create {self.root}: {exc.strerror}") from exc
        #: the native writer of this directory (``vna_native.BlobDir``), None on the Python reference path
        self.native_dir: BlobDir | None = None
        if native or (native is None and native_ext.available()):
            blob_dir = getattr(native_ext.load(_NEEDED_BY), "BlobDir", None)
            if blob_dir is not None:
                self.native_dir = blob_dir(self._root_s, fsync=fsync, file_mode=file_mode)
            elif native:
                raise ConfigError(f"{_NEEDED_BY}: the installed vna_native predates it: {native_ext.BUILD_HINT}")

    @property
    def native(self) -> bool:
        """True when writes go through the native writer."""
        return self.native_dir is not None

    def __repr__(self) -> str:
        return f"FilesystemBlobStore({self.store_id!r}, {str(self.root)!r})"

    def _path(self, key: str, *, quarantined: bool = False) -> Path:
        return self.root / safe_key(key, quarantined=quarantined)

    def local_path(self, key: str) -> Path:
        """The file holding ``key``."""
        return self._path(key)

    def _makedirs(self, directory: Path) -> None:
        missing: list[Path] = []
        d = directory
        while not d.exists() and d != self.root:
            missing.append(d)
            d = d.parent
        for d in reversed(missing):
            try:
                d.mkdir()
            except FileExistsError:
                continue
            if self.fsync:
                _fsync_dir(d.parent)

    def put(self, key: str, chunks: Iterable[bytes]) -> BlobStat:
        if self.native_dir is not None:
            return self._put_native(self.native_dir, key, chunks)

        def write(fd: int) -> int:
            size = 0
            for data in chunks:
                write_all(fd, data)
                size += len(data)
            return size

        return self._put(key, write)

    def put_file(self, key: str, source: Path, *, adopt: bool = False) -> BlobStat:
        """``put`` of a local file's bytes, copied by the kernel (copy_file_range) without passing through Python.

        With ``adopt`` a ``source`` on this store's filesystem becomes the blob
        itself: fsynced, given the store's ``file_mode`` and hard-linked under
        ``key`` -- no copy, no second inode. Elsewhere it is copied.
        """
        if adopt:
            stat = self._adopt(key, source)
            if stat is not None:
                return stat
        if self.native_dir is not None:
            safe_key(key)
            try:
                return BlobStat(key=key, size=self._native_call(key, self.native_dir.put_file, key, str(source)))
            except OSError as exc:
                raise StorageUnavailable(f"{self.store_id}: cannot write {key}: {exc.strerror}") from exc

        def copy(fd: int) -> int:
            with open(source, "rb") as src:
                total = os.fstat(src.fileno()).st_size
                size = 0
                use_range = True
                while size < total:
                    try:
                        if use_range:
                            n = os.copy_file_range(src.fileno(), fd, total - size)
                        else:
                            n = os.sendfile(fd, src.fileno(), size, total - size)
                    except OSError as exc:
                        # copy_file_range refuses other filesystems (EXDEV) on some kernels
                        if use_range and size == 0 and exc.errno in _NO_COPY_RANGE:
                            use_range = False
                            continue
                        raise
                    if n == 0:
                        break
                    size += n
                return size

        return self._put(key, copy)

    def _adopt(self, key: str, source: Path) -> BlobStat | None:
        """Link ``source`` under ``key`` (after fsync); None if it is on another filesystem."""
        if self.native_dir is not None:
            safe_key(key)
            try:
                size = self._native_call(key, self.native_dir.adopt, key, str(source))
            except OSError as exc:
                raise StorageUnavailable(f"{self.store_id}: cannot write {key}: {exc.strerror}") from exc
            return None if size is None else BlobStat(key=key, size=size)
        try:
            fd = os.open(source, os.O_RDONLY)
            try:
                st = os.fstat(fd)
                if st.st_dev != self._dev():
                    return None
                os.fchmod(fd, self.file_mode)
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            if not self._publish(key, str(source), may_decline=True):
                return None  # no hard link here: copy
        except OSError as exc:
            raise StorageUnavailable(f"{self.store_id}: cannot write {key}: {exc.strerror}") from exc
        return BlobStat(key=key, size=st.st_size)

    def _native_call(self, key: str, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` of the native writer, whose FileExistsError (the key exists) is BlobExists."""
        try:
            return fn(*args)
        except FileExistsError:
            raise BlobExists(f"{self.store_id}: {key} already exists") from None

    def _put_native(self, native: BlobDir, key: str, chunks: Iterable[bytes]) -> BlobStat:
        safe_key(key)
        try:
            writer = native.writer()
            try:
                for data in chunks:
                    writer.write(data if type(data) is bytes else bytes(data))
                size, sha256 = self._native_call(key, writer.commit, key)
            finally:
                writer.close()
        except OSError as exc:
            raise StorageUnavailable(f"{self.store_id}: cannot write {key}: {exc.strerror}") from exc
        return BlobStat(key=key, size=size, sha256=sha256)

    def _publish(self, key: str, source: str, *, may_decline: bool = False) -> bool:
        """Hard-link the fsynced ``source`` as ``key``'s file (create-new) and fsync its directory.

        False when ``may_decline`` and this filesystem cannot link it (the caller copies instead).
        """
        final = os.path.join(self._root_s, safe_key(key))
        parent = os.path.dirname(final)
        try:
            try:
                os.link(source, final)
            except FileNotFoundError:  # no directory yet (the series' first instance): make it, link again
                self._makedirs(Path(parent))
                os.link(source, final)
        except FileExistsError:
            raise BlobExists(f"{self.store_id}: {key} already exists") from None
        except OSError as exc:
            if may_decline and exc.errno in _NO_LINK:
                return False
            raise
        if self.fsync:
            _fsync_dir(parent)
        return True

    def _dev(self) -> int:
        if self._root_dev is None:
            self._root_dev = os.stat(self.root / _TMP).st_dev
        return self._root_dev

    def _put(self, key: str, write: Callable[[int], int]) -> BlobStat:
        tmp = os.path.join(self._root_s, _TMP, f"{uuid.uuid4().hex}.part")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, self.file_mode)
            try:
                size = write(fd)
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            self._publish(key, tmp)
        except OSError as exc:
            raise StorageUnavailable(f"{self.store_id}: cannot write {key}: {exc.strerror}") from exc
        finally:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        return BlobStat(key=key, size=size)

    def open(self, key: str, offset: int = 0, length: int | None = None) -> Iterator[bytes]:
        path = self._path(key, quarantined=True)
        try:
            fh = open(path, "rb")
        except FileNotFoundError:
            raise BlobNotFound(f"{self.store_id}: {key} not found") from None
        except OSError as exc:
            raise StorageUnavailable(f"{self.store_id}: cannot read {key}: {exc.strerror}") from exc
        return self._read(fh, key, offset, length)

    def _read(self, fh: BinaryIO, key: str, offset: int, length: int | None) -> Iterator[bytes]:
        with fh:
            try:
                if offset:
                    fh.seek(offset)
                yield from read_chunks(fh, length)
            except OSError as exc:
                raise StorageUnavailable(f"{self.store_id}: cannot read {key}: {exc.strerror}") from exc

    def stat(self, key: str) -> BlobStat:
        try:
            st = self._path(key).stat()
        except FileNotFoundError:
            raise BlobNotFound(f"{self.store_id}: {key} not found") from None
        except OSError as exc:
            raise StorageUnavailable(f"{self.store_id}: cannot stat {key}: {exc.strerror}") from exc
        return BlobStat(key=key, size=st.st_size, modified=st.st_mtime)

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StorageUnavailable(f"{self.store_id}: cannot delete {key}: {exc.strerror}") from exc
        if self.fsync:
            try:
                _fsync_dir(path.parent)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    raise StorageUnavailable(f"{self.store_id}: fsync after delete: {exc.strerror}") from exc

    def quarantine(self, key: str) -> str:
        src = self._path(key)
        qkey = f"{_QUARANTINE}/{key}.{int(time.time())}.{uuid.uuid4().hex[:8]}"
        dst = self.root / qkey
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.rename(src, dst)
        except FileNotFoundError:
            raise BlobNotFound(f"{self.store_id}: {key} not found") from None
        except OSError as exc:
            raise StorageUnavailable(f"{self.store_id}: cannot quarantine {key}: {exc.strerror}") from exc
        return qkey

    def iter_keys(self, prefix: str = "") -> Iterator[str]:
        for dirpath, dirnames, filenames in os.walk(self.root):
            rel = os.path.relpath(dirpath, self.root)
            if rel == ".":
                dirnames[:] = [d for d in dirnames if d not in (_TMP, _QUARANTINE)]
                rel = ""
            dirnames.sort()
            for name in sorted(filenames):
                key = f"{rel}/{name}" if rel else name
                if key.startswith(prefix):
                    yield key


def native_replicas(stores: Sequence[object]) -> bool:
    """True when every store is a FilesystemBlobStore on the native writer (:func:`put_file_replicas` takes them)."""
    return bool(stores) and all(isinstance(s, FilesystemBlobStore) and s.native_dir is not None for s in stores)


def put_file_replicas(stores: Sequence[FilesystemBlobStore], key: str, source: Path, *, adopt: bool = False
                      ) -> list[tuple[BlobStat | StorageError, int, int]]:
    """``put_file(key, source)`` on every store at once: one native call, the stores written in parallel
    with the GIL released; with ``adopt`` the first store may take ``source`` over (``put_file(adopt=True)``).

    Per store, in order: its BlobStat or the error its ``put_file`` would have raised (BlobExists,
    StorageUnavailable), and when its write started and ended (``time.time_ns()``). Every store must be
    on the native writer (:func:`native_replicas`); ValueError for an unsafe key.
    """
    safe_key(key)
    dirs = [s.native_dir for s in stores]
    if not all(dirs):
        raise ValueError("put_file_replicas needs stores on the native writer")
    raw = native_ext.load(_NEEDED_BY).write_replicas(dirs, key, str(source), adopt)
    out: list[tuple[BlobStat | StorageError, int, int]] = []
    for store, (result, started_ns, ended_ns) in zip(stores, raw):
        outcome: BlobStat | StorageError
        if isinstance(result, FileExistsError):
            outcome = BlobExists(f"{store.store_id}: {key} already exists")
        elif isinstance(result, OSError):
            outcome = StorageUnavailable(f"{store.store_id}: cannot write {key}: {result.strerror}")
        else:
            outcome = BlobStat(key=key, size=result)
        out.append((outcome, started_ns, ended_ns))
    return out
