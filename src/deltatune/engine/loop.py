"""The training loop: `train` is a short driver over named parts, read top to bottom.

`setup` builds the `Run` (what is fixed: model, optimizer, schedule, step counts, guard, saver) and the
`TrainState` (the progress, saved whole in checkpoints); then, for each global batch, `train_step`,
`log_window`, `evaluate_and_keep_best` and a checkpoint when due; `after_training` and `summary` last.
See docs/engine.md.

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
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from deltatune import methods
from deltatune.config import RunConfig
from deltatune.constants import IGNORE_INDEX
from deltatune.data import DataBundle, Split
from deltatune.data.batching import collate, eval_batches, length_grouped_batches, model_inputs, shard
from deltatune.data.columns import column, rows_of
from deltatune.engine import (
    artifact,
    checkpoints,
    compiling,
    embedding_grad,
    faults,
    first_token,
    frozen,
    memory,
    modes,
    optim,
    precision,
)
from deltatune.engine import preference as preference_objective
from deltatune.engine.distributed import Dist
from deltatune.engine.killpoints import kill_point
from deltatune.engine.report import RunLog, console
from deltatune.engine.strategy import Single
from deltatune.engine.tracking import Trackers
from deltatune.engine.train_state import TrainState
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
    return GenerationEval(tokenizer, rows_of(sample, "prompt_ids"), rows_of(sample, "reference"),
                          cfg.eval.max_new_tokens)


@dataclass
class Run:
    """What stays fixed for one run (built by `setup`); what changes as it trains is the TrainState."""
    model: torch.nn.Module
    net: torch.nn.Module  # what the step calls: the model as the strategy wrapped it, compiled when configured
    strategy: Single  # how the model, gradients and optimizer spread over processes (engine/strategy.py)
    tokenizer: object
    data: DataBundle
    cfg: RunConfig
    run_dir: Path
    dist: Dist
    prec: precision.Precision
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: object
    lengths: np.ndarray
    global_batch: int
    steps_per_epoch: int
    total_steps: int
    eval_every: int
    lm: bool
    keep_logits: bool
    guard: faults.NonFiniteGuard
    saver: checkpoints.Saver
    gen_eval: GenerationEval | None
    probe: Split | None
    heap_tuned: bool
    trainable: int  # parameters that train, of `total`
    total: int
    frozen: frozen.FrozenDtype
    baseline: memory.Baseline  # memory with the model loaded: what training adds is measured from it
    compile_clock: compiling.CompileClock
    objective: TokenObjective | preference_objective.PreferenceObjective  # what the task computes per step
    wall_start: float = field(default_factory=time.perf_counter)
    row_grad: embedding_grad.RowGradBuffer | None = None  # set inside `train`'s context


def train(model: torch.nn.Module, tokenizer, data: DataBundle, cfg: RunConfig, run_dir: Path, dist: Dist,
          lr_scale=None, resume: Path | None = None, trackers: Trackers | None = None) -> dict:
    """Set up, then steps, logging windows, evaluations and checkpoints until the last step; the summary.
    `trackers` (engine/tracking.py) get every record metrics.jsonl gets."""
    run, state = setup(model, tokenizer, data, cfg, run_dir, dist, lr_scale)
    with (RunLog(run_dir, dist.is_main, run.total_steps, trackers.record if trackers is not None else None) as log,
          # The buffer replaces weight.grad, which only the plain torch path reads (not DeepSpeed's or FSDP's hooks).
          embedding_grad.row_buffered(model, dist.world if run.strategy.name in ("single", "ddp") else 0)
          as run.row_grad,
          first_token.first_token_only(model, cfg.task) as (pruned, pruned_why)):
        if dist.is_main:
            log.print(memory_plan(run))
        if resume is not None:
            run.saver.restore(resume, tokenizer, log, state)
            log.progress.update(log.task, completed=state.step)
        log.print(f"[bold]distributed[/]: {describe(run.strategy)}")
        log.print(f"[dim]precision {run.prec.name} ({run.prec.reason}); {run.trainable:,} of "
                  f"{run.total:,} parameters train; {run.total_steps} steps of {run.global_batch} "
                  f"examples; optimizer {run.cfg.train.optimizer}; heap kept mapped: {run.heap_tuned}; embedding "
                  f"gradient row-buffered: {run.row_grad is not None}; last layer first token only: {pruned} "
                  f"({pruned_why}); {run.frozen.describe()}")
        with preserved_rng():  # a fresh run's reference pass must not move the streams a resumed run restores
            run.objective.prepare(run, log, resumed=resume is not None)
        if resume is None:
            before_training(run, state, log)
        for global_ids in global_batches(run, state):
            train_step(run, state, global_ids, log)
            log_window(run, state, log)
            if data.validation is not None and (state.step % run.eval_every == 0 or state.step == run.total_steps):
                evaluate_and_keep_best(run, state, log)
            if run.saver.due(state.step, state.best_step == state.step):
                run.saver.save(state)
            kill_point("step")  # tests: a process killed between steps
    forgot = after_training(run, state)
    return summary(run, state, resume, pruned, forgot)


def setup(model: torch.nn.Module, tokenizer, data: DataBundle, cfg: RunConfig, run_dir: Path, dist: Dist,
          lr_scale) -> tuple[Run, TrainState]:
    """Threads, precision, device, optimizer and schedule, the step count, the guard and the saver."""
    tc = cfg.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    prec = precision.resolve(tc.precision, dist.device)
    if not is_quantized(model):  # 4-/8-bit weights are placed by device_map at load time and cannot move
        model.to(dist.device)
    if tc.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    train_set = data.train.dataset
    global_batch = tc.batch_size * tc.grad_accum * dist.world
    steps_per_epoch = math.ceil(len(train_set) / global_batch)
    total_steps = tc.max_steps or math.ceil(tc.epochs * steps_per_epoch)
    trainable, total = count_parameters(model)  # before sharding: the whole model's counts
    # The optimizer is built after wrapping: sharding (FSDP2) replaces the parameters it must hold.
    spread = modes.choose(cfg, dist, prec)
    frozen_base = frozen.apply(model, cfg.model.frozen_dtype, prec.name, methods.REGISTRY[cfg.method.name].saves,
                               spread.name, is_quantized(model))
    # What training adds is measured from here: the model loaded, the method applied, the base cast.
    baseline = memory.Baseline.take(dist.device)
    heap_tuned = keep_heap_mapped() if dist.device.type == "cpu" else False
    net, optimizer, scheduler = spread.wrap(model, lambda m: optim.build_optimizer(m, tc, dist.device, lr_scale),
                                            lambda opt: optim.build_scheduler(opt, tc, total_steps))
    scaler = None if spread.owns_loss_scaling else prec.scaler()
    lm = cfg.lm
    objective = (preference_objective.PreferenceObjective(cfg, model, base_only, LM_LOGITS_BUDGET)
                 if cfg.task == "preference" else TokenObjective())
    wall_start = time.perf_counter()
    state = TrainState(steps_per_epoch)
    # Non-finite steps are skipped and counted; resumable checkpoints every train.save_every steps.
    best_path = artifact.artifact_dir(run_dir, model) if data.validation is not None else None
    ckdir = checkpoints.checkpoints_dir(run_dir)
    guard = faults.NonFiniteGuard(tc, prec.name, state.skips, lambda: checkpoints.latest_with_step(ckdir),
                                  best_path, dist)
    saver = checkpoints.Saver(run_dir, cfg, dist, spread, model, optimizer, scheduler, scaler, train_set,
                              steps_per_epoch, total_steps)
    run = Run(
        model=model, net=compiling.compile_model(net, tc, cfg.data.max_length) if tc.compile else net,
        strategy=spread, tokenizer=tokenizer, data=data, cfg=cfg, run_dir=run_dir, dist=dist, prec=prec,
        optimizer=optimizer, scheduler=scheduler, scaler=scaler,
        lengths=column(train_set, "length"), global_batch=global_batch, steps_per_epoch=steps_per_epoch,
        total_steps=total_steps, eval_every=steps_per_epoch if cfg.eval.every == "epoch" else int(cfg.eval.every),
        # Preference losses score whole [rows, positions, vocab] logits (sequence_logps), not kept targets.
        lm=lm, keep_logits=lm and isinstance(objective, TokenObjective) and accepts_logits_mask(model),
        guard=guard, saver=saver,
        gen_eval=generation_inputs(data.validation, cfg, tokenizer) if data.validation is not None else None,
        probe=forgetting.probe_split(tokenizer, cfg.eval.forgetting_rows, forgetting.probe_length(model))
        if lm and cfg.eval.forgetting else None,
        heap_tuned=heap_tuned, trainable=trainable, total=total, frozen=frozen_base,
        baseline=baseline, compile_clock=compiling.CompileClock(
            tc.compile, str(compiling.cache_dir(tc)) if tc.compile else None, cfg.data.max_length),
        objective=objective, wall_start=wall_start)
    return run, state


def global_batches(run: Run, state: TrainState) -> Iterator[np.ndarray]:
    """The example indices of each remaining optimizer step, epoch after epoch, from the state's position
    on; stops after the last step or an early stop."""
    while not state.done(run.total_steps):
        batches = length_grouped_batches(run.lengths, run.global_batch, run.cfg.train.seed, state.epoch)
        for global_ids in batches[state.batch_in_epoch:]:
            yield global_ids
            if state.done(run.total_steps):
                return


def train_step(run: Run, state: TrainState, global_ids: np.ndarray, log: RunLog) -> None:
    """One optimizer step: micro-batches (forward, loss, backward), clipping, the non-finite guard, the
    optimizer and the schedule. The loss is summed over the global batch and divided by its size."""
    t0, compiled = time.perf_counter(), run.compile_clock.start()
    tc, dist, scaler, spread = run.cfg.train, run.dist, run.scaler, run.strategy
    micro: list[dict] = []
    i = 0
    try:
        micro = micro_batches(run, global_ids)
        # Examples (classification), target tokens (language modelling) or pairs (preference) in the global batch.
        n_items = dist.all_sum(sum(run.objective.count(run, m) for m in micro if m["real"]))
        step_loss = torch.zeros((), dtype=torch.float32)
        step_sums: dict[str, float] = {}  # what a logging window adds up beyond the loss (preference metrics)
        for i, batch in enumerate(micro):
            real = batch.pop("real")
            batch = {k: v.to(dist.device, non_blocking=True) for k, v in batch.items()}
            with spread.accumulating(run.net, last=i == len(micro) - 1):
                loss_sum, sums = run.objective.loss(run, batch)
                if not real:  # a stand-in that keeps this rank in step with the others; it adds nothing
                    loss_sum, sums = loss_sum * 0.0, dict.fromkeys(sums, 0.0)
                # x world: DDP (and FSDP, ZeRO) average gradients over ranks, we want the global-batch mean.
                spread.backward(loss_sum * (dist.world / n_items), scaler)
            step_loss += loss_sum.detach().float().cpu()
            step_sums = {k: step_sums.get(k, 0.0) + v for k, v in sums.items()}
            tokens = int(batch["attention_mask"].sum()) if real else 0
            state.tokens += tokens
            state.window.tokens += tokens
    except (RuntimeError, MemoryError) as e:
        shape = tuple(micro[i]["input_ids"].shape) if micro else None
        faults.raise_if_oom(e, run.cfg, dist.device, faults.Where("train", state.step + 1, shape))
        raise
    if scaler:
        scaler.unscale_(run.optimizer)
    grad_norm = spread.clip(run.optimizer, tc.max_grad_norm, fold=scaler is None, rows=run.row_grad)
    # Every rank decides alike: the loss of the whole global batch, the norm of all gradients.
    step_loss = torch.tensor(dist.all_sum(float(step_loss)))
    step_sums = dist.all_sums(step_sums)
    # An fp16 overflow is loss scaling at work (torch's GradScaler, or DeepSpeed's own), not a fault.
    scaled = scaler is not None or (spread.owns_loss_scaling and run.prec.name == "fp16")
    skipped = run.guard.skip(state.step + 1, step_loss, grad_norm, scaled,
                             run.scheduler.get_last_lr()[0], log)
    spread.step(run.optimizer, run.scheduler, scaler, skip=skipped)
    state.step += 1
    state.compute_s += time.perf_counter() - t0
    run.compile_clock.stop(compiled)  # a step in which dynamo compiled counts as compile time
    if not skipped:
        state.window.add(float(step_loss), float(grad_norm), n_items, step_sums)


def micro_batches(run: Run, global_ids: np.ndarray) -> list[dict]:
    """This rank's micro-batches of a global batch, each marked `real`. Every rank runs train.grad_accum of
    them: where a short last batch leaves a rank fewer rows, stand-ins (the batch's first row, loss x 0) keep
    the ranks' collectives in step (DDP's all-reduce, FSDP's gathers, DeepSpeed's accumulation count)."""
    tc, dist = run.cfg.train, run.dist
    parts = shard(global_ids, dist.rank, dist.world, tc.batch_size)
    if run.strategy.name != "single":  # DeepSpeed counts micro-batches even in a world of one
        parts += [[]] * (tc.grad_accum - len(parts))
    out = []
    for ids in parts:
        rows = ids if len(ids) else [int(global_ids[0])]
        batch = run.objective.collate(run, rows)
        if tc.compile:  # static-shape graphs: one per length bucket, not one per length
            batch = compiling.pad_to_bucket(batch, run.tokenizer.pad_token_id, run.cfg.data.max_length)
        batch["real"] = bool(len(ids))
        out.append(batch)
    return out


def log_window(run: Run, state: TrainState, log: RunLog) -> None:
    """Every train.log_every steps (and at the last): the window's mean loss, learning rate, largest
    gradient norm and real tokens per second; the progress bar moves every step."""
    step, w = state.step, state.window
    if step % run.cfg.train.log_every == 0 or step == run.total_steps:
        rate = run.dist.all_sum(w.tokens) / max(time.perf_counter() - w.started, 1e-9)
        log.step(step, loss=w.loss / max(w.items, 1), lr=run.scheduler.get_last_lr()[0],
                 epoch=round(step / run.steps_per_epoch, 3), tokens_per_s=round(rate, 1),
                 max_grad_norm=round(w.norm, 4), **run.objective.window(w.sums))
        w.reset()
    else:
        log.step(step)


def run_eval(run: Run, state: TrainState, log: RunLog) -> dict:
    """Evaluate the validation split now; the result is logged and kept in the state's evaluations."""
    try:
        result = run.objective.evaluate(run)
    except (RuntimeError, MemoryError) as e:
        faults.raise_if_oom(e, run.cfg, run.dist.device, faults.Where("eval", state.step))
        raise
    result["step"], result["epoch"] = state.step, round(state.step / run.steps_per_epoch, 3)
    state.evals.append(result)
    log.write({"eval": result})
    return result


