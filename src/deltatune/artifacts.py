"""Is a run's saved model intact? Checked before loading, so that a missing, cut-short or corrupt file
(an interrupted copy, a full disk) is one sentence naming the file and the way back, instead of whatever
traceback transformers, peft or safetensors would give.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from deltatune.engine import checkpoints
from deltatune.errors import DeltatuneError


def check(run_dir: Path, artifact: Path) -> None:
    """Before loading: a saved model with a missing, cut-short or corrupt file is refused with a sentence
    naming the file, instead of whatever traceback the loader would give."""
    if found := _artifact_problem(artifact):
        raise DeltatuneError(_unloadable(run_dir, *found))


def _artifact_problem(artifact: Path) -> tuple[Path, str] | None:
    """The first file of a saved model (model/ or adapter/) that cannot load, and what is wrong with it:
    a copy that stopped early or a full disk leaves files missing or cut short, which the loaders
    report as unrelated-looking tracebacks."""
    config_file = artifact / ("adapter_config.json" if artifact.name == "adapter" else "config.json")
    if problem := _json_problem(config_file):
        return config_file, problem
    weights = [artifact / ("adapter_model.safetensors" if artifact.name == "adapter" else "model.safetensors")]
    index = artifact / "model.safetensors.index.json"
    if artifact.name == "model" and index.is_file():  # a large model saved in shards
        if problem := _json_problem(index):
            return index, problem
        shards = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values()
        weights = [artifact / name for name in sorted(set(shards))]
    for file in weights:
        if problem := _safetensors_problem(file):
            return file, problem
    return None


def _json_problem(file: Path) -> str | None:
    if not file.is_file():
        return "missing"
    try:
        data = json.loads(file.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        where = f" ({e.msg}, line {e.lineno})" if isinstance(e, json.JSONDecodeError) else ""
        return f"corrupt: not valid JSON{where}"
    return None if isinstance(data, dict) else "corrupt: not a JSON object"


def _safetensors_problem(file: Path) -> str | None:
    """Read the header (8-byte length, then JSON naming each tensor's byte range) and compare the file's
    length with where the last tensor ends: a file cut short fails here, before any weight is read."""
    if not file.is_file():
        return "missing"
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        if len(head) < 8 or n > size - 8:
            return f"truncated or corrupt: {size:,} bytes, header unreadable (too short for the header it declares)"
        try:
            header = json.loads(f.read(n))
            ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, TypeError, IndexError):
            return f"corrupt: {size:,} bytes, header unreadable (not a safetensors header)"
    expected = 8 + n + max(ends, default=0)
    if size != expected:
        return f"truncated or corrupt: {size:,} bytes, but its header describes {expected:,}"
    return None


def _unloadable(run: Path, file: Path, problem: str) -> str:
    """Which file, what is wrong with it, and the ways back to a run that loads."""
    fixes = ["copy the run directory again from where it was made",
             f"train it again (`deltatune train {run / 'config.yaml'} output.overwrite=true`)"]
    newest = checkpoints.latest(checkpoints.checkpoints_dir(run))
    if newest is not None and not (run / "summary.json").exists():  # unfinished: its checkpoints can finish it
        fixes.insert(0, f"`deltatune train {run / 'config.yaml'} --resume auto` continues from its newest "
                        f"checkpoint ({newest.name}) and saves the model again")
    return f"{file}: {problem}, so the run's trained model cannot be loaded. Fix: {'; or '.join(fixes)}."


@contextmanager
def reading(run: Path, artifact: Path) -> Iterator[None]:
    """Second line of defence behind `check`: what transformers, peft and safetensors raise
    for unreadable files in `artifact` becomes the same kind of sentence (only these error types)."""
    from huggingface_hub.errors import HFValidationError  # peft's error for a missing adapter file
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError, HFValidationError, json.JSONDecodeError) as e:
        cause = (str(e).strip().splitlines() or [""])[0]
        raise DeltatuneError(_unloadable(run, artifact, f"unreadable ({type(e).__name__}: {cause})")) from None
