"""Full fine-tuning: every weight trains. The baseline every delta method is measured against."""

from __future__ import annotations

from typing import Literal

import torch

from deltatune.sections import Section


class Config(Section):
    name: Literal["full"] = "full"


def apply(model: torch.nn.Module, cfg: Config, task: str) -> torch.nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model
