"""Models: the built-in catalogue and loading by built-in name, Hugging Face id or local directory."""

from deltatune.models.catalogue import BUILTIN_MODELS, resolve
from deltatune.models.loading import attention_for, load_classifier, load_model, load_tokenizer

__all__ = ["BUILTIN_MODELS", "resolve", "attention_for", "load_classifier", "load_model", "load_tokenizer"]
