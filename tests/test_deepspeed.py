"""DeepSpeed ZeRO-2 and ZeRO-3 under torchrun (2 processes, gloo): one process's weights at the same global batch.

Global batch 8 everywhere: one process runs batch 4 x accumulation 2, two ranks batch 2 x accumulation 2 (so
DeepSpeed's accumulation count, and our scale_wrt_gas=False, are exercised). 81 rows: the last global batch holds
one row, and the rank without it runs stand-ins (loss x 0). fp32. Per step, the loss (1e-5), learning rate and
gradient norm (1e-3 relative) agree; the final weights differ by at most 1.9e-5 (full) and 1.6e-5 (LoRA) measured
after 22 steps, tolerance 5e-5 for both: the summation order changes (2 rows per backward, not 4; DeepSpeed's
reduce-scatter), and Adam turns 1e-7 differences of near-zero gradients (embedding rows, the last layer's biases,
LoRA's fresh B) into steps of up to the learning rate.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deltatune import api, config
from deltatune.errors import ConfigError
from tests.conftest import toy_rows, write_jsonl

pytest.importorskip("deepspeed")

ROWS = 81
TOLERANCE = {"full": 5e-5, "lora": 5e-5}
STEPS = 22  # 11 global batches of 8 per epoch, 2 epochs


def overrides(out: Path, model: Path, data: dict[str, Path], method: str, batch_size: int, **extra) -> list[str]:
    values = {"model.name": model, "data.train": data["train"], "data.validation": data["validation"],
              "method.name": method, "train.epochs": 2, "train.batch_size": batch_size, "train.grad_accum": 2,
              "train.lr": 3e-3, "train.precision": "fp32", "train.threads": 1, "train.log_every": 1,
              "eval.every": 5, "eval.metric": "loss", "output.dir": out, **extra}
    if method == "lora":
        values.update({"method.r": 4, "method.init": "gaussian", "method.dropout": 0.0, "train.lr": 1e-2})
    return [f"{k}={v}" for k, v in values.items()]


def deltatune(args: list[str], nproc: int = 2, timeout: int = 180) -> subprocess.CompletedProcess:
    """`deltatune train ARGS` under torchrun (one torch thread per rank), or as one plain process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else []
    cmd = [sys.executable, *launch, "-m", "deltatune", "train", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("zero-data")
    return {"train": write_jsonl(d / "train.jsonl", toy_rows(ROWS, seed=3)),
            "validation": write_jsonl(d / "val.jsonl", toy_rows(21, seed=4))}


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_bert, data) -> dict[str, tuple[Path, dict]]:
    """One plain process per method, batch 4 x accumulation 2 (in this process)."""
    runs = {}
    for method in ("full", "lora"):
        out = tmp_path_factory.mktemp(f"single-{method}") / "run"
        runs[method] = out, api.train(config.load(None, overrides(out, tiny_bert, data, method, batch_size=4)))
    return runs


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


def zero_run(out: Path, tiny_bert: Path, data, method: str, stage: int, *args: str, **extra) -> dict:
    done = deltatune([*overrides(out, tiny_bert, data, method, batch_size=2, **extra), "train.distributed=deepspeed",
                      f"train.zero_stage={stage}", *args])
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "distributed: deepspeed, world size 2, backend gloo" in done.stdout + done.stderr
    return json.loads((out / "summary.json").read_text())


def assert_trained_like_one_process(one: tuple[Path, dict], run: Path, summary: dict, method: str) -> None:
    """The same weights, and step by step the same loss, schedule and gradient norm (a gradient scaled by the
    accumulation count twice, or a schedule stepped twice, shows there: Adam alone would hide the first)."""
    one_dir, one_summary = one
    assert summary["steps"] == one_summary["steps"] == STEPS and summary["global_batch"] == 8
    for a, b in zip(steps(one_dir), steps(run), strict=True):
        assert a[0] == b[0] and b[1] == pytest.approx(a[1], abs=1e-5) and b[2] == pytest.approx(a[2], rel=1e-9)
        assert b[3] == pytest.approx(a[3], rel=1e-3, abs=1e-4), f"step {a[0]}: gradient norm {b[3]} vs {a[3]}"
    worst = largest_difference(weights(one_dir), weights(run))
    assert worst < TOLERANCE[method], f"largest difference {worst:.2e}"
    for e1, e2 in zip(one_summary["evals"], summary["evals"], strict=True):
        assert e1["step"] == e2["step"] and e2["loss"] == pytest.approx(e1["loss"], abs=1e-5)


@pytest.mark.parametrize(("method", "offload"), [("full", "none"), ("lora", "optimizer")])
def test_zero2_reaches_the_weights_of_one_process(tmp_path, tiny_bert, data, single, method, offload):
    summary = zero_run(tmp_path / "zero", tiny_bert, data, method, 2, f"train.offload={offload}")
    d = summary["distributed"]
    assert (d["mode"], d["world_size"], d["backend"], d["zero_stage"], d["sharding"], d["config"]) == \
        ("deepspeed", 2, "gloo", 2, "optimizer state, gradients", "built")
    assert d["wrapper"] == f"DeepSpeed engine {importlib.metadata.version('deepspeed')}"
    assert d["offload"] == {"none": "none", "optimizer": "optimizer state to cpu"}[offload]
    assert_trained_like_one_process(single[method], tmp_path / "zero", summary, method)