def eval_line(run: Run, result: dict) -> str:
    return "  ".join(f"{k} {result[k]:.4f}" for k in metrics.TASK_METRICS[run.cfg.task] if k in result)


def evaluate_and_keep_best(run: Run, state: TrainState, log: RunLog) -> None:
    """Evaluate; an improved eval.metric saves the model (rank 0), else counts towards eval.patience."""
    cfg, step = run.cfg, state.step
    result = run_eval(run, state, log)
    value = result[cfg.metric]
    if math.isfinite(value) and metrics.improved(cfg.metric, value, state.best):
        state.best, state.best_step, state.best_metrics, state.bad_evals = value, step, result, 0
        export(run)
    else:
        state.bad_evals += 1
    log.print(f"step {step}: " + eval_line(run, result) + ("  [green]best" if state.best_step == step else ""))
    state.window.started = time.perf_counter()  # eval time is not training throughput
    if cfg.eval.patience and state.bad_evals >= cfg.eval.patience:
        log.print(f"early stop: no {cfg.metric} improvement in {state.bad_evals} evals")
        state.stopped_early = True


def export(run: Run) -> None:
    """The model (or adapter) as a single process would save it: gathered whole on rank 0 when sharded
    (every rank takes part), then written by rank 0 alone."""
    whole = run.strategy.full_state_dict(run.model)
    if run.dist.is_main:
        artifact.save(run.model, run.tokenizer, run.run_dir, state_dict=whole)
    run.dist.barrier()


