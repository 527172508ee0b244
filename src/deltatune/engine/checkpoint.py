"""Saving the model a run keeps, atomically: a reader sees the old complete copy or the new one."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from deltatune.engine.faults import kill_point

# transformers draws a progress bar per save; with a save per improved eval that is noise.
hf_logging.disable_progress_bar()


def artifact_dir(run_dir: Path, model: torch.nn.Module) -> Path:
    """peft models save an adapter (peft's format); everything else a full transformers model."""
    from deltatune.methods.adapter import BottleneckAdapterModel

    # A model can only be a PeftModel if peft was imported; importing it just to ask costs ~1.3 s,
    # which a full fine-tune used to pay inside its timed training.
    peft = sys.modules.get("peft")
    adapter_types = (BottleneckAdapterModel, peft.PeftModel) if peft is not None else (BottleneckAdapterModel,)
    return run_dir / ("adapter" if isinstance(model, adapter_types) else "model")


def save(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, run_dir: Path) -> Path:
    target = artifact_dir(run_dir, model)
    save_model(model, tokenizer, target)
    return target


def save_model(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, target: Path,
               extra: dict[str, str] | None = None) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    for name, text in (extra or {}).items():
        (tmp / name).write_text(text, encoding="utf-8")
    for f in tmp.iterdir():  # data on disk before the rename makes it visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    old = target.with_name(f".{target.name}.old")
    if target.exists():
        os.replace(target, old)
    kill_point("artifact")  # tests: killed between the two renames; `recover` puts the old copy back
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def recover(run_dir: Path) -> None:
    """Undo what a kill inside `save_model` left: the complete old copy comes back, a partial new one goes."""
    for name in ("model", "adapter"):
        target, old, tmp = run_dir / name, run_dir / f".{name}.old", run_dir / f".{name}.tmp"
        if old.exists():
            if target.exists():
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(old, target)
        shutil.rmtree(tmp, ignore_errors=True)
