"""Models: the built-in catalogue and loading by built-in name, Hugging Face id or local directory."""

from deltatune.models.catalogue import BUILTIN_MODELS, resolve
from deltatune.models.loading import load_classifier, load_tokenizer

__all__ = ["BUILTIN_MODELS", "resolve", "load_classifier", "load_tokenizer"]
