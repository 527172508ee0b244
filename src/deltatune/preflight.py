"""Combinations that cannot work, refused before any weight is loaded, each with the reason and the fix.

`run` is what `api.train` asks first. Every check reads only the config (and, where needed, the device,
whether an optional package is installed, or what output.dir holds); none loads a model.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from deltatune import methods
from deltatune.engine import precision
from deltatune.errors import ConfigError, DeltatuneError
from deltatune.evaluation.metrics import TASK_METRICS

SOFT_PROMPTS = ("prompt_tuning", "p_tuning", "prefix_tuning")


def run(cfg, resuming: bool = False) -> None:
    """All the checks, in order; `resuming`: continuing a checkpoint of output.dir, which may be finished."""
    # The precision is resolved for the device a run here gets by default (as api does): fp16 needs CUDA.
    precision.resolve(cfg.train.precision, precision.default_device())
    _metric_and_method(cfg)
    _qlora(cfg)
    _evaluation(cfg)
    _packing(cfg)
    _remote_code(cfg)
    _distributed(cfg)
    _optimizer(cfg, precision.default_device().type)
    _compile(cfg)
    _finished_run(cfg, resuming)


def _metric_and_method(cfg) -> None:
    if cfg.metric not in TASK_METRICS[cfg.task]:
        raise ConfigError(f"eval.metric={cfg.metric} does not exist for task `{cfg.task}`. "
                          f"Fix: use one of {', '.join(TASK_METRICS[cfg.task])}.")
    method = methods.REGISTRY[cfg.method.name]
    if cfg.task not in method.tasks:
        raise ConfigError(f"method.name={cfg.method.name} does not support task `{cfg.task}`: {method.why_not_task} "
                          f"Fix: use one of the methods listed by `deltatune methods` for {cfg.task}.")


def _distributed(cfg) -> None:
    """Options of one engine asked of another, and a missing engine: refused, never ignored."""
    tc = cfg.train
    mode = tc.distributed
    if tc.offload != "none" and mode not in ("fsdp", "deepspeed"):
        raise ConfigError(f"train.offload={tc.offload} needs a sharding engine: train.distributed={mode} keeps every "
                          f"state on the device. Fix: set train.distributed=fsdp or deepspeed, or train.offload=none.")
    if tc.deepspeed_config and mode != "deepspeed":
        raise ConfigError(f"train.deepspeed_config={tc.deepspeed_config} is read only by DeepSpeed, but "
                          f"train.distributed={mode}. Fix: set train.distributed=deepspeed, or remove the key.")
    if tc.deepspeed_config and not Path(tc.deepspeed_config).is_file():
        raise ConfigError(f"train.deepspeed_config: {tc.deepspeed_config} does not exist. Fix: give the path of a "
                          f"DeepSpeed JSON file.")
    if mode == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("train.distributed=deepspeed: the deepspeed package is not installed. Fix: `pip install "
                          "deepspeed` (make setup installs it), or use train.distributed=fsdp, which needs only torch.")
    if mode == "deepspeed" and not tc.deepspeed_config and tc.offload == "all" and tc.zero_stage != 3:
        raise ConfigError(f"train.offload=all moves the parameters to CPU memory, which only ZeRO stage 3 "
                          f"partitions (train.zero_stage={tc.zero_stage}). Fix: set train.zero_stage=3, or "
                          f"train.offload=optimizer (optimizer state only).")
    if mode == "deepspeed" and cfg.method.name == "qlora":
        raise ConfigError("method.name=qlora with train.distributed=deepspeed: ZeRO flattens and partitions the "
                          "parameters, which a 4-/8-bit base's packed weights do not survive. Fix: use "
                          "train.distributed=ddp for QLoRA, or method.name=lora on the 16/32-bit base.")
    if mode == "deepspeed" and tc.zero_stage == 3 and not tc.deepspeed_config:
        _zero3_method(cfg)
    if mode in ("fsdp", "deepspeed") and tc.compile:
        raise ConfigError(f"train.compile=true is not supported with train.distributed={mode} here (the sharded "
                          f"module's hooks break the compiled graph). Fix: set train.compile=false.")


def _optimizer(cfg, device: str) -> None:
    """train.optimizer: bitsandbytes' 8-bit optimizers need the package (and paging needs CUDA); only AdamW runs
    under the sharding engines."""
    tc = cfg.train
    name, mode = tc.optimizer, tc.distributed
    if name in ("adamw_8bit", "paged_adamw_8bit") and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"train.optimizer={name} needs bitsandbytes. Fix: pip install "
                          f"'deltatune[qlora]' (bitsandbytes 0.50+ runs its 8-bit optimizers on CPU too), or set "
                          f"train.optimizer=adamw.")
    if name == "paged_adamw_8bit" and device != "cuda":
        raise ConfigError(f"train.optimizer=paged_adamw_8bit pages optimizer state through CUDA unified memory, but "
                          f"this run computes on {device} (bitsandbytes would silently fall back to unpaged). Fix: "
                          f"train.optimizer=adamw_8bit (the same 8-bit states, without paging).")
    if name != "adamw" and mode in ("fsdp", "deepspeed"):
        why = {"fsdp": "FSDP2 hands it sharded DTensor parameters, which bitsandbytes' kernels do not take and "
                       "on which Adafactor would factor each shard rather than each matrix",
               "deepspeed": "ZeRO flattens the parameters it partitions into one vector, which undoes Adafactor's "
                            "per-matrix factoring, and 8-bit AdamW has not been validated under ZeRO here"}[mode]
        offload = " DeepSpeed can instead keep AdamW's state in CPU memory: train.offload=optimizer." \
            if mode == "deepspeed" else ""
        raise ConfigError(f"train.optimizer={name} with train.distributed={mode}: {why}. Fix: "
                          f"train.optimizer=adamw, or train.distributed=ddp.{offload}")


def _compile(cfg) -> None:
    """torch.compile on CPU builds C++ kernels (inductor): a compiler must be on PATH. A cache without compiling
    would be ignored: said, not ignored."""
    if cfg.train.compile_cache and not cfg.train.compile:
        raise ConfigError(f"train.compile_cache={cfg.train.compile_cache} is only used by torch.compile, but "
                          f"train.compile=false. Fix: set train.compile=true, or remove train.compile_cache.")
    if not cfg.train.compile or precision.default_device().type != "cpu":
        return
    import os
    import shutil

    wanted = os.environ.get("CXX", "g++")  # the one compiler inductor tries (torch._inductor.config.cpp.cxx)
    if shutil.which(wanted) is None:
        raise ConfigError(f"train.compile=true on CPU builds C++ kernels (torch inductor) with {wanted} "
                          f"({'$CXX' if 'CXX' in os.environ else 'inductor uses g++ unless CXX is set'}), which is "
                          f"not on PATH. Fix: install it (e.g. apt-get install g++) or point CXX at a C++ "
                          f"compiler, or set train.compile=false.")


def _zero3_method(cfg) -> None:
    """Methods that read weights outside the forward pass of the module holding them, where ZeRO-3 keeps only
    this rank's partition (measured on 2 processes against one)."""
    name = cfg.method.name
    if name in SOFT_PROMPTS:
        raise ConfigError(f"method.name={name} with ZeRO stage 3: the soft prompt is read outside the model's "
                          f"forward pass, where ZeRO-3 holds only a partition of it (measured: the ranks hang). "
                          f"Fix: train.zero_stage=2, or train.distributed=fsdp (which keeps the prompt whole).")


