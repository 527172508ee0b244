"""task: preference in the training loop: pairs in, a preference loss (DPO, IPO, SimPO, ORPO) out.

`PreferenceObjective` is what the loop asks of this task (loop.TokenObjective is the same for classification
and language modelling): collate a micro-batch, count what the loss is averaged over, the loss of a
micro-batch with the sums a logging window adds up, the evaluation, and what to prepare before the first step.

A micro-batch of N pairs is 2N rows (data.preference.collate: the chosen sequences, then the rejected ones).
One forward pass of the policy scores both answers (`sequence_logps`, summed or averaged over answer tokens as
the loss says). The reference model's log-probabilities come from `Reference`, in one of three ways:

- none: SimPO and ORPO read no reference; nothing is computed for one.
- live (peft adapters): the same model with its adapter switched off (peft's `disable_adapter`), in eval mode
  and without gradients, one more forward pass per micro-batch: no second copy of the model in memory, no
  pass over the data before training, nothing on disk. Soft prompts (prompt/P-tuning, prefix tuning) vanish
  with the adapter, so their reference is the base model on the plain sequence (sequence_logps reads only the
  last labels.shape[1] positions of the policy's longer logits).
- precomputed (methods that change the model's own weights: full, freeze, bitfit, deltatune's bottleneck
  adapters, which cannot be switched off; and LoRA with init=pissa, whose base weights peft changed): one pass
  of the initial model over the train and validation pairs before the first step, in eval mode, cached in the
  run directory (reference_logps/<key>.safetensors) under a key of the tokenized data's fingerprints, the
  model's and the method's settings, the precision and the loss's averaging. A resumed run reads it back; it
  is never recomputed from a half-trained model (a resume without it is refused).
Why adapters do not precompute too (TRL's precompute_ref_log_probs): docs/preference.md#training.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from deltatune.data import preference as pairs
from deltatune.data.batching import eval_batches, model_inputs
from deltatune.data.columns import column
from deltatune.engine.distributed import Dist
from deltatune.errors import DeltatuneError
from deltatune.evaluation import generation
from deltatune.models import identity
from deltatune.preference.losses import LOSSES, metric_means, metric_sums, sequence_logps

CACHE_DIR = "reference_logps"


def reference_kind(cfg: Any, model: torch.nn.Module) -> tuple[str, str]:
    """(none | live | precomputed, why) for this run's loss and method."""
    loss = LOSSES[cfg.preference.loss]
    if not loss.needs_reference:
        return "none", f"{loss.name} uses no reference model"
    if cfg.preference.reference == "precomputed":
        return "precomputed", ("preference.reference=precomputed: the initial model's log-probabilities are computed "
                               "once before training")
    if not callable(getattr(model, "disable_adapter", None)):
        return "precomputed", (f"method {cfg.method.name} has no adapter that can be switched off: the initial "
                               f"model's log-probabilities are computed once before training")
    if not switches_off(cfg, model):
        return "precomputed", ("lora init=pissa moved the principal components out of the base weights, so the "
                               "model with its adapter off is not the initial model")
    return "live", "the model with its adapter switched off (peft's disable_adapter), no second copy"


def switches_off(cfg: Any, model: torch.nn.Module) -> bool:
    """Whether the model with its peft adapter switched off is the initial model's reference: not for methods
    without one, nor for lora init=pissa (peft moved the principal components out of the base weights)."""
    return callable(getattr(model, "disable_adapter", None)) and getattr(cfg.method, "init", None) != "pissa"


