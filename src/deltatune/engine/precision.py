"""Numeric precision: resolve `train.precision` against what this device can actually do."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from deltatune.errors import ConfigError


def default_device() -> torch.device:
    """Where a run (or a loaded run) computes when nothing says otherwise: the GPU if there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_supports_bf16() -> bool:
    """Native bf16 matmuls (AVX512-BF16 or AMX). Without them bf16 autocast is emulated and slower."""
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(cpu, "_is_amx_tile_supported", lambda: False)())


@dataclass(frozen=True)
class Precision:
    name: str  # what actually runs: fp32 | bf16 | fp16
    device_type: str
    reason: str  # why, so `auto` never decides silently

    @property
    def dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def scaler(self) -> torch.amp.GradScaler | None:
        # fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range and needs none.
        return torch.amp.GradScaler(self.device_type) if self.name == "fp16" else None


def resolve(requested: str, device: torch.device) -> Precision:
    dev = device.type
    if requested == "fp16" and dev != "cuda":
        raise ConfigError("train.precision=fp16 needs a CUDA GPU (CPU autocast has no fp16 training path). "
                          "Fix: use train.precision=bf16 or auto.")
    if requested == "bf16":
        if dev == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("train.precision=bf16: this GPU has no bf16 support. Fix: use fp16 or auto.")
        if dev == "cpu" and not cpu_supports_bf16():
            raise ConfigError("train.precision=bf16: this CPU lacks native bf16 (AVX512-BF16/AMX); it would be "
                              "emulated and slower than fp32. Fix: use fp32 or auto.")
        return Precision("bf16", dev, "requested")
    if requested != "auto":
        return Precision(requested, dev, "requested")
    if dev == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision("bf16", dev, "auto: GPU supports bf16")
        return Precision("fp16", dev, "auto: GPU lacks bf16, using fp16 with loss scaling")
    if dev == "cpu" and cpu_supports_bf16():
        return Precision("bf16", dev, "auto: CPU has native bf16 (AVX512-BF16/AMX)")
    return Precision("fp32", dev, f"auto: no native bf16 on this {dev}")
