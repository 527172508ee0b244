"""Peak training memory per device, predicted from config.json alone: no weight is loaded.

What a training step holds at its peak (the start of the backward pass of the longest micro-batch):

    weights       every parameter as the run keeps it: trainable fp32; frozen Linear weights in bf16
                  (model.frozen_dtype), or 4-bit NF4 with its quantization constants (QLoRA), or int8 with one
                  fp32 scale per row (QLoRA with method.bits=8, LLM.int8); the rest fp32
    gradients     4 B per trainable parameter (fp32, also under bf16 autocast)
    optimizer     adamw 8 B/param; adamw_8bit / paged_adamw_8bit 2 B/param; adafactor factored rows + columns
    activations   the tensors autograd saves for the backward pass, found by running the model's forward on
                  fake tensors (shapes, no storage) for one and two transformer blocks under the run's autocast
                  and method: the difference is one block, the rest is embeddings and head. Gradient
                  checkpointing keeps each block's input and recomputes one block at a time.
    logits, loss  positions x vocabulary: the logits (compute dtype), their fp32 copy, log-probabilities and
                  gradient (language models; a classifier's are negligible)
    distribution  DDP's gradient buckets; FSDP2 and ZeRO shard weights/gradients/states over N devices (plus
                  one gathered block, DeepSpeed's fp32 master partition and reduce bucket); offload moves
                  optimizer state (and parameters) to CPU memory
    framework     a fixed allowance plus allocator slack on the batch-dependent part (first guesses, docs/plan.md)

`Estimate.increase` is the peak minus the model as loaded: on CPU the measured peak RSS increase over RSS
after loading (what bench/plan_validation.py compares).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch

from deltatune.config import RunConfig
from deltatune.errors import ConfigError
from deltatune.plan import params as plan_params

GiB = 2**30
MiB = 2**20
# First guesses, not yet calibrated (docs/plan.md: the validation table and what it still misses):
FRAMEWORK_FIXED = {"cpu": 48 * MiB, "cuda": 512 * MiB}  # CPU: autograd graph, allocator arenas; CUDA: context, cuBLAS
ALLOCATOR_SLACK = {"cpu": 0.10, "cuda": 0.05}  # of the batch-dependent bytes: fragmentation, transient buffers
NF4_BYTES = 0.5  # two 4-bit values per byte
NF4_BLOCK = 64  # values per quantization block (absmax)
DQ_BLOCK = 256  # double quantization: absmaxes per second-level block
INT8_ROW_SCALE = 4  # LLM.int8: one fp32 absmax per output row (SCB)
OPTIMIZER_BYTES = {"adamw": 8.0, "adamw_8bit": 2.0, "paged_adamw_8bit": 2.0}  # adafactor: by shape
BNB_MIN_8BIT = 4096  # bitsandbytes keeps 32-bit states for tensors smaller than this


@dataclass
class Estimate:
    """Peak training memory of one device (bytes), by part. `scales` names the parts that grow with the
    micro-batch (linearly: attention scores too, they are B x heads x T x T)."""
    breakdown: dict[str, int]
    loaded: int  # the model as loaded (whole, before any sharding): the baseline of `increase`
    micro_batch: int
    grad_accum: int
    seq_len: int
    devices: int
    device: str
    mode: str
    precision: str
    scales: tuple[str, ...]
    cpu_offloaded: int = 0  # bytes moved to CPU memory by train.offload (not on the device)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.breakdown.values())

    @property
    def increase(self) -> int:
        """Peak minus the model as loaded. Memory freed by sharding is reused, so never below zero."""
        return max(0, self.total - self.loaded)

    @property
    def per_example(self) -> float:
        return sum(self.breakdown[k] for k in self.scales) / self.micro_batch

    def fits(self, memory: int) -> bool:
        return self.total <= memory

    def largest_micro_batch(self, memory: int) -> tuple[int, int] | None:
        """(micro-batch, grad_accum) that fits `memory` and keeps the global batch, or None when not even one
        example fits. Never more than the global batch per micro-batch."""
        fixed = self.total - self.per_example * self.micro_batch
        if self.per_example <= 0 or memory < fixed + self.per_example:
            return None
        global_batch = self.micro_batch * self.grad_accum
        b = min(int((memory - fixed) // self.per_example), global_batch)
        return b, math.ceil(global_batch / b)

    def to_dict(self) -> dict:
        return {"total_bytes": self.total, "increase_bytes": self.increase, "loaded_bytes": self.loaded,
                "breakdown_bytes": dict(self.breakdown), "cpu_offloaded_bytes": self.cpu_offloaded,
                "per_example_bytes": round(self.per_example), "micro_batch": self.micro_batch,
                "grad_accum": self.grad_accum, "seq_len": self.seq_len, "devices": self.devices,
                "device": self.device, "mode": self.mode, "precision": self.precision, "notes": self.notes}


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.0f} MiB"


# ---------------------------------------------------------------------------------------------
# What the run will be


def plan_precision(requested: str, device: str) -> str:
    """train.precision as it would resolve on `device` (engine/precision.py), without asking a GPU: a planned
    GPU is assumed to have bf16 (A100 and newer)."""
    if requested != "auto":
        return requested
    if device == "cuda":
        return "bf16"
    from deltatune.engine.precision import cpu_supports_bf16

    return "bf16" if cpu_supports_bf16() else "fp32"


def frozen_bf16(cfg: RunConfig, prec: str, mode: str = "single") -> bool:
    """model.frozen_dtype as the run resolves it (engine/frozen.py, the one home of the rule): frozen Linear
    weights in bf16 for adapter methods training in bf16 on one process or DDP, not over a quantized base."""
    from deltatune import methods
    from deltatune.engine import frozen

    strategy = "deepspeed" if mode.startswith("zero") else mode
    name, _ = frozen.resolve(cfg.model.frozen_dtype, prec, methods.REGISTRY[cfg.method.name].saves, strategy,
                             cfg.method.name == "qlora")
    return name == "bf16"


def cast_linears(model: torch.nn.Module) -> set[int]:
    """ids of the parameters frozen.cast_frozen_linears casts: weights and biases of frozen nn.Linear layers,
    not an output layer tied to the (fp32) embedding."""
    embedding = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    return {id(p) for m in model.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters(recurse=False)
            if not p.requires_grad and p.is_floating_point() and id(p) not in embedding}


def mode_of(cfg: RunConfig, devices: int) -> str:
    mode = cfg.train.distributed
    if mode == "auto":
        return "ddp" if devices > 1 else "single"
    if mode == "ddp" and devices == 1:
        return "single"
    if mode == "deepspeed":
        return f"zero{cfg.train.zero_stage}"
    return mode


@dataclass
class Weights:
    """Bytes of the model as the run holds it, from the meta skeleton with the method applied."""
    trainable: int  # parameters
    weight_bytes: int
    trainable_shapes: list[tuple[int, ...]]
    outside_params: int  # embeddings, head, final norm: parameters outside the repeated blocks
    layers: int
    hidden: int
    vocab: int
    quant_constants: int


def _weights(cfg: RunConfig, prec: str, mode: str) -> Weights:
    from deltatune.methods.common import HEAD_NAMES, layer_stack, projection_types

    model = plan_params.apply_method(cfg, plan_params.skeleton(cfg, plan_params.num_labels(cfg)), meta=True)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    quantized = cfg.method.name == "qlora"
    bf16 = cast_linears(model) if frozen_bf16(cfg, prec, mode) else set()
    kinds = projection_types()
    linear_params = {id(p): name for name, m in model.named_modules() if isinstance(m, kinds)
                     for p in m.parameters(recurse=False)}
    seen: set[int] = set()
    trainable, weight_bytes, quant_constants, shapes = 0, 0.0, 0.0, []
    for p in model.parameters():
        if id(p) in seen:  # tied weights (embeddings = output layer) are stored once
            continue
        seen.add(id(p))
        n = p.numel()
        if p.requires_grad:
            trainable += n
            shapes.append(tuple(p.shape))
            weight_bytes += 4 * n
            continue
        module = linear_params.get(id(p))
        if module is not None and quantized and p.ndim == 2 and \
                module.rpartition(".")[2] not in ("lm_head", *HEAD_NAMES):
            if cfg.method.bits == 8:
                weight_bytes += n
                quant_constants += INT8_ROW_SCALE * p.shape[0]
            else:
                weight_bytes += NF4_BYTES * n
                per_block = (1 + 4 / DQ_BLOCK) if cfg.method.double_quant else 4
                quant_constants += per_block * n / NF4_BLOCK
        elif id(p) in bf16:
            weight_bytes += 2 * n
        else:
            weight_bytes += 4 * n
    stack, layers = layer_stack(base)
    in_blocks = sum(p.numel() for n, p in base.named_parameters() if n.startswith(stack + "."))
    total = sum(p.numel() for p in base.parameters())
    mc = base.config
    hidden = getattr(mc, "hidden_size", None) or getattr(mc, "n_embd", 0)
    vocab = getattr(mc, "vocab_size", 0) if cfg.lm else plan_params.num_labels(cfg)
    return Weights(trainable, int(weight_bytes + quant_constants), shapes, total - in_blocks, layers, hidden, vocab,
                   int(quant_constants))


def _optimizer_bytes(cfg: RunConfig, w: Weights) -> int:
    name = cfg.train.optimizer
    if name == "adafactor":  # factored second moment for matrices (rows + columns), full for vectors; no momentum
        return sum(4 * (math.prod(s[:-1]) + s[-1]) if len(s) >= 2 else 4 * math.prod(s) for s in w.trainable_shapes)
    per = OPTIMIZER_BYTES[name]
    if per == 8.0:
        return int(per * w.trainable)
    # bitsandbytes: 8-bit moments with an fp32 absmax per 256-value block; small tensors stay 32-bit.
    return int(sum((per + 8 / 256) * math.prod(s) if math.prod(s) >= BNB_MIN_8BIT else 8 * math.prod(s)
                   for s in w.trainable_shapes))


# ---------------------------------------------------------------------------------------------
# Activations: traced on fake tensors


def _saved_bytes(cfg: RunConfig, prec: str, attention: str, seq_len: int, layers: int, mode: str) -> int:
    """Bytes autograd saves for backward in one forward pass at batch 1, for a `layers`-block copy of the model
    built on fake tensors (shapes only), with the method applied and the run's autocast. Parameters saved
    for backward are not new memory and are left out; each storage counts once (views share it)."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    from deltatune.engine import frozen

    fake = FakeTensorMode(allow_non_fake_inputs=True)
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        saved[storage._cdata] = max(saved.get(storage._cdata, 0), storage.nbytes())
        return t

    warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor", category=UserWarning)
    with fake:
        model = plan_params.build(cfg, plan_params.model_config(cfg, plan_params.num_labels(cfg), layers), attention)
    # Outside the fake mode: peft moves new adapter weights with Module.to, which cannot swap fake parameters.
    # The adapters of one or two blocks are small real tensors; the forward converts them.
    model = plan_params.apply_method(cfg, model)
    with fake:
        if frozen_bf16(cfg, prec, mode):
            cast = cast_linears(model)
            for p in model.parameters():
                if id(p) in cast:
                    p.data = p.data.to(torch.bfloat16)
        frozen.skip_adapter_input_casts(model, prec)  # as the engine does (engine/frozen.py)
        model.train()
        held = {(p if isinstance(p, FakeTensor) else fake.from_tensor(p)).untyped_storage()._cdata
                for p in [*model.parameters(), *model.buffers()]}
        ids = torch.zeros(1, seq_len, dtype=torch.long)
        kwargs = {"use_cache": False} if cfg.lm else {}
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=prec in ("bf16", "fp16")):
            model(input_ids=ids, **kwargs)
    return sum(n for key, n in saved.items() if key not in held)


