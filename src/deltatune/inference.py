"""Predicting with classification runs: the rows texts become (`encode`, `fill`), and many runs in one process.

`MultiAdapter` holds several runs as `deltatune serve` does (the base model once; LoRA adapters attached under
their own names). `predict` answers with one run; `predict_mixed` serves a batch whose rows belong to
different runs (LoRA adapters in a single forward pass: peft's mixed-batch inference).
Rows are those of `api.predict`: one per text, blank texts flagged, truncation counted.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from deltatune import config as config_mod
from deltatune.errors import DeltatuneError

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


class MultiAdapter:
    """Several classification runs in one process, held and answered as `deltatune serve` holds and answers them
    (serve/engine.py, the one home of this): plain LoRA adapters over one base in one peft model, so a batch may
    mix them in one forward pass; runs of any other method share every base weight they hold unchanged."""

    def __init__(self, run_dirs: list[str | Path], device: str = "cpu"):
        from deltatune.serve.engine import Engine

        if not run_dirs:
            raise DeltatuneError("give at least one run directory")
        self.runs = [Path(r) for r in run_dirs]
        self.names = {str(r): f"run{i}" for i, r in enumerate(self.runs)}
        cfgs = {}
        for run in self.runs:
            if not (run / "config.yaml").is_file():
                raise DeltatuneError(f"{run}: not a finished deltatune run (missing config.yaml). Fix: pass the "
                                     f"output.dir of a run that completed `deltatune train`.")
            cfgs[str(run)] = config_mod.load(run / "config.yaml")
            if cfgs[str(run)].task != "classification":
                raise DeltatuneError(f"{run}: a {cfgs[str(run)].task} run; predict classifies (use deltatune "
                                     f"generate for decoders)")
        # The base every adapter run must have been trained on: the first adapter run's (checked by fingerprint).
        adapter_runs = [r for r in self.runs if (r / "adapter").is_dir()]
        base = cfgs[str(adapter_runs[0])].model if adapter_runs else None
        self.engine = Engine(base.name if base else None, base.revision if base else None, device)
        for run in self.runs:
            self.engine.add(self.names[str(run)], run)

    @torch.no_grad()
    def predict(self, texts: list[str], run: str | Path) -> list[dict]:
        """One row per text (see `encode`), answered by `run`, all its texts in one forward pass."""
        return self.predict_mixed(texts, [run] * len(texts))

    @torch.no_grad()
    def predict_mixed(self, texts: list[str], runs: list[str | Path]) -> list[dict]:
        """Row i is answered by runs[i]; rows of LoRA adapters over one base go through one forward pass."""
        engine = self.engine
        works = [engine.prepare_classify(engine.get(self._name(r)), [t], sys.maxsize) for t, r in zip(texts, runs)]
        rows = [row for answer in engine.classify_many(works) for row in answer]
        for row, run in zip(rows, runs):
            row["run"] = str(run)
        return rows

    def _name(self, run: str | Path) -> str:
        if str(run) not in self.names:
            raise DeltatuneError(f"{run} is not one of the loaded runs: {', '.join(self.names)}")
        return self.names[str(run)]
