"""The Index port: the catalogue (query attributes) and the placement ledger.

Contract (every adapter, checked by ``tests/contracts/test_index.py``):

- ``register`` is atomic: the instance version, its catalogue rows and all its
  placements become visible together or not at all. Registering an existing
  ``(sop_uid, version)`` raises StateConflict and changes nothing.
- Placement state changes are compare-and-set (``transition``).
- ``find`` applies :mod:`vna.index.query` semantics exactly, whatever the
  adapter pushes down; it yields rows lazily.
- Backend failures raise IndexUnavailable; nothing else escapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Protocol, Sequence

from vna.domain import InstanceRecord, Placement, PlacementState, QueryLevel
from vna.index.query import Condition

__all__ = ["Index", "IndexStats", "TierStats"]


@dataclass(frozen=True)
class TierStats:
    """Placement counts and bytes for one tier."""

    placements: int = 0
    stored_bytes: int = 0
    by_state: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class IndexStats:
    """Counts for ``vna index stats``."""

    patients: int
    studies: int
    series: int
    instances: int
    content_bytes: int
    tiers: dict[str, TierStats]


class Index(Protocol):
    """Catalogue and placement ledger."""

    def migrate(self) -> int:
        """Create or upgrade the schema idempotently; return the schema version."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...

    def get_instance(self, sop_uid: str) -> InstanceRecord | None:
        """The current (newest) version of an instance, or None."""
        ...

    def register(self, record: InstanceRecord, placements: Sequence[Placement]) -> None:
        """Atomically record an instance version, its catalogue rows and placements."""
        ...

    def placements(self, sop_uid: str, version: int | None = None) -> list[Placement]:
        """Placements of one version (default: the current one)."""
        ...

    def transition(
        self,
        placement: Placement,
        new_state: PlacementState,
        *,
        verified_at: float | None = None,
    ) -> bool:
        """Set ``new_state`` iff the stored state still equals ``placement.state``.

        Moving a placement to TO_DELETE is refused (returns False) unless another
        placement of the same instance version is OK.
        """
        ...

    def find(
        self, level: QueryLevel, conditions: Sequence[Condition], *, limit: int | None = None
    ) -> Iterator[dict[str, str]]:
        """Matching rows at ``level`` with every key of that level and above, computed keys included."""
        ...

    def stats(self) -> IndexStats:
        """Counts and bytes per tier."""
        ...

    def acquire_lease(self, name: str, owner: str, ttl: float) -> bool:
        """Take or renew the named lease for ``ttl`` seconds; False if another owner holds it."""
        ...

    def release_lease(self, name: str, owner: str) -> None:
        """Release the lease if ``owner`` holds it."""
        ...
