"""`train.compile`: torch.compile with a persistent kernel cache, bounded recompiles, and its time counted apart.

- Cache: inductor's FX graph cache and AOTAutograd's cache (both on by default in torch) write to
  `TORCHINDUCTOR_CACHE_DIR`; we point it at `train.compile_cache` (default `$DELTATUNE_CACHE/compile`), so a
  second run of the same model and shapes loads the compiled kernels instead of generating and building C++
  (or Triton) again. Dynamo still traces the Python at start; that part is not cached.
- Bounded recompiles: the model is compiled for static shapes, and every micro-batch is padded up to one of a
  few sequence-length buckets (`buckets`: 16, 32, 48, 64, then steps of 1.5x/1.33x, capped at
  data.max_length). A run therefore compiles at most one graph per bucket (and per batch size: a short last
  batch is one more), whatever the data; the recompile limit is raised to that count so none falls back to
  eager. Without buckets every new length compiles again (measured: "static shapes recompiled too often");
  dynamic shapes compile once but ran slower here (see docs/efficiency.md). Padding is masked: padded tokens
  are no targets, and attention ignores them.
- Time: a step during which dynamo compiled a new graph counts whole towards `seconds` (its compute is small
  next to compiling), so summary.json reports compile time apart from training time (`CompileClock`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from deltatune.constants import IGNORE_INDEX

SMALL = (16, 32, 48, 64)


def cache_dir(tc) -> Path:
    """train.compile_cache, or the deltatune cache's `compile` folder."""
    if tc.compile_cache:
        path = Path(tc.compile_cache).expanduser()
        path.mkdir(parents=True, exist_ok=True)
        return path
    from deltatune.cache import cache_root

    return cache_root("compile")


def buckets(max_length: int) -> list[int]:
    """Padded lengths used when compiling: 16, 32, 48, 64, 96, 128, 192, 256, 384, 512, ... up to max_length
    (always the last). At most ~33% padding above 64 tokens, 2 x log2(max_length) graphs."""
    out, n = list(SMALL), SMALL[-1]
    while n < max_length:
        n = n * 3 // 2 if n & (n - 1) == 0 else n * 4 // 3  # 64 -> 96 -> 128 -> 192 -> 256 ...
        out.append(n)
    return sorted({b for b in out if b < max_length} | {max_length})


def bucket_length(n: int, max_length: int) -> int:
    """The bucket a row of n tokens is padded to (n itself beyond max_length: packed rows can be that long)."""
    return next((b for b in buckets(max_length) if b >= n), n)


def pad_to_bucket(batch: dict[str, torch.Tensor], pad_id: int, max_length: int) -> dict[str, torch.Tensor]:
    """A collated batch (data.batching.collate) padded on the right to its bucket's length, as collate pads:
    pad ids, mask 0, IGNORE_INDEX token labels, and position ids of the padding as one more segment from 0."""
    width = batch["input_ids"].shape[1]
    extra = bucket_length(width, max_length) - width
    if extra <= 0:
        return batch
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    out = dict(batch)
    for key, value in fill.items():
        if key in batch and batch[key].dim() == 2:  # classification labels are one per row: left alone
            out[key] = torch.nn.functional.pad(batch[key], (0, extra), value=value)
    if "position_ids" in batch:
        pos = batch["position_ids"]
        # Padding continues collate's own padding segment when the row has one, else starts a new one at 0.
        real = batch["attention_mask"].sum(1, keepdim=True)
        start = torch.where(real < width, pos[:, -1:] + 1, torch.zeros_like(real))
        out["position_ids"] = torch.cat([pos, start + torch.arange(extra).unsqueeze(0)], dim=1)
    return out


def enable_cache(path: Path) -> None:
    """Inductor's and AOTAutograd's on-disk caches in `path` (read by inductor at each use, so setting it before
    the first compile of this process is enough)."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True


def compile_model(net: torch.nn.Module, tc, max_length: int) -> torch.nn.Module:
    """The network as the step calls it, compiled for static shapes; batches must go through pad_to_bucket."""
    enable_cache(cache_dir(tc))
    import torch._dynamo.config as dynamo_config

    # One graph per bucket, times two batch sizes (full and the short last one), and graph-break fragments.
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 4 * len(buckets(max_length)))
    return torch.compile(net, dynamic=False)


def graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process so far (FX-cache hits included: they still trace)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


@dataclass
class CompileClock:
    """Compile time apart from training time: steps in which new graphs were compiled, and their seconds.

    Use: `mark = clock.start()` at a step's start, `clock.stop(mark)` at its end (after the optimizer)."""
    enabled: bool
    cache: str | None = None
    max_length: int = 0
    seconds: float = 0.0
    steps: int = 0  # steps that compiled
    graphs: int = 0

    def start(self) -> tuple[float, int]:
        return time.perf_counter(), graphs_compiled() if self.enabled else 0

    def stop(self, mark: tuple[float, int]) -> float:
        """Seconds of this step that were compiling (all of it if it compiled, else 0)."""
        if not self.enabled:
            return 0.0
        t0, before = mark
        new = graphs_compiled() - before
        if new <= 0:
            return 0.0
        spent = time.perf_counter() - t0
        self.seconds += spent
        self.steps += 1
        self.graphs += new
        return spent

    def summary(self) -> dict:
        return {"enabled": self.enabled, "cache_dir": self.cache, "compile_s": round(self.seconds, 2),
                "steps_that_compiled": self.steps, "graphs": self.graphs,
                "buckets": buckets(self.max_length) if self.enabled else None}
