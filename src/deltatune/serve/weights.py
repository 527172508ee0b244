"""One copy in memory of each weight that several served models hold.

A server loads each run as `deltatune predict`/`generate` would: base model, then the run's adapter. For plain
LoRA, adapters share one peft model (engine.py); every other family (IA3, prompt tuning, DoRA, bottleneck
adapters, a merged hot LoRA) gets its own wrapper around its own copy of the base. The copies are identical
tensors, so once a model is loaded, each of its parameters that is *exactly equal* to one already held under
the same name (by another model) is replaced by that one and the duplicate is freed. Sharing only what is
bit-equal keeps every answer what it was; nothing in serving writes to weights (merging a hot LoRA happens
before its model joins the store).

Names are those inside the transformers model, with the wrappers' own levels removed (peft's `base_layer` and
`original_module`, the same names deltatune's bottleneck adapters use), so `...q_proj.base_layer.weight` in a
LoRA model and `...q_proj.weight` in an IA3 model or a merged model are the same weight. Quantized parameters
(bitsandbytes `Params4bit`/`Int8Params`, which carry their quantization state) are never shared.
"""

from __future__ import annotations

import weakref
from collections import Counter

import torch

WRAPPER_LEVELS = ("base_layer", "original_module")


def inner_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside `model` (a peft or bottleneck wrapper, or the model itself)."""
    from transformers import PreTrainedModel

    return next((m for m in model.modules() if isinstance(m, PreTrainedModel)), model)


def canonical(name: str) -> str:
    return ".".join(part for part in name.split(".") if part not in WRAPPER_LEVELS)


class WeightStore:
    """Parameters by canonical name; held weakly, so a weight goes when the last model holding it is unloaded."""

    def __init__(self):
        self._held: dict[str, weakref.ref] = {}

    def adopt(self, model: torch.nn.Module) -> int:
        """Point `model` at the held copy of each of its parameters that one already exists for (same name, equal
        values), and hold the others for models to come. Returns the bytes `model` no longer holds on its own."""
        freed = 0
        seen: dict[int, torch.nn.Parameter] = {}  # tied parameters (embeddings = LM head) stay tied
        inner = inner_model(model)
        for full, param in list(inner.named_parameters(remove_duplicate=False)):
            owner_name, _, attr = full.rpartition(".")
            owner = inner.get_submodule(owner_name)
            if id(param) in seen:
                setattr(owner, attr, seen[id(param)])
                continue
            name = canonical(full)
            held = self._held.get(name)
            held = held() if held is not None else None
            if type(param) is not torch.nn.Parameter:  # quantized: values alone do not define it
                seen[id(param)] = param
                continue
            if held is None:
                self._held[name] = weakref.ref(param)
                seen[id(param)] = param
            elif held is param or not _equal(held, param):
                seen[id(param)] = param
            else:
                setattr(owner, attr, held)
                seen[id(param)] = held
                freed += param.numel() * param.element_size()
        return freed


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)


def memory(served: dict[str, list[torch.nn.Parameter]]) -> dict[str, dict[str, int]]:
    """For each served name (and the parameters answering for it): bytes no other name uses (`own_bytes`) and
    bytes it uses in common with at least one other name (`shared_bytes`). A storage counts once per name, however
    many parameters point at it (tied embeddings)."""
    holders: Counter = Counter()
    storages: dict[str, dict[int, int]] = {}
    for name, params in served.items():
        mine = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in params}
        storages[name] = mine
        holders.update(mine.keys())
    return {name: {"own_bytes": sum(n for ptr, n in mine.items() if holders[ptr] == 1),
                   "shared_bytes": sum(n for ptr, n in mine.items() if holders[ptr] > 1)}
            for name, mine in storages.items()}