@contextlib.contextmanager
def preserved_rng():
    """Python's, numpy's and torch's (CPU) random states as they were on entry, whatever runs inside."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        yield
    random.setstate(py)
    np.random.set_state(npy)


def memory_plan(run: Run) -> str:
    """The memory planner's estimate for this run (config only, no weights): one line, a warning when it will
    not fit the free memory; its predicted increase goes into summary.json next to the measured one."""
    from deltatune.plan import memory as planner

    try:
        with preserved_rng():  # the planner builds (meta) models: it must not move the run's random streams
            est = planner.estimate(run.cfg, devices=run.dist.world, device=run.dist.device.type)
    except Exception as e:  # noqa: BLE001 - the plan informs; an architecture it cannot trace must not stop training
        return f"[yellow]memory plan: not available for this run ({type(e).__name__}: {e})[/]"
    run.baseline.planned_increase_mb = round(est.increase / 2**20, 1)
    free = planner.free_memory_bytes(run.dist.device)
    line = planner.start_line(est, free)
    return f"[dim]{line}[/]" if est.fits(free) else f"[bold yellow]warning: {line}[/]"


def describe(spread: Single) -> str:
    d = spread.describe()
    parts = [f"{d['mode']}", f"world size {d['world_size']}", f"backend {d['backend'] or 'none'}",
             f"wrapper {d['wrapper']}", f"sharding {d['sharding']}", f"offload {d['offload']}"]
    if d.get("zero_stage") is not None:
        parts.insert(4, f"ZeRO stage {d['zero_stage']}")
    return ", ".join(parts)


def probe_perplexity(run: Run, state: TrainState) -> dict:
    """The forgetting probe: perplexity of the current model on general text."""
    try:
        return evaluate(run.model, run.probe, 0, run.prec, run.dist.device, run.tokenizer.pad_token_id,
                        run.cfg.eval.batch_size, lm=True, dist=run.dist, synced=run.strategy.shards_parameters)
    except (RuntimeError, MemoryError) as e:
        faults.raise_if_oom(e, run.cfg, run.dist.device, faults.Where("eval", state.step))
        raise


def before_training(run: Run, state: TrainState, log: RunLog) -> None:
    """A fresh run (not a resume): the forgetting probe's baseline, and eval.at_start."""
    if run.probe is not None:  # the base model: adapters (if any) switched off
        with base_only(run.model):
            state.probe_before = probe_perplexity(run, state)
        log.print(f"forgetting probe before training: perplexity {state.probe_before['perplexity']:.3f} on "
                  f"{run.probe.where}")
    if run.cfg.eval.at_start and run.data.validation is not None:
        at_start = run_eval(run, state, log)
        log.print("step 0 (before training): " + eval_line(run, at_start))
        state.window.started = time.perf_counter()


