"""Length-grouped, seeded, rank-sharded batches with dynamic padding.

Grouping examples of similar length and padding each batch only to its own longest row is the
largest single speed-up on short-text data (about 7x over padding to 128 on SST-2 on our CPUs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from deltatune.constants import IGNORE_INDEX

if TYPE_CHECKING:
    pass

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


def eval_batches(lengths: list[int] | np.ndarray, batch_size: int, max_tokens: int | None = None
                 ) -> list[list[int]]:
    """Sorted by length (no shuffling needed): the least padding for evaluation. `max_tokens` also caps
    rows x longest row per batch (e.g. to bound a language model's full logits)."""
    lengths = np.asarray(lengths)
    order = np.argsort(-lengths, kind="stable").tolist()
    batches, i = [], 0
    while i < len(order):
        rows = batch_size if max_tokens is None else max(1, min(batch_size, max_tokens // int(lengths[order[i]])))
        batches.append(order[i:i + rows])
        i += rows
    return batches


def collate(rows: dict[str, list], pad_id: int, pad_side: str = "right", lm: bool = False
            ) -> dict[str, torch.Tensor]:
    """Pad a batch of token-id lists to its own longest row.

    Language modelling: per-token `labels` lists are padded with IGNORE_INDEX (-100, ignored by the loss); without
    them every real token is a target. Packed rows also bring `position_ids`; their padding becomes
    one more segment (positions from 0), so it never joins a real example's attention block.
    """
    ids = rows["input_ids"]
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    token_labels = lm and "labels" in rows
    labels = torch.full((len(ids), width), IGNORE_INDEX, dtype=torch.long) if token_labels else None
    positions = torch.zeros((len(ids), width), dtype=torch.long) if "position_ids" in rows else None
    for i, x in enumerate(ids):
        sl = slice(0, len(x)) if pad_side == "right" else slice(width - len(x), width)
        input_ids[i, sl] = torch.tensor(x, dtype=torch.long)
        mask[i, sl] = 1
        if labels is not None:
            labels[i, sl] = torch.tensor(rows["labels"][i], dtype=torch.long)
        if positions is not None:
            positions[i, :len(x)] = torch.tensor(rows["position_ids"][i], dtype=torch.long)
            positions[i, len(x):] = torch.arange(width - len(x))
    out = {"input_ids": input_ids, "attention_mask": mask}
    if labels is not None:
        out["labels"] = labels
    elif lm:
        out["labels"] = input_ids.masked_fill(mask == 0, IGNORE_INDEX)
    elif "labels" in rows:
        out["labels"] = torch.tensor(rows["labels"], dtype=torch.long)
    if positions is not None:
        out["position_ids"] = positions
    return out


def model_inputs(batch: dict[str, torch.Tensor], lm: bool, keep_logits: bool = False
                 ) -> dict[str, torch.Tensor | bool | None]:
    """What the model is called with. Packed rows pass positions and *no* attention mask: that is how
    transformers is told to build the block-diagonal mask (see data/packing.py). Decoders in training
    need no key/value cache.

    keep_logits: project onto the vocabulary only where the next token is a target (`logits_to_keep`
    as a boolean mask; the logits come back flattened to (targets, vocab)). In instruction tuning a
    74-token example may have 2 target tokens, and the output layer is ~20% of a small LLM's compute.
    """
    if "position_ids" in batch:
        inputs: dict = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
                        "attention_mask": None, "use_cache": False}
    else:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if lm:
            inputs["use_cache"] = False
    if keep_logits:
        inputs["logits_to_keep"] = target_positions(batch["labels"])
    return inputs


def target_positions(labels: torch.Tensor) -> torch.Tensor:
    """Boolean (batch, length): True where the *next* token is a target."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep
