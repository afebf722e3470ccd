"""The minimum number of independent copies (``archive.min_copies``) and what each store counts for.

A copy on a plain filesystem directory counts 1; a store that is itself
redundant declares it (``hot.s3[].redundancy``, ``cold.redundancy``,
``cold.s3.redundancy``) and one copy there counts that many. Only verified
(``OK``) copies count. The lifecycle never retires a hot copy unless the
copies left still count at least ``min_copies``; the integrity report warns
about instance versions below it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

from vna.config import Config
from vna.domain import Placement, PlacementState
from vna.storage.accessor import TierAccessor

__all__ = ["CopyPolicy", "copy_policy", "shortfall"]


@dataclass(frozen=True)
class CopyPolicy:
    """``min_copies`` and each store's declared redundancy (a store not listed counts 1)."""

    min_copies: int = 1
    redundancy: Mapping[str, int] = field(default_factory=dict)

    def weight(self, store_id: str) -> int:
        """How many copies one copy on ``store_id`` counts for."""
        return self.redundancy.get(store_id, 1)

    def counted(self, placements: Iterable[Placement]) -> int:
        """The copies the OK placements among ``placements`` count for."""
        return sum(self.weight(p.store_id) for p in placements if p.state is PlacementState.OK)

    def hot_copies_kept(self, cold_store: str, hot_stores: list[str]) -> int:
        """Hot copies a migration keeps per instance when all of ``hot_stores`` hold one (retired last-first)."""
        counted = self.weight(cold_store) + sum(self.weight(s) for s in hot_stores)
        kept = len(hot_stores)
        for store_id in reversed(hot_stores):
            if counted - self.weight(store_id) < self.min_copies:
                continue
            counted -= self.weight(store_id)
            kept -= 1
        return kept


def copy_policy(cfg: Config, hot: TierAccessor, cold: TierAccessor) -> CopyPolicy:
    """The policy of an archive's stores: hot directories count 1, hot buckets and the cold store as declared.

    ``hot.stores`` are in config order (directories, then buckets), as the archive builds them.
    """
    weights = [1] * len(cfg.hot.replicas) + [s3.redundancy for s3 in cfg.hot.s3]
    redundancy = {store.store_id: w for store, w in zip(hot.stores, weights)}
    redundancy.update({store.store_id: cfg.cold.copies_counted for store in cold.stores})
    return CopyPolicy(cfg.archive.min_copies, redundancy)


def shortfall(cfg: Config, policy: CopyPolicy, hot: TierAccessor, cold: TierAccessor) -> str | None:
    """Why the configured stores cannot give a new instance ``min_copies`` copies (None when they can).

    Ingest writes one copy per hot replica; a migration adds the cold copy.
    """
    hot_counted = sum(policy.weight(s.store_id) for s in hot.stores)
    if hot_counted >= policy.min_copies:
        return None
    cold_counted = sum(policy.weight(s.store_id) for s in cold.stores)
    where = f"the {len(hot.stores)} hot replica(s) count {hot_counted} cop{'y' if hot_counted == 1 else 'ies'}"
    if not cfg.lifecycle.enabled or hot_counted + cold_counted < policy.min_copies:
        return (f"archive.min_copies = {policy.min_copies} cannot be met: {where}"
                f"{'' if not cfg.lifecycle.enabled else f' and the cold tier {cold_counted}'}; "
                "every instance stays below the minimum (add replicas, declare a store's redundancy "
                "or lower archive.min_copies)")
    return (f"archive.min_copies = {policy.min_copies}: {where}; new instances are below the minimum "
            "until the lifecycle migrates them")
