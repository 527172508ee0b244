"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020): h + up(act(down(h))) after a sublayer.

peft has no bottleneck adapter, so this is a small peft-shaped implementation: each wrapped Linear keeps
the original as `base_layer` and its adapter in `nn.ModuleDict`s keyed by adapter name ("default").
`houlsby` adds one after the attention and one after the feed-forward sublayer of every block;
`pfeiffer` only after the feed-forward sublayer. Only the adapters and the task head train.

Saved in peft's on-disk layout (`adapter_config.json` + `adapter_model.safetensors`, peft-style keys),
but with peft_type BOTTLENECK_ADAPTER: only deltatune loads this format (plain peft cannot).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from deltatune.errors import ConfigError
from deltatune.methods.common import head_modules, layer_stack, load_named, out_features, projection_types
from deltatune.sections import Section

PEFT_TYPE = "BOTTLENECK_ADAPTER"
CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
ADAPTER = "default"
PREFIX = "base_model.model."  # peft's key prefix, so the file reads like any other peft adapter

# Output projections of the sublayers, relative to one transformer block: the adapter goes on their
# output, i.e. before the residual add (+ LayerNorm in BERT's post-norm blocks).
# BERT/RoBERTa/ELECTRA, LLaMA/Mistral/Qwen, GPT-2 (whose projections are transformers' Conv1D).
ATTENTION_OUTPUTS = ("attention.output.dense", "self_attn.o_proj", "attn.c_proj")
FFN_OUTPUTS = ("output.dense", "mlp.down_proj", "mlp.c_proj")

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


class Config(Section):
    name: Literal["adapter"] = "adapter"
    style: Literal["houlsby", "pfeiffer"] = Field(
        "pfeiffer", description="houlsby: after attention and feed-forward; pfeiffer: after feed-forward only")
    reduction_factor: int = Field(16, ge=1, description="bottleneck size = hidden size // reduction_factor")
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] = "relu"