@torch.no_grad()
def pair_logps(model: torch.nn.Module, split: Any, averages: bool, prec: Any, dist: Any, pad_id: int,
               batch_size: int, max_tokens: int | None, synced: bool) -> torch.Tensor:
    """[pairs, 2] float32 on the CPU: each pair's (chosen, rejected) log-probability under `model` in eval mode,
    in row order, on every rank. Batches are sharded over the ranks (every world-th one) and gathered;
    synced: the parameters are sharded (FSDP, ZeRO-3), so every rank runs as many batches (stand-ins filling
    the difference, their results dropped)."""
    was_training = model.training
    model.eval()
    ds = split.dataset
    # One pair is two rows: half the row budget in pairs keeps the logits of a batch within max_tokens rows.
    batches = eval_batches(column(ds, "length"), batch_size, max_tokens // 2 if max_tokens else None)
    mine = batches[dist.rank::dist.world]
    filler = (-(-len(batches) // dist.world) - len(mine)) if synced else 0
    rows: list[int] = []
    values: list[list[float]] = []
    try:
        for j, ids in enumerate(mine + batches[:1] * filler):
            batch = {k: v.to(dist.device) for k, v in pairs.collate(ds[ids], pad_id).items()}
            with prec.autocast():
                logits = model(**model_inputs(batch, lm=True)).logits
            if j < len(mine):
                chosen, rejected = sequence_logps(logits, batch["labels"], averages).float().cpu().chunk(2)
                rows += ids
                values += torch.stack([chosen, rejected], dim=1).tolist()
    finally:
        model.train(was_training)
    table = torch.zeros(len(ds), 2, dtype=torch.float32)
    for part_rows, part_values in dist.gather_objects((rows, values)):
        if part_rows:
            table[torch.tensor(part_rows)] = torch.tensor(part_values, dtype=torch.float32)
    return table


class Reference:
    """The reference model's log-probabilities of a micro-batch's answers, or of a whole split (evaluation)."""

    def __init__(self, kind: str, why: str, averages: bool, base_only: Callable, adapter_off: bool):
        self.kind, self.why, self.averages = kind, why, averages
        self.base_only = base_only  # loop.base_only: the model with its peft adapter switched off
        # Precomputed for a peft model too (preference.reference=precomputed): the reference is still the model
        # with its adapter off (soft prompts start random, so "initial model" would not be the base).
        self.adapter_off = adapter_off
        self.tables: dict[str, torch.Tensor] = {}  # precomputed: split name -> [pairs, 2]
        self.cache: Path | None = None

    def of_batch(self, run: Any, batch: dict) -> tuple[torch.Tensor, ...]:
        """(chosen, rejected) per pair of the micro-batch, or () when the loss uses no reference."""
        if self.kind == "none":
            return ()
        if self.kind == "precomputed":
            table = self.tables["train"][batch["index"].cpu()].to(run.dist.device)
            return table[:, 0], table[:, 1]
        model = run.model
        was_training = model.training
        model.eval()  # as the precomputed reference and the evaluation: no dropout in the reference
        try:
            with torch.no_grad(), self.base_only(model), run.prec.autocast():
                logits = model(**model_inputs(batch, lm=True)).logits
        finally:
            model.train(was_training)
        return sequence_logps(logits, batch["labels"], self.averages).chunk(2)

    def of_split(self, run: Any, name: str, split: Any, logits_budget: int | None) -> torch.Tensor:
        if self.kind == "precomputed":
            return self.tables[name]
        with self.base_only(run.model):
            return split_logps(run, split, self.averages, logits_budget)

    def prepare(self, run: Any, log: Any, resumed: bool, logits_budget: int | None) -> None:
        """precomputed: read the cache, or (a fresh run) compute it with the initial model and write it."""
        if self.kind != "precomputed":
            return
        self.cache = run.run_dir / CACHE_DIR / f"{cache_key(run, self.averages)}.safetensors"
        splits = {"train": run.data.train, **({"validation": run.data.validation} if run.data.validation else {})}
        if self.cache.is_file():
            self.tables = load_file(self.cache)
            log.print(f"reference log-probabilities: read from {self.cache}")
        elif resumed:
            others = sorted(p.name for p in self.cache.parent.glob("*.safetensors"))
            why = (f"the run directory holds them for other data, model or settings ({', '.join(others)}): what "
                   f"changed since the run started (data files, tokenizer, max_length, model, method, precision) "
                   f"must be as it was" if others else "the file is missing")
            raise DeltatuneError(
                f"resuming a preference run: its reference log-probabilities ({self.cache}) cannot be read ({why}), "
                f"and they cannot be recomputed from a half-trained model. Fix: resume with the run's own config "
                f"and data, restore the file, or start the run over (output.overwrite=true).")
        else:
            log.print(f"reference log-probabilities: one pass of the initial model over "
                      f"{', '.join(f'{len(s.dataset)} {n}' for n, s in splits.items())} pairs ({self.why})")
            with self.base_only(run.model) if self.adapter_off else contextlib.nullcontext():
                self.tables = {n: split_logps(run, s, self.averages, logits_budget) for n, s in splits.items()}
            if run.dist.is_main:
                write_atomically(self.cache, self.tables)
            run.dist.barrier()
        for name, split in splits.items():
            if name not in self.tables or self.tables[name].shape != (len(split.dataset), 2):
                raise DeltatuneError(f"{self.cache}: holds no reference log-probabilities for the {len(split.dataset)}"
                                     f" {name} pairs of this run. Fix: delete the file and start the run over.")


def split_logps(run: Any, split: Any, averages: bool, logits_budget: int | None) -> torch.Tensor:
    vocab = getattr(run.model.config, "vocab_size", None) or 32_000
    return pair_logps(run.model, split, averages, run.prec, run.dist, run.tokenizer.pad_token_id,
                      run.cfg.eval.batch_size, logits_budget // vocab if logits_budget else None,
                      run.strategy.shards_parameters)


def cache_key(run: Any, averages: bool) -> str:
    """What the initial model's log-probabilities depend on: the tokenized pairs (datasets' fingerprint changes
    with the rows, tokenizer, template, max_length and the data code), the model's files and settings, the
    method's settings, the precision and whether log-probabilities are averaged."""
    cfg, data = run.cfg, run.data
    parts = {"train": data.train.dataset._fingerprint,
             "validation": data.validation.dataset._fingerprint if data.validation is not None else None,
             "model": identity.fingerprint(identity.model_dir(cfg.model.name, cfg.model.revision)),
             "model_settings": cfg.model.model_dump(mode="json"), "method": cfg.method.model_dump(mode="json"),
             "precision": run.prec.name, "averages": averages}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def write_atomically(path: Path, tables: dict[str, torch.Tensor]) -> None:
    """A reader (a resume) finds the whole file or none: written beside it, then renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    save_file({k: v.contiguous() for k, v in tables.items()}, tmp)
    os.replace(tmp, path)


@torch.no_grad()
def score_pairs(loss_fn: Any, hyper: dict, policy: torch.Tensor, reference: torch.Tensor | None) -> dict:
    """The loss (mean over pairs) and metrics of [pairs, 2] (chosen, rejected) log-probabilities under the policy
    and the reference (None for losses without one). preference_accuracy needs no reference: the share of pairs
    whose chosen answer the policy itself finds likelier (its log-probability, summed or averaged as the loss
    reads it), which means something before training too, where every DPO reward is 0."""
    ref = (reference[:, 0], reference[:, 1]) if reference is not None else ()
    out = loss_fn(policy[:, 0], policy[:, 1], *ref, **hyper)
    return {"loss": float(out.losses.double().mean()), **metric_means(metric_sums(out)),
            "preference_accuracy": float((policy[:, 0] > policy[:, 1]).double().mean())}


def evaluate_saved(cfg: Any, model: torch.nn.Module, tokenizer: Any, split: Any, prec: Any, base_only: Callable,
                   logits_budget: int, base_model: torch.nn.Module | None = None, gen: Any = None) -> dict:
    """`deltatune eval` of a saved preference run on `split` (one process): the metrics training logs, with the
    reference as training had it: the model with its adapter switched off, or `base_model`, the initial model
    loaded alone, for the methods whose reference was precomputed from it (their run's table covers only its
    own pairs). gen: a loop.GenerationEval for the generation metrics, or None."""
    loss_fn = LOSSES[cfg.preference.loss]
    dist = Dist(0, 1, 0, next(model.parameters()).device)
    vocab = getattr(model.config, "vocab_size", None) or 32_000

    def logps(m: torch.nn.Module) -> torch.Tensor:
        return pair_logps(m, split, loss_fn.averages, prec, dist, tokenizer.pad_token_id, cfg.eval.batch_size,
                          logits_budget // vocab, synced=False)

    policy, reference = logps(model), None
    if loss_fn.needs_reference:
        with base_only(model) if base_model is None else contextlib.nullcontext():
            reference = logps(base_model if base_model is not None else model)
    result = score_pairs(loss_fn, cfg.preference.hyper(), policy, reference)
    if gen is not None:
        result.update(generation.score(model, tokenizer, gen.prompts, gen.references, gen.max_new_tokens,
                                       cfg.eval.batch_size, prec.autocast))
    return result


class PreferenceObjective:
    """task: preference. The loss of a step is the sum of its pairs' losses over the pairs of the global batch
    (so batch 8 == batch 2 x accumulation 4, as for every task); a window also logs the rewards and
    log-probabilities (preference.losses.metric_means)."""

    def __init__(self, cfg: Any, model: torch.nn.Module, base_only: Callable,
                 logits_budget: int | None = None):
        self.loss_fn = LOSSES[cfg.preference.loss]
        self.hyper = cfg.preference.hyper()
        self.reference = Reference(*reference_kind(cfg, model), self.loss_fn.averages, base_only,
                                   switches_off(cfg, model))
        self.logits_budget = logits_budget

    def collate(self, run: Any, rows: list[int]) -> dict:
        batch = pairs.collate(run.data.train.dataset[rows], run.tokenizer.pad_token_id)
        batch["index"] = torch.tensor(rows, dtype=torch.long)  # the pairs' rows: where precomputed references sit
        return batch

    def count(self, run: Any, batch: dict) -> int:
        """Pairs: what the loss is averaged over."""
        return len(batch["index"])

    def loss(self, run: Any, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """The summed loss of the micro-batch's pairs (one policy forward of its 2N rows), and metric sums."""
        with run.prec.autocast():
            logits = run.net(**model_inputs(batch, lm=True)).logits
        chosen, rejected = sequence_logps(logits, batch["labels"], self.loss_fn.averages).chunk(2)
        out = self.loss_fn(chosen, rejected, *self.reference.of_batch(run, batch), **self.hyper)
        return out.losses.sum(), metric_sums(out)

    def window(self, sums: dict[str, float]) -> dict[str, float]:
        return {k: round(v, 6) for k, v in metric_means(sums).items()} if sums.get("pairs") else {}

    def evaluate(self, run: Any) -> dict:
        """Loss and metrics over every validation pair (the loss is the mean over pairs); with a generation
        metric (eval.metric exact_match / label_accuracy), answers generated for a sample of the prompts too,
        scored against the chosen answers as sft scores its references."""
        split = run.data.validation
        policy = split_logps(run, split, self.loss_fn.averages, self.logits_budget)
        reference = None
        if self.reference.kind != "none":
            reference = self.reference.of_split(run, "validation", split, self.logits_budget)
        result = score_pairs(self.loss_fn, self.hyper, policy, reference)
        if run.gen_eval is not None:
            gen = run.gen_eval
            result.update(generation.score(run.model, gen.tokenizer, gen.prompts, gen.references, gen.max_new_tokens,
                                           run.cfg.eval.batch_size, run.prec.autocast, dist=run.dist,
                                           synced=run.strategy.shards_parameters))
        return result

    def prepare(self, run: Any, log: Any, resumed: bool) -> None:
        log.print(f"[dim]preference: loss {self.loss_fn.name} {self.hyper}; reference {self.reference.kind} "
                  f"({self.reference.why})")
        self.reference.prepare(run, log, resumed, self.logits_budget)

    def summary(self) -> dict:
        ref = self.reference
        return {"preference": {"loss": self.loss_fn.name, "hyper": self.hyper, "reference": ref.kind,
                               "reference_why": ref.why, "reference_cache": str(ref.cache) if ref.cache else None}}

