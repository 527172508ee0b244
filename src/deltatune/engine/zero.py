"""DeepSpeed ZeRO through DeepSpeed's own engine (`deepspeed.initialize`): stages 1, 2 and 3, optional CPU
offload, or a user's DeepSpeed JSON used as it is.

What DeepSpeed owns here, and what deltatune still does:
- the optimizer is ours (torch AdamW with the no-decay groups, engine/optim.py), wrapped by ZeRO, so that the
  maths is the one a single process runs; DeepSpeed partitions its state (stage >= 1), the gradients (>= 2)
  and the parameters (3), and steps it at the accumulation boundary;
- the schedule is ours: DeepSpeed never sees it, and `step` advances it once per optimizer step, applied or
  skipped, as a single process does;
- loss scaling (fp16) and gradient clipping are DeepSpeed's (`owns_loss_scaling`; `gradient_clipping`);
- checkpoints are DeepSpeed's own format (`engine.save_checkpoint`), one shard per rank, plus our schedule.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import warnings
from pathlib import Path

import torch

from deltatune.engine.strategy import Single
from deltatune.errors import ConfigError, DeltatuneError

TAG = "deepspeed"  # the folder of DeepSpeed's files inside one deltatune checkpoint
SHARDING = {1: "optimizer state", 2: "optimizer state, gradients", 3: "parameters, gradients, optimizer state"}
# Keys deltatune sets from its own config; a user JSON may hold them only with the same values.
BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")
REFUSED_SECTIONS = {"optimizer": "train.lr, train.weight_decay (AdamW)", "scheduler": "train.schedule, train.warmup"}


class DeepSpeedZero(Single):
    """ZeRO stage 1 (optimizer state sharded), 2 (and gradients) or 3 (and parameters) on DeepSpeed's engine.

    Per step the loop runs exactly train.grad_accum micro-batches on every rank; each `backward` is followed
    by `engine.step()`, which DeepSpeed turns into the optimizer step (reduce, clip, update) on the last one
    (its accumulation boundary) and into bookkeeping on the others.

    Non-finite steps: DeepSpeed decides before we can. With an fp32 model it skips the update when the global
    gradient norm is not finite (bf16 and fp16 too: `check_grad_overflow`, fp16's dynamic loss scaling), which
    is the guard's rule. `step` checks that both agreed: a step the guard skips but DeepSpeed applied (a
    non-finite loss under finite gradients, or a user JSON with the overflow check off) cannot be undone, so
    the run stops with that sentence rather than continue from weights a single process would not have.
    """

    name = "deepspeed"
    wrapper = "DeepSpeed engine"
    owns_loss_scaling = True

    def __init__(self, dist, cfg, prec) -> None:
        super().__init__(dist, cfg, prec)
        tc = cfg.train
        self.user_json = tc.deepspeed_config
        self.ds_config = user_config(cfg, prec, dist.world) if self.user_json else built_config(cfg, prec, dist.world)
        zero = self.ds_config.get("zero_optimization") or {}
        self.stage = int(zero.get("stage", 0))
        if self.stage not in SHARDING:
            raise ConfigError(f"train.deepspeed_config={self.user_json}: zero_optimization.stage is {self.stage}; "
                              f"deltatune runs ZeRO stages 1, 2 or 3. Fix: set the JSON's stage to 1, 2 or 3.")
        self.shards_parameters = self.stage == 3
        self.offload = offload_words(zero)
        self.engine = None  # deepspeed.DeepSpeedEngine, after wrap
        self.group_sizes: list[int] = []  # parameters per optimizer group, whole model (set by wrap)

    def describe(self) -> dict:
        return {**super().describe(), "wrapper": f"{self.wrapper} {ds_version()}", "zero_stage": self.stage,
                "sharding": SHARDING[self.stage], "offload": self.offload,
                "config": f"user JSON {self.user_json}" if self.user_json else "built"}

    def param_counts(self, optimizer) -> list[int]:
        return self.group_sizes

    def wrap(self, model, make_optimizer, make_scheduler):
        deepspeed = import_deepspeed(self.dist)
        optimizer = make_optimizer(model)
        # Whole-model sizes of the groups: after initialize they hold only this rank's flat partition.
        self.group_sizes = super().param_counts(optimizer)
        # Built on the client optimizer: ZeRO keeps its param_group dicts (and so the `lr` the schedule sets).
        scheduler = make_scheduler(optimizer)
        os.environ.setdefault("LOCAL_RANK", str(self.dist.local_rank))  # DeepSpeed asserts torchrun's variable
        if not self.user_json:
            self.ds_config["zero_optimization"].update(bucket_sizes(model))
        engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                          config=self.ds_config, dist_init_required=False)
        self.engine = engine
        return engine, ds_optimizer, scheduler

    def backward(self, loss: torch.Tensor, scaler) -> None:
        # The loss is already divided by the global count: DeepSpeed must not divide by grad_accum again.
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()  # the optimizer step at the accumulation boundary (the last micro-batch), else a count

    def clip(self, optimizer, max_norm, fold, rows) -> torch.Tensor:
        """DeepSpeed clipped already (gradient_clipping) inside its step: the global norm it measured."""
        if not self.engine.was_step_applied():
            return torch.tensor(float("inf"))  # DeepSpeed skipped: the gradients were not finite (or fp16 overflow)
        norm = self.engine.get_global_grad_norm()
        return torch.as_tensor(float("nan") if norm is None else norm, dtype=torch.float32).detach().cpu()

    def step(self, optimizer, scheduler, scaler, skip: bool) -> None:
        if skip and self.engine.was_step_applied():
            raise DeltatuneError(
                "DeepSpeed applied an optimizer step that deltatune's non-finite guard had to skip (the loss was "
                "not finite while DeepSpeed found the gradients finite, or the DeepSpeed JSON turns its overflow "
                "check off); the update cannot be undone. Fix: resume from the last checkpoint with a lower "
                "train.lr, or set bf16.check_grad_overflow=true in the DeepSpeed JSON.")
        scheduler.step()  # ours alone: DeepSpeed was given no scheduler

    def full_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """The whole model in fp32 on rank 0 (every rank calls it, in the same order: ZeRO-3 gathers collectively).

        Trainable parameters come from ZeRO's fp32 master copies (gathered from every rank's partition); frozen
        ones from the module (ZeRO-3 gathers them too). Stages 1/2 in fp32: every rank holds the whole model
        as it trains, saved as it is (None)."""
        if self.stage < 3 and self.prec.name == "fp32":
            return None
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        live = model.state_dict(keep_vars=True)
        frozen = [p for p in model.parameters() if not p.requires_grad]
        out: dict[str, torch.Tensor] = {}
        with deepspeed.zero.GatheredParameters(frozen, modifier_rank=None, enabled=self.stage == 3):
            for name, tensor in live.items():
                value = safe_get_full_fp32_param(tensor) if tensor.requires_grad else tensor.detach()
                if value is None:
                    raise RuntimeError(f"DeepSpeed holds no fp32 copy of trainable parameter {name}")
                if self.dist.is_main:
                    out[name] = value.detach().to("cpu", copy=True).contiguous()
        return out if self.dist.is_main else None

    # Checkpoints: DeepSpeed's own files (module, and every rank's optimizer partition) in <checkpoint>/deepspeed/.
    def save_state(self, tmp: Path, put, model, optimizer, scheduler, scaler) -> None:
        """Every rank writes its shard; rank 0 the schedule (ours, not DeepSpeed's)."""
        put(TAG, lambda path: self.engine.save_checkpoint(str(path.parent), tag=path.name, save_latest=False))
        if self.dist.is_main:
            put("scheduler.pt", lambda path: torch.save(scheduler.state_dict(), path))

    def load_weights(self, path: Path, model: torch.nn.Module) -> None:
        """The weights of checkpoint `path`, the fp32 master copies too (so that `full_state_dict` exports
        them): DeepSpeed restores both only with the optimizer partitions, which the resume then replaces by
        its own checkpoint's (`load_state` follows this on every use)."""
        self._load(path, optimizer=True)

    def load_state(self, path: Path, model, optimizer, scheduler, scaler) -> None:
        self._load(path, optimizer=True)
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))

    def _load(self, path: Path, optimizer: bool) -> None:
        if not (Path(path) / TAG).is_dir():
            raise ConfigError(f"--resume {path}: no DeepSpeed state ({TAG}/) in this checkpoint; it was not "
                              f"written by train.distributed=deepspeed. Fix: resume with the settings that wrote it.")
        loaded, _ = self.engine.load_checkpoint(str(path), tag=TAG, load_optimizer_states=optimizer,
                                                load_lr_scheduler_states=False)
        if loaded is None:
            raise ConfigError(f"--resume {path}: DeepSpeed could not read its checkpoint in {path / TAG}. Fix: "
                              f"resume from another checkpoint (--resume PATH), or start the run over.")


