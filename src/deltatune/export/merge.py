"""Merge a trained adapter into its base model, and prove the merge changed nothing.

The merged model is a plain transformers directory (safetensors + tokenizer): zero added latency,
loadable without deltatune or peft. Before anything is written, merged and unmerged models are run
on the same sample inputs; if their outputs differ by more than `tolerance`, nothing is written.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from deltatune import api, methods, models
from deltatune.data.batching import collate
from deltatune.engine import artifact, runlock
from deltatune.errors import DeltatuneError
from deltatune.methods.lora import is_quantized

SAMPLE_TEXTS = ["A moving, beautifully acted film.", "Dull, tedious and far too long.",
                "The markets rallied after the announcement.", "It was fine, I suppose.",
                "Nobody expected the sequel to be this good, yet here we are."]


def sample_batch(run: api.LoadedRun, limit: int = 32) -> dict[str, torch.Tensor]:
    """Rows of the run's own data (its `data.text` column: classification and causal_lm runs) where they can be
    read, else fixed sentences (sft and preference rows have no such column; every adapted layer still sees
    the sentences, so the check stays valid)."""
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


@torch.no_grad()
def merge_checked(model: torch.nn.Module, batch: dict[str, torch.Tensor]
                  ) -> tuple[torch.nn.Module, torch.Tensor, float]:
    """Merge `model`'s adapter into its base weights (in place; `model` is spent) and measure what that changed:
    (the merged plain model, the unmerged logits on `batch`, the difference: the largest absolute difference
    from them, relative to the largest logit magnitude where that exceeds 1). Relative because float32 rounding
    grows with the values: a correct merge of a SmolLM2-135M LoRA (logits up to ~30) differs by ~1e-4 in
    absolute terms, while a wrong one (an adapter dropped or scaled wrongly) differs by whole units."""
    before = model(**batch).logits.float()
    merged = model.merge_and_unload()
    scale = max(1.0, float(before.abs().max()))
    return merged, before, float((before - merged(**batch).logits.float()).abs().max()) / scale


def dequantized_copy(run: api.LoadedRun) -> torch.nn.Module:
    """QLoRA: never merge into 4- or 8-bit weights. Build a 32-bit base whose linear weights are exactly the
    dequantized ones the adapter was trained against, then attach the adapter to it, so the merged model
    computes what the trained (unmerged) model computed."""
    from peft import PeftModel

    cfg = run.config
    from deltatune.engine.loop import seed_everything

    seed_everything(cfg.train.seed)
    base32 = models.load_model(cfg.task, cfg.model.name, run.labels, run.tokenizer, cfg.model.revision,
                               cfg.model.trust_remote_code, "sdpa")
    for name, module in run.model.get_base_model().named_modules():
        weight = dequantized_weight(module)
        if weight is not None:
            base32.get_submodule(name.removesuffix(".base_layer")).weight.data.copy_(weight)
    return PeftModel.from_pretrained(base32, run.path / "adapter")


def dequantized_weight(module: torch.nn.Module) -> torch.Tensor | None:
    """The fp32 values a bitsandbytes layer computes with; None for any other module (peft's wrappers of these
    layers carry the same class names, hence the module check)."""
    import bitsandbytes.functional as bnbf

    if not type(module).__module__.startswith("bitsandbytes"):
        return None
    kind = type(module).__name__
    if kind == "Linear4bit":
        data, state = module.weight.data, module.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            # bitsandbytes repacks 4-bit weights for its CPU kernel at the first forward pass;
            # dequantizing needs the original layout back: its own inverse, which copies the weight but
            # rewrites the quantization state in place (so it gets a copy: a second call on the same
            # state, or the live model's next forward, would read garbage).
            data, state = bnbf._convert_weight_packed_for_cpu_inverse(data, copy.deepcopy(state))
        return bnbf.dequantize_4bit(data, state).float()
    if kind == "Linear8bitLt":  # LLM.int8: int8 rows, each with its absmax (SCB): w = q * absmax / 127
        scb = module.weight.SCB if getattr(module.weight, "SCB", None) is not None else module.state.SCB
        return module.weight.data.float() * (scb.float().unsqueeze(1) / 127.0)
    return None


def merge(run_dir: str | Path, out_dir: str | Path, tolerance: float = 1e-4, overwrite: bool = False) -> dict:
    """Merge the adapter of `run_dir` into its base and write it to `out_dir`, which must be new, empty, or
    (with `overwrite`) a previous merge; it is locked against other writers for the whole merge."""
    from deltatune import preflight

    # Refused before any weight is loaded: what cannot merge, and an output whose files a merge would destroy.
    preflight.merge(run_dir, out_dir, overwrite)
    with runlock.hold(out_dir, "deltatune merge") as lock:
        try:
            return _merge_locked(Path(run_dir), Path(out_dir), tolerance, overwrite)
        except BaseException:
            lock.discard = lock.created  # the directory made for the lock goes again
            raise


def _merge_locked(run_dir: Path, out: Path, tolerance: float, overwrite: bool) -> dict:
    from deltatune import preflight

    run = api.load_run(run_dir, device="cpu")
    method = methods.REGISTRY[run.config.method.name]
    batch = sample_batch(run)
    quantized = is_quantized(run.model)
    with torch.no_grad():
        reference, kernel_diff = run.model, None
        if quantized:
            # The merge is checked against the adapter on the dequantized base (the exact NF4 / int8
            # values). bitsandbytes' kernels only approximate that product (4-bit CPU kernel; int8
            # activations outside training), so their own difference is measured and reported
            # separately, not counted against the merge.
            kernel = run.model(**batch).logits.float()
            reference = dequantized_copy(run)
        merged, before, diff = merge_checked(reference, batch)
        if quantized:
            kernel_diff = float((kernel - before).abs().max())
    report = {"run_dir": str(run_dir), "method": method.name, "samples": int(batch["input_ids"].shape[0]),
              "max_diff": diff, "max_abs_diff": diff * max(1.0, float(before.abs().max())), "tolerance": tolerance,
              "into": f"fp32 copy of the dequantized {run.config.method.bits}-bit base" if quantized else "fp32 base",
              "quantized_kernel_max_abs_diff": kernel_diff, "task": run.config.task,
              # How `deltatune generate` should render prompts for the merged model, as for the run.
              "prompt_template": api.prompt_template(run.config, run.tokenizer)}
    if diff > tolerance:
        raise DeltatuneError(f"merge verification failed: merged and unmerged outputs differ by {diff:.3g} relative "
                             f"to the largest logit (> tolerance {tolerance:g}); nothing was written to {out}.")
    preflight.merge_target(run_dir, out, overwrite)  # again, under the lock: nothing arrived in OUT meanwhile
    # Atomically (temp dir, fsync, rename): a killed merge never leaves a half-written model behind.
    artifact.recover_target(out)
    artifact.save_model(merged, run.tokenizer, out, extra={"merge_report.json": json.dumps(report, indent=1)},
                          what="the merged model")
    return report
