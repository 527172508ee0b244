"""The training loop. One function, read top to bottom: set up, then steps, evals and checkpoints.

Conventions
- `train.batch_size` is the micro-batch per process; one optimizer step sees
  batch_size x grad_accum x world examples (the "global batch").
- The loss of a step is the *sum* over its examples divided by the number of examples in the whole
  global batch, counted before the backward passes. Dividing each micro-batch by its own size (or
  by grad_accum) would weight short last batches wrongly; this way batch 8 == batch 2 x accum 4.
"""

from __future__ import annotations

import contextlib
import ctypes
import inspect
import math
import random
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from deltatune.config import RunConfig
from deltatune.constants import IGNORE_INDEX
from deltatune.data import DataBundle, Split
from deltatune.data.batching import collate, eval_batches, length_grouped_batches, model_inputs, shard
from deltatune.engine import artifact, checkpoints, embedding_grad, faults, first_token, optim, precision
from deltatune.engine.distributed import Dist
from deltatune.engine.killpoints import kill_point
from deltatune.engine.report import RunLog, console
from deltatune.evaluation import forgetting, generation, metrics
from deltatune.methods import count_parameters
from deltatune.methods.lora import is_quantized

LM_LOGITS_BUDGET = 2**26  # logit values per evaluation batch of a language model without a target mask


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def keep_heap_mapped() -> bool:
    """Stop glibc from unmapping and re-mapping big tensors every step (1.7M page faults per run
    measured here; about 8% of step time). Only for glibc; other allocators are left alone."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):
        return False


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Keep only each layer's input in the forward pass and recompute the rest during backward.

    Non-reentrant checkpointing: it gives adapters their gradients even when the embeddings (and so
    every layer input) are frozen, which the older reentrant variant needs a workaround for."""
    from deltatune.errors import ConfigError

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ConfigError(f"train.gradient_checkpointing=true: {type(base).__name__} does not support it. "
                          f"Fix: set it to false.")
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def train(model: torch.nn.Module, tokenizer, data: DataBundle, cfg: RunConfig, run_dir: Path, dist: Dist,
          lr_scale=None, resume: Path | None = None) -> dict:
    tc = cfg.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    heap_tuned = keep_heap_mapped() if dist.device.type == "cpu" else False
    prec = precision.resolve(tc.precision, dist.device)
    if not is_quantized(model):  # 4-bit weights are placed by device_map at load time and cannot move
        model.to(dist.device)
    if tc.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    optimizer = optim.build_optimizer(model, tc, dist.device, lr_scale)
    scaler = prec.scaler()

    train_set = data.train.dataset
    lengths = np.asarray(train_set["length"])
    global_batch = tc.batch_size * tc.grad_accum * dist.world
    steps_per_epoch = math.ceil(len(train_set) / global_batch)
    total_steps = tc.max_steps or math.ceil(tc.epochs * steps_per_epoch)
    scheduler = optim.build_scheduler(optimizer, tc, total_steps)
    eval_every = steps_per_epoch if cfg.eval.every == "epoch" else int(cfg.eval.every)
    trainable, total = count_parameters(model)

    # DDP all-reduces gradients; `no_sync` skips that for all but the last micro-batch of a step.
    net = model
    if dist.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model)
    compiled = torch.compile(net, dynamic=True) if tc.compile else net
    pad_id = tokenizer.pad_token_id
    lm = cfg.task != "classification"
    keep_logits = lm and accepts_logits_mask(model)

    best: float | None = None
    best_step, best_metrics, bad_evals, stopped_early = 0, {}, 0, False
    probe_before: dict | None = None
    step, tokens_done, compute_s = 0, 0, 0.0
    window_loss, window_items, window_tokens, window_norm, window_t = 0.0, 0.0, 0, 0.0, time.perf_counter()
    history: list[dict] = []
    wall_start = time.perf_counter()
    # Non-finite steps are skipped and counted; resumable checkpoints every train.save_every steps.
    best_path = artifact.artifact_dir(run_dir, model) if data.validation is not None else None
    ckdir = checkpoints.checkpoints_dir(run_dir)
    guard = faults.NonFiniteGuard(tc, prec.name, lambda: checkpoints.latest_with_step(ckdir), best_path, dist)
    saver = checkpoints.Saver(run_dir, cfg, dist, model, optimizer, scheduler, scaler, guard, train_set,
                              steps_per_epoch, total_steps)

    gen_eval = generation_inputs(data.validation, cfg, tokenizer) if data.validation is not None else None
    probe = forgetting.probe_split(tokenizer, cfg.eval.forgetting_rows, forgetting.probe_length(model)) \
        if lm and cfg.eval.forgetting else None

    def run_eval(at_step: int) -> dict:
        result = evaluate(model, data.validation, len(data.labels), prec, dist.device, pad_id, cfg.eval.batch_size,
                          lm, gen_eval, keep_logits)
        result["step"], result["epoch"] = at_step, round(at_step / steps_per_epoch, 3)
        history.append(result)
        log.write({"eval": result})
        return result

    def eval_line(result: dict) -> str:
        return "  ".join(f"{k} {result[k]:.4f}" for k in metrics.TASK_METRICS[cfg.task] if k in result)

    with (RunLog(run_dir, dist.is_main, total_steps) as log, embedding_grad.row_buffered(model, dist.world) as row_grad,
          first_token.first_token_only(model, cfg.task) as (pruned, pruned_why)):
        if resume is not None:
            p = saver.restore(resume, tokenizer, log)
            step, best, best_step, best_metrics, bad_evals = (p["step"], p["best"], p["best_step"],
                                                              p["best_metrics"], p["bad_evals"])
            stopped_early, history, tokens_done, compute_s = (p["stopped_early"], p["history"], p["tokens_done"],
                                                              p["compute_s"])
            window_loss, window_items, window_norm = p["window_loss"], p["window_items"], p["window_norm"]
            probe_before = p.get("probe_before")  # measured on the base model when the run started
            log.progress.update(log.task, completed=step)
        log.print(f"[dim]precision {prec.name} ({prec.reason}); {trainable:,} of {total:,} parameters train; "
                  f"{total_steps} steps of {global_batch} examples; heap kept mapped: {heap_tuned}; "
                  f"embedding gradient row-buffered: {row_grad is not None}; last layer first token only: {pruned} "
                  f"({pruned_why})")
        if probe is not None and resume is None:  # the base model: adapters (if any) switched off
            with base_only(model):
                probe_before = evaluate(model, probe, 0, prec, dist.device, pad_id, cfg.eval.batch_size, lm=True)
            log.print(f"forgetting probe before training: perplexity {probe_before['perplexity']:.3f} on "
                      f"{probe.where}")
        if cfg.eval.at_start and data.validation is not None and resume is None:
            at_start = run_eval(0)
            log.print("step 0 (before training): " + eval_line(at_start))
            window_t = time.perf_counter()
        while step < total_steps and not stopped_early:
            epoch = step // steps_per_epoch
            batches = length_grouped_batches(lengths, global_batch, tc.seed, epoch)
            for global_ids in batches[step % steps_per_epoch:]:
                t0 = time.perf_counter()
                micro = [collate(train_set[ids], pad_id, lm=lm)
                         for ids in shard(global_ids, dist.rank, dist.world, tc.batch_size)]
                # Examples (classification) or target tokens (language modelling) in the global batch.
                n_items = dist.all_sum(sum(count_targets(m["labels"], lm) for m in micro))
                step_loss = torch.zeros((), dtype=torch.float32)
                for i, batch in enumerate(micro):
                    batch = {k: v.to(dist.device, non_blocking=True) for k, v in batch.items()}
                    last = i == len(micro) - 1
                    sync = contextlib.nullcontext() if last or dist.world == 1 else net.no_sync()
                    with sync:
                        with prec.autocast():
                            logits = compiled(**model_inputs(batch, lm, keep_logits)).logits
                        loss_sum = task_loss(logits, batch["labels"], lm, keep_logits)
                        # x world: DDP averages gradients over ranks, we want the global-batch mean.
                        scaled = loss_sum * (dist.world / n_items)
                        (scaler.scale(scaled) if scaler else scaled).backward()
                    step_loss += loss_sum.detach().float().cpu()
                    tokens_done += int(batch["attention_mask"].sum())
                    window_tokens += int(batch["attention_mask"].sum())
                if scaler:
                    scaler.unscale_(optimizer)
                grad_norm = clip_gradients(optimizer, tc.max_grad_norm, fold=scaler is None, rows=row_grad)
                skipped = guard.skip(step + 1, step_loss, grad_norm, scaler is not None, scheduler.get_last_lr()[0],
                                     log)
                if skipped:
                    pass  # nothing non-finite reaches the optimizer (or the weights)
                elif scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                compute_s += time.perf_counter() - t0
                if not skipped:
                    window_loss += float(step_loss)
                    window_norm = max(window_norm, float(grad_norm))
                    window_items += n_items / dist.world

                if step % tc.log_every == 0 or step == total_steps:
                    elapsed = time.perf_counter() - window_t
                    rate = dist.all_sum(window_tokens) / max(elapsed, 1e-9)
                    log.step(step, loss=window_loss / max(window_items, 1), lr=scheduler.get_last_lr()[0],
                             epoch=round(step / steps_per_epoch, 3), tokens_per_s=round(rate, 1),
                             max_grad_norm=round(window_norm, 4))
                    window_loss, window_items, window_tokens, window_norm = 0.0, 0.0, 0, 0.0
                    window_t = time.perf_counter()
                else:
                    log.step(step)

                if data.validation is not None and (step % eval_every == 0 or step == total_steps):
                    result = run_eval(step)
                    value = result[cfg.metric]
                    if math.isfinite(value) and metrics.improved(cfg.metric, value, best):
                        best, best_step, best_metrics, bad_evals = value, step, result, 0
                        if dist.is_main:
                            artifact.save(model, tokenizer, run_dir)
                    else:
                        bad_evals += 1
                    log.print(f"step {step}: " + eval_line(result) + ("  [green]best" if best_step == step else ""))
                    window_t = time.perf_counter()  # eval time is not training throughput
                    if cfg.eval.patience and bad_evals >= cfg.eval.patience:
                        log.print(f"early stop: no {cfg.metric} improvement in {bad_evals} evals")
                        stopped_early = True
                if saver.due(step, best_step == step):
                    saver.save(step, best=best, best_step=best_step, best_metrics=best_metrics, bad_evals=bad_evals,
                               stopped_early=stopped_early, history=history, tokens_done=tokens_done,
                               compute_s=compute_s, window_loss=window_loss, window_items=window_items,
                               window_norm=window_norm, probe_before=probe_before)
                kill_point("step")  # tests: a process killed between steps
                if step >= total_steps or stopped_early:
                    break

    if data.validation is None and dist.is_main:
        artifact.save(model, tokenizer, run_dir)
    forgot = None
    if probe is not None and probe_before is not None:
        probe_after = evaluate(model, probe, 0, prec, dist.device, pad_id, cfg.eval.batch_size, lm=True)
        forgot = forgetting.report(probe_before, probe_after, probe, step)
        if dist.is_main:
            console.print(f"forgetting probe: perplexity {forgot['perplexity_before']:.3f} -> "
                          f"{forgot['perplexity_after']:.3f} ({forgot['change_percent']:+.2f}%)")
    dist.barrier()
    return {
        "precision": prec.name, "precision_reason": prec.reason, "steps": step,
        "epochs_done": round(step / steps_per_epoch, 3), "global_batch": global_batch,
        "train_seconds": round(time.perf_counter() - wall_start, 2), "compute_seconds": round(compute_s, 2),
        "tokens": int(dist.all_sum(tokens_done)),
        "tokens_per_s": round(dist.all_sum(tokens_done) / max(compute_s, 1e-9), 1),
        "trainable_params": trainable, "total_params": total, "peak_rss_mb": round(peak_rss_mb(), 1),
        "best_step": best_step, "best_metric": cfg.metric, "best_metrics": best_metrics,
        "stopped_early": stopped_early, "evals": history, "world_size": dist.world, "heap_kept_mapped": heap_tuned,
        "embedding_rows_buffered": row_grad is not None, "last_layer_first_token_only": pruned,
        "quantized_base": is_quantized(model),
        "param_groups": [{"lr": g.get("initial_lr", g["lr"]), "weight_decay": g["weight_decay"],
                          "params": sum(p.numel() for p in g["params"])} for g in optimizer.param_groups],
        "attention": getattr(model.config, "_attn_implementation", None),
        "gradient_checkpointing": tc.gradient_checkpointing,
        "skipped_steps": guard.skipped, "resumed_from": str(resume) if resume else None,
        "last_checkpoint": str(checkpoints.latest(saver.dir) or "") or None, "forgetting": forgot,
    }


