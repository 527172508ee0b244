"""Fine-tuning methods. Each family is a small module: its config section(s), `apply`, and whether
the result can be merged into the base model.

`apply(model, cfg, task)` returns the model to train, with exactly the parameters the method
trains left with requires_grad=True. peft-backed methods return a peft `PeftModel` and are saved
in peft's adapter format; the others save a full model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Union

from pydantic import Field

from deltatune.methods import adapter, full, lora, partial, peft_methods
from deltatune.methods.common import quiet_third_party

quiet_third_party()  # before peft imports bitsandbytes

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Method:
    name: str
    Config: type
    apply: Any
    saves: str  # "model" (a full transformers model) or "adapter" (peft format)
    mergeable: bool | None  # None: nothing to merge (the result already is a plain model)
    why_not_mergeable: str = ""
    description: str = ""
    tasks: tuple[str, ...] = ("classification", "causal_lm", "sft", "preference")
    why_not_task: str = ""
    lr_scale: Any = None  # (cfg, parameter name) -> learning-rate multiplier, e.g. LoRA+
    load_kwargs: Any = None  # (cfg, compute dtype, device) -> extra from_pretrained arguments, e.g. 4-bit
    # train.lr=auto: the learning rate this method trains with unless the config names one. Chosen from
    # measured runs (docs/methods.md#learning-rates: the table and sweeps behind each value).
    default_lr: float = 1e-4


REGISTRY: dict[str, Method] = {m.name: m for m in [
    Method("full", full.Config, full.apply, "model", None, description="every weight trains", default_lr=1e-4),
    Method("freeze", partial.FreezeConfig, partial.apply_freeze, "model", None,
           description="only the top N layers and/or parameters matching patterns train", default_lr=1e-4),
    Method("bitfit", partial.BitFitConfig, partial.apply_bitfit, "model", None,
           description="only bias terms (and the task head) train", default_lr=1e-3),
    Method("lora", lora.Config, lora.apply, "adapter", True,
           description="low-rank update W + BA/r; variants dora, rslora; init default/gaussian/pissa; LoRA+",
           lr_scale=lora.lr_scale, default_lr=5e-4),
    Method("adapter", adapter.Config, adapter.apply, "adapter", False,
           "a bottleneck adapter is a non-linear block (up(act(down(h)))) added after a sublayer: no single "
           "weight matrix can absorb it, so it stays as extra computation",
           "bottleneck adapters after the attention and/or feed-forward sublayers (Houlsby / Pfeiffer)",
           default_lr=1e-3),
    Method("qlora", lora.QLoRAConfig, lora.apply_qlora, "adapter", True,
           description="LoRA over a 4-bit NF4 or 8-bit LLM.int8 base (bitsandbytes); merges into a 32-bit copy",
           lr_scale=lora.lr_scale, load_kwargs=lora.quantized_load_kwargs, default_lr=5e-4),
    Method("ia3", peft_methods.IA3Config, peft_methods.apply_ia3, "adapter", True,
           description="learned rescaling of keys, values and feed-forward activations", default_lr=3e-2),
    Method("ln_tuning", peft_methods.LNTuningConfig, peft_methods.apply_ln_tuning, "adapter", False,
           "LayerNorm tuning replaces the norm weights; peft cannot merge it back", "only LayerNorm weights train",
           default_lr=1e-3),
    Method("prompt_tuning", peft_methods.PromptTuningConfig, peft_methods.apply_prompt_tuning, "adapter", False,
           "soft prompts add virtual tokens to every input: there is no weight to merge them into",
           "trainable virtual tokens prepended to the input", default_lr=3e-2),
    Method("p_tuning", peft_methods.PTuningConfig, peft_methods.apply_p_tuning, "adapter", False,
           "soft prompts add virtual tokens to every input: there is no weight to merge them into",
           "virtual tokens produced by a small prompt encoder (MLP or LSTM)", default_lr=1e-2),
    Method("prefix_tuning", peft_methods.PrefixTuningConfig, peft_methods.apply_prefix_tuning, "adapter", False,
           "prefixes add key/value positions to every layer: there is no weight to merge them into",
           "trainable key/value prefixes in every layer, reparameterised by an MLP (P-tuning v2 style); "
           "decoders only (transformers-5 encoders take no key/value cache)", default_lr=1e-2),
]}

# The `method:` section: pydantic picks the variant by `name`.
MethodConfig = Annotated[Union[tuple(m.Config for m in REGISTRY.values())], Field(discriminator="name")]  # noqa: UP007


def apply(model: torch.nn.Module, cfg: Any, task: str) -> torch.nn.Module:
    return REGISTRY[cfg.name].apply(model, cfg, task)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) tensors are counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        # 4-bit weights are stored packed (two values a byte); count the parameters they stand for.
        shape = getattr(getattr(p, "quant_state", None), "shape", None)
        n = math.prod(shape) if shape is not None else p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total
