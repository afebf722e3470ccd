"""Integrity reports from the placement ledger: per tier how much was verified when, what is damaged or at risk,
and per-study / per-instance fixity (last verification and its outcome). Read-only.

``verified_at`` is the time of a copy's last check; its state is that check's
outcome (``OK`` verified, ``MISSING``/``CORRUPT`` proven wrong).
"""

from __future__ import annotations

import datetime as _dt
import math
import time
from collections import defaultdict
from typing import Any, Mapping

from vna.domain import Placement, PlacementState, Tier, site_of
from vna.errors import NotFound
from vna.index.base import Index
from vna.lifecycle.copies import CopyPolicy
from vna.storage.accessor import TierAccessor, site_of_tiers

__all__ = ["AGE_BUCKETS", "integrity_report", "study_fixity", "instance_fixity", "iso"]

_DAY = 86400.0
#: Buckets of time since the last verification of OK copies.
AGE_BUCKETS: tuple[tuple[str, float], ...] = (
    ("<1d", _DAY), ("1-7d", 7 * _DAY), ("7-30d", 30 * _DAY), ("30-90d", 90 * _DAY), (">90d", math.inf))
_DAMAGED = (PlacementState.MISSING, PlacementState.CORRUPT)


def iso(ts: float | None) -> str | None:
    """UTC ISO-8601 of an epoch time (None stays None)."""
    if ts is None:
        return None
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).isoformat(timespec="seconds")


def _bucket(age: float) -> str:
    for name, bound in AGE_BUCKETS:
        if age < bound:
            return name
    return AGE_BUCKETS[-1][0]


def _empty_counts() -> dict[str, Any]:
    return {"placements": 0, "by_state": {}, "stored_bytes_ok": 0,
            "verified": {"never": 0, **{name: 0 for name, _ in AGE_BUCKETS}},
            "oldest_verified_at": None, "newest_verified_at": None}


def _count(c: dict[str, Any], p: Placement, now: float) -> None:
    c["placements"] += 1
    c["by_state"][p.state.value] = c["by_state"].get(p.state.value, 0) + 1
    if p.state is not PlacementState.OK:
        return
    c["stored_bytes_ok"] += p.stored_size
    if p.verified_at is None:
        c["verified"]["never"] += 1
        return
    c["verified"][_bucket(now - p.verified_at)] += 1
    if c["oldest_verified_at"] is None or p.verified_at < c["oldest_verified_at"]:
        c["oldest_verified_at"] = p.verified_at
    if c["newest_verified_at"] is None or p.verified_at > c["newest_verified_at"]:
        c["newest_verified_at"] = p.verified_at


def _row(p: Placement) -> dict[str, Any]:
    return {"sop_uid": p.sop_uid, "version": p.version, "tier": p.tier.value, "store": p.store_id,
            "state": p.state.value, "verified_at": p.verified_at, "verified": iso(p.verified_at)}