@dataclass
class GenerationEval:
    """Prompts and reference answers for generation-based metrics (a seeded sample of validation)."""
    tokenizer: object
    prompts: list[list[int]]
    references: list[str]
    max_new_tokens: int


def generation_inputs(split: Split, cfg: RunConfig, tokenizer) -> GenerationEval | None:
    """Only when the chosen metric needs generated answers: generating is far slower than scoring."""
    if cfg.metric not in metrics.GENERATION_METRICS:
        return None
    ds = split.dataset
    rows = list(range(len(ds)))
    if cfg.eval.generate_rows and cfg.eval.generate_rows < len(rows):
        rows = sorted(random.Random(cfg.data.seed).sample(rows, cfg.eval.generate_rows))
    sample = ds.select(rows)
    return GenerationEval(tokenizer, sample["prompt_ids"], sample["reference"], cfg.eval.max_new_tokens)


@contextlib.contextmanager
def base_only(model: torch.nn.Module):
    """The base model's behaviour: peft adapters disabled while inside (others are the base already,
    or start as the identity, like bottleneck adapters)."""
    disable = getattr(model, "disable_adapter", None)
    with disable() if callable(disable) else contextlib.nullcontext():
        yield


def accepts_logits_mask(model: torch.nn.Module) -> bool:
    """Whether the decoder can compute logits only at target positions (`logits_to_keep`). Not with
    soft prompts: their virtual tokens make the hidden states longer than the labels."""
    if getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False):
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def count_targets(labels: torch.Tensor, lm: bool) -> int:
    """What the loss is averaged over: examples, or next-token targets (all but each row's first)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum()) if lm else len(labels)


def task_loss(logits: torch.Tensor, labels: torch.Tensor, lm: bool, kept: bool = False) -> torch.Tensor:
    """Summed cross-entropy (fp32) over examples, or over next-token targets for language models.

    kept: the logits are only those at target positions, flattened (see batching.model_inputs)."""
    if not lm:
        return F.cross_entropy(logits.float(), labels, reduction="sum")
    if kept:
        return F.cross_entropy(logits.float(), labels[:, 1:][labels[:, 1:] != IGNORE_INDEX], reduction="sum")
    # Soft prompts prepend virtual positions to the logits; the targets align with the last ones.
    logits = logits[:, -labels.shape[1]:-1]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def clip_gradients(optimizer: torch.optim.Optimizer, max_norm: float | None, fold: bool,
                   rows: embedding_grad.RowGradBuffer | None = None) -> torch.Tensor:
    """Total gradient norm, clipped to `max_norm`.

    With fused AdamW the clip factor is folded into the optimizer's `grad_scale` (its kernel divides
    each gradient by it while updating), saving a read-modify-write pass over every gradient. A
    row-buffered embedding gradient adds only its written rows to the norm (the rest are zeros).
    """
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([rows.written() if rows is not None and p.grad is rows.buffer else p.grad
                                          for p in params])
    if not max_norm:
        return norm
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    if fold and optimizer.defaults.get("fused"):
        optimizer.grad_scale = (1.0 / coef).to(torch.float32)  # type: ignore[attr-defined]
    else:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


@torch.no_grad()
def evaluate(model: torch.nn.Module, split: Split, num_labels: int, prec: precision.Precision,
             device: torch.device, pad_id: int, batch_size: int = 64, lm: bool = False,
             gen: GenerationEval | None = None, keep_logits: bool = False) -> dict:
    """Loss and task metrics over a split (every rank sees the whole split).

    classification: loss per example, accuracy/precision/recall/F1. causal_lm / sft: loss per target
    token and perplexity = exp(loss); with `gen`, also answers generated for a sample of prompts,
    scored by exact match and label accuracy (evaluation/generation.py).
    """
    was_training = model.training
    model.eval()
    ds = split.dataset
    preds, golds, loss_sum, count = [], [], 0.0, 0
    # Full language-model logits are rows x length x vocabulary (32 x 256 x 49,152 fp32 is 1.6 GB, and
    # the loss makes another copy): batches are capped so that they stay near LM_LOGITS_BUDGET values.
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 32_000
    max_tokens = LM_LOGITS_BUDGET // vocab if lm and not keep_logits else None
    for ids in eval_batches(ds["length"], batch_size, max_tokens):
        batch = {k: v.to(device) for k, v in collate(ds[ids], pad_id, lm=lm).items()}
        with prec.autocast():
            logits = model(**model_inputs(batch, lm, keep_logits)).logits
        loss_sum += float(task_loss(logits, batch["labels"], lm, keep_logits))
        count += count_targets(batch["labels"], lm)
        if not lm:
            preds += logits.argmax(-1).tolist()
            golds += batch["labels"].tolist()
    loss = loss_sum / max(count, 1)
    if lm:
        result = {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
        if gen is not None:
            result.update(generation.score(model, gen.tokenizer, gen.prompts, gen.references, gen.max_new_tokens,
                                           batch_size, prec.autocast))
        model.train(was_training)
        return result
    model.train(was_training)
    return {"loss": loss, **metrics.classification(golds, preds, num_labels)}