def _activations(cfg: RunConfig, prec: str, attention: str, seq_len: int, w: Weights, mode: str
                 ) -> tuple[int, int]:
    """(activation bytes per example, of which one block's share) for the full stack."""
    one = _saved_bytes(cfg, prec, attention, seq_len, 1, mode)
    two = _saved_bytes(cfg, prec, attention, seq_len, 2, mode)
    block = max(0, two - one)
    outside = max(0, one - block)
    if not cfg.train.gradient_checkpointing:
        return outside + w.layers * block, block
    # Non-reentrant checkpointing keeps every block's input (the fp32 residual stream) and recomputes one block
    # at a time in the backward pass.
    return outside + w.layers * seq_len * w.hidden * 4 + block, block


def _logit_positions(cfg: RunConfig, seq_len: int, target_tokens: int | None) -> int:
    """Rows of logits a language model computes per example: only target positions (`logits_to_keep`), or
    every position when soft prompts lengthen the sequence."""
    if getattr(cfg.method, "name", "") in ("prompt_tuning", "p_tuning", "prefix_tuning"):
        return seq_len + getattr(cfg.method, "num_virtual_tokens", 0)
    return min(target_tokens or seq_len - 1, seq_len - 1)


# ---------------------------------------------------------------------------------------------
# The estimate


