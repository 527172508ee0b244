"""Where deltatune keeps what it extracts or converts once: `$DELTATUNE_CACHE`, default ~/.cache/deltatune."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root(kind: str) -> Path:
    """`kind` is a subfolder: `datasets` (built-in data as JSONL) or `models` (converted built-in models)."""
    path = Path(os.environ.get("DELTATUNE_CACHE", Path.home() / ".cache" / "deltatune")) / kind
    path.mkdir(parents=True, exist_ok=True)
    return path
