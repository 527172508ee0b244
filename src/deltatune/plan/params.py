"""Parameter counts of a method on a model, from the model's config alone (meta device, no weights).

Because nothing is allocated, this works for a 70B-parameter config on a laptop: the model is
built on PyTorch's meta device, the method is applied exactly as in training, and the tensors
that would train are counted.
"""

from __future__ import annotations

import torch

from deltatune import methods
from deltatune.config import RunConfig
from deltatune.methods.common import head_modules
from deltatune.models.catalogue import resolve


def skeleton(cfg: RunConfig, num_labels: int) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForSequenceClassification

    model_cfg = AutoConfig.from_pretrained(resolve(cfg.model.name, cfg.model.revision), revision=cfg.model.revision,
                                           trust_remote_code=cfg.model.trust_remote_code)
    model_cfg.num_labels = num_labels
    if getattr(model_cfg, "pad_token_id", None) is None:
        model_cfg.pad_token_id = 0  # decoder classifiers need one; irrelevant to counting
    with torch.device("meta"):
        return AutoModelForSequenceClassification.from_config(model_cfg, trust_remote_code=cfg.model.trust_remote_code)


def count(cfg: RunConfig) -> dict:
    """Total, trainable, method-added ("adapter") and head parameters, and the artifact size."""
    labels = len(cfg.data.labels) if cfg.data.labels else 2
    base = skeleton(cfg, labels)
    base_total = sum(p.numel() for p in base.parameters())
    model = methods.apply(base, cfg.method, cfg.task)
    trainable, total = methods.count_parameters(model)
    heads = tuple(head_modules(getattr(model, "get_base_model", lambda: model)()))
    head = sum(p.numel() for n, p in model.named_parameters()
               if p.requires_grad and any(f"{h}." in f".{n}" for h in heads))
    method = methods.REGISTRY[cfg.method.name]
    added = total - base_total if method.saves == "adapter" else 0
    # peft keeps an untrained copy of the head next to the trained one (modules_to_save); bottleneck
    # adapters do not.
    added -= head if any(".modules_to_save." in n for n, _ in model.named_parameters()) else 0
    return {
        "model": cfg.model.name, "method": cfg.method.name, "num_labels": labels,
        "base_params": base_total, "trainable_params": trainable,
        "trainable_percent": round(100 * trainable / base_total, 4),
        "method_params": trainable - head,
        "added_params": added, "head_params": head,
        # What a run ships: the adapter (+ head) for delta methods, the whole model otherwise, in fp32.
        "artifact_mb": round(4 * (trainable if method.saves == "adapter" else base_total) / 2**20, 3),
    }
