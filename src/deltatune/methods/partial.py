"""Partial fine-tuning: train a chosen subset of the existing weights (no new parameters).

`freeze` trains the top N transformer layers and/or parameters whose names match patterns;
`bitfit` trains only bias terms. The task head always trains: a new head must learn.
"""

from __future__ import annotations

import re
from typing import Literal

import torch
from pydantic import Field

from deltatune.errors import ConfigError
from deltatune.methods.common import head_modules, layer_stack
from deltatune.sections import Section


class FreezeConfig(Section):
    name: Literal["freeze"] = "freeze"
    train_layers: int | None = Field(None, ge=0, description="train the top N transformer layers")
    patterns: list[str] = Field(default_factory=list, description="regexes; matching parameter names train")


class BitFitConfig(Section):
    name: Literal["bitfit"] = "bitfit"


def _train_only(model: torch.nn.Module, keep) -> torch.nn.Module:
    heads = tuple(f"{h}." for h in head_modules(model))
    for name, p in model.named_parameters():
        p.requires_grad_(bool(keep(name)) or name.startswith(heads))
    return model


def apply_freeze(model: torch.nn.Module, cfg: FreezeConfig, task: str) -> torch.nn.Module:
    if cfg.train_layers is None and not cfg.patterns:
        raise ConfigError("method freeze: set method.train_layers (top N layers) and/or method.patterns")
    stack, count = layer_stack(model)
    if cfg.train_layers is not None and cfg.train_layers > count:
        raise ConfigError(f"method.train_layers={cfg.train_layers}, but the model has {count} layers")
    first = count - (cfg.train_layers or 0)
    top = re.compile(rf"^{re.escape(stack)}\.(\d+)\.")
    regexes = [re.compile(p) for p in cfg.patterns]

    def keep(name: str) -> bool:
        m = top.match(name)
        return (cfg.train_layers is not None and m is not None and int(m.group(1)) >= first) or any(
            r.search(name) for r in regexes)

    return _train_only(model, keep)


def apply_bitfit(model: torch.nn.Module, cfg: BitFitConfig, task: str) -> torch.nn.Module:
    return _train_only(model, lambda name: name.endswith(".bias"))