def after_training(run: Run, state: TrainState) -> dict | None:
    """The model without validation is saved as trained; the forgetting probe again; every rank meets."""
    if run.data.validation is None:
        export(run)
    forgot = None
    if run.probe is not None and state.probe_before is not None:
        forgot = forgetting.report(state.probe_before, probe_perplexity(run, state), run.probe, state.step)
        if run.dist.is_main:
            console.print(f"forgetting probe: perplexity {forgot['perplexity_before']:.3f} -> "
                          f"{forgot['perplexity_after']:.3f} ({forgot['change_percent']:+.2f}%)")
    run.dist.barrier()
    return forgot


def summary(run: Run, state: TrainState, resume: Path | None, pruned: bool, forgot: dict | None) -> dict:
    """What `summary.json` reports of the training itself (api.train adds the run's identity)."""
    dist, model = run.dist, run.model
    return {
        "precision": run.prec.name, "precision_reason": run.prec.reason, "steps": state.step,
        "epochs_done": round(state.step / run.steps_per_epoch, 3), "global_batch": run.global_batch,
        "train_seconds": round(time.perf_counter() - run.wall_start, 2), "compute_seconds": round(state.compute_s, 2),
        "tokens": int(dist.all_sum(state.tokens)),
        "tokens_per_s": round(dist.all_sum(state.tokens) / max(state.compute_s, 1e-9), 1),
        "trainable_params": run.trainable, "total_params": run.total,
        "peak_rss_mb": round(memory.peak_rss_mb(), 1), "memory_per_rank": dist.gather_objects(run.baseline.record()),
        "peak_rss_mb_per_rank": dist.gather_objects(round(memory.peak_rss_mb(), 1)),
        "live_tensor_mb_per_rank": dist.gather_objects(round(memory.live_tensor_mb(), 1)),
        "frozen_dtype": run.frozen.name, "frozen_dtype_reason": run.frozen.reason,
        "adapter_input_casts_skipped": run.frozen.input_casts_skipped,
        "optimizer": run.cfg.train.optimizer, "optimizer_state_mb": round(optim.state_bytes(run.optimizer) / 2**20, 1),
        "compile_s": run.compile_clock.summary()["compile_s"], "compile": run.compile_clock.summary(),
        "best_step": state.best_step, "best_metric": run.cfg.metric, "best_metrics": state.best_metrics,
        "stopped_early": state.stopped_early, "evals": state.evals, "world_size": dist.world,
        "distributed": run.strategy.describe(),
        "heap_kept_mapped": run.heap_tuned, "embedding_rows_buffered": run.row_grad is not None,
        "last_layer_first_token_only": pruned, "quantized_base": is_quantized(model),
        "param_groups": [{"lr": g.get("initial_lr", g["lr"]), "weight_decay": g["weight_decay"], "params": n}
                         for g, n in zip(run.optimizer.param_groups, run.strategy.param_counts(run.optimizer),
                                         strict=True)],
        "attention": getattr(model.config, "_attn_implementation", None),
        "gradient_checkpointing": run.cfg.train.gradient_checkpointing,
        "skipped_steps": state.skips.skipped, "resumed_from": str(resume) if resume else None,
        "last_checkpoint": str(checkpoints.latest(run.saver.dir) or "") or None, "forgetting": forgot,
        **run.objective.summary(),
    }


