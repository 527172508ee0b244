"""A leaner forward for plain LoRA on nn.Linear: the same function as peft's, fewer passes over activations.

Under bf16 autocast, peft's forward of each wrapped layer (W x + s B A x) makes several passes that do no
arithmetic worth the name, each over a whole (tokens x features) tensor:
- the input is cast to bf16 twice, once by the base matmul and once by lora_A's, and both copies are kept for
  backward; where the input arrives in bf16 (o_proj, down_proj), peft first casts it *up* to lora_A's fp32;
- the low-rank output is scaled by s in a pass of its own, and added to the base output in another.
With 210 wrapped projections (SmolLM2-135M, all-linear) those passes cost more time than the low-rank matmuls.
Here the input is cast once and shared, s multiplies B (out x r values) instead of the output, and the add is
fused into the second matmul (addmm). Only the forward changes: peft's modules, parameters, state dicts,
merging and saving stay as they are, and anything but the plain single-adapter case uses peft's own forward.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F


def _plain(layer, args: tuple, kwargs: dict) -> str | None:
    """The active adapter when this call is plain LoRA (one adapter, not merged or disabled, no variant such
    as DoRA, no LoRA bias, no extra arguments); None otherwise."""
    if args or kwargs or layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in layer.lora_variant or layer.lora_bias.get(name, False):
        return None
    return name


def forward(layer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    name = _plain(layer, args, kwargs)
    if name is None:
        return type(layer).forward(layer, x, *args, **kwargs)
    if torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
        x = x.to(torch.get_autocast_dtype(x.device.type))  # once, for both matmuls (autocast would do it twice)
    base = layer.base_layer
    out = F.linear(x, base.weight, base.bias)
    low = F.linear(layer.lora_dropout[name](x), layer.lora_A[name].weight)
    b = layer.lora_B[name].weight * layer.scaling[name]  # s B: (out x r) values instead of (tokens x out)
    flat = torch.addmm(out.reshape(-1, out.shape[-1]), low.reshape(-1, low.shape[-1]), b.t())
    return flat.view(out.shape)


def install(model: torch.nn.Module) -> int:
    """Give every peft LoRA layer over a plain nn.Linear this forward; the number of layers changed."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    n = 0
    for module in model.modules():
        if type(module) is LoraLinear and type(module.base_layer) is torch.nn.Linear:
            module.forward = types.MethodType(forward, module)
            n += 1
    return n
