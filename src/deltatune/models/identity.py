"""Which model a name stands for: its local directory, and a fingerprint of its files.

Training records the fingerprint of the base in summary.json (`base`); `deltatune serve` compares it with its own
base's before an adapter loads (serve/registry.py), so an adapter is never served over a model it was not trained
on, even when that model's name means something else on the serving machine, or is absent there.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from deltatune.errors import DeltatuneError
from deltatune.models.catalogue import resolve

SAMPLE_BYTES = 1 << 20  # of each weights file, hashed into the fingerprint (whole files would take minutes)


def model_dir(name: str, revision: str | None = None) -> Path:
    """The local directory holding `name`'s config.json (built-in name, local directory or cached hub id)."""
    source = resolve(name, revision)
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(source, "config.json", revision=revision)
    if not isinstance(cached, str):
        raise DeltatuneError(f"model `{name}`: config.json is not in the local Hugging Face cache")
    return Path(cached).parent


def fingerprint(directory: Path) -> str:
    """A model's identity: its config.json (as data, without transformers' bookkeeping keys) and, for each
    safetensors file, its size and the hash of its first MiB (the header and the first tensors). Two copies
    of one model agree; two models with the same architecture but other weights do not."""
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    for key in ("_name_or_path", "transformers_version"):
        config.pop(key, None)
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for f in sorted(directory.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}:".encode())
        with open(f, "rb") as fh:
            h.update(hashlib.sha256(fh.read(SAMPLE_BYTES)).digest())
    return h.hexdigest()[:16]


def identity(name: str, revision: str | None = None) -> dict:
    """What summary.json records about the base a run trained on."""
    return {"name": name, "revision": revision, "fingerprint": fingerprint(model_dir(name, revision))}
