"""TierAccessor: one tier's replicas seen as one — codec, digests, parallel writes, quorum.

Adapters below stay dumb; everything that checks bytes lives here.
"""

from __future__ import annotations

import contextvars
import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, cast

from vna.checksum import HashingIterator
from vna.codec import Codec, get_codec
from vna.domain import LOCAL_SITE, Placement, PlacementState, Tier, site_of
from vna.errors import BlobExists, IntegrityError, QuorumNotMet, StorageError, StorageUnavailable, VnaError
from vna.storage.base import BlobStore, FileCopyStore
from vna.storage.filesystem import FilesystemBlobStore, native_replicas, put_file_replicas
from vna.telemetry import Telemetry

__all__ = ["ReplicaWrite", "TierAccessor", "site_of_tiers"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplicaWrite:
    """Outcome of writing one replica."""

    store_id: str
    key: str
    ok: bool
    stored_sha256: str = ""
    stored_size: int = 0
    error: str = ""


class _Job:
    """One replica write handed to a writer thread; ``get`` waits for its result (or raises its error)."""

    __slots__ = ("fn", "args", "result", "error", "_done")

    def __init__(self, fn: Callable[..., ReplicaWrite], args: tuple[Any, ...]) -> None:
        self.fn, self.args = fn, args
        self.result: ReplicaWrite | None = None
        self.error: BaseException | None = None
        self._done = threading.Lock()
        self._done.acquire()

    def run(self) -> None:
        try:
            self.result = self.fn(*self.args)
        except BaseException as exc:  # handed to the waiting caller
            self.error = exc
        finally:
            self._done.release()

    def get(self) -> ReplicaWrite:
        self._done.acquire()
        if self.error is not None:
            raise self.error
        return cast(ReplicaWrite, self.result)


class _Writers:
    """The tier's replica writer threads: jobs on a SimpleQueue, each completion a released lock.

    A ThreadPoolExecutor costs several Condition round trips per job (about 8 %
    of the ingest thread's GIL time for two replicas); this is one C-level queue
    put/get and one lock hand-over. Threads start with the first job.
    """

    def __init__(self, n: int, name: str) -> None:
        self._n, self._name = n, name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, fn: Callable[..., ReplicaWrite], *args: Any) -> _Job:
        if not self._threads:
            with self._lock:
                if self._closed:
                    raise RuntimeError("replica writers are closed")
                if not self._threads:
                    for i in range(self._n):
                        t = threading.Thread(target=self._work, name=f"{self._name}_{i}", daemon=True)
                        t.start()
                        self._threads.append(t)
        if self._closed:
            raise RuntimeError("replica writers are closed")
        job = _Job(fn, args)
        self._jobs.put(job)
        return job

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            job.run()

    def close(self) -> None:
        """Finish the queued jobs, stop the threads (idempotent)."""
        with self._lock:
            self._closed = True
            threads, self._threads = self._threads, []
        for _ in threads:
            self._jobs.put(None)
        for t in threads:
            t.join()


