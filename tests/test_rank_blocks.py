"""The ranks' shares of a run's blocks: each block (with all its checkpoints' units) goes to
exactly one rank, for any W, so that a rank can score every block it sketches."""

from __future__ import annotations

from collections import Counter

import pytest
from omegaconf import OmegaConf

from sdi_pipeline.run.rundir import enumerate_units, rank_blocks, run_blocks


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5])
@pytest.mark.parametrize(
    ("n_checkpoints", "n_train", "block_size"), [(1, 1, 4), (3, 40, 16), (2, 7, 1)]
)
def test_rank_blocks_partition_the_units(world_size, n_checkpoints, n_train, block_size) -> None:
    cfg = OmegaConf.create(
        {"checkpoints": {"paths": [f"c{k}" for k in range(n_checkpoints)]},
         "data": {"block_size": block_size}}
    )  # fmt: skip
    blocks = run_blocks(cfg, n_train)
    shares = [rank_blocks(blocks, rank, world_size) for rank in range(world_size)]
    counts = Counter(unit for share in shares for block in share for unit in block.units)
    assert set(counts) == set(enumerate_units(n_checkpoints, n_train, block_size))
    assert set(counts.values()) == {1}
    for share in shares:
        for block in share:  # a block's units: every checkpoint, its examples
            assert [u.ckpt for u in block.units] == list(range(n_checkpoints))
            assert {(u.start, u.stop) for u in block.units} == {(block.start, block.stop)}
    # Balanced: the shares differ by at most one block.
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
