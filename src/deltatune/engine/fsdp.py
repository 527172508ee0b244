"""FSDP2: parameters, gradients and optimizer state sharded over the processes, one group per transformer block.

`torch.distributed.fsdp.fully_shard` is applied to every transformer block (the model's list of layers,
found as the PEFT methods find it: `methods.common.layer_stack`), then to the whole model (the root: the
embeddings, the final norm, the head, and a PEFT wrapper's own parameters). Each rank keeps 1/world of every
tensor, frozen base weights included; a block's parameters are all-gathered just before its forward (and
again before its backward) and freed after; its gradients are reduce-scattered (averaged) after its backward.
The optimizer is built on the sharded parameters (DTensors), so its state is sharded too.

- Precision: bf16 runs with a MixedPrecisionPolicy (bf16 compute and all-gathers, fp32 gradient reduction,
  fp32 sharded master weights for the optimizer); fp32 needs no policy. fp16 is refused (its loss scaler
  does not unscale sharded gradients).
- `train.offload=all`: CPUOffloadPolicy keeps the sharded parameters, their gradients and the optimizer state
  in CPU memory (the optimizer steps on the CPU). FSDP2 cannot offload the optimizer state alone.
- Gradient accumulation reduce-scatters after every micro-batch, so gradients stay sharded (the memory
  FSDP is for) rather than whole until the last one.
- Checkpoints: torch.distributed.checkpoint (each rank writes its own shards of the weights that train and of
  the optimizer state into `dcp/`; it reads back at the same world size); the exported model is gathered
  whole on rank 0 (`full_state_dict`), in the formats a single process writes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from deltatune.engine.killpoints import kill_point
from deltatune.engine.strategy import MakeOptimizer, MakeScheduler, Put, Single
from deltatune.errors import ConfigError

DCP_DIR = "dcp"  # the sharded part of a checkpoint: one file per rank plus torch.distributed.checkpoint's metadata


class FSDP(Single):
    name = "fsdp"
    wrapper = "FSDP2 fully_shard"
    shards_parameters = True

    def __init__(self, dist, cfg, prec) -> None:
        super().__init__(dist, cfg, prec)
        refuse_settings(cfg.train, prec, dist.device)
        self.blocks = 0
        self.replicated: list[torch.nn.Parameter] = []  # left whole on every rank (soft prompts); see clip

    def describe(self) -> dict:
        offload = self.cfg.train.offload == "all"
        return {**super().describe(),
                "sharding": f"parameters, gradients and optimizer state per block ({self.blocks} blocks + root)",
                "offload": "parameters, gradients and optimizer state to CPU" if offload else "none",
                "mixed_precision": "bf16 compute and all-gather, fp32 reduction and master weights"
                if self.prec.name == "bf16" else "none (fp32)"}

    def wrap(self, model: torch.nn.Module, make_optimizer: MakeOptimizer, make_scheduler: MakeScheduler
             ) -> tuple[torch.nn.Module, torch.optim.Optimizer, object]:
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        refuse_model(model)
        kwargs = {"mp_policy": self.policy()}
        if self.cfg.train.offload == "all":
            from torch.distributed.fsdp import CPUOffloadPolicy

            kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=self.dist.device.type == "cuda")
        blocks = transformer_blocks(model)
        for block in blocks:
            fully_shard(block, **kwargs)
        self.replicated = prompt_parameters(model)
        fully_shard(model, ignored_params=set(self.replicated) or None, **kwargs)
        # generate() is not forward(): without this the root's parameters (embeddings, head) stay sharded in it.
        if hasattr(model, "generate"):
            register_fsdp_forward_method(model, "generate")
        self.blocks = len(blocks)
        optimizer = make_optimizer(model)  # on the sharded parameters: its state is sharded too
        return model, optimizer, make_scheduler(optimizer)

    def policy(self):
        from torch.distributed.fsdp import MixedPrecisionPolicy

        if self.prec.name == "bf16":
            return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        return MixedPrecisionPolicy()

    def clip(self, optimizer: torch.optim.Optimizer, max_norm: float | None, fold: bool, rows) -> torch.Tensor:
        """The norm over every rank's gradient shards, as a plain tensor (the same on every rank).

        First the gradients FSDP does not reduce (the replicated soft prompts) are averaged over the ranks here,
        once per step, as FSDP averages the sharded ones."""
        from torch.distributed.tensor import DTensor

        for p in self.replicated:
            if p.grad is not None:  # a sum, then the mean (gloo has no AVG)
                torch.distributed.all_reduce(p.grad)
                p.grad.div_(self.dist.world)
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        if max_norm:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return norm

    def full_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """Every rank takes part in the gathers; rank 0 gets the whole model on the CPU (others an empty dict)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        whole = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return whole if self.dist.is_main else None

    # Checkpoints: the shards of the weights that train and of the optimizer state, from every rank.
    def save_state(self, tmp: Path, put: Put, model: torch.nn.Module, optimizer, scheduler, scaler) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        weights, optim = get_state_dict(model, optimizer, options=_options())
        put(DCP_DIR, lambda path: dcp.save({"model": weights, "optimizer": optim}, checkpoint_id=path))
        kill_point("checkpoint")  # tests: a process killed while writing a checkpoint
        if self.dist.is_main:
            put("scheduler.pt", lambda path: torch.save(scheduler.state_dict(), path))
            if scaler is not None:
                put("scaler.pt", lambda path: torch.save(scaler.state_dict(), path))

    def load_weights(self, path: Path, model: torch.nn.Module) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

        weights = get_model_state_dict(model, options=_options())
        dcp.load({"model": weights}, checkpoint_id=_sharded(path))
        _check_loaded(model, set_model_state_dict(model, weights, options=_options()), path)

    def load_state(self, path: Path, model: torch.nn.Module, optimizer, scheduler, scaler) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        weights, optim = get_state_dict(model, optimizer, options=_options())
        dcp.load({"model": weights, "optimizer": optim}, checkpoint_id=_sharded(path))
        loaded = set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=optim,
                                options=_options())
        _check_loaded(model, loaded, path)
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        if scaler is not None:
            scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Frozen base weights come from the pretrained model again on resume; strict=False because they are absent
    # (what did load is checked by _check_loaded).
    return StateDictOptions(ignore_frozen_params=True, strict=False)