def estimate(cfg: RunConfig, devices: int = 1, device: str | None = None, micro_batch: int | None = None,
             seq_len: int | None = None, target_tokens: int | None = None) -> Estimate:
    """Peak training memory per device for `cfg` on `devices` devices of kind `device` (default: this
    machine's), at train.batch_size (or `micro_batch`) and data.max_length (or `seq_len`). `target_tokens`:
    loss-carrying tokens per sft example (default: all, the worst case)."""
    from deltatune.models.loading import attention_for

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if devices < 1:
        raise ConfigError(f"--devices {devices}: give at least 1")
    prec = plan_precision(cfg.train.precision, device)
    mode = mode_of(cfg, devices)
    b = micro_batch or cfg.train.batch_size
    t = seq_len or cfg.data.max_length
    w = _weights(cfg, prec, mode)
    act = 2 if prec in ("bf16", "fp16") else 4
    per_example, block = _activations(cfg, prec, attention_for(cfg.model.attention, torch.device(device)), t, w,
                                     mode)
    grads, states = 4 * w.trainable, _optimizer_bytes(cfg, w)
    parts = {"weights": w.weight_bytes, "gradients": grads, "optimizer states": states,
             "activations": per_example * b}
    if cfg.lm:
        positions = _logit_positions(cfg, t, target_tokens) * b * w.vocab
        parts["logits"] = positions * act
        parts["loss buffers"] = positions * 12  # fp32 copy or log-probs, their gradient, the input's gradient
    # The backward pass of the top block holds the gradients of its intermediates next to everything saved:
    # about one block's saved bytes again. The loss buffers are freed by then, so only the excess counts.
    parts["backward transients"] = max(0, block * b - parts.get("logits", 0) - parts.get("loss buffers", 0))
    notes = _distribute(parts, cfg, mode, devices, device, w, prec)
    cpu = 0
    if device == "cuda" and cfg.train.offload != "none" and mode in ("fsdp", "zero1", "zero2", "zero3"):
        cpu = parts.pop("optimizer states") + parts.pop("fp32 master partition", 0)
        if cfg.train.offload == "all":
            cpu += parts.pop("weights")
    scales = tuple(k for k in ("activations", "backward transients", "logits", "loss buffers") if k in parts)
    dynamic = sum(parts[k] for k in scales)
    parts["framework"] = int(FRAMEWORK_FIXED[device if device in FRAMEWORK_FIXED else "cuda"])
    parts["allocator slack"] = int(ALLOCATOR_SLACK.get(device, 0.05) * dynamic)
    scales += ("allocator slack",)
    est = Estimate({k: int(v) for k, v in parts.items()}, loaded=int(w.weight_bytes), micro_batch=b,
                   grad_accum=cfg.train.grad_accum, seq_len=t, devices=devices, device=device, mode=mode,
                   precision=prec, scales=scales, cpu_offloaded=int(cpu), notes=notes)
    return est


