"""QueryService: C-FIND-style queries for every front-end (DIMSE, gRPC).

Federation: the index is shared, so every site's studies match. While another
site cannot be reached, a match asking for InstanceAvailability says
UNAVAILABLE when some of its instances have verified copies only at
unreachable sites (it is reported, never dropped); RetrieveAETitle is this
site's AE, which fetches from the other sites.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Mapping

from vna.audit import QUERY, Actor, AuditLog
from vna.domain import InstanceRecord, PlacementState, QueryLevel, site_of
from vna.errors import InvalidInput
from vna.index.base import Index
from vna.index.query import Condition, audit_patient_id, keys_for_level, make_condition

if TYPE_CHECKING:
    from vna.federation.sites import Sites

__all__ = ["QueryService"]

_LEVEL_ORDER = [QueryLevel.PATIENT, QueryLevel.STUDY, QueryLevel.SERIES, QueryLevel.IMAGE]
_UNIDENTIFIED = Actor("unidentified", "unknown")
_WILDCARDS = ("*", "?")


def _exact(value: str) -> list[str]:
    """The values of a single-value or UID-list key; none for wildcard or universal matching."""
    if not value or any(c in value for c in _WILDCARDS):
        return []
    return [v for v in value.split("\\") if v]


def _audit_patients(identifier: Mapping[str, str]) -> list[str]:
    """The exact PatientIDs of an identifier, qualified by its issuer when it names exactly one."""
    issuers = _exact(identifier.get("IssuerOfPatientID", ""))
    issuer = issuers[0] if len(issuers) == 1 else None
    return [audit_patient_id(pid, issuer) for pid in _exact(identifier.get("PatientID", ""))]


class QueryService:
    """Answers queries expressed as ``keyword -> value`` identifiers."""

    def __init__(self, index: Index, retrieve_ae_title: str, *, pn_case_insensitive: bool = True,
                 audit: AuditLog | None = None, sites: Sites | None = None) -> None:
        self.index = index
        self.sites = sites
        self.audit = audit if audit is not None else AuditLog.disabled()
        self.retrieve_ae_title = retrieve_ae_title
        self.pn_case_insensitive = pn_case_insensitive

    def conditions(self, level: QueryLevel, identifier: Mapping[str, str]) -> list[Condition]:
        """Matching conditions for the keys the index knows at ``level``; unknown keys are return-only."""
        known = set(keys_for_level(level))
        out = []
        for kw, raw in identifier.items():
            if kw not in known:
                continue
            cond = make_condition(kw, raw, pn_case_insensitive=self.pn_case_insensitive)
            if cond is not None:
                out.append(cond)
        return out

    def find(
        self, level: QueryLevel, identifier: Mapping[str, str], *, limit: int | None = None,
        actor: Actor | None = None,
    ) -> Iterator[dict[str, str]]:
        """Yield one ``keyword -> value`` dict per match, holding exactly the requested keys.

        Keys the archive does not record come back empty. RetrieveAETitle is
        filled with this archive's AE title. Raises InvalidInput for a bad level,
        AuditUnavailable (before querying) when the audit trail refuses service.
        Audited as one "Query" record (the keys sent, the number of matches)
        when the iteration ends.
        """
        if level not in _LEVEL_ORDER:
            raise InvalidInput(f"unknown query level {level!r}")
        keys = {k: v for k, v in identifier.items() if v and v != "*"}
        with self.audit.operation(QUERY, "E", actor or _UNIDENTIFIED,
                                  patient_ids=_audit_patients(identifier),
                                  study_uids=_exact(identifier.get("StudyInstanceUID", "")),
                                  details={"level": level.value, "keys": keys}) as rec:
            n = 0
            down = set(self.unreachable_sites()) if "InstanceAvailability" in identifier else set()
            if down:
                rec.details["unreachable_sites"] = sorted(down)
            try:
                conds = self.conditions(level, identifier)
                for row in self.index.find(level, conds, limit=limit):
                    out = {}
                    for kw in identifier:
                        if kw == "RetrieveAETitle":
                            out[kw] = self.retrieve_ae_title
                        else:
                            out[kw] = row.get(kw, "")
                    if down and out.get("InstanceAvailability") in ("ONLINE", "NEARLINE") \
                            and not self._reachable(level, row, down):
                        out["InstanceAvailability"] = "UNAVAILABLE"
                    n += 1
                    yield out
            finally:
                rec.details["matches"] = n

    def unreachable_sites(self) -> list[str]:
        """The other sites of the federation that cannot be reached now (health checks are cached)."""
        return self.sites.unreachable() if self.sites else []

    def _reachable(self, level: QueryLevel, row: Mapping[str, str], down: set[str]) -> bool:
        """True if every instance under the row has a verified copy at a site that is not down."""
        insts: list[InstanceRecord]
        if level is QueryLevel.IMAGE:
            one = self.index.get_instance(row.get("SOPInstanceUID", ""))
            insts = [one] if one is not None else []
        elif level is QueryLevel.SERIES:
            insts = [i for i in self.index.study_instances(row.get("StudyInstanceUID", ""))
                     if i.series_uid == row.get("SeriesInstanceUID")]
        elif level is QueryLevel.STUDY:
            insts = self.index.study_instances(row.get("StudyInstanceUID", ""))
        else:
            return True
        for inst in insts:
            if not any(p.state is PlacementState.OK and site_of(p.store_id) not in down
                       for p in self.index.placements(inst.sop_uid, inst.version)):
                return False
        return True