def _finished_run(cfg, resuming: bool) -> None:
    out = Path(cfg.output.dir)
    if (out / "summary.json").exists() and not cfg.output.overwrite and not resuming:
        raise ConfigError(f"output.dir: {out} already holds a finished run. Fix: choose another output.dir "
                          f"or set output.overwrite=true.")


def _packing(cfg) -> None:
    if not cfg.data.packing:
        return
    if not cfg.lm:
        raise ConfigError("data.packing=true does not apply to task classification: each text gets its own label "
                          "from its own sequence. Fix: remove data.packing (dynamic padding and length grouping "
                          "already keep padding low), or use task causal_lm / sft.")
    if cfg.task == "preference":
        raise ConfigError("data.packing=true does not apply to task preference: each pair is scored as two whole "
                          "sequences (prompt + chosen, prompt + rejected) whose log-probabilities are compared. "
                          "Fix: set data.packing=false (length grouping keeps padding low).")
    if cfg.method.name in SOFT_PROMPTS:
        raise ConfigError(f"data.packing=true cannot be combined with method.name={cfg.method.name}: soft prompts "
                          f"are added once per sequence, so packed examples would share one prompt and the "
                          f"position ids would no longer line up. Fix: set data.packing=false, or use lora.")


def _qlora(cfg) -> None:
    m = cfg.method
    if m.name != "qlora":
        return
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("method.name=qlora needs bitsandbytes for its 4-/8-bit base. Fix: pip install "
                          "'deltatune[qlora]' (bitsandbytes 0.50+ also runs on CPU), or use method.name=lora.")
    if m.init == "pissa":
        raise ConfigError("method.name=qlora with method.init=pissa: PiSSA initialises LoRA from the singular "
                          "vectors of the full-precision weights, which a quantized base no longer has (peft refuses "
                          "it). Fix: method.init=default or gaussian, or method.name=lora with init=pissa.")


