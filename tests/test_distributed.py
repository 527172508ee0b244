"""DDP under torchrun (2 processes, gloo): the same weights as one process at the same global batch.

The data has 8k+1 rows, so the last global batch holds one row: one rank trains on it and the other runs
only stand-in micro-batches (loss x 0) that keep DDP's all-reduce in step. With accumulation on, DDP's
`no_sync` path runs too. fp32, with the summation order changed by the all-reduce: full fine-tuning
agrees to 2e-6 (measured: about 3e-7 after 22 steps); LoRA at lr 1e-2 to 5e-5 (measured 1.5e-5: Adam turns
1e-7 gradient differences on near-zero LoRA gradients into steps of up to the learning rate).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deltatune import api, config
from deltatune.errors import ConfigError
from tests.conftest import toy_rows, write_jsonl

ROWS = 81  # global batch 8: 10 full batches and one of 1 row
TOLERANCE = {"full": 2e-6, "lora": 5e-5}


def overrides(out: Path, model: Path, data: dict[str, Path], method: str, batch_size: int) -> list[str]:
    values = {"model.name": model, "data.train": data["train"], "data.validation": data["validation"],
              "method.name": method, "train.epochs": 2, "train.batch_size": batch_size, "train.grad_accum": 2,
              "train.lr": 3e-3, "train.precision": "fp32", "train.threads": 1, "train.log_every": 1,
              "eval.every": 5, "eval.metric": "loss", "output.dir": out}
    if method == "lora":
        values.update({"method.r": 4, "method.init": "gaussian", "method.dropout": 0.0, "train.lr": 1e-2})
    return [f"{k}={v}" for k, v in values.items()]


def torchrun(args: list[str], nproc: int = 2, timeout: int = 120) -> subprocess.CompletedProcess:
    """`deltatune train ARGS` under torchrun, one torch thread per rank (two cores here)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "deltatune", "train", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ddp-data")
    return {"train": write_jsonl(d / "train.jsonl", toy_rows(ROWS, seed=3)),
            "validation": write_jsonl(d / "val.jsonl", toy_rows(21, seed=4))}


def weights(run: Path) -> dict[str, torch.Tensor]:
    path = run / "model" / "model.safetensors"
    return load_file(path if path.exists() else run / "adapter" / "adapter_model.safetensors")


@pytest.mark.parametrize("method", ["full", "lora"])
def test_ddp_two_processes_reach_the_weights_of_one(tmp_path, tiny_bert, data, method):
    one = tmp_path / "one"
    single = api.train(config.load(None, overrides(one, tiny_bert, data, method, batch_size=4)))
    two = tmp_path / "two"
    done = torchrun(overrides(two, tiny_bert, data, method, batch_size=2))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((two / "summary.json").read_text())
    assert summary["distributed"] == {"mode": "ddp", "world_size": 2, "backend": "gloo",
                                      "wrapper": "DistributedDataParallel", "zero_stage": None,
                                      "sharding": "none", "offload": "none"}
    assert single["distributed"]["mode"] == "single" and single["distributed"]["world_size"] == 1
    assert summary["global_batch"] == single["global_batch"] == 8 and summary["steps"] == single["steps"] == 22
    assert "distributed: ddp, world size 2, backend gloo" in done.stdout + done.stderr
    a, b = weights(one), weights(two)
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < TOLERANCE[method], f"largest difference {worst:.2e}"
    # The sharded evaluation (each rank scores half the batches, sums and predictions gathered) sees every row.
    for e1, e2 in zip(single["evals"], summary["evals"], strict=True):
        assert e1["step"] == e2["step"] and e2["loss"] == pytest.approx(e1["loss"], abs=1e-5)
        assert e2["accuracy"] == pytest.approx(e1["accuracy"], abs=1e-9)


def test_ddp_on_one_process_is_refused(tmp_path, tiny_bert, data):
    cfg = config.load(None, [*overrides(tmp_path / "r", tiny_bert, data, "full", 4), "train.distributed=ddp"])
    with pytest.raises(ConfigError, match="needs more than one process.*--nproc"):
        api.train(cfg)
