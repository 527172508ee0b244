"""How one run spreads its model, gradients and optimizer over processes: one object per run.

The loop (engine/loop.py) never asks which engine it runs on; it asks the strategy:

    net, optimizer, scheduler = strategy.wrap(model, make_optimizer, make_scheduler)
    for each micro-batch:  with strategy.accumulating(net, last): ...; strategy.backward(loss, scaler)
    norm = strategy.clip(optimizer, max_norm, fold, rows);  strategy.step(optimizer, scheduler, scaler, skip)
    strategy.full_state_dict(model)           the whole model on rank 0, to export (all ranks call it)
    strategy.save_state(dir, ...) / load_state(dir, ...)   the resumable part of a checkpoint

`Single` is one process; `DDP` replicates the model and all-reduces gradients (gloo on CPU, nccl on
GPU); `engine/fsdp.py` shards parameters, gradients and optimizer state per transformer block (FSDP2);
`engine/zero.py` hands the model to DeepSpeed's own engine (ZeRO 1/2/3). `engine/modes.py` picks one from
`train.distributed` and the world size, and refuses (never falls back) when the request cannot run.
What actually runs is `describe()`: printed at start and recorded in summary.json.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import torch

from deltatune.engine.checkpoints import trainable
from deltatune.engine.distributed import Dist
from deltatune.engine.embedding_grad import RowGradBuffer

MakeOptimizer = Callable[[torch.nn.Module], torch.optim.Optimizer]
MakeScheduler = Callable[[torch.optim.Optimizer], object]
# put(name, write): write the checkpoint file `name` with write(path); disk failures become sentences.
Put = Callable[[str, Callable[[Path], None]], None]


class Single:
    """One process: the model as it is. The base of every strategy (the torch optimizer path)."""

    name = "single"
    wrapper = "none"
    shards_parameters = False  # True: a forward pass needs every rank (FSDP, ZeRO-3)
    owns_loss_scaling = False  # True: the engine scales fp16 losses itself (DeepSpeed); no torch GradScaler

    def __init__(self, dist: Dist, cfg, prec) -> None:
        self.dist, self.cfg, self.prec = dist, cfg, prec

    def describe(self) -> dict:
        return {"mode": self.name, "world_size": self.dist.world, "backend": self.dist.backend,
                "wrapper": self.wrapper, "zero_stage": None, "sharding": "none", "offload": "none"}

    def param_counts(self, optimizer: torch.optim.Optimizer) -> list[int]:
        """Whole-model parameters in each optimizer group (sharding engines hold only this rank's part)."""
        return [sum(p.numel() for p in g["params"]) for g in optimizer.param_groups]

    def wrap(self, model: torch.nn.Module, make_optimizer: MakeOptimizer, make_scheduler: MakeScheduler
             ) -> tuple[torch.nn.Module, torch.optim.Optimizer, object]:
        optimizer = make_optimizer(model)
        return model, optimizer, make_scheduler(optimizer)

    def accumulating(self, net: torch.nn.Module, last: bool) -> contextlib.AbstractContextManager:
        """Around the forward and backward of one micro-batch; `last`: the step's last micro-batch."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, scaler) -> None:
        (scaler.scale(loss) if scaler else loss).backward()

    def clip(self, optimizer: torch.optim.Optimizer, max_norm: float | None, fold: bool, rows) -> torch.Tensor:
        """The total gradient norm (over every rank's gradients), clipped to max_norm; a plain tensor."""
        return clip_gradients(optimizer, max_norm, fold=fold, rows=rows)

    def step(self, optimizer: torch.optim.Optimizer, scheduler, scaler, skip: bool) -> None:
        if not skip:  # nothing non-finite reaches the optimizer (or the weights)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    def full_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """Every rank calls it; the whole model's state dict on rank 0, or None when the model object is whole
        already (then it is saved as it is)."""
        return None

    # Checkpoints: the weights that train, the optimizer, the schedule and the fp16 scaler.
    def save_state(self, tmp: Path, put: Put, model: torch.nn.Module, optimizer, scheduler, scaler) -> None:
        """Every rank calls it (between barriers); here rank 0 writes whole-model files."""
        if not self.dist.is_main:
            return
        from safetensors.torch import save_file

        from deltatune.engine.killpoints import kill_point

        weights = {n: p.detach().cpu().contiguous() for n, p in trainable(model).items()}
        put("weights.safetensors", lambda path: save_file(weights, str(path)))
        put("optimizer.pt", lambda path: torch.save(optimizer.state_dict(), path))
        kill_point("checkpoint")  # tests: a process killed while writing a checkpoint
        put("scheduler.pt", lambda path: torch.save(scheduler.state_dict(), path))
        if scaler is not None:
            put("scaler.pt", lambda path: torch.save(scaler.state_dict(), path))

    def load_weights(self, path: Path, model: torch.nn.Module) -> None:
        """Only the weights of checkpoint `path` (every rank calls it)."""
        from deltatune.methods.common import load_named

        load_named(trainable(model), path / "weights.safetensors", f"{path}: the checkpoint's weights")

    def load_state(self, path: Path, model: torch.nn.Module, optimizer, scheduler, scaler) -> None:
        """Weights, optimizer, schedule and scaler of checkpoint `path` (every rank calls it)."""
        device = next(model.parameters()).device
        self.load_weights(path, model)
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=True))
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        if scaler is not None:
            scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))


class DDP(Single):
    """Every rank holds the whole model; DistributedDataParallel all-reduces (averages) the gradients in the
    backward pass of each step's last micro-batch (`no_sync` skips it for the others)."""

    name = "ddp"
    wrapper = "DistributedDataParallel"

    def wrap(self, model, make_optimizer, make_scheduler):
        optimizer = make_optimizer(model)
        net = torch.nn.parallel.DistributedDataParallel(model)
        return net, optimizer, make_scheduler(optimizer)

    def accumulating(self, net, last):
        return contextlib.nullcontext() if last else net.no_sync()


def clip_gradients(optimizer: torch.optim.Optimizer, max_norm: float | None, fold: bool,
                   rows: RowGradBuffer | None = None) -> torch.Tensor:
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