def ds_version() -> str:
    return importlib.metadata.version("deepspeed")


def import_deepspeed(dist):
    """DeepSpeed, set up for the device and process group deltatune already opened."""
    want = dist.device.type
    have = os.environ.get("DS_ACCELERATOR")
    if have and have != want:
        raise ConfigError(f"DS_ACCELERATOR={have} is set, but this run computes on {want}. Fix: unset DS_ACCELERATOR "
                          f"(deltatune picks the accelerator of the run's device).")
    os.environ["DS_ACCELERATOR"] = want  # not DeepSpeed's guess (it warns and probes every vendor)
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != want:  # imported earlier (accelerate imports it) and guessed otherwise
        raise ConfigError(f"DeepSpeed chose accelerator {get_accelerator().device_name()}, but this run computes on "
                          f"{want}. Fix: set DS_ACCELERATOR={want} before starting deltatune.")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its INFO lines would bury the run's own log
    # torch deprecates two collectives DeepSpeed 0.19 calls on every gather: noise in the run's log.
    warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
                            category=FutureWarning)
    comm = get_accelerator().communication_backend_name()
    if comm != dist.backend:
        raise ConfigError(f"DeepSpeed would send its collectives over {comm}, but this run's process group is "
                          f"{dist.backend} (oneccl_bindings_for_pytorch installed turns DeepSpeed's CPU backend "
                          f"into oneCCL). Fix: pip uninstall oneccl_bindings_for_pytorch, or use "
                          f"train.distributed=fsdp.")
    if want == "cpu":
        # DeepSpeed compiles a shared-memory all-reduce kernel (C++, ~3.5 minutes on this machine) when it
        # first opens its communication backend. Only DeepSpeed-inference's tensor parallelism calls it
        # (inference_all_reduce); ZeRO's collectives go through the torch.distributed group (gloo).
        with contextlib.suppress(AttributeError, TypeError):
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def built_config(cfg, prec, world: int) -> dict:
    """The DeepSpeed config of a run, from deltatune's keys."""
    tc = cfg.train
    if tc.offload == "all" and tc.zero_stage != 3:
        raise ConfigError(f"train.offload=all moves the parameters to CPU memory, which only ZeRO stage 3 "
                          f"partitions (train.zero_stage={tc.zero_stage}). Fix: set train.zero_stage=3, or "
                          f"train.offload=optimizer (optimizer state only).")
    zero: dict = {"stage": tc.zero_stage}
    if tc.offload in ("optimizer", "all"):
        zero["offload_optimizer"] = {"device": "cpu"}
    if tc.offload == "all":
        zero["offload_param"] = {"device": "cpu"}
    return {**batch_keys(tc, world), **precision_keys(prec), "gradient_clipping": float(tc.max_grad_norm or 0.0),
            "zero_optimization": zero, "steps_per_print": 2**62, "wall_clock_breakdown": False,
            # Our torch AdamW, not DeepSpeed's: the same maths as one process, and DeepSpeedCPUAdam would be a
            # C++ build on first use (offload otherwise insists on it).
            "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False}


def bucket_sizes(model: torch.nn.Module) -> dict:
    """Communication buckets sized to the model (the values transformers' DeepSpeed integration derives for
    "auto"). DeepSpeed's defaults are 5e8 elements: a ZeRO-3 gradient bucket of 2 GB in fp32, measured as 2.5 GB
    more per rank than DDP on SmolLM2-135M, whose whole model is 0.5 GB."""
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if not isinstance(hidden, int):
        return {}
    return {"reduce_bucket_size": hidden * hidden, "allgather_bucket_size": hidden * hidden,
            "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
            "stage3_param_persistence_threshold": 10 * hidden}


def batch_keys(tc, world: int) -> dict:
    return {"train_micro_batch_size_per_gpu": tc.batch_size, "gradient_accumulation_steps": tc.grad_accum,
            "train_batch_size": tc.batch_size * tc.grad_accum * world}


def precision_keys(prec) -> dict:
    """bf16/fp16: DeepSpeed's own mixed precision (half-precision model, fp32 master weights in the optimizer,
    fp32 gradient accumulation; fp16 with dynamic loss scaling). fp32: neither."""
    if prec.name == "fp32":
        return {}
    return {prec.name: {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}}


def user_config(cfg, prec, world: int) -> dict:
    """A user's DeepSpeed JSON as it is, once the keys deltatune also decides agree with its config."""
    path = Path(cfg.train.deepspeed_config)
    try:
        ds = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"train.deepspeed_config={path}: not a readable JSON file ({e}). Fix: point it at a "
                          f"DeepSpeed JSON config.") from None
    ours = {**batch_keys(cfg.train, world), "gradient_clipping": float(cfg.train.max_grad_norm or 0.0)}
    for key, value in ours.items():
        if key in ds and ds[key] != value and not (key == "gradient_clipping" and float(ds[key]) == value):
            raise ConfigError(f"train.deepspeed_config={path}: {key} is {ds[key]}, but deltatune's config gives "
                              f"{value} (train.batch_size={cfg.train.batch_size}, train.grad_accum="
                              f"{cfg.train.grad_accum}, {world} process(es), train.max_grad_norm="
                              f"{cfg.train.max_grad_norm}). Fix: make them agree, or remove {key} from the JSON.")
        ds.setdefault(key, value)
    for section, keys in REFUSED_SECTIONS.items():
        if section in ds:
            raise ConfigError(f"train.deepspeed_config={path}: its `{section}` section would replace deltatune's "
                              f"({keys}). Fix: remove it from the JSON and set those keys instead.")
    on = [name for name in ("bf16", "fp16") if (ds.get(name) or {}).get("enabled") in (True, "true")]
    if on != ([prec.name] if prec.name != "fp32" else []):
        raise ConfigError(f"train.deepspeed_config={path}: it enables {on or 'neither bf16 nor fp16'}, but the run's "
                          f"precision is {prec.name} (train.precision={cfg.train.precision}). Fix: make them agree.")
    tc, set_keys = cfg.train, cfg.train.model_fields_set
    stage = (ds.get("zero_optimization") or {}).get("stage", 0)
    if "zero_stage" in set_keys and stage != tc.zero_stage:
        raise ConfigError(f"train.zero_stage={tc.zero_stage}, but train.deepspeed_config={path} asks for ZeRO stage "
                          f"{stage}. Fix: make them agree, or remove train.zero_stage (the JSON decides).")
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("zero_force_ds_cpu_optimizer", False)
    return ds


def offload_words(zero: dict) -> str:
    where = {what: (zero.get(key) or {}).get("device", "none") for what, key in
             (("optimizer state", "offload_optimizer"), ("parameters", "offload_param"))}
    moved = [f"{what} to {device}" for what, device in where.items() if device not in (None, "none")]
    return ", ".join(moved) or "none"
