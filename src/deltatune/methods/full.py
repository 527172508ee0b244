"""Full fine-tuning: every weight trains. The baseline every delta method is measured against."""

from __future__ import annotations

import torch


def apply(model: torch.nn.Module, section: object) -> torch.nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model