def _distribute(parts: dict[str, float], cfg: RunConfig, mode: str, n: int, device: str, w: Weights,
                prec: str) -> list[str]:
    """Per-device shares under the distribution mode (in place); notes on what was assumed."""
    notes: list[str] = []
    if mode == "ddp":
        parts["ddp gradient buckets"] = parts["gradients"]  # gradients are copied into flat buckets to all-reduce
    elif mode == "fsdp":
        for k in ("weights", "gradients", "optimizer states"):
            parts[k] /= n
        per_block = max(0.0, parts["weights"] * n - 4 * w.outside_params) / max(w.layers, 1)
        # One block gathered for compute and the next prefetched, in the compute dtype (bf16 under MixedPrecision).
        parts["gathered blocks"] = 2 * per_block * (0.5 if prec in ("bf16", "fp16") else 1.0)
    elif mode.startswith("zero"):
        stage = int(mode[-1])
        if stage == 3:
            parts["weights"] /= n
        parts["optimizer states"] /= n
        parts["fp32 master partition"] = 4 * w.trainable / n  # DeepSpeed's own fp32 copy of this rank's part
        if stage >= 2:
            parts["gradients"] /= n
            parts["reduce bucket"] = 4 * w.hidden * w.hidden  # sized to the model: hidden^2 elements (zero.py)
        if cfg.method.name == "qlora":
            raise ConfigError("method.name=qlora with train.distributed=deepspeed is refused by preflight (ZeRO "
                              "flattens the packed 4-/8-bit weights). Fix: train.distributed=ddp, or method.name=lora.")
    if device == "cpu" and cfg.train.offload != "none":
        notes.append("train.offload moves state to CPU memory, which on a CPU run is the same memory")
    return notes


