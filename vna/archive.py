"""The composition root: builds stores, index and services from a Config."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vna.codec import IdentityCodec, PixelCodec
from vna.config import Config
from vna.domain import PlacementState, Tier
from vna.index import Index, open_index
from vna.services.ingest import IngestService
from vna.services.query import QueryService
from vna.services.retrieve import RetrieveService
from vna.storage.accessor import TierAccessor
from vna.storage.base import BlobStore
from vna.storage.filesystem import FilesystemBlobStore

if TYPE_CHECKING:
    from vna.lifecycle.migrator import Migrator

__all__ = ["Archive"]


class Archive:
    """Everything one vna process needs, wired from its config. Close it when done."""

    def __init__(self, cfg: Config, index: Index | None = None) -> None:
        self.cfg = cfg
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        self.index = index if index is not None else open_index(cfg)
        stores = [
            FilesystemBlobStore(f"hot-{i + 1}", cfg.resolve(path), fsync=cfg.hot.fsync)
            for i, path in enumerate(cfg.hot.replicas)
        ]
        self.hot = TierAccessor(Tier.HOT, stores, cfg.hot.quorum, IdentityCodec())
        self.cold = TierAccessor(Tier.COLD, [self._cold_store(cfg)], 1, PixelCodec(cfg.cold.zstd_level))
        #: every tier's accessor, by tier
        self.tiers: dict[Tier, TierAccessor] = {Tier.HOT: self.hot, Tier.COLD: self.cold}
        self.ingest = IngestService(self.index, self.hot, cfg.archive.duplicate_policy)
        self.retrieve = RetrieveService(self.index, self.tiers, cfg.resolve("spool/retrieve"))
        self.query = QueryService(self.index, cfg.dicom.ae_title)

    @staticmethod
    def _cold_store(cfg: Config) -> BlobStore:
        if cfg.cold.backend == "s3":
            from vna.storage.s3 import S3BlobStore

            return S3BlobStore("cold-s3", cfg.cold.s3)
        return FilesystemBlobStore("cold-1", cfg.resolve(cfg.cold.path), fsync=cfg.hot.fsync)

    def migrator(self) -> Migrator:
        """The lifecycle job on this archive's tiers."""
        from vna.lifecycle.migrator import Migrator

        return Migrator(self.index, self.hot, self.cold, self.retrieve, self.cfg.lifecycle, self.cfg.cold)

    def is_committed(self, sop_uid: str, sop_class_uid: str | None = None) -> bool:
        """True if the current version has at least W verified (OK) hot copies."""
        inst = self.index.get_instance(sop_uid)
        if inst is None or (sop_class_uid is not None and inst.sop_class_uid != sop_class_uid):
            return False
        ok = [p for p in self.index.placements(sop_uid)
              if p.state is PlacementState.OK and p.tier is Tier.HOT]
        return len(ok) >= self.hot.quorum

    def close(self) -> None:
        """Release threads and connections."""
        for accessor in self.tiers.values():
            accessor.close()
        self.index.close()
