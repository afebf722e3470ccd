"""QueryService: C-FIND-style queries for every front-end (DIMSE, gRPC)."""

from __future__ import annotations

from typing import Iterator, Mapping

from vna.domain import QueryLevel
from vna.errors import InvalidInput
from vna.index.base import Index
from vna.index.query import Condition, keys_for_level, make_condition

__all__ = ["QueryService"]

_LEVEL_ORDER = [QueryLevel.PATIENT, QueryLevel.STUDY, QueryLevel.SERIES, QueryLevel.IMAGE]


class QueryService:
    """Answers queries expressed as ``keyword -> value`` identifiers."""

    def __init__(self, index: Index, retrieve_ae_title: str, *, pn_case_insensitive: bool = True) -> None:
        self.index = index
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
        self, level: QueryLevel, identifier: Mapping[str, str], *, limit: int | None = None
    ) -> Iterator[dict[str, str]]:
        """Yield one ``keyword -> value`` dict per match, holding exactly the requested keys.

        Keys the archive does not record come back empty. RetrieveAETitle is
        filled with this archive's AE title. Raises InvalidInput for a bad level.
        """
        if level not in _LEVEL_ORDER:
            raise InvalidInput(f"unknown query level {level!r}")
        conds = self.conditions(level, identifier)
        for row in self.index.find(level, conds, limit=limit):
            out = {}
            for kw in identifier:
                if kw == "RetrieveAETitle":
                    out[kw] = self.retrieve_ae_title
                else:
                    out[kw] = row.get(kw, "")
            yield out