def integrity_report(
    index: Index, tiers: Mapping[Tier, TierAccessor], *, now: float | None = None, max_items: int = 100,
    copies: CopyPolicy | None = None,
) -> dict[str, Any]:
    """The whole-archive report (one pass over the placement ledger).

    ``findings`` counts damaged copies, lost instance versions (no OK copy),
    under-replicated ones (fewer OK hot copies than hot stores, unless their
    hot copies are being retired or the lifecycle moved them to the cold tier)
    and ones below ``copies.min_copies`` (their OK copies, each counted with
    its store's redundancy, count fewer). Lists are cut at ``max_items`` entries.
    Federation: counts and findings cover this site's placements (the site of
    ``tiers``); an instance is lost only if no site holds an OK copy, and another
    site's OK copy counts toward the minimum (as 1).
    """
    copies = copies if copies is not None else CopyPolicy()
    now = time.time() if now is None else now
    hot = tiers.get(Tier.HOT)
    hot_stores = len(hot.stores) if hot is not None else 0
    by_tier: dict[str, dict[str, Any]] = {}
    by_store: dict[str, dict[str, Any]] = {}
    groups: dict[tuple[str, int], list[Placement]] = defaultdict(list)
    damaged: list[dict[str, Any]] = []
    n_damaged = 0
    site = site_of_tiers(tiers)
    everywhere: dict[tuple[str, int], list[Placement]] = defaultdict(list)
    for p in index.iter_placements():
        everywhere[(p.sop_uid, p.version)].append(p)
        if site_of(p.store_id) != site:
            continue
        _count(by_tier.setdefault(p.tier.value, _empty_counts()), p, now)
        _count(by_store.setdefault(p.store_id, _empty_counts() | {"tier": p.tier.value}), p, now)
        groups[(p.sop_uid, p.version)].append(p)
        if p.state in _DAMAGED:
            n_damaged += 1
            if len(damaged) < max_items:
                damaged.append(_row(p))
    lost: list[dict[str, Any]] = []
    under: list[dict[str, Any]] = []
    below: list[dict[str, Any]] = []
    n_lost = n_under = n_single = n_below = 0
    for (sop_uid, version), rows in groups.items():
        ok = [r for r in everywhere[(sop_uid, version)] if r.state is PlacementState.OK]
        if not ok:
            n_lost += 1
            if len(lost) < max_items:
                lost.append({"sop_uid": sop_uid, "version": version,
                             "copies": {r.store_id: r.state.value for r in rows}})
            continue
        if len(ok) == 1:
            n_single += 1
        counted = copies.counted(ok)
        if counted < copies.min_copies:
            n_below += 1
            if len(below) < max_items:
                below.append({"sop_uid": sop_uid, "version": version, "copies": counted,
                              "min_copies": copies.min_copies})
        hot_rows = [r for r in rows if r.tier is Tier.HOT]
        migrated = any(r.tier is Tier.COLD and r.state is PlacementState.OK for r in rows)
        if hot_rows and not migrated and not any(r.state is PlacementState.TO_DELETE for r in hot_rows):
            hot_ok = sum(1 for r in hot_rows if r.state is PlacementState.OK)
            if hot_ok < hot_stores:
                n_under += 1
                if len(under) < max_items:
                    under.append({"sop_uid": sop_uid, "version": version, "hot_ok": hot_ok, "hot_stores": hot_stores})
    for counts in (*by_tier.values(), *by_store.values()):
        counts["oldest_verified"] = iso(counts["oldest_verified_at"])
        counts["newest_verified"] = iso(counts["newest_verified_at"])
    return {
        "generated_at": now, "generated": iso(now),
        "instance_versions": len(groups),
        "tiers": by_tier, "stores": by_store,
        "damaged": {"count": n_damaged, "items": damaged},
        "lost": {"count": n_lost, "items": lost},
        "under_replicated": {"count": n_under, "items": under},
        "single_copy": {"count": n_single},
        "below_min_copies": {"count": n_below, "min_copies": copies.min_copies, "items": below},
        "findings": n_damaged + n_lost + n_under + n_below,
    }


def _instance(index: Index, sop_uid: str, version: int) -> dict[str, Any]:
    rows = sorted(index.placements(sop_uid, version), key=lambda r: (r.tier.value, r.store_id))
    ok = [r for r in rows if r.state is PlacementState.OK]
    if not ok:
        outcome = "LOST"
    elif any(r.state in _DAMAGED for r in rows):
        outcome = "DAMAGED"
    else:
        outcome = "OK"
    times = [r.verified_at for r in ok]
    last = None if not times or any(t is None for t in times) else min(t for t in times if t is not None)
    checks = [r.verified_at for r in rows if r.verified_at is not None]
    return {
        "sop_uid": sop_uid, "version": version, "outcome": outcome,
        # every OK copy was verified at or after this time (None: some OK copy never was)
        "last_verified_at": last, "last_verified": iso(last),
        "last_checked_at": max(checks, default=None), "last_checked": iso(max(checks, default=None)),
        "copies": [_row(r) for r in rows],
    }


def _worst(outcomes: list[str]) -> str:
    for o in ("LOST", "DAMAGED"):
        if o in outcomes:
            return o
    return "OK"


def instance_fixity(index: Index, sop_uid: str) -> dict[str, Any]:
    """Fixity of the current version of one instance; raises NotFound."""
    rec = index.get_instance(sop_uid)
    if rec is None:
        raise NotFound(f"instance {sop_uid} is not in the archive")
    return _instance(index, rec.sop_uid, rec.version)


def study_fixity(index: Index, study_uid: str) -> dict[str, Any]:
    """Fixity of every current instance of a study: its outcome and when all its copies were last verified.

    Raises NotFound for an unknown study.
    """
    records = index.study_instances(study_uid)
    if not records:
        raise NotFound(f"study {study_uid} is not in the archive")
    instances = [_instance(index, r.sop_uid, r.version) for r in records]
    lasts = [i["last_verified_at"] for i in instances]
    last = None if any(x is None for x in lasts) else min(lasts)
    return {
        "study_uid": study_uid, "instances": len(instances),
        "outcome": _worst([i["outcome"] for i in instances]),
        "last_verified_at": last, "last_verified": iso(last),
        "by_outcome": {o: sum(1 for i in instances if i["outcome"] == o) for o in ("OK", "DAMAGED", "LOST")},
        "instance_fixity": instances,
    }
