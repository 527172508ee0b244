"""What the multi-process tests share (DDP, DeepSpeed): one config, torchrun, the data, the weights.

Global batch 8 everywhere: one process runs batch 4 x accumulation 2, two ranks batch 2 x accumulation 2.
81 rows: the last global batch holds one row, so one rank runs only stand-in micro-batches (loss x 0).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.conftest import toy_rows, write_jsonl

ROWS = 81
STEPS = 22  # 11 global batches of 8 per epoch, 2 epochs


def overrides(out: Path, model: Path, data: dict[str, Path], method: str, batch_size: int, **extra) -> list[str]:
    values = {"model.name": model, "data.train": data["train"], "data.validation": data["validation"],
              "method.name": method, "train.epochs": 2, "train.batch_size": batch_size, "train.grad_accum": 2,
              "train.lr": 3e-3, "train.precision": "fp32", "train.threads": 1, "train.log_every": 1,
              "eval.every": 5, "eval.metric": "loss", "output.dir": out, **extra}
    if method == "lora":  # no dropout: its draws differ between one and two processes (each rank its own rows)
        values.update({"method.r": 4, "method.init": "gaussian", "method.dropout": 0.0, "train.lr": 1e-2})
    return [f"{k}={v}" for k, v in values.items()]


def deltatune(args: list[str], nproc: int = 2, timeout: int = 180) -> subprocess.CompletedProcess:
    """`deltatune train ARGS` under torchrun (one torch thread per rank), or as one plain process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else []
    cmd = [sys.executable, *launch, "-m", "deltatune", "train", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def write_data(tmp_path_factory) -> dict[str, Path]:
    """The training and validation files (each test module's `data` fixture)."""
    d = tmp_path_factory.mktemp("ranks-data")
    return {"train": write_jsonl(d / "train.jsonl", toy_rows(ROWS, seed=3)),
            "validation": write_jsonl(d / "val.jsonl", toy_rows(21, seed=4))}


def weights(run: Path) -> dict[str, torch.Tensor]:
    path = run / "model" / "model.safetensors"
    return load_file(path if path.exists() else run / "adapter" / "adapter_model.safetensors")


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def steps(run: Path) -> list[tuple[int, float, float, float]]:
    """(step, loss, learning rate, gradient norm) of every logged step."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["lr"], r["max_grad_norm"]) for r in rows if "loss" in r]
