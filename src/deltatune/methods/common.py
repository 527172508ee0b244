"""Helpers shared by method modules: where the task head and the repeated layers are."""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

import torch

from deltatune.errors import ConfigError, did_you_mean
from deltatune.tasks import is_lm

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
        raise ConfigError(f"cannot find the transformer blocks of {type(model).__name__} (a list of layers named "
                          f"layer, layers, h or block); its layers: {', '.join(wrappable_names(model)) or 'none'}. "
                          f"Fix: use a method that names its layers, e.g. method.name=lora with "
                          f"method.target_modules=[...] from that list.")
    return best


def projection_types() -> tuple[type, ...]:
    """What an attention or MLP projection is: nn.Linear (and its 4-bit/8-bit subclasses), or transformers'
    Conv1D, the GPT-2 family's Linear with its weight stored transposed (in x out)."""
    from transformers.pytorch_utils import Conv1D

    return (torch.nn.Linear, Conv1D)


def wrappable_types() -> tuple[type, ...]:
    """Every layer type peft's LoRA can wrap (peft/tuners/lora/layer.py: dispatch_default)."""
    nn = torch.nn
    return (*projection_types(), nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention)


def is_conv1d(module: torch.nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def out_features(layer: torch.nn.Module) -> int:
    """Output width of a projection (Conv1D stores its weight as in x out)."""
    return layer.weight.shape[1] if is_conv1d(layer) else layer.out_features


def block_projections(model: torch.nn.Module) -> list[str]:
    """Full names of every projection inside the repeated blocks: the attention and MLP projections.

    Only projections: embeddings sit outside the blocks, and convolutions or nn.MultiheadAttention inside
    a block mix positions or wrap a whole attention (peft marks it experimental), not one weight matrix."""
    try:
        stack, _ = layer_stack(model)
    except ConfigError:
        return []
    kinds = projection_types()
    return [n for n, m in model.named_modules() if n.startswith(stack + ".") and isinstance(m, kinds)]


def wrappable_names(model: torch.nn.Module) -> list[str]:
    """Distinct leaf names of the layers peft can wrap, in model order: what target_modules can name."""
    kinds = wrappable_types()
    return list(dict.fromkeys(n.rpartition(".")[2] for n, m in model.named_modules() if n and isinstance(m, kinds)))


def matching(model: torch.nn.Module, entry: str) -> list[tuple[str, torch.nn.Module]]:
    """Modules a target_modules list entry selects, as peft matches lists: the full name, or a dotted suffix."""
    return [(n, m) for n, m in model.named_modules() if n == entry or n.endswith("." + entry)]


def check_targets(model: torch.nn.Module, entries: list[str], key: str) -> list[str]:
    """The full names an explicit target list selects, or a ConfigError naming the entry that selects nothing
    (or something that is not a layer) with the model's own layer names, instead of peft's traceback."""
    kinds, names, found = wrappable_types(), wrappable_names(model), []
    layers = f"Its layers: {', '.join(names)}"
    for entry in entries:
        hits = matching(model, entry)
        if not hits:
            raise ConfigError(f"{key}: `{entry}` matches no layer of {type(model).__name__}"
                              f"{did_you_mean(entry, names)}. {layers}. Fix: use names from that list (a name "
                              f"selects every layer whose dotted path ends with it), or {key.split('.')[-1]}: auto.")
        wrong = [(n, m) for n, m in hits if not isinstance(m, kinds)]
        if wrong:
            n, m = wrong[0]
            raise ConfigError(f"{key}: `{entry}` selects `{n}`, a {type(m).__name__}, which is a group of layers, "
                              f"not one peft can wrap. {layers}. Fix: name the layers inside it instead.")
        found += [n for n, _ in hits]
    return list(dict.fromkeys(found))


def fan_in_fan_out(modules: list[torch.nn.Module]) -> bool:
    """peft's flag for Conv1D targets (weights stored in x out). peft corrects it per layer with a warning
    when it does not fit; set from the targets themselves it fits (all GPT-2 projections are Conv1D)."""
    return sum(map(is_conv1d, modules)) > len(modules) / 2


def norm_layers(model: torch.nn.Module) -> list[str]:
    """Full names of the normalization layers (LayerNorm, RMSNorm, ...) outside the task head."""
    heads = tuple(head_modules(model))
    return [n for n, m in model.named_modules()
            if type(m).__name__.endswith("Norm") and n and not n.startswith(heads)]


def peft_task_type(task: str):
    from peft import TaskType

    return TaskType.CAUSAL_LM if is_lm(task) else TaskType.SEQ_CLS


def load_named(params: dict[str, torch.nn.Parameter], file: Path, what: str) -> None:
    """Copy the tensors of a safetensors `file` into `params` by name, strictly: the same names and
    shapes, or a ConfigError naming `what` (e.g. "adapter weights in DIR") and the first mismatches."""
    from safetensors.torch import load_file

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


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_third_party() -> None:
    """Silence third-party notices that peft-backed commands printed and that are not the user's concern,
    each by its source and message (anything else those libraries say still gets through):

    - bitsandbytes (imported by peft) logs at import, on CPUs with AVX512-BF16, that the optional `kernels`
      package for its CPU 4-bit matmul is missing; that package would fetch the kernel from the hub, and
      bitsandbytes falls back to its own kernel.
    - peft reads transformers' deprecated `is_gradient_checkpointing` whenever it wraps a model
      (peft_model.py), and transformers warns with a FutureWarning about peft's code, not the user's.
    - peft passes prefix tuning's prefixes to decoders as `past_key_values`, a name transformers deprecated.
    - (and one more, for ln_tuning only) peft's layer probe warns "Unsupported layer type" for norm layers.
    """
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _DropMessage) for f in logger.filters):
        logger.addFilter(_DropMessage("Failed to load CPU gemm_4bit_forward from kernels-community"))
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning,
                            module="transformers.modeling_utils")
    # peft hands prefix-tuning prefixes to decoders as `past_key_values`, which transformers renamed `cache`.
    warnings.filterwarnings("ignore", message=r"`past_key_values` is deprecated .* Use `cache` instead",
                            category=FutureWarning)
    # LayerNorm tuning wraps norm layers by design; peft's generic layer probe calls them "unsupported".
    warnings.filterwarnings("ignore", message=r"Unsupported layer type '<class '[\w.]*Norm'>' encountered",
                            category=UserWarning, module="peft.tuners.tuners_utils")