def test_zero3_lora_exports_the_trained_adapter(tmp_path, tiny_bert, data, single):
    """ZeRO-3 partitions every parameter: saving the adapter from the live model would write empty tensors
    (TRL #4416, PEFT #2892). Ours is gathered first: plain peft loads it and answers like one process's."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "zero3-lora"
    summary = zero_run(out, tiny_bert, data, "lora", 3)
    assert summary["distributed"]["sharding"] == "parameters, gradients, optimizer state"
    assert_trained_like_one_process(single["lora"], out, summary, "lora")
    mine = weights(out)
    lora_b = [k for k in mine if "lora_B" in k]
    assert lora_b and all(mine[k].numel() and mine[k].abs().max() > 1e-3 for k in lora_b), "lora_B not trained"
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    batch = tok(["the film was good", "a dull and boring plot"], return_tensors="pt", padding=True)
    logits = []
    for run in (single["lora"][0], out):
        base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
        model = PeftModel.from_pretrained(base, run / "adapter").eval()
        with torch.no_grad():
            logits.append(model(**batch).logits)
    assert torch.allclose(logits[0], logits[1], atol=1e-4), (logits[0], logits[1])
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2).eval()
    with torch.no_grad():
        assert not torch.allclose(base(**batch).logits, logits[1], atol=1e-3), "the adapter changes nothing"


def test_zero3_trains_checkpoints_and_resumes_exactly(tmp_path, tiny_bert, data, single):
    """Full fine-tuning under ZeRO-3 reaches one process's weights; its checkpoints are DeepSpeed's own format
    (one optimizer partition per rank) plus our schedule, and a run resumed from step 15 ends with the very
    weights of the run that never stopped (the best model re-exported from its checkpoint on the way)."""
    whole = tmp_path / "whole"
    keep = {"train.save_every": 5, "train.keep_last": 4}
    summary = zero_run(whole, tiny_bert, data, "full", 3, **keep)
    assert summary["distributed"]["zero_stage"] == 3
    assert_trained_like_one_process(single["full"], whole, summary, "full")
    step15 = whole / "checkpoints" / "step-000015"
    assert (step15 / "deepspeed").is_dir() and (step15 / "scheduler.pt").is_file()
    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-000020")
    (resumed / "summary.json").unlink()
    again = zero_run(resumed, tiny_bert, data, "full", 3, "--resume", "auto", **keep)
    assert again["resumed_from"].endswith("step-000015") and again["steps"] == STEPS
    assert steps(resumed) == steps(whole)
    worst = largest_difference(weights(whole), weights(resumed))
    assert worst == 0.0, f"largest difference {worst:.2e}"


def test_offload_of_parameters_below_stage_3_is_refused(tmp_path, tiny_bert, data):
    done = deltatune([*overrides(tmp_path / "r", tiny_bert, data, "full", batch_size=2),
                      "train.distributed=deepspeed", "train.zero_stage=2", "train.offload=all"], nproc=1)
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    said = " ".join((done.stdout + done.stderr).split())
    assert "train.offload=all" in said and "train.zero_stage=3" in said and "Traceback" not in said


def strategy_for(tmp_path: Path, tiny_bert: Path, data, *args: str):
    """The DeepSpeed strategy a 2-process run of this config would build (no process group needed)."""
    from deltatune.engine import precision, zero
    from deltatune.engine.distributed import Dist

    cfg = config.load(None, [*overrides(tmp_path / "r", tiny_bert, data, "full", batch_size=2),
                             "train.distributed=deepspeed", *args])
    cpu = torch.device("cpu")
    return zero.DeepSpeedZero(Dist(rank=0, world=2, local_rank=0, device=cpu), cfg, precision.resolve("fp32", cpu))


def test_a_user_json_runs_as_it_is_once_it_agrees(tmp_path, tiny_bert, data):
    path = write_json(tmp_path / "ds.json", {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {
        "stage": 3, "offload_optimizer": {"device": "cpu"}}, "zero_optimization_extra_key_kept": 1})
    spread = strategy_for(tmp_path, tiny_bert, data, f"train.deepspeed_config={path}")
    d = spread.describe()
    assert (d["zero_stage"], d["offload"], d["config"]) == (3, "optimizer state to cpu", f"user JSON {path}")
    assert spread.shards_parameters and spread.ds_config["zero_optimization_extra_key_kept"] == 1
    # What the JSON leaves out comes from deltatune's config (2 x 2 accumulation x 2 processes).
    assert (spread.ds_config["gradient_accumulation_steps"], spread.ds_config["train_batch_size"]) == (2, 8)


@pytest.mark.parametrize(("json_keys", "said"), [
    ({"train_micro_batch_size_per_gpu": 4}, r"train_micro_batch_size_per_gpu is 4, but deltatune's config gives 2"),
    ({"train_batch_size": 16}, r"train_batch_size is 16, but deltatune's config gives 8 .*2 process"),
    ({"optimizer": {"type": "Adam"}}, r"`optimizer` section would replace deltatune's"),
    ({"bf16": {"enabled": True}}, r"enables \['bf16'\], but the run's precision is fp32"),
    ({"zero_optimization": {"stage": 0}}, r"stage is 0; deltatune runs ZeRO stages 1, 2 or 3"),
])
def test_a_user_json_that_disagrees_is_refused(tmp_path, tiny_bert, data, json_keys, said):
    path = write_json(tmp_path / "ds.json", {"zero_optimization": {"stage": 2}, **json_keys})
    with pytest.raises(ConfigError, match=said):
        strategy_for(tmp_path, tiny_bert, data, f"train.deepspeed_config={path}")


def test_stage_of_the_json_and_the_config_must_agree(tmp_path, tiny_bert, data):
    path = write_json(tmp_path / "ds.json", {"zero_optimization": {"stage": 3}})
    with pytest.raises(ConfigError, match=r"train.zero_stage=1, but .* asks for ZeRO stage 3"):
        strategy_for(tmp_path, tiny_bert, data, f"train.deepspeed_config={path}", "train.zero_stage=1")


def write_json(path: Path, obj: dict) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path
