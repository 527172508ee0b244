"""Data: sources (files, built-ins), validation, tokenization, length-grouped batching."""

from deltatune.data.build import DataBundle, Split, build, build_eval

__all__ = ["DataBundle", "Split", "build", "build_eval"]
