"""Numerical faults and out-of-memory: detect, skip or stop, and say what to change.

- A step whose loss or gradient norm is not finite is skipped: nothing reaches the optimizer (its
  fused kernel would spread one NaN into every weight). Skipped steps are counted; after
  `train.max_bad_steps` in a row the run stops with a diagnosis instead of training on.
- Out-of-memory errors become a DeltatuneError listing remedies with this run's numbers.
- SIGTERM raises `Terminated`, so that cleanup runs as after Ctrl-C.

It imports nothing that saves: the guard is handed a way to find the last checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from deltatune.engine.train_state import SkipCount
from deltatune.errors import DeltatuneError


class NumericalError(DeltatuneError):
    """Training stopped because the loss or gradients stayed non-finite."""


class NonFiniteGuard:
    """Counts skipped steps; raises NumericalError after `limit` non-finite steps in a row."""

    def __init__(self, tc, precision: str, counts: SkipCount, last_checkpoint: Callable[[], tuple[Path, int] | None],
                 best_model: Path | None, dist=None):
        """counts: the run's skip counters (part of its TrainState, so checkpoints save them).
        last_checkpoint: the newest complete checkpoint and its step (or None), for the diagnosis."""
        self.limit, self.lr, self.clip, self.precision = tc.max_bad_steps, tc.lr, tc.max_grad_norm, precision
        self.dist, self.counts = dist, counts
        self.last_checkpoint, self.best_model = last_checkpoint, best_model

    def skip(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, scaled: bool, current_lr: float,
             log) -> bool:
        """Whether optimizer step `step` must be skipped (after counting it, or raising).

        With fp16 loss scaling an inf gradient under a finite loss is the scaler's business: it skips
        the step itself and lowers its scale, so that is not counted as a fault here.
        """
        loss_ok, norm_ok = math.isfinite(float(loss)), math.isfinite(float(grad_norm))
        fine = loss_ok and (norm_ok or scaled)
        if self.dist is not None and self.dist.world > 1:
            # The loss is per process: every rank must take the same decision, or their weights drift apart.
            loss_ok = self.dist.all_sum(0.0 if loss_ok else 1.0) == 0
            fine = self.dist.all_sum(0.0 if fine else 1.0) == 0
        c = self.counts
        if fine:
            c.in_a_row = 0
            return False
        what = "loss" if not loss_ok else "gradient norm"
        value = float(loss) if not loss_ok else float(grad_norm)
        if math.isfinite(value):  # not here, but on another process
            value = "not finite on another process"  # type: ignore[assignment]
        c.skipped += 1
        c.in_a_row += 1
        if c.in_a_row == 1:
            c.first_bad = step
        log.write({"skipped_step": step, "reason": f"{what} is {value}"})
        log.print(f"[yellow]step {step}: {what} is {value}; step skipped, no update applied "
                  f"({c.in_a_row} in a row, {c.skipped} in all; the run stops at {self.limit} in a row)")
        if c.in_a_row >= self.limit:
            raise NumericalError(self.diagnosis(step, what, current_lr))
        return True

    def diagnosis(self, step: int, what: str, current_lr: float) -> str:
        last = self.last_checkpoint()
        # (Resuming with the same config would replay the same steps into the same fault: the fix is a new run.)
        ckpt = (f"{last[0]} (step {last[1]}; finite weights and optimizer state)" if last
                else "none (train.save_every is not set)")
        best = f"{self.best_model} (finite weights)" if self.best_model and self.best_model.exists() else "none yet"
        fixes = [f"lower the learning rate (now train.lr={self.lr:g}, {current_lr:.3g} at this step), "
                 f"e.g. train.lr={self.lr / 10:g}"]
        if self.precision != "fp32":
            fixes.append(f"train in full precision: train.precision=fp32 (now {self.precision})")
        fixes.append(f"clip gradients harder: train.max_grad_norm={self.clip / 4:g} (now {self.clip:g})" if self.clip
                     else "clip gradients: train.max_grad_norm=1.0 (now off)")
        fixes.append("look for extreme or broken examples in the batches of these steps")
        c = self.counts
        return (f"training stopped at step {step}: the {what} was not finite for {c.in_a_row} steps in a row "
                f"(steps {c.first_bad}-{step}; {c.skipped} skipped in all; train.max_bad_steps={self.limit}). "
                f"No non-finite update was applied and no NaN weights were written.\n"
                f"  learning rate: {current_lr:.3g} (train.lr={self.lr:g}); precision: {self.precision}\n"
                f"  last good checkpoint: {ckpt}\n  best model so far: {best}\n"
                f"  Fix, in a new run: " + "; or ".join(fixes) + ".")


def all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


# ---------------------------------------------------------------------------------------------
# Out of memory

CPU_OOM = ("out of memory", "can't allocate memory", "cannot allocate memory")


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        isinstance(exc, MemoryError) or any(s in str(exc).lower() for s in CPU_OOM))


@dataclass(frozen=True)
class Where:
    """Where an out-of-memory error struck, as the loop knows it: the phase, the optimizer step being
    taken ('train') or just taken ('eval'), and the failing micro-batch's input_ids shape."""
    phase: str  # "train" | "eval"
    step: int
    shape: tuple[int, ...] | None = None


