"""Length-grouped batches (the default when not packing) under many processes: every rank plans
the same global batches, the ranks' shares are disjoint and make up the batch, and a checkpoint
moves to another world size when the global batch is kept."""

import numpy as np
import pytest

from tunesmith.data.batching import Batches
from tunesmith.data.tokenize import Example
from tunesmith.errors import TunesmithError

EXAMPLES = [Example(np.arange(1, 2 + i % 7), np.full(1 + i % 7, -100), f"f:{i}") for i in range(29)]


def batches(world: int, rank: int, size: int) -> Batches:
    b = Batches(EXAMPLES, size, 64, 0, packing=False, seed=5, group_by_length=True)
    b.shard(rank, world)
    return b


def test_grouped_global_batches_split_between_ranks():
    one = batches(1, 0, 4)
    ranks = [batches(2, r, 2) for r in range(2)]
    assert [len(r.plan(1)) for r in ranks] == [len(one.plan(1))] * 2
    for k, rows in enumerate(one.plan(1)):
        shares = [r._slice(r.plan(1)[k]) for r in ranks]
        assert shares[0] + shares[1] == rows  # same batch as one process, split in two
    lengths = [max(one.lengths[i] for (i,) in rows) for rows in one.plan(0)]
    assert len(set(lengths)) > 1  # grouping is by length, not a fixed cut


def test_grouped_checkpoint_moves_between_world_sizes_with_the_same_global_batch():
    saved = batches(2, 1, 2)
    saved.position = len(saved.plan(0)) + 3  # into the second epoch
    again = batches(1, 0, 4)
    again.load_state_dict(saved.state_dict())
    assert again.position == saved.position
    # Another global batch groups other examples together: no position consumed the same rows.
    with pytest.raises(TunesmithError, match="not a whole number"):
        batches(1, 0, 3).load_state_dict(saved.state_dict())
