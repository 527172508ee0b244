"""LoRA and its variants through peft: W x + (alpha/r) B A x, with only A and B training.

variant: `lora` (Hu et al. 2021), `dora` (weight-decomposed), `rslora` (alpha/sqrt(r) scaling).
init: `default` (B = 0), `gaussian`, `pissa` (principal singular vectors of W).
loraplus_lr_ratio: LoRA+ trains B with a learning rate this many times A's.
qlora: the same LoRA over a base loaded in 4 bits (NF4, bitsandbytes; works on CPU too), or in 8 bits
       (`bits: 8`, LLM.int8: int8 weights with one fp32 scale per row).
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
from pydantic import Field, model_validator

from deltatune.errors import ConfigError
from deltatune.methods.common import (
    HEAD_NAMES,
    block_projections,
    check_targets,
    fan_in_fan_out,
    layer_stack,
    peft_task_type,
    projection_types,
    wrappable_names,
)
from deltatune.sections import Section


class Config(Section):
    name: Literal["lora"] = "lora"
    r: int = Field(8, ge=1)
    alpha: float = Field(16, gt=0)
    # 0, as in peft: dropout copies the input of every wrapped layer (one fp32 copy and its mask per projection,
    # kept for backward): +1.65 GB peak on SmolLM2-135M all-linear at 8 x 160 tokens, measured.
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on each adapter's input (costs a copy per layer)")
    target_modules: Literal["auto", "all-linear"] | list[str] = Field(
        "auto", description="auto: every attention and MLP projection in the transformer blocks")
    variant: Literal["lora", "dora", "rslora"] = "lora"
    init: Literal["default", "gaussian", "pissa"] = "default"
    loraplus_lr_ratio: float | None = Field(None, gt=0, description="LoRA+: lr of B = lr x this")


def targets(model: torch.nn.Module, target_modules: str | list[str]) -> str | list[str]:
    """What peft wraps: `auto` resolved to the block projections (and shown), an explicit list checked
    against the model, `all-linear` left to peft."""
    if target_modules == "all-linear":
        return target_modules
    if target_modules != "auto":
        check_targets(model, target_modules, "method.target_modules")
        return target_modules
    names = block_projections(model)
    if not names:
        raise ConfigError(
            f"method.target_modules=auto: found no attention or MLP projections (Linear or Conv1D layers inside "
            f"repeated transformer blocks) in {type(model).__name__}; its layers: "
            f"{', '.join(wrappable_names(model)) or 'none'}. Fix: set method.target_modules to a list of the layer "
            f"names to adapt, e.g. method.target_modules=[{','.join(wrappable_names(model)[:2])}].")
    _show(names, layer_stack(model)[0])
    return names


def _show(names: list[str], stack: str) -> None:
    """One line saying what `auto` picked: names within a block, the number of blocks and of modules."""
    import os

    if int(os.environ.get("RANK", "0")) != 0:  # one line per run, not one per process
        return
    from deltatune.engine.report import console

    # "bert.encoder.layer.0.attention.self.query" -> block "0", name "attention.self.query"
    split = [n.removeprefix(stack + ".").partition(".") for n in names]
    within = list(dict.fromkeys(rel for _, _, rel in split))
    blocks = len({block for block, _, _ in split})
    console.print(f"lora targets: {', '.join(within)} (x{blocks} layers = {len(names)} modules)",
                  highlight=False, soft_wrap=True)


def _wrapped(model: torch.nn.Module, target_modules: str | list[str]) -> list[torch.nn.Module]:
    """The modules peft will wrap, to set fan_in_fan_out from them."""
    if target_modules == "all-linear":  # peft's rule: every projection but the output layer
        return [m for n, m in model.named_modules() if isinstance(m, projection_types())
                and n.rpartition(".")[2] not in ("lm_head", *HEAD_NAMES)]
    return [model.get_submodule(n) for n in check_targets(model, target_modules, "method.target_modules")]


def apply(model: torch.nn.Module, cfg: Config, task: str) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    target_modules = targets(model, cfg.target_modules)
    peft_cfg = LoraConfig(
        task_type=peft_task_type(task), r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
        target_modules=target_modules, use_dora=cfg.variant == "dora",
        use_rslora=cfg.variant == "rslora", init_lora_weights={"default": True}.get(cfg.init, cfg.init),
        fan_in_fan_out=fan_in_fan_out(_wrapped(model, target_modules)),
    )
    with warnings.catch_warnings():
        # Only with targets mixing Linear and Conv1D: peft then sets the flag per layer, correctly.
        warnings.filterwarnings("ignore", message="fan_in_fan_out is set to", category=UserWarning)
        return get_peft_model(model, peft_cfg)


class QLoRAConfig(Config):
    name: Literal["qlora"] = "qlora"  # type: ignore[assignment]
    bits: Literal[4, 8] = Field(4, description="4: NF4/FP4 blocks (QLoRA); 8: LLM.int8 rows (bitsandbytes)")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type (bits=4 only)")
    double_quant: bool = Field(True, description="also quantize the quantization constants (QLoRA paper; bits=4 only)")

    @model_validator(mode="after")
    def _four_bit_options_need_four_bits(self):
        # Changed from their defaults with bits=8 they would be ignored: say so instead. (Not "set at all": a
        # run's resolved config.yaml writes every key, and must load again.)
        if self.bits == 8 and (self.quant_type != "nf4" or not self.double_quant):
            raise ValueError("method.quant_type and method.double_quant describe 4-bit blocks; with method.bits=8 "
                             "(LLM.int8) they do nothing. Fix: drop them, or set method.bits=4.")
        return self


def quantized_load_kwargs(cfg: QLoRAConfig, compute_dtype: torch.dtype, device: torch.device) -> dict:
    """from_pretrained arguments that load the base in 4 or 8 bits."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError("method qlora needs bitsandbytes: pip install bitsandbytes (0.50+ runs on CPU)") from None
    from transformers import BitsAndBytesConfig

    # Task heads stay in full precision: a new classification head is initialised, not loaded, and
    # would otherwise become a 4-bit layer that was never quantized (bitsandbytes then fails).
    keep = [*HEAD_NAMES, "lm_head"]
    if cfg.bits == 8:  # int8 weights, one fp32 scale per output row; computes in the input's dtype
        quant = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep)
    else:
        quant = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=cfg.quant_type, bnb_4bit_use_double_quant=cfg.double_quant,
            bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=keep)
    return {"quantization_config": quant, "device_map": {"": str(device)}}


def apply_qlora(model: torch.nn.Module, cfg: QLoRAConfig, task: str) -> torch.nn.Module:
    from peft import prepare_model_for_kbit_training

    # Freezes the quantized base, keeps norms/embeddings/head in fp32, lets gradients reach the inputs.
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return apply(model, cfg, task)


QUANTIZED_LINEARS = ("Linear4bit", "Linear8bitLt")  # bitsandbytes' layers, by name: no import needed to ask


def is_quantized(model: torch.nn.Module) -> bool:
    return any(type(m).__name__ in QUANTIZED_LINEARS for m in model.modules())


def lr_scale(cfg: Config, param_name: str) -> float:
    """LoRA+: the B matrices learn `loraplus_lr_ratio` times faster than A."""
    return cfg.loraplus_lr_ratio if cfg.loraplus_lr_ratio and "lora_B" in param_name else 1.0
