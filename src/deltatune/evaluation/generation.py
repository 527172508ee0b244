"""Generation, and the metrics of tasks phrased as generation.

- `generate`: batched, left-padded greedy decoding or sampling, stopping at EOS.
- `exact_match`: the answer equals the reference after normalising case, surrounding whitespace and
  trailing punctuation ("Positive." == "positive").
- `label_accuracy`: for answers drawn from a small set of labels (the distinct references, at most
  MAX_LABELS), the label the answer names *first* is the prediction. A chatty base model that says
  "The sentiment of this review is positive" scores as positive: zero-shot accuracy measures what
  the model knows, not whether it already answers in one word.
"""

from __future__ import annotations

import contextlib
import re

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

MAX_LABELS = 50


@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]],
             max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             batch_size: int = 16, autocast=None, synced: bool = False) -> list[tuple[list[int], bool]]:
    """New token ids for each prompt (EOS and everything after it removed), and whether EOS came.

    synced: the parameters are sharded over processes (FSDP, ZeRO-3), so every rank runs every decoding step
    until all ranks are done (transformers' `synced_gpus`); every rank must pass as many prompts."""
    was_training = model.training
    model.eval()
    device = next(p for p in model.parameters()).device
    eos = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    out: list[tuple[list[int], bool]] = [([], False) for _ in prompts]
    order = np.argsort([-len(p) for p in prompts], kind="stable").tolist()  # similar lengths share a batch
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(idx):  # left padding: every prompt ends where generation starts
            ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]):] = 1
        kwargs = {"do_sample": do_sample, "max_new_tokens": max_new_tokens, "eos_token_id": eos,
                  "pad_token_id": pad}
        if synced:
            kwargs["synced_gpus"] = True
        if do_sample:
            kwargs.update(temperature=temperature, top_p=top_p)
        else:  # the model's generation_config may ask for sampling; greedy means greedy
            kwargs.update(temperature=None, top_p=None, top_k=None)
        with autocast() if autocast else contextlib.nullcontext():
            seqs = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        for row, i in enumerate(idx):
            new = seqs[row, width:].tolist()
            cut = next((k for k, t in enumerate(new) if t in eos), None)
            out[i] = (new, False) if cut is None else (new[:cut], True)
    model.train(was_training)
    return out


def eos_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokenizer's EOS plus any the model's generation config names (chat models often have two)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    ids += [extra] if isinstance(extra, int) else list(extra or [])
    return list(dict.fromkeys(ids))


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower().rstrip(".!?;:,").strip()


def exact_match(answers: list[str], references: list[str]) -> float:
    return float(np.mean([normalize(a) == normalize(r) for a, r in zip(answers, references)])) if answers else 0.0


def first_label(answer: str, labels: list[str]) -> str | None:
    """The label named earliest in the answer (whole words), or None."""
    text = normalize(answer)
    hits = [(m.start(), label) for label in labels
            for m in [re.search(rf"(?<!\w){re.escape(label)}(?!\w)", text)] if m]
    return min(hits)[1] if hits else None


def label_accuracy(answers: list[str], references: list[str]) -> float | None:
    labels = sorted({normalize(r) for r in references})
    if not answers or len(labels) > MAX_LABELS:
        return None  # not a labelling task: too many distinct answers
    return float(np.mean([first_label(a, labels) == normalize(r) for a, r in zip(answers, references)]))


def score(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]],
          references: list[str], max_new_tokens: int, batch_size: int, autocast=None, dist=None,
          synced: bool = False) -> dict:
    """exact_match and label_accuracy of greedy answers, plus a few samples to look at.

    dist (engine.distributed.Dist): each of several processes answers every world-th prompt, then all
    answers are gathered; synced: see `generate`."""
    world, rank = (dist.world, dist.rank) if dist is not None else (1, 0)
    mine = list(range(rank, len(prompts), world))
    filler = -(-len(prompts) // world) - len(mine)  # every rank generates as many prompts (answers dropped)
    new = generate(model, tokenizer, [prompts[i] for i in mine] + [prompts[0]] * filler, max_new_tokens,
                   batch_size=batch_size, autocast=autocast, synced=synced)[:len(mine)]
    by_row = dict(zip(mine, (tokenizer.decode(x, skip_special_tokens=True) for x, _ in new)))
    if world > 1:
        for part in dist.gather_objects(by_row):
            by_row.update(part)
    answers = [by_row[i] for i in range(len(prompts))]
    result = {"exact_match": exact_match(answers, references), "generated_rows": len(answers),
              "samples": [{"answer": a, "reference": r} for a, r in zip(answers[:3], references[:3])]}
    acc = label_accuracy(answers, references)
    if acc is not None:
        result["label_accuracy"] = acc
    return result
