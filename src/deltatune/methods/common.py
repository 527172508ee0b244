"""Helpers shared by method modules: where the task head and the repeated layers are."""

from __future__ import annotations

import re
from pathlib import Path

import torch

HEAD_NAMES = ("classifier", "score")  # sequence-classification heads (BERT family, decoder family)


def head_modules(model: torch.nn.Module) -> list[str]:
    """Top-level names of the classification head(s) present on this model."""
    return [n for n, _ in model.named_children() if n in HEAD_NAMES]


def layer_stack(model: torch.nn.Module) -> tuple[str, int]:
    """The repeated transformer blocks: (module path, count), e.g. ("bert.encoder.layer", 6)."""
    best = ("", 0)
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) > best[1] and re.search(r"(^|\.)(layers?|h|block)$", name):
            best = (name, len(mod))
    if not best[1]:
        raise ValueError(f"cannot find the transformer layers of {type(model).__name__}")
    return best


def block_linears(model: torch.nn.Module) -> list[str]:
    """Full names of every nn.Linear inside the repeated blocks: the attention and MLP projections."""
    stack, _ = layer_stack(model)
    return [n for n, m in model.named_modules() if n.startswith(stack + ".") and isinstance(m, torch.nn.Linear)]


def norm_layers(model: torch.nn.Module) -> list[str]:
    """Full names of the normalization layers (LayerNorm, RMSNorm, ...) outside the task head."""
    heads = tuple(head_modules(model))
    return [n for n, m in model.named_modules()
            if type(m).__name__.endswith("Norm") and n and not n.startswith(heads)]


def peft_task_type(task: str):
    from peft import TaskType

    return {"classification": TaskType.SEQ_CLS, "causal_lm": TaskType.CAUSAL_LM, "sft": TaskType.CAUSAL_LM}[task]


def load_named(params: dict[str, torch.nn.Parameter], file: Path, what: str) -> None:
    """Copy the tensors of a safetensors `file` into `params` by name, strictly: the same names and
    shapes, or a ConfigError naming `what` (e.g. "adapter weights in DIR") and the first mismatches."""
    from safetensors.torch import load_file

    from deltatune.errors import ConfigError

    saved = load_file(str(file))
    missing, unexpected = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
    shapes = [f"{k} {tuple(saved[k].shape)} vs model {tuple(p.shape)}" for k, p in params.items()
              if k in saved and saved[k].shape != p.shape]
    if missing or unexpected or shapes:
        raise ConfigError(f"{what} do not match this model (missing {missing[:3]}, unexpected {unexpected[:3]}, "
                          f"other shapes {shapes[:3]}). Was it written for another model or method?")
    with torch.no_grad():
        for key, p in params.items():
            p.copy_(saved[key])
