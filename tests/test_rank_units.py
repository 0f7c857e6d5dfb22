"""The ranks' shares of a run's units: each unit goes to exactly one rank, for any W."""

from __future__ import annotations

from collections import Counter

import pytest

from sdi_pipeline.rundir import enumerate_units, rank_units


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5])
@pytest.mark.parametrize(
    ("n_checkpoints", "n_train", "block_size"), [(1, 1, 4), (3, 40, 16), (2, 7, 1)]
)
def test_rank_units_partition_the_units(world_size, n_checkpoints, n_train, block_size) -> None:
    units = enumerate_units(n_checkpoints, n_train, block_size)
    shares = [rank_units(units, rank, world_size) for rank in range(world_size)]
    counts = Counter(unit for share in shares for unit in share)
    assert set(counts) == set(units) and set(counts.values()) == {1}
    # Balanced: the shares differ by at most one unit.
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
