"""The composition root: builds stores, index and services from a Config."""

from __future__ import annotations

import hashlib
import json
import logging
from typing import TYPE_CHECKING

from vna.audit import (APPLICATION_ACTIVITY, APPLICATION_START, APPLICATION_STOP, INSTANCES_ACCESSED, Actor, AuditLog,
                       Code)
from vna.codec import IdentityCodec, PixelCodec
from vna.config import Config
from vna.pixelcodec import CODEC_VERSIONS
from vna.domain import PlacementState, Tier, site_of, site_store_id
from vna.errors import AuditUnavailable, NotFound
from vna.gauges import ArchiveGauges
from vna.index import Index, open_index
from vna.lifecycle.copies import copy_policy, shortfall
from vna.services.ingest import IngestService
from vna.services.query import QueryService
from vna.services.retrieve import RetrieveService
from vna.storage.accessor import TierAccessor
from vna.storage.base import BlobStore
from vna.storage.filesystem import FilesystemBlobStore
from vna.telemetry import Telemetry

if TYPE_CHECKING:
    from vna.federation.sites import Sites
    from vna.lifecycle.migrator import Migrator

__all__ = ["Archive"]

log = logging.getLogger(__name__)


class Archive:
    """Everything one vna process needs, wired from its config. Close it when done.

    ``telemetry``: an already built one (tests pass in-memory exporters);
    by default it is set up from ``cfg.telemetry``.
    """

    def __init__(self, cfg: Config, index: Index | None = None, *, telemetry: Telemetry | None = None) -> None:
        self.cfg = cfg
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        self.telemetry = telemetry if telemetry is not None else Telemetry.setup(cfg.telemetry)
        self.audit = AuditLog(cfg.audit, cfg.resolve(cfg.audit.path), telemetry=self.telemetry,
                              source={"ae": cfg.dicom.ae_title, "site": cfg.archive.site_id})
        self._activity(APPLICATION_START)
        self.index = index if index is not None else open_index(cfg)
        #: this site's id; store ids carry it (``hot-1@A``) so every placement names its site
        self.site_id = cfg.archive.site_id
        stores = self._hot_stores(cfg)
        self.hot = TierAccessor(Tier.HOT, stores, cfg.hot.quorum, IdentityCodec(), telemetry=self.telemetry)
        self.cold = TierAccessor(Tier.COLD, [self._cold_store(cfg)], 1,
                                 PixelCodec(cfg.cold.zstd_level, version=CODEC_VERSIONS[cfg.cold.codec]))
        #: every tier's accessor, by tier
        self.tiers: dict[Tier, TierAccessor] = {Tier.HOT: self.hot, Tier.COLD: self.cold}
        #: archive.min_copies and what one copy on each store counts for
        self.copies = copy_policy(cfg, self.hot, self.cold)
        if (short := shortfall(cfg, self.copies, self.hot, self.cold)) is not None:
            log.warning("%s", short)
        self.ingest = IngestService(self.index, self.hot, cfg.archive.duplicate_policy,
                                    audit=self.audit, telemetry=self.telemetry,
                                    assigned_issuers=cfg.assigned_issuers())
        #: the other sites of the federation (None: a single site)
        self.sites: Sites | None = None
        if cfg.federation.site:
            from vna.federation.sites import Sites

            self.sites = Sites(self.site_id, cfg.federation)
        self.retrieve = RetrieveService(self.index, self.tiers, cfg.resolve("spool/retrieve"),
                                        audit=self.audit, telemetry=self.telemetry, site=self.site_id,
                                        sites=self.sites, cache_remote=cfg.federation.cache_remote)
        self.ingest.retrieve = self.retrieve  # a re-send in other bytes is compared with a verified stored copy
        self.ingest.copy_weight = self.copies.weight  # a verified copy counts as its store declares (redundancy)
        self.query = QueryService(self.index, cfg.dicom.ae_title, audit=self.audit, sites=self.sites)
        self.gauges = ArchiveGauges(self)

    @staticmethod
    def _hot_stores(cfg: Config) -> list[BlobStore]:
        """The hot replicas: directories ``hot-1..``, then S3 buckets ``hot-s3-1..`` (ids fixed by config order).

        Ids carry the site (``hot-1@A``) unless the site is the default "local".
        """
        site = cfg.archive.site_id
        stores: list[BlobStore] = [
            FilesystemBlobStore(site_store_id(f"hot-{i + 1}", site), cfg.resolve(path), fsync=cfg.hot.fsync,
                                file_mode=cfg.archive.file_mode)
            for i, path in enumerate(cfg.hot.replicas)
        ]
        if cfg.hot.s3:
            from vna.storage.s3 import S3BlobStore

            stores += [S3BlobStore(site_store_id(f"hot-s3-{i + 1}", site), s3) for i, s3 in enumerate(cfg.hot.s3)]
        return stores

    @staticmethod
    def _cold_store(cfg: Config) -> BlobStore:
        if cfg.cold.backend == "s3":
            from vna.storage.s3 import S3BlobStore

            return S3BlobStore(site_store_id("cold-s3", cfg.archive.site_id), cfg.cold.s3)
        return FilesystemBlobStore(site_store_id("cold-1", cfg.archive.site_id), cfg.resolve(cfg.cold.path),
                                   fsync=cfg.hot.fsync, file_mode=cfg.archive.file_mode)

    def migrator(self) -> Migrator:
        """The lifecycle job on this archive's tiers."""
        from vna.lifecycle.migrator import Migrator

        return Migrator(self.index, self.hot, self.cold, self.retrieve, self.cfg.lifecycle, self.cfg.cold,
                        audit=self.audit, telemetry=self.telemetry, copies=self.copies)

    def is_committed(self, sop_uid: str, sop_class_uid: str | None = None) -> bool:
        """True if the current version has at least W verified (OK) hot copies at this site."""
        inst = self.index.get_instance(sop_uid)
        if inst is None or (sop_class_uid is not None and inst.sop_class_uid != sop_class_uid):
            return False
        ok = [p for p in self.index.placements(sop_uid)
              if p.state is PlacementState.OK and p.tier is Tier.HOT and site_of(p.store_id) == self.site_id]
        return len(ok) >= self.hot.quorum

    def set_hold(self, study_uid: str, held: bool, reason: str, actor: Actor) -> None:
        """Place or lift a legal hold on a study, audited (refused first if the trail cannot be written).

        Raises NotFound for an unknown study, AuditUnavailable, IndexUnavailable.
        """
        instances = self.index.study_instances(study_uid)
        if not instances:
            raise NotFound(f"study {study_uid} is not in the archive")
        with self.audit.operation(INSTANCES_ACCESSED, "U", actor, study_uids=[study_uid],
                                  patient_ids={i.attrs.get("PatientID", "") for i in instances},
                                  details={"change": "legal hold placed" if held else "legal hold lifted",
                                           "reason": reason}):
            self.index.set_hold(study_uid, held, reason if held else "")

    def _activity(self, what: Code) -> None:
        """Record the start (with the digest of the configuration loaded) or the stop of this process."""
        details = {}
        if what is APPLICATION_START:
            config = json.dumps(self.cfg.as_dict(), sort_keys=True, default=str).encode()
            details = {"config_sha256": hashlib.sha256(config).hexdigest(), "data_dir": str(self.cfg.data_dir)}
        try:
            self.audit.record(APPLICATION_ACTIVITY, "E", Actor.process("vna"), event_type=what, details=details)
        except AuditUnavailable as exc:
            log.error("%s not audited: %s", what.meaning, exc)

    def close(self) -> None:
        """Release threads and connections; the audit trail and telemetry are flushed last."""
        self.gauges.close()
        for accessor in self.tiers.values():
            accessor.close()
        if self.sites is not None:
            self.sites.close()
        self.index.close()
        self._activity(APPLICATION_STOP)
        self.audit.close()
        self.telemetry.shutdown()
