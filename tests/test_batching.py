"""Length-grouped batching: covers every row once, is seeded, and depends only on the global batch."""

from __future__ import annotations

import numpy as np

from deltatune.data.batching import collate, eval_batches, length_grouped_batches, shard


def test_every_index_once_and_grouped():
    lengths = np.random.default_rng(0).integers(3, 100, size=1001)
    batches = length_grouped_batches(lengths, 16, seed=1, epoch=0)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(1001))
    # Grouping: the mean within-batch length spread is far below a random batching's.
    spread = np.mean([np.ptp(lengths[b]) for b in batches if len(b) > 1])
    assert spread < 0.25 * np.ptp(lengths)
    # The longest batch comes first, so running out of memory happens at step 1.
    assert max(lengths[batches[0]]) == lengths.max()


def test_seeded_and_epoch_dependent():
    lengths = list(range(200))
    a = length_grouped_batches(lengths, 8, seed=3, epoch=0)
    assert a == length_grouped_batches(lengths, 8, seed=3, epoch=0)
    assert a != length_grouped_batches(lengths, 8, seed=3, epoch=1)
    assert a != length_grouped_batches(lengths, 8, seed=4, epoch=0)


def test_shard_splits_global_batch_across_ranks_and_micro_batches():
    batch = list(range(16))
    parts = [shard(batch, r, 2, 4) for r in range(2)]
    assert parts[0] == [[0, 1, 2, 3], [4, 5, 6, 7]] and parts[1] == [[8, 9, 10, 11], [12, 13, 14, 15]]
    assert [i for p in parts for m in p for i in m] == batch
    assert shard([1, 2, 3], 0, 1, 2) == [[1, 2], [3]]


def test_eval_batches_sorted_and_complete():
    lengths = [5, 1, 9, 3, 7]
    b = eval_batches(lengths, 2)
    assert [i for x in b for i in x] == [2, 4, 0, 3, 1]


def test_collate_pads_to_longest_in_batch():
    out = collate({"input_ids": [[5, 6, 7], [8]], "labels": [1, 0]}, pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [1, 0]
    left = collate({"input_ids": [[5, 6, 7], [8]]}, pad_id=0, pad_side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]


def test_eval_batches_cap_rows_times_length():
    from deltatune.data.batching import eval_batches

    lengths = [256] * 10 + [10] * 40
    batches = eval_batches(lengths, batch_size=64, max_tokens=1000)
    assert sorted(i for b in batches for i in b) == list(range(50))
    assert all(len(b) * max(lengths[i] for i in b) <= 1000 for b in batches)
    assert [len(b) for b in batches] == [3, 3, 3, 3, 38] and eval_batches(lengths, 64) == [list(range(50))]
