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
import shutil
from pathlib import Path

import pytest
import torch

from deltatune import api, config
from deltatune.errors import ConfigError
from tests.multiproc import STEPS, deltatune, largest_difference, overrides, steps, weights, write_data

pytest.importorskip("deepspeed")

TOLERANCE = {"full": 5e-5, "lora": 5e-5}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    return write_data(tmp_path_factory)


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_bert, data) -> dict[str, tuple[Path, dict]]:
    """One plain process per method, batch 4 x accumulation 2 (in this process)."""
    runs = {}
    for method in ("full", "lora"):
        out = tmp_path_factory.mktemp(f"single-{method}") / "run"
        runs[method] = out, api.train(config.load(None, overrides(out, tiny_bert, data, method, batch_size=4)))
    return runs


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


def test_zero2_in_one_process_reaches_the_plain_weights(tmp_path, tiny_bert, data, single):
    """The same config from one process on: ZeRO-2 in a group of one (batch 4 x accumulation 2, the last global
    batch of one row runs a stand-in, which DeepSpeed's accumulation count needs) trains like plain torch."""
    out = tmp_path / "one-zero"
    done = deltatune([*overrides(out, tiny_bert, data, "full", batch_size=4), "train.distributed=deepspeed",
                      "train.zero_stage=2"], nproc=1)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["distributed"]["mode"], summary["distributed"]["world_size"]) == ("deepspeed", 1)
    assert_trained_like_one_process(single["full"], out, summary, "full")


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
