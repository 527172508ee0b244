"""The optimizer `train.optimizer` names (same no-decay groups and LoRA+ scales for every one), and the
warmup + linear/cosine/constant schedules.

- adamw: torch AdamW, fused where the device has the kernel (one kernel over all tensors; on our CPUs
  foreach ran at 0.66x of it). Its `grad_scale` also takes the clipping factor (strategy.clip_gradients).
- adamw_8bit / paged_adamw_8bit: bitsandbytes' AdamW8bit / PagedAdamW8bit. Both moments are stored as 8-bit
  blockwise-quantized codes (2 bytes per parameter instead of 8); tensors under 4,096 elements keep fp32
  moments (bitsandbytes' `min_8bit_size`). The paged variant puts the states in CUDA unified memory, which
  the driver moves to CPU memory under GPU memory pressure: CUDA only (bitsandbytes on CPU falls back to the
  plain 8-bit optimizer with a warning; preflight refuses it instead).
- adafactor: torch.optim.Adafactor. Second moments of a matrix are factored into a row and a column vector
  (and there is no first moment), so its state is ~0 bytes per parameter. Its step is *relative*: each
  update is min(train.lr, 1/sqrt(step)) x max(1e-3, RMS(parameter)), so train.lr is the largest relative step
  (torch's default 1e-2), not AdamW's absolute rate.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from deltatune.config import TrainSection

ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8
BNB = {"adamw_8bit": "AdamW8bit", "paged_adamw_8bit": "PagedAdamW8bit"}


def param_groups(model: torch.nn.Module, weight_decay: float, lr: float,
                 lr_scale: Callable[[str], float] | None = None) -> list[dict]:
    """Biases and normalization weights are not decayed (standard BERT/LLaMA practice).

    `lr_scale(name)` lets a method give some parameters a multiple of the learning rate (LoRA+).
    """
    groups: dict[tuple[bool, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_norm = "norm" in name.lower() or "ln_" in name.lower()
        decays = not (p.ndim < 2 or name.endswith(".bias") or is_norm)
        groups.setdefault((decays, lr_scale(name) if lr_scale else 1.0), []).append(p)
    return [{"params": ps, "weight_decay": weight_decay if decays else 0.0, "lr": lr * scale}
            for (decays, scale), ps in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1]))]


def build_optimizer(model: torch.nn.Module, cfg: TrainSection, device: torch.device,
                    lr_scale: Callable[[str], float] | None = None) -> torch.optim.Optimizer:
    """`train.optimizer` over the model's trainable parameters (param_groups: no-decay groups, LoRA+ scales).
    Which combinations can run is preflight's to say (preflight._optimizer); this only builds."""
    groups = param_groups(model, cfg.weight_decay, cfg.lr, lr_scale)
    if cfg.optimizer == "adafactor":
        return torch.optim.Adafactor(groups, lr=cfg.lr)
    if cfg.optimizer in BNB:
        import bitsandbytes as bnb

        return getattr(bnb.optim, BNB[cfg.optimizer])(groups, lr=cfg.lr, betas=ADAM_BETAS, eps=ADAM_EPS)
    # Fused AdamW is one kernel over all tensors; on our CPUs foreach ran at 0.66x of it.
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=ADAM_BETAS, eps=ADAM_EPS, fused=fused)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state this process holds now (moments, quantization maps and scales; step counters
    too). Sharded states (FSDP2's DTensors) count their local shard."""
    seen: dict[int, int] = {}
    for state in optimizer.state.values():
        for value in state.values():
            if not isinstance(value, torch.Tensor) or value.device.type == "meta":
                continue
            local = value.to_local() if hasattr(value, "to_local") else value
            storage = local.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def warmup_steps(cfg: TrainSection, total_steps: int) -> int:
    return int(cfg.warmup * total_steps) if cfg.warmup < 1 else int(cfg.warmup)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainSection, total_steps: int
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    warm = warmup_steps(cfg, total_steps)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
