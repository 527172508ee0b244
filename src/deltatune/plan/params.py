"""Parameter counts of a method on a model, from the model's config alone (meta device, no weights).

Because nothing is allocated, this works for a 70B-parameter config on a laptop: the model the task
trains (a causal LM for causal_lm/sft, a sequence classifier for classification) is built on PyTorch's
meta device from config.json, the method is applied exactly as in training, and the tensors that would
train are counted.
"""

from __future__ import annotations

import contextlib

import torch

from deltatune import methods
from deltatune.config import RunConfig
from deltatune.errors import ConfigError
from deltatune.methods.common import head_modules
from deltatune.models.catalogue import resolve


def model_config(cfg: RunConfig, num_labels: int, layers: int | None = None):
    """The transformers config of cfg.model (config.json only), with the head the task needs; `layers` cuts
    the stack to that many blocks (the memory planner traces one or two blocks, not eighty)."""
    from transformers import AutoConfig

    try:
        model_cfg = AutoConfig.from_pretrained(resolve(cfg.model.name, cfg.model.revision),
                                               revision=cfg.model.revision,
                                               trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.name: cannot read the config of `{cfg.model.name}`: {e}. Fix: a built-in name, "
                          f"a local directory with a config.json, or a Hugging Face id in the local cache.") from None
    if not cfg.lm:
        model_cfg.num_labels = num_labels
    if getattr(model_cfg, "pad_token_id", None) is None:
        model_cfg.pad_token_id = 0  # decoder classifiers need one; irrelevant to counting and memory
    if layers is not None:
        model_cfg.num_hidden_layers = layers
        if isinstance(getattr(model_cfg, "layer_types", None), list):  # per-layer kinds (sliding/full): keep L
            model_cfg.layer_types = model_cfg.layer_types[:layers]
    return model_cfg


def build(cfg: RunConfig, model_cfg, attention: str | None = None) -> torch.nn.Module:
    """The task's model from `model_cfg`, on whatever device or fake-tensor mode the caller is inside.

    Its weights are never initialised: planning needs shapes only, and random initialisation run under
    FakeTensorMode (the planner's trace) left the process broken: a later meta-device model build (any
    from_pretrained) segfaulted in torch's prims `uniform` (5 of 6 runs of three test files; 0 of 6 since)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.initialization import no_init_weights

    auto = AutoModelForCausalLM if cfg.lm else AutoModelForSequenceClassification
    extra = {"attn_implementation": attention} if attention else {}
    with no_init_weights():
        return auto.from_config(model_cfg, trust_remote_code=cfg.model.trust_remote_code, **extra)


def skeleton(cfg: RunConfig, num_labels: int) -> torch.nn.Module:
    """The model the task trains, on the meta device: shapes without storage."""
    with torch.device("meta"):
        return build(cfg, model_config(cfg, num_labels))


def num_labels(cfg: RunConfig) -> int:
    return len(cfg.data.labels) if cfg.data.labels else 2


@contextlib.contextmanager
def quiet():
    """Methods announce their choices (`lora targets: ...`) once per run; planning applies them to skeletons
    several times and prints its own account instead."""
    from deltatune.engine.report import console

    was, console.quiet = console.quiet, True
    try:
        yield
    finally:
        console.quiet = was


def apply_method(cfg: RunConfig, base: torch.nn.Module, meta: bool = False) -> torch.nn.Module:
    """The method applied as in training (quietly); `meta`: new adapter weights on the meta device too (peft
    initialises them where they are created: 800M real LoRA parameters on a 65B skeleton took 40 s)."""
    with quiet(), torch.device("meta") if meta else contextlib.nullcontext():
        return methods.apply(base, cfg.method, cfg.task)


def count(cfg: RunConfig) -> dict:
    """Total, trainable, method-added ("adapter") and head parameters, and the artifact size."""
    labels = num_labels(cfg)
    base = skeleton(cfg, labels)
    base_total = sum(p.numel() for p in base.parameters())
    with torch.device("meta"):  # adapters too: see apply_method
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
        "model": cfg.model.name, "task": cfg.task, "architecture": type(base).__name__, "method": cfg.method.name,
        "num_labels": labels if not cfg.lm else None,
        "base_params": base_total, "trainable_params": trainable,
        "trainable_percent": round(100 * trainable / base_total, 4),
        "method_params": trainable - head,
        "added_params": added, "head_params": head,
        # What a run ships: the adapter (+ head) for delta methods, the whole model otherwise, in fp32.
        "artifact_mb": round(4 * (trainable if method.saves == "adapter" else base_total) / 2**20, 3),
    }