class TokenObjective:
    """Classification and language modelling (causal_lm, sft): what the loop computes per task, as
    preference.PreferenceObjective does for task preference. The loss is summed over examples or next-token
    targets (`task_loss`); a logging window adds nothing beyond the loss."""

    def collate(self, run: Run, rows: list[int]) -> dict:
        return collate(run.data.train.dataset[rows], run.tokenizer.pad_token_id, lm=run.lm)

    def count(self, run: Run, batch: dict) -> int:
        return count_targets(batch["labels"], run.lm)

    def loss(self, run: Run, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        with run.prec.autocast():
            logits = run.net(**model_inputs(batch, run.lm, run.keep_logits)).logits
        return task_loss(logits, batch["labels"], run.lm, run.keep_logits), {}

    def window(self, sums: dict[str, float]) -> dict[str, float]:
        return {}

    def evaluate(self, run: Run) -> dict:
        return evaluate(run.model, run.data.validation, len(run.data.labels), run.prec, run.dist.device,
                        run.tokenizer.pad_token_id, run.cfg.eval.batch_size, run.lm, run.gen_eval, run.keep_logits,
                        run.dist, run.strategy.shards_parameters)

    def prepare(self, run: Run, log: RunLog, resumed: bool) -> None:
        """Nothing to compute before the first step."""

    def summary(self) -> dict:
        return {}


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


@torch.no_grad()
def evaluate(model: torch.nn.Module, split: Split, num_labels: int, prec: precision.Precision,
             device: torch.device, pad_id: int, batch_size: int = 64, lm: bool = False,
             gen: GenerationEval | None = None, keep_logits: bool = False, dist: Dist | None = None,
             synced: bool = False) -> dict:
    """Loss and task metrics over a split, sharded over the processes of `dist` (each rank scores every
    world-th batch; sums and predictions are gathered, so every rank returns the same result).

    classification: loss per example, accuracy/precision/recall/F1. causal_lm / sft: loss per target
    token and perplexity = exp(loss); with `gen`, also answers generated for a sample of prompts,
    scored by exact match and label accuracy (evaluation/generation.py).
    synced: the parameters are sharded (FSDP, ZeRO-3), so a forward pass needs every rank: each runs as
    many batches (stand-ins, whose results are dropped, fill the difference).
    """
    was_training = model.training
    model.eval()
    ds = split.dataset
    world, rank = (dist.world, dist.rank) if dist is not None else (1, 0)
    preds, golds, loss_sum, count = [], [], 0.0, 0
    # Full language-model logits are rows x length x vocabulary (32 x 256 x 49,152 fp32 is 1.6 GB, and
    # the loss makes another copy): batches are capped so that they stay near LM_LOGITS_BUDGET values.
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 32_000
    max_tokens = LM_LOGITS_BUDGET // vocab if lm and not keep_logits else None
    batches = eval_batches(column(ds, "length"), batch_size, max_tokens)
    mine = batches[rank::world]
    filler = (-(-len(batches) // world) - len(mine)) if synced else 0
    for j, ids in enumerate(mine + batches[:1] * filler):
        batch = {k: v.to(device) for k, v in collate(ds[ids], pad_id, lm=lm).items()}
        with prec.autocast():
            logits = model(**model_inputs(batch, lm, keep_logits)).logits
        if j >= len(mine):
            continue
        loss_sum += float(task_loss(logits, batch["labels"], lm, keep_logits))
        count += count_targets(batch["labels"], lm)
        if not lm:
            preds += logits.argmax(-1).tolist()
            golds += batch["labels"].tolist()
    if world > 1:
        loss_sum, count = dist.all_sum(loss_sum), int(dist.all_sum(count))
        if not lm:
            parts = dist.gather_objects((preds, golds))
            preds, golds = [p for part in parts for p in part[0]], [g for part in parts for g in part[1]]
    loss = loss_sum / max(count, 1)
    if lm:
        result = {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
        if gen is not None:
            result.update(generation.score(model, gen.tokenizer, gen.prompts, gen.references, gen.max_new_tokens,
                                           batch_size, prec.autocast, dist=dist, synced=synced))
        model.train(was_training)
        return result
    model.train(was_training)
    return {"loss": loss, **metrics.classification(golds, preds, num_labels)}
