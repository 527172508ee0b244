"""Length-grouped, seeded, rank-sharded batches with dynamic padding.

Grouping examples of similar length and padding each batch only to its own longest row is the
largest single speed-up on short-text data (about 7x over padding to 128 on SST-2 on our CPUs).
"""

from __future__ import annotations

import numpy as np
import torch

MEGABATCH = 50  # global batches per sorting window: enough to group lengths, still well shuffled


def length_grouped_batches(lengths: list[int] | np.ndarray, global_batch: int, seed: int, epoch: int
                           ) -> list[list[int]]:
    """Shuffle, sort by length inside windows of MEGABATCH global batches, shuffle the batches.

    Depends only on the *global* batch size, so batch 8 and batch 2 x accumulation 4 (or 4
    processes x 2) see exactly the same examples in the same optimizer steps.
    """
    lengths = np.asarray(lengths)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    window = global_batch * MEGABATCH
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = order[start:start + window]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches += [chunk[i:i + global_batch].tolist() for i in range(0, len(chunk), global_batch)]
    perm = rng.permutation(len(batches)).tolist()
    # Longest batch first: if memory runs out, it does so in the first step, not after an hour.
    longest = max(range(len(batches)), key=lambda b: lengths[batches[b]].max() * len(batches[b]))
    perm.remove(longest)
    return [batches[longest]] + [batches[b] for b in perm]


def shard(batch: list[int], rank: int, world: int, micro: int) -> list[list[int]]:
    """This rank's micro-batches of one global batch (contiguous slice, then chunks of `micro`)."""
    per_rank = -(-len(batch) // world)
    mine = batch[rank * per_rank:(rank + 1) * per_rank]
    return [mine[i:i + micro] for i in range(0, len(mine), micro)]


def eval_batches(lengths: list[int] | np.ndarray, batch_size: int) -> list[list[int]]:
    """Sorted by length (no shuffling needed): the least padding for evaluation."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]


def collate(rows: dict[str, list], pad_id: int, pad_side: str = "right", lm: bool = False
            ) -> dict[str, torch.Tensor]:
    """Pad a batch of token-id lists to its own longest row; labels pass through.

    lm=True: the targets are the tokens themselves, with padding marked -100 (ignored by the loss).
    """
    ids = rows["input_ids"]
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        sl = slice(0, len(x)) if pad_side == "right" else slice(width - len(x), width)
        input_ids[i, sl] = torch.tensor(x, dtype=torch.long)
        mask[i, sl] = 1
    out = {"input_ids": input_ids, "attention_mask": mask}
    if lm:
        out["labels"] = input_ids.masked_fill(mask == 0, -100)
    elif "labels" in rows:
        out["labels"] = torch.tensor(rows["labels"], dtype=torch.long)
    return out
