"""Merge a trained adapter into its base model, and prove the merge changed nothing.

The merged model is a plain transformers directory (safetensors + tokenizer): zero added latency,
loadable without deltatune or peft. Before anything is written, merged and unmerged models are run
on the same sample inputs; if their outputs differ by more than `tolerance`, nothing is written.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from deltatune import api, methods
from deltatune.data.batching import collate
from deltatune.errors import DeltatuneError

SAMPLE_TEXTS = ["A moving, beautifully acted film.", "Dull, tedious and far too long.",
                "The markets rallied after the announcement.", "It was fine, I suppose.",
                "Nobody expected the sequel to be this good, yet here we are."]


def sample_batch(run: api.LoadedRun, limit: int = 32) -> dict[str, torch.Tensor]:
    """Rows from the run's own validation data where it can be read, else fixed sentences."""
    texts = list(SAMPLE_TEXTS)
    try:
        from deltatune.data import sources

        ds = sources.read(run.config.data.validation if isinstance(run.config.data.validation, str)
                          else run.config.data.train, run.config.data.columns)
        texts = [str(t) for t in ds[run.config.data.text][:limit]] or texts
    except Exception:  # the data may live on another machine; fixed sentences still exercise the merge
        pass
    ids = run.tokenizer(texts, truncation=True, max_length=run.config.data.max_length)["input_ids"]
    return collate({"input_ids": ids}, run.tokenizer.pad_token_id)


def merge(run_dir: str | Path, out_dir: str | Path, tolerance: float = 1e-4) -> dict:
    run = api.load_run(run_dir, device="cpu")
    method = methods.REGISTRY[run.config.method.name]
    if method.saves != "adapter":
        raise DeltatuneError(f"{run_dir}: method `{method.name}` already produced a full model in "
                             f"{Path(run_dir) / 'model'}; there is nothing to merge.")
    if not method.mergeable:
        raise DeltatuneError(f"{run_dir}: method `{method.name}` cannot be merged: {method.why_not_mergeable}. "
                             f"Serve it with its base model (deltatune predict), or train LoRA/IA3 to merge.")
    batch = sample_batch(run)
    with torch.no_grad():
        before = run.model(**batch).logits.float()
        merged = run.model.merge_and_unload()
        after = merged(**batch).logits.float()
    diff = float((before - after).abs().max())
    report = {"run_dir": str(run_dir), "method": method.name, "samples": int(batch["input_ids"].shape[0]),
              "max_abs_diff": diff, "tolerance": tolerance}
    if diff > tolerance:
        raise DeltatuneError(f"merge verification failed: merged and unmerged outputs differ by {diff:.3g} "
                             f"(> tolerance {tolerance:g}); nothing was written to {out_dir}.")
    out = Path(out_dir)
    merged.save_pretrained(out, safe_serialization=True)
    run.tokenizer.save_pretrained(out)
    (out / "merge_report.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    return report
