"""DDP under torchrun (2 processes, gloo): the same weights as one process at the same global batch.

The data has 8k+1 rows, so the last global batch holds one row: one rank trains on it and the other runs
only stand-in micro-batches (loss x 0) that keep DDP's all-reduce in step. With accumulation on, DDP's
`no_sync` path runs too. fp32, with the summation order changed by the all-reduce: the loss and gradient norm
agree step by step to 1e-7, the final weights to 5e-5 (measured 1.9e-5 for full fine-tuning, on the last layer's
attention output bias, and 1.5e-5 for LoRA at lr 1e-2: Adam turns 1e-7 differences of near-zero gradients into
steps of up to the learning rate).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deltatune import api, config
from deltatune.errors import ConfigError
from tests.multiproc import STEPS, deltatune, overrides, steps, weights, write_data

TOLERANCE = {"full": 5e-5, "lora": 5e-5}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    return write_data(tmp_path_factory)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_ddp_two_processes_reach_the_weights_of_one(tmp_path, tiny_bert, data, method):
    one = tmp_path / "one"
    single = api.train(config.load(None, overrides(one, tiny_bert, data, method, batch_size=4)))
    two = tmp_path / "two"
    done = deltatune(overrides(two, tiny_bert, data, method, batch_size=2))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((two / "summary.json").read_text())
    assert summary["distributed"] == {"mode": "ddp", "world_size": 2, "backend": "gloo",
                                      "wrapper": "DistributedDataParallel", "zero_stage": None,
                                      "sharding": "none", "offload": "none"}
    assert single["distributed"]["mode"] == "single" and single["distributed"]["world_size"] == 1
    assert summary["global_batch"] == single["global_batch"] == 8 and summary["steps"] == single["steps"] == STEPS
    assert "distributed: ddp, world size 2, backend gloo" in done.stdout + done.stderr
    for x, y in zip(steps(one), steps(two), strict=True):  # (step, loss, lr, gradient norm)
        assert x[0] == y[0] and y[1] == pytest.approx(x[1], abs=1e-6) and y[3] == pytest.approx(x[3], abs=1e-4)
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
