"""Cassandra catalogue counters (schema v6, issue 19): maintained without scans, equal to a full recount.

Real node; the duplicate writers are driven through the adapter's own protocol
steps (``_begin`` then ``_finish``, as ``register`` calls them), the roll-up
through :meth:`CassandraIndex.rollup_counters`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from tests.contracts.test_cassandra_registration import placement_of, record_of, two_frontends  # noqa: F401
from tests.contracts.test_index import P1, S1, load_catalogue, make_placement, make_record
from vna.domain import PlacementState, Tier
from vna.errors import StateConflict
from vna.index.base import IndexStats
from vna.index.cassandra import CassandraIndex
from vna.index.cassandra_counters import SHARDS

pytestmark = pytest.mark.cassandra


def recounted(index: CassandraIndex) -> IndexStats:
    """A full recount, without repairing anything."""
    return index._counters.recount(repair=False)[1]


def test_counters_follow_registrations_transitions_and_rollups(cassandra_index: CassandraIndex) -> None:
    idx = cassandra_index
    load_catalogue(idx)
    assert idx.stats() == recounted(idx)  # pending deltas, nothing rolled up yet
    assert idx.rollup_counters(margin=0.0) > 0
    assert idx.stats() == recounted(idx)  # from the totals
    assert idx.rollup_counters(margin=0.0) == 0

    ok = next(p for p in idx.placements("1.4.2"))
    assert idx.transition(ok, PlacementState.MISSING)
    assert not idx.transition(ok, PlacementState.MISSING)  # lost the compare-and-set: counted nothing
    missing = replace(ok, state=PlacementState.MISSING)
    assert idx.replace_placement(missing, replace(ok, blob_key="hot-a/elsewhere", stored_size=7))
    retired = next(p for p in idx.placements("1.4.4") if p.state is PlacementState.TO_DELETE)
    assert idx.delete_placement(retired)
    idx.add_placements([make_placement("1.4.3", store="cold", tier=Tier.COLD, size=9)])
    idx.register(make_record("1.4.2", "1.3.1", "1.2.1", version=2, size=4321), [make_placement("1.4.2", version=2)])
    s = idx.stats()
    assert s == recounted(idx)
    assert s.instances == 7 and s.tiers["hot"].by_state.get("TO_DELETE", 0) == 0
    idx.rollup_counters(margin=0.0)
    assert idx.stats() == recounted(idx)


def test_a_retried_registration_is_counted_once(cassandra_index: CassandraIndex) -> None:
    idx = cassandra_index
    r = make_record("1.4.1", "1.3.1", "1.2.1")
    idx.register(r, [make_placement("1.4.1")])
    idx.rollup_counters(margin=0.0)
    with pytest.raises(StateConflict):
        idx.register(r, [make_placement("1.4.1")])
    assert idx.stats().instances == 1
    assert idx.stats() == recounted(idx)


@pytest.mark.parametrize("rolled_between", [False, True])
def test_two_front_ends_committing_the_same_bytes_count_it_once(
        two_frontends: tuple[CassandraIndex, CassandraIndex], rolled_between: bool) -> None:  # noqa: F811
    """Both passed their decision before either commit landed; a roll-up may fold the first in between."""
    a, b = two_frontends
    r = record_of("a")
    copies = [placement_of("a", "hot-a"), placement_of("a", "hot-b")]  # the same replicas on every front-end
    begun = [(index, index._begin(r, copies)) for index in (a, b)]
    for n, (index, (writer, stamp, t0, marks)) in enumerate(begun):
        index._finish(r, writer, stamp, t0, ["hot-a", "hot-b"], index._counters.commit_statements(r, copies, None))
        index._settle_shared(marks)
        if n == 0 and rolled_between:
            assert a.rollup_counters(margin=0.0) > 0
    s = a.stats()
    assert (s.instances, s.studies, s.series, s.patients) == (1, 1, 1, 1)
    assert s.tiers["hot"].placements == 2  # not 4
    assert s == recounted(a)
    b.rollup_counters(margin=0.0)
    assert a.stats() == recounted(a)


def test_recount_repairs_wrong_totals(cassandra_index: CassandraIndex, cassandra_admin: Any) -> None:
    idx = cassandra_index
    load_catalogue(idx)
    idx.rollup_counters(margin=0.0)
    truth = idx.stats()
    ks = idx.cfg.keyspace
    cassandra_admin.execute(f"UPDATE {ks}.counter_ledger SET totals = totals + {{'instances': 40}} "
                            f"WHERE shard = {SHARDS - 1}")
    cassandra_admin.execute(f"DELETE FROM {ks}.counter_ledger WHERE shard = 0 AND entry >= 'p:'")  # lost markers
    assert idx.stats().instances == truth.instances + 40
    maintained, recount = idx.recount()
    assert maintained.instances == truth.instances + 40
    assert recount == truth
    assert idx.stats() == truth
    idx.register(make_record("1.4.9", "1.3.1", "1.2.1", attrs=P1 | S1), [make_placement("1.4.9")])
    idx.rollup_counters(margin=0.0)  # the markers were repaired: an existing study is not counted again
    assert idx.stats() == recounted(idx)
