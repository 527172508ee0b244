"""Fine-tuning methods. Each is a small module: what it trains, and whether it can merge.

REGISTRY maps `method.name` to the module's `apply(model, section) -> model`, which leaves exactly
the parameters the method trains with requires_grad=True.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from deltatune.methods import full

REGISTRY: dict[str, Callable[[torch.nn.Module, object], torch.nn.Module]] = {
    "full": full.apply,
}


def apply(model: torch.nn.Module, section: object) -> torch.nn.Module:
    return REGISTRY[section.name](model, section)  # type: ignore[attr-defined]


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) tensors are counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total