class BottleneckLayer(nn.Module):
    """`base_layer(x)` followed by out + up(act(down(out))), peft-style (adapters keyed by name)."""

    def __init__(self, base_layer: nn.Module, reduction_factor: int, non_linearity: str, init_std: float = 0.0):
        super().__init__()
        self.base_layer = base_layer
        self.non_linearity = non_linearity
        self.active_adapter = ADAPTER
        hidden = out_features(base_layer)
        size = max(1, hidden // reduction_factor)
        w = base_layer.weight
        # Half-precision bases get fp32 adapters (as peft's autocast_adapter_dtype): tiny, and they train stably.
        dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        self.adapter_down = nn.ModuleDict({ADAPTER: nn.Linear(hidden, size, device=w.device, dtype=dtype)})
        self.adapter_up = nn.ModuleDict({ADAPTER: nn.Linear(size, hidden, device=w.device, dtype=dtype)})
        self.reset_adapter(init_std)

    def reset_adapter(self, init_std: float = 0.0) -> None:
        """init_std=0: near-identity start (small down, zero up), so training begins at the base model.
        init_std>0 (tests): every adapter tensor ~ N(0, init_std), so the adapter visibly changes outputs."""
        down, up = self.adapter_down[ADAPTER], self.adapter_up[ADAPTER]
        with torch.no_grad():
            for p in (*down.parameters(), *up.parameters()):
                nn.init.zeros_(p)
                if init_std > 0:
                    nn.init.normal_(p, std=init_std)
            if init_std == 0:
                nn.init.normal_(down.weight, std=1e-2)  # up = 0 keeps the output exact; down must not be 0 too

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        down, up = self.adapter_down[self.active_adapter], self.adapter_up[self.active_adapter]
        h = ACTIVATIONS[self.non_linearity](down(out.to(down.weight.dtype)))
        return out + up(h).to(out.dtype)

    def __getattr__(self, name: str) -> Any:
        # Code that reads `o_proj.weight`, `.in_features`, ... still finds the wrapped Linear's.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)


def targets(model: nn.Module, style: str) -> list[str]:
    """Full names of the Linears to wrap: the attention (houlsby) and feed-forward outputs of each block."""
    stack, count = layer_stack(model)
    wanted = (ATTENTION_OUTPUTS if style == "houlsby" else ()) + FFN_OUTPUTS
    modules = dict(model.named_modules())
    names = [f"{stack}.{i}.{rel}" for i in range(count) for rel in wanted
             if isinstance(modules.get(f"{stack}.{i}.{rel}"), projection_types())]
    per_block = 2 if style == "houlsby" else 1
    if len(names) != per_block * count:
        raise ConfigError(
            f"method adapter: found {len(names)} sublayer output projections in {type(model).__name__}, expected "
            f"{per_block} per block x {count} blocks. Supported: BERT-family (attention.output.dense, output.dense), "
            f"LLaMA-family (self_attn.o_proj, mlp.down_proj) and GPT-2-family (attn.c_proj, mlp.c_proj) models. "
            f"Fix: use method lora for this model.")
    return names


def _inject(model: nn.Module, names: list[str], cfg: Config, init_std: float) -> None:
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        if not isinstance(base, projection_types()):
            raise ConfigError(f"method adapter: `{name}` is a {type(base).__name__}, not a Linear or Conv1D")
        setattr(parent, child, BottleneckLayer(base, cfg.reduction_factor, cfg.non_linearity, init_std))


class BottleneckAdapterModel(nn.Module):
    """A transformers model with bottleneck adapters; calls, attributes and saving go through this wrapper."""

    def __init__(self, model: nn.Module, cfg: Config, target_modules: list[str], task: str):
        super().__init__()
        self.base_model = model
        self.adapter_config = cfg
        self.target_modules = list(target_modules)
        self.task = task
        self.heads = head_modules(model)

    @property
    def config(self) -> Any:
        return self.base_model.config

    def get_base_model(self) -> nn.Module:
        return self.base_model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # get_input_embeddings, generate, gradient_checkpointing_enable, ... come from the base (as in peft).
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def saved_parameters(self) -> dict[str, nn.Parameter]:
        """What the adapter file holds, by its key: adapter tensors (adapter name dropped, as peft does) + head."""
        out: dict[str, nn.Parameter] = {}
        for name in self.target_modules:
            layer = self.base_model.get_submodule(name)
            for kind in ("adapter_down", "adapter_up"):
                for pname, p in getattr(layer, kind)[ADAPTER].named_parameters():
                    out[f"{PREFIX}{name}.{kind}.{pname}"] = p
        for head in self.heads:
            for pname, p in self.base_model.get_submodule(head).named_parameters():
                out[f"{PREFIX}{head}.{pname}"] = p
        return out

    def save_pretrained(self, save_directory: str | Path, safe_serialization: bool = True, **kwargs: Any) -> None:
        # safetensors is the only format written; the kwarg is accepted for peft/transformers call compatibility.
        from safetensors.torch import save_file

        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        saved = self.saved_parameters()
        whole = kwargs.get("state_dict")  # the whole model's tensors, when this process holds a shard (FSDP)
        if whole is not None:
            name_of = {id(p): n for n, p in self.named_parameters()}
            tensors = {k: whole[name_of[id(p)]].detach().cpu().contiguous() for k, p in saved.items()}
        else:
            tensors = {k: p.detach().cpu().contiguous() for k, p in saved.items()}
        save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        meta = {
            "peft_type": PEFT_TYPE, "library": "deltatune", "format_version": 1,
            "base_model_name_or_path": getattr(self.config, "_name_or_path", None) or None,
            "task": self.task, "style": self.adapter_config.style,
            "reduction_factor": self.adapter_config.reduction_factor,
            "non_linearity": self.adapter_config.non_linearity,
            "target_modules": self.target_modules, "modules_to_save": self.heads,
        }
        (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, directory: str | Path,
                        is_trainable: bool = False) -> BottleneckAdapterModel:
        """Re-apply the saved adapters to `base_model` and load their (and the head's) weights, strictly."""
        directory = Path(directory)
        meta = json.loads((directory / CONFIG_NAME).read_text(encoding="utf-8"))
        if meta.get("peft_type") != PEFT_TYPE:
            raise ConfigError(f"{directory}: not a deltatune bottleneck adapter (peft_type {meta.get('peft_type')})")
        cfg = Config(style=meta["style"], reduction_factor=meta["reduction_factor"],
                     non_linearity=meta["non_linearity"])
        _inject(base_model, meta["target_modules"], cfg, init_std=0.0)
        model = cls(base_model, cfg, meta["target_modules"], meta["task"])
        if model.heads != meta["modules_to_save"]:
            raise ConfigError(f"{directory}: saved with head(s) {meta['modules_to_save']}, the base has {model.heads}")
        load_named(model.saved_parameters(), directory / WEIGHTS_NAME, f"{directory}: the adapter weights")
        _set_trainable(model, is_trainable)
        return model


def _set_trainable(model: BottleneckAdapterModel, trainable: bool) -> None:
    keep = {id(p) for p in model.saved_parameters().values()} if trainable else set()
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


def apply(model: nn.Module, cfg: Config, task: str, init_std: float = 0.0) -> BottleneckAdapterModel:
    """Freeze the base, insert the adapters; adapters and task head train. `init_std` is for tests only."""
    names = targets(model, cfg.style)
    _inject(model, names, cfg, init_std)
    wrapped = BottleneckAdapterModel(model, cfg, names, task)
    _set_trainable(wrapped, True)
    return wrapped


def from_pretrained(base_model: nn.Module, directory: str | Path, is_trainable: bool = False
                    ) -> BottleneckAdapterModel:
    return BottleneckAdapterModel.from_pretrained(base_model, directory, is_trainable)


def is_saved_adapter(directory: str | Path) -> bool:
    """Whether `directory` holds a bottleneck adapter (so loaders pick this module instead of peft)."""
    path = Path(directory) / CONFIG_NAME
    return path.exists() and json.loads(path.read_text(encoding="utf-8")).get("peft_type") == PEFT_TYPE
