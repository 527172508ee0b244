"""What an adapter run computes in under autocast: the frozen base in bf16 (`model.frozen_dtype`), and
adapter inputs left in the autocast dtype.

Under bf16 autocast every fp32 weight is cast to bf16 in each forward pass. For a weight that trains,
autocast caches the cast once per pass and the fp32 master copy is what the optimizer updates. For a
frozen weight it caches nothing (the cache only holds leaf tensors that require grad): each projection
is cast again on every micro-batch, and the bf16 copy is held for the backward pass next to the fp32
original. Storing the frozen linear weights in bf16 once removes both the casts and the copies, and
halves what the base occupies. Only linear layers are cast: embeddings and norms stay fp32, so the
residual stream keeps its precision, and their outputs are what autocast would compute anyway.

peft's LoRA layers also cast each wrapped layer's input to the adapter's dtype (`x.to(lora_A.weight.dtype)`)
before the low-rank path. Under bf16 autocast, for a layer whose input is bf16 (in LLaMA: o_proj and
down_proj; the others read the fp32 output of a norm), that is an fp32 copy of the activation which autocast's
matmul casts straight back to bf16 and keeps for backward, and two more casts of its gradient on the way
back: four passes over the input, and a second bf16 copy held where the graph keeps the input anyway (o_proj),
for nothing. bf16 -> fp32 -> bf16 is exact, so skipping it (peft's own switch, `cast_input_dtype_enabled`, which
`peft.helpers.disable_input_dtype_casting` sets) gives the same numbers bit for bit for plain LoRA while its
dropout is 0 (with dropout, the mask is drawn on the bf16 input, as for a model loaded in bf16). DoRA keeps
the cast: its extra elementwise work on the input rounds differently in bf16.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from deltatune.errors import ConfigError


@dataclass(frozen=True)
class FrozenDtype:
    name: str  # fp32 | bf16: what the frozen linear weights are stored in
    reason: str
    tensors: int = 0  # weights and biases cast
    saved_mb: float = 0.0  # memory given back by casting
    input_casts_skipped: int = 0  # adapter layers whose input peft no longer casts to fp32 (under autocast)

    def describe(self) -> str:
        skipped = (f"; {self.input_casts_skipped} adapter layers take their input as autocast gives it"
                   if self.input_casts_skipped else "")
        if self.name == "fp32":
            return f"frozen base fp32 ({self.reason}){skipped}"
        return (f"frozen base bf16 ({self.reason}): {self.tensors} linear tensors, {self.saved_mb:,.0f} MB less"
                f"{skipped}")


def resolve(requested: str, precision: str, saves: str, strategy: str, quantized: bool) -> tuple[str, str]:
    """(dtype, why) for `model.frozen_dtype`. `auto` casts only where it is exact to do so: an adapter
    method (the base is never saved, so nothing shipped changes), bf16 training, one process or DDP."""
    where = f"model.frozen_dtype={requested}"
    if requested == "fp32":
        return "fp32", "requested"
    blocker = None
    if precision != "bf16":
        blocker = (f"the run trains in {precision}: bf16 weights need bf16 autocast", "set train.precision=bf16")
    elif saves != "adapter":
        blocker = ("this method saves the whole model, and its frozen weights would be written in bf16",
                   "use an adapter method (lora, ia3, ...) or model.frozen_dtype=fp32")
    elif strategy not in ("single", "ddp"):
        blocker = (f"the {strategy} engine shards and casts parameters itself", "use model.frozen_dtype=fp32")
    elif quantized:
        blocker = ("the base is already quantized (4- or 8-bit)", "use model.frozen_dtype=auto")
    if blocker is None:
        return "bf16", "requested" if requested == "bf16" else "auto: adapter method training in bf16"
    if requested == "bf16":
        raise ConfigError(f"{where}: {blocker[0]}. Fix: {blocker[1]}.")
    return "fp32", f"auto: {blocker[0]}"


def cast_frozen_linears(model: torch.nn.Module, dtype: torch.dtype) -> tuple[int, int]:
    """Cast the weights (and biases) of every linear layer that does not train; (tensors, bytes saved).

    Tied weights (an output layer sharing the embedding matrix) are left alone: the embedding is fp32."""
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    tensors = saved = 0
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        for name in ("weight", "bias"):
            p = getattr(module, name, None)
            if (p is None or p.requires_grad or not p.is_floating_point() or p.dtype == dtype
                    or id(p) in embedding_weights):
                continue
            saved += p.numel() * (p.element_size() - torch.empty((), dtype=dtype).element_size())
            p.data = p.data.to(dtype)
            tensors += 1
    return tensors, saved


def skip_adapter_input_casts(model: torch.nn.Module, precision: str) -> int:
    """Turn off peft's input cast in every plain LoRA layer (see the module docstring); how many. Only where
    the run computes under autocast (bf16, fp16), which casts each matmul's inputs itself. Variants (DoRA)
    keep it: their extra elementwise work on the input gives other roundings in bf16 than in fp32."""
    if precision not in ("bf16", "fp16") or "peft" not in sys.modules:  # without peft loaded, no peft layer
        return 0  # exists (and full fine-tuning need not import it)
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and not m.lora_variant]
    for layer in layers:
        layer.cast_input_dtype_enabled = False
    return len(layers)


def apply(model: torch.nn.Module, requested: str, precision: str, saves: str, strategy: str,
          quantized: bool) -> FrozenDtype:
    name, reason = resolve(requested, precision, saves, strategy, quantized)
    skipped = skip_adapter_input_casts(model, precision)
    if name == "fp32":
        return FrozenDtype(name, reason, input_casts_skipped=skipped)
    tensors, saved = cast_frozen_linears(model, torch.bfloat16)
    return FrozenDtype(name, reason, tensors, round(saved / 2**20, 1), skipped)
