"""Many task adapters over one base model in one process.

The base model is loaded once; each run's adapter (and its trained head) is attached under its own
name. `predict` answers with one adapter at a time; `predict_mixed` serves a batch whose rows
belong to different LoRA adapters in a single forward pass (peft's mixed-batch inference).
Rows are those of `api.predict`: one per text, blank texts flagged, truncation counted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from deltatune import artifacts, models
from deltatune import config as config_mod
from deltatune.data.batching import collate
from deltatune.engine.loop import seed_everything
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
    def __init__(self, run_dirs: list[str | Path], device: str = "cpu"):
        from peft import PeftModel
        from transformers import AutoTokenizer

        if not run_dirs:
            raise DeltatuneError("give at least one run directory")
        self.runs = [Path(r) for r in run_dirs]
        self.names = {str(r): f"run{i}" for i, r in enumerate(self.runs)}
        cfgs = []
        for run in self.runs:
            if not (run / "adapter").is_dir():
                raise DeltatuneError(f"{run}: not an adapter run (no adapter/); multi-adapter serving needs runs "
                                     f"trained with a peft method such as lora")
            artifacts.check(run, run / "adapter")
            cfgs.append(config_mod.load(run / "config.yaml"))
        self.labels = {str(r): json.loads((r / "labels.json").read_text()) for r in self.runs}
        first = cfgs[0]
        for run, cfg in zip(self.runs[1:], cfgs[1:]):
            if (cfg.model.name, cfg.task) != (first.model.name, first.task):
                raise DeltatuneError(f"{run}: trained on `{cfg.model.name}` ({cfg.task}), but {self.runs[0]} on "
                                     f"`{first.model.name}` ({first.task}); adapters must share one base model")
            if len(self.labels[str(run)]) != len(self.labels[str(self.runs[0])]):
                raise DeltatuneError(f"{run}: {len(self.labels[str(run)])} labels vs "
                                     f"{len(self.labels[str(self.runs[0])])} in {self.runs[0]}; the shared base "
                                     f"carries one head shape")
        self.max_length = first.data.max_length
        self.tokenizer = AutoTokenizer.from_pretrained(self.runs[0] / "adapter")
        seed_everything(first.train.seed)
        base = models.load_classifier(first.model.name, self.labels[str(self.runs[0])], self.tokenizer,
                                      first.model.revision, first.model.trust_remote_code, "sdpa")
        self.model = PeftModel.from_pretrained(base, self.runs[0] / "adapter", adapter_name="run0")
        for run in self.runs[1:]:
            self.model.load_adapter(run / "adapter", adapter_name=self.names[str(run)])
        self.model.to(device).eval()

    def _rows(self, texts: list[str], runs: list[str], names: list[str] | None) -> list[dict]:
        """One row per text (see `encode`); the scored ones in one forward pass, with adapter names[i]
        for row i when given (a mixed batch), else the active adapter."""
        keep, ids, rows = encode(self.tokenizer, texts, self.max_length)
        for row, run in zip(rows, runs):
            row["run"] = run
        if not keep:
            return rows
        dev = next(self.model.parameters()).device
        batch = {k: v.to(dev) for k, v in collate({"input_ids": ids}, self.tokenizer.pad_token_id).items()}
        extra = {"adapter_names": [names[i] for i in keep]} if names is not None else {}
        probs = self.model(**batch, **extra).logits.float().softmax(-1).cpu()
        for i, p in zip(keep, probs):
            fill(rows[i], self.labels[runs[i]], p)
        return rows

    @torch.no_grad()
    def predict(self, texts: list[str], run: str | Path) -> list[dict]:
        self.model.set_adapter(self._name(run))
        return self._rows(texts, [str(run)] * len(texts), None)

    @torch.no_grad()
    def predict_mixed(self, texts: list[str], runs: list[str | Path]) -> list[dict]:
        """Row i is answered by adapter runs[i], all in one forward pass."""
        names = [self._name(r) for r in runs]
        return self._rows(texts, [str(r) for r in runs], names)

    def _name(self, run: str | Path) -> str:
        if str(run) not in self.names:
            raise DeltatuneError(f"{run} is not one of the loaded runs: {', '.join(self.names)}")
        return self.names[str(run)]