class TierAccessor:
    """Writes to and reads from the BlobStores of one tier.

    ``write`` fans the bytes out to every replica in parallel, verifies that
    each replica received exactly the content digest, and succeeds when at
    least ``quorum`` replicas hold the bytes durably. Below quorum it deletes
    what it wrote (compensation) and raises QuorumNotMet.
    """

    def __init__(self, tier: Tier, stores: Sequence[BlobStore], quorum: int, codec: Codec, *,
                 telemetry: Telemetry | None = None) -> None:
        self.tier = tier
        self.telemetry = telemetry if telemetry is not None else Telemetry.disabled()
        self.stores = list(stores)
        self.quorum = quorum
        self.codec = codec
        # which stores copy files in the kernel: fixed with the stores (a runtime Protocol check costs ~50 us)
        self._copies_files = [isinstance(s, FileCopyStore) for s in self.stores]
        # every replica on the native filesystem writer: write_file is one native call for all of them
        self._native_files = native_replicas(self.stores)
        self._pool = _Writers(max(2, 4 * len(self.stores)), f"vna-{tier.value}")

    def close(self) -> None:
        """Stop the writer threads."""
        self._pool.close()

    def store(self, store_id: str) -> BlobStore:
        """The store with this id (KeyError if unknown)."""
        for s in self.stores:
            if s.store_id == store_id:
                return s
        raise KeyError(store_id)

    def _write_one(
        self, store: BlobStore, key: str, source: Callable[[], Iterable[bytes]], content_sha256: str
    ) -> ReplicaWrite:
        content = HashingIterator(source())
        stored = HashingIterator(self.codec.encode(content))
        try:
            with self.telemetry.stage("storage.write", {"vna.store": store.store_id, "vna.tier": self.tier.value}):
                store.put(key, stored)
        except VnaError as exc:
            log.warning("replica %s failed to write %s: %s", store.store_id, key, exc)
            return ReplicaWrite(store.store_id, key, False, error=str(exc))
        if content.hexdigest() != content_sha256:
            store.delete(key)
            return ReplicaWrite(store.store_id, key, False, error="content changed while writing")
        return ReplicaWrite(store.store_id, key, True, stored.hexdigest(), stored.size)

    def _copy_one(self, store: FileCopyStore, store_id: str, key: str, path: Path, sha256: str,
                  size: int, adopt: bool = False) -> ReplicaWrite:
        try:
            with self.telemetry.stage("storage.write", {"vna.store": store_id, "vna.tier": self.tier.value}):
                stat = store.put_file(key, path, adopt=adopt)
        except VnaError as exc:
            log.warning("replica %s failed to write %s: %s", store_id, key, exc)
            return ReplicaWrite(store_id, key, False, error=str(exc))
        if stat.size != size:
            cast(BlobStore, store).delete(key)
            return ReplicaWrite(store_id, key, False, error=f"wrote {stat.size} bytes of {size}")
        return ReplicaWrite(store_id, key, True, sha256, size)

    def write_file(self, key: str, path: Path, content_sha256: str, size: int, *,
                   adopt: bool = False) -> list[ReplicaWrite]:
        """Write a local file (whose digest the caller computed) to every replica; see :meth:`write`.

        With the identity codec, stores that can copy files do so in the kernel
        and the stored digest is the content digest. ``adopt``: ``path`` is a
        spool file nobody writes again; the first such store may take it over
        (``FileCopyStore.put_file``) -- one replica at most, the others get copies.
        """
        if self.codec.name != "identity":
            return self.write(key, lambda: iter_file(str(path)), content_sha256)
        if self._native_files:
            return self._quorum(key, self._copy_native(key, path, content_sha256, size, adopt))
        calls: list[tuple[Callable[..., ReplicaWrite], tuple[Any, ...]]] = []
        for s, copies in zip(self.stores, self._copies_files):
            if copies:
                calls.append((self._copy_one, (s, s.store_id, key, path, content_sha256, size, adopt)))
                adopt = False
            else:
                calls.append((self._write_one, (s, key, lambda: iter_file(str(path)), content_sha256)))
        return self._quorum(key, self._fan_out(calls))

    def _copy_native(self, key: str, path: Path, sha256: str, size: int, adopt: bool) -> list[ReplicaWrite]:
        """:meth:`_copy_one` on every replica at once (``filesystem.put_file_replicas``)."""
        stores = cast(list[FilesystemBlobStore], self.stores)
        out: list[ReplicaWrite] = []
        for store, (stat, started_ns, ended_ns) in zip(stores, put_file_replicas(stores, key, path, adopt=adopt)):
            self.telemetry.stage_done("storage.write", started_ns, ended_ns,
                                      {"vna.store": store.store_id, "vna.tier": self.tier.value})
            if isinstance(stat, StorageError):
                log.warning("replica %s failed to write %s: %s", store.store_id, key, stat)
                out.append(ReplicaWrite(store.store_id, key, False, error=str(stat)))
            elif stat.size != size:
                store.delete(key)
                out.append(ReplicaWrite(store.store_id, key, False, error=f"wrote {stat.size} bytes of {size}"))
            else:
                out.append(ReplicaWrite(store.store_id, key, True, sha256, size))
        return out

    def write(
        self, key: str, source: Callable[[], Iterable[bytes]], content_sha256: str
    ) -> list[ReplicaWrite]:
        """Write ``source()`` to every replica under ``key``; raise QuorumNotMet below quorum."""
        return self._quorum(key, self._fan_out([(self._write_one, (s, key, source, content_sha256))
                                                for s in self.stores]))

    def _fan_out(self, calls: list[tuple[Callable[..., ReplicaWrite], tuple[Any, ...]]]) -> list[ReplicaWrite]:
        """Run the replica writes in parallel: all but the first on the writer pool, the first in this thread."""
        jobs = [self._submit(fn, *args) for fn, args in calls[1:]]
        first = [calls[0][0](*calls[0][1])] if calls else []
        return first + [j.get() for j in jobs]

    def _submit(self, fn: Callable[..., ReplicaWrite], *args: Any) -> _Job:
        """Run on the writer pool; with telemetry, in a copy of the caller's context (span parent)."""
        if self.telemetry.enabled:
            return self._pool.submit(contextvars.copy_context().run, fn, *args)
        return self._pool.submit(fn, *args)

    def _quorum(self, key: str, results: list[ReplicaWrite]) -> list[ReplicaWrite]:
        ok = [r for r in results if r.ok]
        if len(ok) < self.quorum:
            self.delete_all(key, [r.store_id for r in ok])
            errors = "; ".join(f"{r.store_id}: {r.error}" for r in results if not r.ok)
            raise QuorumNotMet(f"{len(ok)} of {len(self.stores)} replicas written, {self.quorum} required ({errors})")
        return results

    def delete_all(self, key: str, store_ids: Iterable[str]) -> None:
        """Best-effort compensating delete of ``key`` on the given stores."""
        for sid in store_ids:
            try:
                self.store(sid).delete(key)
            except StorageError as exc:
                log.error("compensating delete of %s on %s failed: %s", key, sid, exc)

    def placements(
        self, writes: Sequence[ReplicaWrite], *, sop_uid: str, version: int, content_sha256: str,
        content_size: int, now: float | None = None,
    ) -> list[Placement]:
        """Placement records for a write: OK for replicas that took it, MISSING for the others."""
        ts = time.time() if now is None else now
        return [
            Placement(
                sop_uid=sop_uid, version=version, tier=self.tier, store_id=w.store_id, blob_key=w.key,
                codec=self.codec.name, content_sha256=content_sha256, content_size=content_size,
                stored_sha256=w.stored_sha256, stored_size=w.stored_size,
                state=PlacementState.OK if w.ok else PlacementState.MISSING,
                created_at=ts, verified_at=ts if w.ok else None,
            )
            for w in writes
        ]

    def copy_verified(self, store: BlobStore, source: Path, keys: Iterable[str], *, sop_uid: str, version: int,
                      content_sha256: str, content_size: int, now: float) -> Placement:
        """Write the file ``source`` to ``store`` under the first of ``keys`` it takes, read it back verified.

        Returns the copy's OK placement (not recorded: the caller records it).
        A key the store refuses (StorageUnavailable, BlobExists) passes to the
        next one. Raises IntegrityError when ``source`` does not hash to
        ``content_sha256``/``content_size`` or the read-back mismatches, and
        StorageError when no key takes the write; no blob is left behind.
        """
        error: StorageError = StorageUnavailable("no key tried")
        for key in keys:
            content = HashingIterator(iter_file(str(source)))
            stored = HashingIterator(self.codec.encode(content))
            try:
                store.put(key, stored)
            except (StorageUnavailable, BlobExists) as exc:
                error = exc
                continue
            new = Placement(
                sop_uid=sop_uid, version=version, tier=self.tier, store_id=store.store_id, blob_key=key,
                codec=self.codec.name, content_sha256=content_sha256, content_size=content_size,
                stored_sha256=stored.hexdigest(), stored_size=stored.size, state=PlacementState.OK,
                created_at=now, verified_at=now)
            try:
                if content.hexdigest() != content_sha256 or content.size != content_size:
                    raise IntegrityError(f"the bytes of {sop_uid} changed while being copied")
                self.read_verified(new, lambda _data: None)
            except (IntegrityError, StorageError):
                self.delete_all(key, [store.store_id])
                raise
            return new
        raise error

    def read_verified(self, placement: Placement, sink: Callable[[bytes], object]) -> None:
        """Stream the placement's original bytes into ``sink``; raise IntegrityError on any mismatch.

        The caller must not trust what reached ``sink`` unless this returns.
        """
        store = self.store(placement.store_id)
        stored = HashingIterator(store.open(placement.blob_key, placement.offset or 0, placement.length))
        content = HashingIterator(get_codec(placement.codec).decode(stored))
        for data in content:
            sink(data)
        if stored.hexdigest() != placement.stored_sha256 or stored.size != placement.stored_size:
            raise IntegrityError(
                f"{placement.store_id}:{placement.blob_key} stored digest mismatch "
                f"(size {stored.size}, expected {placement.stored_size})")
        if content.hexdigest() != placement.content_sha256 or content.size != placement.content_size:
            raise IntegrityError(f"{placement.store_id}:{placement.blob_key} content digest mismatch")


def iter_file(path: str) -> Iterator[bytes]:
    """Chunks of a local file (used as a replayable write source)."""
    from vna.checksum import read_chunks

    with open(path, "rb") as fh:
        yield from read_chunks(fh)


def site_of_tiers(tiers: Mapping[Tier, TierAccessor]) -> str:
    """The site whose stores these tiers hold (from their site-qualified store ids, see ``domain.site_of``).

    Jobs built on these tiers touch only placements of this site: the index is
    shared by every site of a federation.
    """
    for accessor in tiers.values():
        for store in accessor.stores:
            return site_of(store.store_id)
    return LOCAL_SITE
