"""What predicting with a classification run gives for each text: `encode` (before the model runs) and `fill`
(after). One row per text, blank texts flagged, truncation counted: the rows of `api.predict`,
`deltatune serve`'s /v1/classify and `inference.MultiAdapter`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

EMPTY = "empty text"  # the problem name training uses for the same rows (data/validate.py)


def encode(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int
           ) -> tuple[list[int], list[list[int]], list[dict]]:
    """What predicting each text involves, before any model runs: (indices of the texts to score,
    their token ids cut to max_length, one row per text). Every text keeps its row, so outputs line
    up with inputs; a blank one is not scored (training refuses such rows, so any answer would be
    invented) and its row says why. Each row counts the tokens kept and the text's full length."""
    keep = [i for i, t in enumerate(texts) if t.strip()]
    kept = [texts[i] for i in keep]
    ids = tokenizer(kept, truncation=True, max_length=max_length)["input_ids"] if kept else []
    # Untruncated, only to measure what truncation dropped (verbose=False: no over-length warning).
    full = tokenizer(kept, truncation=False, verbose=False)["input_ids"] if kept else []
    rows = [{"text": t, "label": None, "score": None, "scores": None, "tokens": 0, "tokens_total": 0,
             "truncated": False, "problem": EMPTY} for t in texts]
    for i, short, whole in zip(keep, ids, full):
        rows[i].update(tokens=len(short), tokens_total=len(whole), truncated=len(whole) > len(short), problem=None)
    return keep, ids, rows


def fill(row: dict, labels: list[str], probs: torch.Tensor) -> None:
    """Put one scored text's label, its probability and every label's probability into its row."""
    k = int(probs.argmax())
    row.update(label=labels[k], score=float(probs[k]), scores=dict(zip(labels, probs.tolist())))
