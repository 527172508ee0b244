"""Saving the model a run keeps, atomically: a reader sees the old complete copy or the new one."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from deltatune.engine import disk, runlock
from deltatune.engine.killpoints import kill_point

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


def save(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, run_dir: Path,
         state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """state_dict: the whole model's tensors when `model` holds only this rank's shard (FSDP, ZeRO-3)."""
    target = artifact_dir(run_dir, model)
    save_model(model, tokenizer, target, what=f"the best {target.name} of the run", state_dict=state_dict)
    runlock.artifact_saved(run_dir)  # a run this one replaces (output.overwrite) can go now
    return target


def save_model(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, target: Path,
               extra: dict[str, str] | None = None, what: str = "the model",
               state_dict: dict[str, torch.Tensor] | None = None) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        # peft keeps only the adapter's entries of a whole state dict (and would save an empty adapter from
        # ZeRO-3's placeholder parameters without it: TRL #4416, PEFT #2892).
        kwargs = {"state_dict": state_dict} if state_dict is not None else {}
        with _deepspeed_not_probed():
            model.save_pretrained(tmp, safe_serialization=True, **kwargs)
        tokenizer.save_pretrained(tmp)
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        for f in tmp.iterdir():  # data on disk before the rename makes it visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    except Exception as e:  # a full disk or a read-only directory gets a sentence; anything else stays a bug
        shutil.rmtree(tmp, ignore_errors=True)  # the previous complete copy is untouched
        failure = disk.write_failure(e, target, what)
        if failure is None:
            raise
        raise failure from None
    old = target.with_name(f".{target.name}.old")
    if (target / runlock.LOCK).exists():  # a locked merge output: the held lock file moves into the new copy
        os.replace(target / runlock.LOCK, tmp / runlock.LOCK)
    if target.exists():
        os.replace(target, old)
    kill_point("artifact")  # tests: killed between the two renames; `recover` puts the old copy back
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _deepspeed_not_probed() -> Iterator[None]:
    """transformers' save_pretrained unwraps the model with accelerate, which imports deepspeed whenever it
    is installed, only to ask whether the model is a DeepSpeedEngine: 0.7-1 s (and deepspeed's accelerator
    probe) added to every run's save. No object can be one before deepspeed is imported, so until then
    accelerate is told, for this call only, that deepspeed is absent. Runs under DeepSpeed import it first."""
    other = sys.modules.get("accelerate.utils.other")
    if "deepspeed" in sys.modules or other is None or not hasattr(other, "is_deepspeed_available"):
        yield  # deepspeed is loaded (the answer matters), or accelerate is not (nothing would ask)
        return
    probe = other.is_deepspeed_available
    other.is_deepspeed_available = lambda: False
    try:
        yield
    finally:
        other.is_deepspeed_available = probe


def recover(run_dir: Path) -> None:
    """Undo what a kill inside `save_model` left: the complete old copy comes back, a partial new one goes.
    (A kill inside a replacement of the whole run, output.overwrite, is `runlock.settle`'s.)"""
    for name in ("model", "adapter"):
        recover_target(run_dir / name)


def recover_target(target: Path) -> None:
    """One `save_model` target: a complete old copy left aside comes back; a partial new one goes."""
    old, tmp = target.with_name(f".{target.name}.old"), target.with_name(f".{target.name}.tmp")
    if old.exists():
        if target.exists() and any(p.name != runlock.LOCK for p in target.iterdir()):
            shutil.rmtree(old, ignore_errors=True)
        else:
            if target.exists():  # only the lock of the command now writing it: keep it
                os.replace(target / runlock.LOCK, old / runlock.LOCK)
                target.rmdir()
            os.replace(old, target)
    shutil.rmtree(tmp, ignore_errors=True)
