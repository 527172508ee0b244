"""The other peft-backed methods: IA3, LayerNorm tuning, and the soft-prompt family.

Each is a config section mapped one to one onto peft's own config; peft does the work.
"""

from __future__ import annotations

import inspect
import types
from typing import Literal

import torch
from pydantic import Field

from deltatune.errors import ConfigError
from deltatune.methods.common import check_targets, fan_in_fan_out, norm_layers, peft_task_type, wrappable_names
from deltatune.sections import Section


class IA3Config(Section):
    name: Literal["ia3"] = "ia3"
    target_modules: list[str] | None = Field(None, description="default: peft's choice for the architecture")
    feedforward_modules: list[str] | None = None


class LNTuningConfig(Section):
    name: Literal["ln_tuning"] = "ln_tuning"
    target_modules: list[str] | None = Field(None, description="default: every normalization layer")


class PromptTuningConfig(Section):
    name: Literal["prompt_tuning"] = "prompt_tuning"
    num_virtual_tokens: int = Field(20, ge=1)
    init_text: str | None = Field(None, description="initialise the virtual tokens from this text's embeddings")


class PTuningConfig(Section):
    name: Literal["p_tuning"] = "p_tuning"
    num_virtual_tokens: int = Field(20, ge=1)
    encoder: Literal["MLP", "LSTM"] = "MLP"
    encoder_hidden_size: int = Field(128, ge=1)


class PrefixTuningConfig(Section):
    name: Literal["prefix_tuning"] = "prefix_tuning"
    num_virtual_tokens: int = Field(20, ge=1)
    projection: bool = Field(True, description="reparameterise prefixes through an MLP (P-tuning v2 style)")
    encoder_hidden_size: int = Field(128, ge=1)


def _wrap(model: torch.nn.Module, peft_cfg) -> torch.nn.Module:
    from peft import get_peft_model

    return get_peft_model(model, peft_cfg)


def apply_ia3(model, cfg: IA3Config, task: str):
    from peft import IA3Config as PeftIA3
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS

    # peft's per-architecture defaults, resolved here so that an unknown architecture gets a sentence,
    # and so that fan_in_fan_out can be set for Conv1D layers (GPT-2) instead of peft warning per layer.
    kind = getattr(model.config, "model_type", None)
    for key, value, defaults in (("target_modules", cfg.target_modules, TARGETS),
                                 ("feedforward_modules", cfg.feedforward_modules, FEEDFORWARD)):
        if value is None and kind not in defaults:
            raise ConfigError(
                f"method ia3: peft has no default method.{key} for model type `{kind}`; its layers: "
                f"{', '.join(wrappable_names(model))}. Fix: set method.target_modules (the layers whose outputs "
                f"are rescaled) and method.feedforward_modules (those of them in the feed-forward block, which "
                f"rescale their inputs instead; may be []).")
    targets = cfg.target_modules or TARGETS[kind]
    modules = [model.get_submodule(n) for n in check_targets(model, targets, "method.target_modules")]
    return _wrap(model, PeftIA3(task_type=peft_task_type(task), target_modules=targets,
                                feedforward_modules=cfg.feedforward_modules, fan_in_fan_out=fan_in_fan_out(modules)))


def apply_ln_tuning(model, cfg: LNTuningConfig, task: str):
    from peft import LNTuningConfig as PeftLN

    targets = cfg.target_modules or norm_layers(model)
    return _wrap(model, PeftLN(task_type=peft_task_type(task), target_modules=targets))


def apply_prompt_tuning(model, cfg: PromptTuningConfig, task: str):
    from peft import PromptTuningConfig as PeftPT
    from peft import PromptTuningInit

    kw = {}
    if cfg.init_text:
        kw = {"prompt_tuning_init": PromptTuningInit.TEXT, "prompt_tuning_init_text": cfg.init_text,
              "tokenizer_name_or_path": model.name_or_path}
    return _wrap(model, PeftPT(task_type=peft_task_type(task), num_virtual_tokens=cfg.num_virtual_tokens, **kw))


def apply_p_tuning(model, cfg: PTuningConfig, task: str):
    from peft import PromptEncoderConfig

    return _wrap(model, PromptEncoderConfig(task_type=peft_task_type(task), num_virtual_tokens=cfg.num_virtual_tokens,
                                            encoder_reparameterization_type=cfg.encoder,
                                            encoder_hidden_size=cfg.encoder_hidden_size))


def apply_prefix_tuning(model, cfg: PrefixTuningConfig, task: str):
    from peft import PrefixTuningConfig as PeftPrefix

    if task == "classification" and "cache" not in inspect.signature(model.forward).parameters:
        # Prefixes are extra key/value positions handed to every layer through the model's cache;
        # transformers-5 encoders (BERT family) take no cache at all.
        raise ConfigError(
            f"method prefix_tuning: `{model.config.model_type}` classifiers take no key/value cache in transformers 5, "
            "so there is nowhere to put the prefixes. Fix: use method.name=prompt_tuning or p_tuning for this "
            "model, or prefix tuning with a decoder (LLaMA, ...).")
    peft_model = _wrap(model, PeftPrefix(task_type=peft_task_type(task), num_virtual_tokens=cfg.num_virtual_tokens,
                                         prefix_projection=cfg.projection,
                                         encoder_hidden_size=cfg.encoder_hidden_size))
    return prefix_through_cache(peft_model) if task == "classification" else peft_model


def prefix_through_cache(peft_model):
    """Let peft's prefix tuning drive a transformers-5 decoder *classifier*.

    peft 0.21 passes prefixes as `past_key_values` and refuses models whose forward lacks that
    argument; transformers-5 sequence classifiers call it `cache`. peft has already extended the
    attention mask by the prefix length when it calls `_prefix_tuning_forward`, so the only change
    is the argument's name. (Plain peft cannot run these adapters until it learns the new name.)
    """
    from peft.utils.other import _get_batch_size

    def forward(self, input_ids=None, inputs_embeds=None, **kwargs):
        kwargs.pop("past_key_values", None)
        prompt = self.get_prompt(_get_batch_size(input_ids, inputs_embeds))
        return self.base_model(input_ids=input_ids, inputs_embeds=inputs_embeds, cache=prompt, **kwargs)

    peft_model._prefix_tuning_forward = types.MethodType(forward, peft_model)
    return peft_model
