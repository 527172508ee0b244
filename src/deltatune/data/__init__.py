"""Data: sources (files, built-ins), validation, tokenization, length-grouped batching."""

from deltatune.data.build import DataBundle, Split, build

__all__ = ["DataBundle", "Split", "build"]
