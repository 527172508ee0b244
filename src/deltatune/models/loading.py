"""Load tokenizers and task models with transformers' Auto classes."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from deltatune.errors import ConfigError
from deltatune.models.catalogue import resolve


def load_tokenizer(name: str, revision: str | None = None, trust_remote_code: bool = False
                   ) -> PreTrainedTokenizerBase:
    source = resolve(name, revision)
    try:
        tok = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise ConfigError(_not_found(name, e)) from None
    except ValueError as e:
        raise _remote_code(name, e) from None
    if tok.pad_token is None:
        # Decoder tokenizers (GPT-2, LLaMA) ship without a pad token; padding is masked out anyway.
        tok.pad_token = tok.eos_token
    return tok


def attention_for(requested: str, device: torch.device) -> str:
    """`auto`: on CPU, PyTorch's SDPA backward (flash-attention for CPU) took ~10 ms per layer per
    step for MiniLM at batch 16, making whole steps 20-30% slower than eager attention; on GPUs
    SDPA is the fast path."""
    if requested != "auto":
        return requested
    return "eager" if device.type == "cpu" else "sdpa"


def load_classifier(name: str, labels: list[str], tokenizer: PreTrainedTokenizerBase,
                    revision: str | None = None, trust_remote_code: bool = False, attention: str = "sdpa",
                    **extra) -> torch.nn.Module:
    """A sequence classifier whose head knows the label names and ids."""
    source = resolve(name, revision)
    id2label = dict(enumerate(labels))
    # transformers reports the new head as MISSING weights; the head is new by design, and deltatune
    # says so itself, so only errors get through while loading.
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=len(labels), id2label=id2label, label2id={v: k for k, v in id2label.items()},
            revision=revision, trust_remote_code=trust_remote_code, dtype=torch.float32,
            attn_implementation=attention, **extra,
        )
    except OSError as e:
        raise ConfigError(_not_found(name, e)) from None
    except ValueError as e:
        raise _remote_code(name, e) from None
    finally:
        hf_logging.set_verbosity(previous)
    if model.config.pad_token_id is None:
        # Decoder classifiers pick the last non-pad token, so they must know the pad id.
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def load_model(task: str, name: str, labels: list[str], tokenizer: PreTrainedTokenizerBase,
               revision: str | None = None, trust_remote_code: bool = False, attention: str = "sdpa",
               **extra) -> torch.nn.Module:
    """The task's model: a classifier with a labelled head, or a causal language model.

    `extra` goes to from_pretrained (e.g. a 4-bit quantization_config for QLoRA).
    """
    if task == "classification":
        return load_classifier(name, labels, tokenizer, revision, trust_remote_code, attention, **extra)
    try:
        model = AutoModelForCausalLM.from_pretrained(resolve(name, revision), revision=revision, dtype=torch.float32,
                                                     trust_remote_code=trust_remote_code,
                                                     attn_implementation=attention, **extra)
    except OSError as e:
        raise ConfigError(_not_found(name, e)) from None
    except ValueError as e:
        raise _remote_code(name, e) from None
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def _remote_code(name: str, err: ValueError) -> Exception:
    """transformers refuses to run a checkpoint's own code unless trust_remote_code is on: say so plainly."""
    if "custom code" not in str(err) and "trust_remote_code" not in str(err):
        return err
    return ConfigError(f"model.name: `{name}` needs its own Python code to load, which deltatune runs only with "
                       f"model.trust_remote_code=true. Fix: use a model transformers supports natively, or set "
                       f"model.trust_remote_code=true if you trust its source.")


def _not_found(name: str, err: Exception) -> str:
    from deltatune.models.catalogue import BUILTIN_MODELS

    return (f"model.name: cannot load `{name}`: {err}\n"
            f"  Use a built-in name ({', '.join(BUILTIN_MODELS)}), a local directory, or a Hugging Face id "
            f"that is already in your local cache (this machine may have no hub access).")
