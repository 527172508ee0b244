"""Packing: several short examples share one training sequence, without seeing each other.

Each packed row keeps, per token, the example's own positions (0, 1, 2, ... restarting at every
example). Given `position_ids` and no attention mask, transformers builds a block-diagonal causal
mask from those restarts (masking_utils.find_packed_sequence_indices) for eager, SDPA and flash
attention alike, so a token attends only to earlier tokens *of its own example*, and rotary
positions are those of the example alone: a packed batch computes what the unpacked one does
(tests/test_decoders.py checks the logits). The first token of every example carries no loss, as
in an unpacked row, so no example is trained to predict the next example's start.

Padding at the end of a row is its own "example" (positions from 0, no loss), so it never mixes
with real tokens either.
"""

from __future__ import annotations

import bisect

import datasets
import numpy as np

from deltatune.constants import IGNORE_INDEX
from deltatune.data.columns import column, rows_of


def plan(lengths: list[int], max_length: int, seed: int) -> list[list[int]]:
    """Groups of example indices whose lengths sum to <= max_length: best-fit decreasing (each example
    goes to the fullest sequence it still fits in), with a seeded shuffle first so equal lengths do
    not always land together. The open sequences are kept sorted by room left, so each placement is a
    binary search, not a scan: O(n log n) for n examples."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths))
    order = order[np.argsort([-lengths[i] for i in order], kind="stable")]
    bins: list[list[int]] = []
    open_rooms: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for i in order.tolist():
        n = lengths[i]
        at = bisect.bisect_left(open_rooms, (n, -1))  # the smallest room that still fits n
        if at == len(open_rooms):
            bins.append([i])
            room, b = max_length - n, len(bins) - 1
        else:
            room, b = open_rooms.pop(at)
            bins[b].append(i)
            room -= n
        if room > 0:
            bisect.insort(open_rooms, (room, b))
    return bins


def pack_rows(input_ids: list[list[int]], labels: list[list[int]] | None, groups: list[list[int]]) -> dict:
    """Concatenate each group; `labels=None` means every token is a target (plain causal LM)."""
    out: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": [], "length": [], "examples": []}
    for group in groups:
        ids, labs, pos = [], [], []
        for i in group:
            x = input_ids[i]
            y = list(labels[i]) if labels is not None else list(x)
            y[0] = IGNORE_INDEX  # predicted from the previous example's last token: never a target
            ids += x
            labs += y
            pos += range(len(x))
        out["input_ids"].append(ids)
        out["labels"].append(labs)
        out["position_ids"].append(pos)
        out["length"].append(len(ids))
        out["examples"].append(len(group))
    return out


def pack_dataset(ds: datasets.Dataset, max_length: int, seed: int) -> tuple[datasets.Dataset, dict]:
    """Packed rows of a tokenized dataset (input_ids, length, labels if any), and statistics: examples
    per row and the share of real tokens. The caller wraps them in its Split (data/build.py)."""
    lengths = column(ds, "length").tolist()
    groups = plan(lengths, max_length, seed)
    packed = pack_rows(rows_of(ds, "input_ids"), rows_of(ds, "labels") if "labels" in ds.column_names else None,
                       groups)
    stats = {"examples": len(lengths), "sequences": len(groups),
             "examples_per_sequence": round(len(lengths) / max(len(groups), 1), 2),
             "fill": round(sum(lengths) / max(len(groups) * max_length, 1), 4)}
    return datasets.Dataset.from_dict(packed), stats