def _sharded(path: Path) -> Path:
    sharded = Path(path) / DCP_DIR
    if not (sharded / ".metadata").is_file():
        raise ConfigError(f"--resume {path}: no FSDP shards ({DCP_DIR}/.metadata) in this checkpoint. Fix: resume "
                          f"it with the train.distributed it was written with (its trainer_state.json says which).")
    return sharded


def _check_loaded(model: torch.nn.Module, keys, path: Path) -> None:
    """Every weight that trains came from the checkpoint (strict loading, less the frozen weights)."""
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    missing = [k for k in keys.missing_keys if k not in frozen]
    if missing or keys.unexpected_keys:
        raise ConfigError(f"--resume {path}: the checkpoint's weights do not fit this model (missing "
                          f"{missing[:5]}, unexpected {list(keys.unexpected_keys)[:5]}). Fix: resume with the "
                          f"model and method the checkpoint was written with.")


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks, each its own FSDP group: only one block's whole parameters exist at a time."""
    from deltatune.methods.common import layer_stack

    stack, _ = layer_stack(model)
    return list(model.get_submodule(stack))


def prompt_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """A prompt-learning PEFT model's soft prompts (prompt tuning, p-tuning, prefix tuning): kept whole on every
    rank, because peft computes the saved prompt from the live prompt encoder, outside any forward pass (a
    sharded one fails there). They are num_virtual_tokens x hidden values: replicating them costs nothing."""
    if not getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False):
        return []
    return [p for p in model.prompt_encoder.parameters() if p.requires_grad]


def refuse_settings(tc, prec, device: torch.device) -> None:
    """Settings FSDP2 cannot honour: said before anything is loaded, with the fix."""
    if tc.offload == "optimizer":
        raise ConfigError("train.offload=optimizer: FSDP2 cannot offload the optimizer state alone (its CPU offload "
                          "moves parameters, gradients and optimizer state together). Fix: train.offload=all, or "
                          "train.distributed=deepspeed for optimizer-only offload.")
    if tc.offload == "all" and device.type == "cpu":
        raise ConfigError("train.offload=all: this run computes on the CPU, so its parameters and optimizer state "
                          "are in CPU memory already and there is nothing to offload. Fix: train.offload=none.")
    if tc.deepspeed_config:
        raise ConfigError(f"train.deepspeed_config={tc.deepspeed_config} is read by train.distributed=deepspeed only; "
                          f"FSDP would ignore it. Fix: remove it, or set train.distributed=deepspeed.")
    if prec.name == "fp16":
        raise ConfigError("train.precision=fp16 with train.distributed=fsdp: the fp16 loss scaler cannot unscale "
                          "FSDP's sharded gradients. Fix: train.precision=bf16 (no scaler needed), or "
                          "train.distributed=ddp.")


def refuse_model(model: torch.nn.Module) -> None:
    """Models FSDP2 cannot shard as they are."""
    from deltatune.methods.lora import is_quantized

    if is_quantized(model):
        raise ConfigError("train.distributed=fsdp with a quantized base (QLoRA): bitsandbytes' 4-/8-bit weights keep "
                          "their quantization state beside the tensor, which FSDP2 cannot shard. Fix: "
                          "train.distributed=ddp (every rank holds the small quantized base), or method.name=lora on "
                          "the unquantized model.")
