"""What this process holds in memory: RSS now, its peak since training started, live tensor storages.

The planner (plan/memory.py) predicts the peak *increase* over the model as loaded, because that is
what training adds and what a user can act on (batch, checkpointing, method, optimizer); this module
measures the same quantity so every run's summary.json checks the prediction.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from pathlib import Path

import torch

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_mb(field: str) -> float | None:
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """Resident memory now."""
    now = _status_mb("VmRSS")
    return now if now is not None else peak_rss_mb()


def peak_rss_mb() -> float:
    """The highest resident memory of this process's whole life (loading included)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def reset_peak() -> bool:
    """Start a new peak (Linux: writing 5 to clear_refs resets VmHWM), so the peak of training is not the
    peak of loading (a checkpoint read whole, a GGUF file dequantized). False where that is impossible."""
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return _status_mb("VmHWM") is not None


def peak_since_reset_mb() -> float:
    peak = _status_mb("VmHWM")
    return peak if peak is not None else peak_rss_mb()


@dataclass
class Baseline:
    """Memory with the model loaded; `record()` later gives the peak since then and the increase.

    CPU: resident memory (RSS) and its peak (VmHWM, restarted here). CUDA: torch's allocated bytes and
    max_memory_allocated, restarted here. None where the peak cannot be restarted."""
    device: str
    loaded_mb: float | None
    planned_increase_mb: float | None = None  # the memory planner's prediction, set by the loop

    @classmethod
    def take(cls, device: torch.device) -> Baseline:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            return cls("cuda", torch.cuda.memory_allocated(device) / 2**20)
        # No malloc_trim here: a CI run that called it in every training of one pytest process aborted with
        # glibc's "corrupted double-linked list"; glibc trims freed heap by itself until keep_heap_mapped.
        now = rss_mb()
        return cls("cpu", now if reset_peak() else None)

    def peak_mb(self) -> float:
        return torch.cuda.max_memory_allocated() / 2**20 if self.device == "cuda" else peak_since_reset_mb()

    def record(self) -> dict:
        out = {"measured": "cuda max_memory_allocated" if self.device == "cuda" else "RSS", "loaded_mb": None,
               "peak_mb": None, "peak_increase_mb": None, "planned_increase_mb": self.planned_increase_mb}
        if self.loaded_mb is not None:
            peak = self.peak_mb()
            out.update(loaded_mb=round(self.loaded_mb, 1), peak_mb=round(peak, 1),
                       peak_increase_mb=round(peak - self.loaded_mb, 1))
        return out


def live_tensor_mb() -> float:
    """Bytes of every tensor storage this process holds now (each storage once), in MB: after training, the
    weights and optimizer state the strategy keeps on this rank, whatever engine holds them. Peak RSS cannot
    show this: it includes loading the model whole and allocator slack."""
    import gc
    import warnings
    import weakref

    seen: dict[int, int] = {}
    with warnings.catch_warnings():  # isinstance on deprecated torch module attributes warns
        warnings.simplefilter("ignore")
        # isinstance asks a weak proxy for its __class__, which raises once the referent is gone (torch.compile
        # leaves such proxies: every compiled run failed here in its summary); a proxy is never a tensor itself.
        objects = [o for o in gc.get_objects() if type(o) not in weakref.ProxyTypes and isinstance(o, torch.Tensor)]
    for obj in objects:
        if obj.device.type != "meta":
            try:  # wrapper tensors (DTensor) and freed storages have no data of their own; shards are listed too
                storage = obj.untyped_storage()
                ptr, size = storage.data_ptr(), storage.nbytes()
            except (RuntimeError, NotImplementedError):
                continue
            if ptr:
                seen[ptr] = max(seen.get(ptr, 0), size)
    return sum(seen.values()) / 2**20