# ---------------------------------------------------------------------------------------------
# Verdicts


def refusal(est: Estimate, memory: int) -> str:
    """Why `est` cannot fit `memory` even at micro-batch 1, and what would shrink it most."""
    fixed = est.total - est.per_example * est.micro_batch
    biggest = sorted(((v, k) for k, v in est.breakdown.items()), reverse=True)[:3]
    fixes = []
    if est.mode in ("single", "ddp"):
        fixes.append("shard over several devices (train.distributed=fsdp, or deepspeed with zero_stage=3)")
    if est.breakdown.get("optimizer states", 0) > 0.2 * est.total:
        fixes.append("a parameter-efficient method (method.name=lora/qlora) or train.optimizer=adamw_8bit")
    if est.breakdown.get("weights", 0) > 0.5 * memory:
        fixes.append("a 4-bit base (method.name=qlora), or 8-bit (method.name=qlora method.bits=8)")
    if est.breakdown.get("activations", 0) > 0.2 * est.total:
        fixes.append("train.gradient_checkpointing=true or a shorter data.max_length")
    return (f"does not fit {gib(memory)} per device even at micro-batch 1: {gib(fixed + est.per_example)} needed "
            f"(largest parts: {', '.join(f'{k} {gib(v)}' for v, k in biggest)}). Fix: " + "; or ".join(fixes))


def start_line(est: Estimate, free: int | None = None) -> str:
    """One line for `deltatune train` to print at start (and warn with when it will not fit `free`)."""
    top = ", ".join(f"{k} {gib(v)}" for k, v in sorted(est.breakdown.items(), key=lambda kv: -kv[1])[:4])
    line = (f"memory plan: peak ~{gib(est.total)} per {est.device} device ({est.mode}, {est.precision}, micro-batch "
            f"{est.micro_batch} x {est.seq_len} tokens; {top}); increase over the loaded model ~{gib(est.increase)}")
    if free is not None:
        if est.fits(free):
            line += f"; fits the {gib(free)} free"
        else:
            best = est.largest_micro_batch(free)
            line += (f"; WILL NOT FIT the {gib(free)} free: " +
                     (f"train.batch_size={best[0]} train.grad_accum={best[1]} would" if best else refusal(est, free)))
    return line


def free_memory_bytes(device: torch.device | str) -> int:
    """Free memory where the run computes: the GPU's free bytes, or MemAvailable of this machine."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError("/proc/meminfo has no MemAvailable line")