def _evaluation(cfg) -> None:
    if cfg.data.validation is None and cfg.eval.patience:
        raise ConfigError(f"eval.patience={cfg.eval.patience} needs validation data to watch, but "
                          f"data.validation is null. Fix: set data.validation (a file or a fraction such as 0.1), "
                          f"or remove eval.patience.")


def _remote_code(cfg) -> None:
    """A local model that needs its own Python code (an `auto_map` and an architecture transformers does not
    know) runs it only with model.trust_remote_code=true. With a known architecture transformers ignores that
    code and uses its own, which is said too."""
    if cfg.model.trust_remote_code:
        return
    from deltatune.models.catalogue import resolve

    # An unknown name fails here, at once and before any data work, with the nearest built-in name.
    f = Path(resolve(cfg.model.name, cfg.model.revision)) / "config.json"
    meta = json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}
    if "auto_map" not in meta:
        return
    from transformers import CONFIG_MAPPING

    kind = meta.get("model_type")
    if kind in CONFIG_MAPPING:
        from deltatune.engine.report import console

        console.print(f"note: {f.parent} ships its own code (`auto_map`); model.trust_remote_code is off, so "
                      f"transformers' own `{kind}` implementation is used instead.", highlight=False, soft_wrap=True)
        return
    raise ConfigError(f"model.name: {f.parent} needs its own Python code (model_type `{kind}` is not one "
                      f"transformers knows; config.json has an `auto_map`), which deltatune runs only with "
                      f"model.trust_remote_code=true. Fix: use a model transformers supports natively, or set "
                      f"model.trust_remote_code=true if you trust its source.")


def merge(run_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> None:
    """Before `deltatune merge` loads anything: the run must hold a mergeable adapter, and the output must be
    a place where writing destroys nothing but a previous merge."""
    from deltatune import config as config_mod

    path = Path(run_dir)
    if not (path / "config.yaml").is_file():
        raise DeltatuneError(f"{path}: not a finished deltatune run (missing config.yaml). "
                             f"Fix: pass the output.dir of a run that completed `deltatune train`.")
    merge_target(path, out_dir, overwrite)
    cfg = config_mod.load(path / "config.yaml")
    method = methods.REGISTRY[cfg.method.name]
    if method.saves != "adapter":
        raise DeltatuneError(f"{run_dir}: method `{method.name}` already produced a full model in "
                             f"{path / 'model'}; there is nothing to merge. Use that directory as it is.")
    if not method.mergeable:
        raise DeltatuneError(f"{run_dir}: method `{method.name}` cannot be merged: {method.why_not_mergeable}. "
                             f"Serve it with its base model (deltatune predict), or train LoRA/IA3 to merge.")


def merge_target(run_dir: str | Path, out_dir: str | Path, overwrite: bool) -> None:
    """The merge replaces OUT as a whole. Refused: an OUT that contains the run or lies inside it (even with
    --overwrite; paths compared after resolving symlinks), a file, and an existing non-empty OUT unless
    --overwrite is given and OUT holds a previous merge (its merge_report.json)."""
    from deltatune.engine import runlock

    run, out = Path(run_dir).resolve(), Path(out_dir).resolve()
    if out == run or out in run.parents:
        raise DeltatuneError(f"merge: the output {out_dir} contains the run {run_dir} (and perhaps other files); "
                             f"writing the merge there would replace all of it. Fix: name a new directory, "
                             f"e.g. {Path(out_dir) / 'merged'}.")
    if run in out.parents:
        raise DeltatuneError(f"merge: the output {out_dir} is inside the run directory {run_dir}, which later "
                             f"commands would misread. Fix: write the merged model somewhere else.")
    if out.exists() and not out.is_dir():
        raise DeltatuneError(f"merge: the output {out_dir} is a file. Fix: name a new directory.")
    held = [p.name for p in out.iterdir() if p.name != runlock.LOCK] if out.is_dir() else []
    if not held:
        return
    shown = ", ".join(sorted(held)[:5]) + (f" and {len(held) - 5} more" if len(held) > 5 else "")
    if not overwrite:
        raise DeltatuneError(f"merge: the output {out_dir} exists and is not empty ({shown}). Fix: name a new "
                             f"directory, or pass --overwrite to replace a previous merge there.")
    if not (out / "merge_report.json").is_file():
        raise DeltatuneError(f"merge: the output {out_dir} is not a previous merge (no merge_report.json; it holds "
                             f"{shown}); --overwrite only replaces what `deltatune merge` wrote. Fix: name a new "
                             f"directory.")