def raise_if_oom(exc: BaseException, cfg, device: torch.device, at: Where) -> None:
    """Called in an `except` by the loop: an out-of-memory `exc` becomes the DeltatuneError of `out_of_memory`;
    anything else returns, for the caller to re-raise with its traceback."""
    if is_oom(exc):
        raise out_of_memory(exc, cfg, device, at) from None


def out_of_memory(exc: BaseException, cfg, device: torch.device, at: Where | None = None) -> DeltatuneError:
    """A DeltatuneError with remedies for this run, for an out-of-memory error raised in training.

    at: where the loop was (None: outside a step or an evaluation, e.g. while moving the model)."""
    from deltatune.engine import precision
    from deltatune.methods import REGISTRY

    tc = cfg.train
    phase, shape = (at.phase, at.shape) if at else ("train", None)
    where = f"at step {at.step}" if at else "during training"
    if phase == "eval":
        where = "while evaluating" + (f" after step {at.step}" if at.step else " before training")
    batch = f" (micro-batch of {shape[0]} rows x {shape[1]} tokens)" if shape and phase == "train" else ""
    fixes = []
    if phase == "eval":
        fixes.append(f"a smaller evaluation batch: eval.batch_size={max(1, cfg.eval.batch_size // 4)}")
    if tc.batch_size > 1:
        micro = max(1, tc.batch_size // 2)
        accum = tc.grad_accum * tc.batch_size // micro
        fixes.append(f"a smaller micro-batch with more accumulation, same global batch: train.batch_size={micro} "
                     f"train.grad_accum={accum}" + ("" if tc.batch_size % micro == 0 else " (close to it)"))
    if not tc.gradient_checkpointing:
        fixes.append("recompute activations in the backward pass: train.gradient_checkpointing=true")
    if REGISTRY[cfg.method.name].saves == "model":
        fixes.append(f"a PEFT method, which keeps no optimizer state for the frozen weights: method.name=lora "
                     f"(now {cfg.method.name})")
    elif cfg.method.name == "lora" and device.type == "cuda":
        fixes.append("a 4-bit base model: method.name=qlora")
    prec = precision.resolve(tc.precision, device)
    bf16_native = torch.cuda.is_bf16_supported() if device.type == "cuda" else precision.cpu_supports_bf16()
    if prec.name == "fp32" and bf16_native:
        fixes.append(f"half the activation memory with bf16: train.precision=bf16 (now {prec.name})")
    if shape and shape[1] > 64 and cfg.data.max_length > 64:
        fixes.append(f"shorter inputs: data.max_length={cfg.data.max_length // 2} (now {cfg.data.max_length}; "
                     f"the longest rows are truncated, and counted)")
    detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    return DeltatuneError(f"out of memory {where}{batch} on {device.type}: {detail}\n"
                          f"  Fix (any of these, for this run):\n    " + "\n    ".join(fixes))


# ---------------------------------------------------------------------------------------------
# SIGTERM: stop where the process is, as SIGINT does, so that cleanup runs and the user is told where to resume


class Terminated(BaseException):
    """Raised by the SIGTERM handler of `sigterm_raises` (a BaseException, like KeyboardInterrupt)."""


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():  # handlers belong to the main thread
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
