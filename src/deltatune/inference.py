"""Many task adapters over one base model in one process.

The base model is loaded once; each run's adapter (and its trained head) is attached under its own
name. `predict` answers with one adapter at a time; `predict_mixed` serves a batch whose rows
belong to different LoRA adapters in a single forward pass (peft's mixed-batch inference).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from deltatune import config as config_mod
from deltatune import models
from deltatune.data.batching import collate
from deltatune.engine.loop import seed_everything
from deltatune.errors import DeltatuneError


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
            if not (run / "adapter" / "adapter_config.json").exists():
                raise DeltatuneError(f"{run}: not an adapter run (no adapter/); multi-adapter serving needs runs "
                                     f"trained with a peft method such as lora")
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

    def _batch(self, texts: list[str]) -> dict[str, torch.Tensor]:
        ids = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        dev = next(self.model.parameters()).device
        return {k: v.to(dev) for k, v in collate({"input_ids": ids}, self.tokenizer.pad_token_id).items()}

    def _rows(self, texts: list[str], runs: list[str], logits: torch.Tensor) -> list[dict]:
        probs = logits.float().softmax(-1).cpu()
        out = []
        for text, run, p in zip(texts, runs, probs):
            labels = self.labels[run]
            k = int(p.argmax())
            out.append({"run": run, "text": text, "label": labels[k], "score": float(p[k]),
                        "scores": dict(zip(labels, p.tolist()))})
        return out

    @torch.no_grad()
    def predict(self, texts: list[str], run: str | Path) -> list[dict]:
        self.model.set_adapter(self._name(run))
        return self._rows(texts, [str(run)] * len(texts), self.model(**self._batch(texts)).logits)

    @torch.no_grad()
    def predict_mixed(self, texts: list[str], runs: list[str | Path]) -> list[dict]:
        """Row i is answered by adapter runs[i], all in one forward pass."""
        names = [self._name(r) for r in runs]
        logits = self.model(**self._batch(texts), adapter_names=names).logits
        return self._rows(texts, [str(r) for r in runs], logits)

    def _name(self, run: str | Path) -> str:
        if str(run) not in self.names:
            raise DeltatuneError(f"{run} is not one of the loaded runs: {', '.join(self.names)}")
        return self.names[str(run)]
