"""Many classification runs in one process: `MultiAdapter` holds them as `deltatune serve` does (the base model
once; LoRA adapters attached under their own names). `predict` answers with one run; `predict_mixed` serves a
batch whose rows belong to different runs (LoRA adapters in a single forward pass: peft's mixed-batch inference).
Rows are those of `api.predict` (prediction.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from deltatune import config as config_mod
from deltatune.errors import DeltatuneError


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
