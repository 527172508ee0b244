"""AdamW with no-decay groups and warmup + linear/cosine/constant schedules."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from deltatune.config import TrainSection


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
                    lr_scale: Callable[[str], float] | None = None) -> torch.optim.AdamW:
    # Fused AdamW is one kernel over all tensors; on our CPUs foreach ran at 0.66x of it.
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay, cfg.lr, lr_scale), lr=cfg.lr,
                             betas=(0.9, 0.999), eps=1e-8, fused=fused)


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
