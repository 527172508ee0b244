"""FSDP2 (train.distributed=fsdp) under torchrun: 2 CPU processes (gloo), the tiny models of conftest.

- Two processes at batch 4 reach the weights one process reaches at batch 8 (the same global batch), for full
  fine-tuning (BERT classification), LoRA and prompt tuning (LLaMA sft); the exported model / adapter loads in plain
  transformers / peft in this process and gives the single-process run's outputs. fp32, dropout off: only the
  order of the reductions differs, which moves weights by ~1e-7..1e-6 here (TOL = 1e-5 allowed).
- summary.json records what ran (mode, world, wrapper, sharding); a request FSDP2 cannot honour exits with 2
  and a sentence.
- Resumed from a checkpoint under 2 processes, a run ends bit for bit where the uninterrupted 2-process run ends
  (sharded torch.distributed.checkpoint state: weights, optimizer, and the best model re-exported from its
  shards); resuming it with 1 process is refused with the way forward. (Killing ranks is test_launch's.)
"""

from __future__ import annotations

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
from tests.conftest import sft_rows, write_jsonl

TOL = 1e-5  # fp32: sums over 2 ranks' half-batches instead of one batch (measured max ~1e-6)
STEPS = 16


def make(out: Path, model: Path, toy_data, method: str = "full", **extra):
    overrides = {"model.name": str(model), "data.train": str(toy_data["train"]),
                 "data.validation": str(toy_data["validation"]), "train.max_steps": STEPS, "train.batch_size": 8,
                 "train.lr": 3e-3, "train.precision": "fp32", "train.log_every": 4, "train.threads": 1,
                 "eval.every": 8, "eval.metric": "loss", "output.dir": str(out), "method.name": method, **extra}
    if method == "lora":  # dropout off: rank-dependent dropout draws would differ from one process's
        overrides.update({"method.r": 4, "method.dropout": 0, "method.init": "gaussian", "train.lr": 1e-2})
    return config.load(None, [f"{k}={v}" for k, v in overrides.items()])


def fsdp2(cfg):
    """The same run as FSDP over 2 processes: half the batch per process, the same global batch."""
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"distributed": "fsdp", "batch_size": 4})})


def torchrun(cfg, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    path = tmp / f"config-{len(list(tmp.glob('config-*')))}.yaml"
    path.write_text(cfg.to_yaml())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           "-m", "deltatune", "train", str(path), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)


def trained(cfg, tmp: Path, *args: str) -> dict:
    r = torchrun(cfg, tmp, *args)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return json.loads((Path(cfg.output.dir) / "summary.json").read_text())


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory, tiny_bert, toy_data):
    """Full fine-tuning of the tiny BERT: one process (here) and FSDP x2 (checkpoints every 5 steps)."""
    tmp = tmp_path_factory.mktemp("fsdp-full")
    single = make(tmp / "single", tiny_bert, toy_data, **{"train.save_every": 5})
    sharded = fsdp2(make(tmp / "fsdp", tiny_bert, toy_data, **{"train.save_every": 5}))
    return single, api.train(single), sharded, trained(sharded, tmp)


def test_full_finetuning_matches_one_process_and_loads_in_plain_transformers(full_runs, tok):
    from transformers import AutoModelForSequenceClassification

    single, s1, sharded, s2 = full_runs
    assert s1["global_batch"] == s2["global_batch"] == 8 and s2["steps"] == STEPS
    a, b = (load_file(Path(c.output.dir) / "model" / "model.safetensors") for c in (single, sharded))
    assert max_diff(a, b) < TOL
    assert [e["loss"] for e in s1["evals"]] == pytest.approx([e["loss"] for e in s2["evals"]], abs=TOL)
    batch = tok(["the film was great", "a dull boring plot and actors"], return_tensors="pt", padding=True)
    logits = []
    for c in (single, sharded):  # the FSDP run's export is a plain transformers directory
        model = AutoModelForSequenceClassification.from_pretrained(Path(c.output.dir) / "model").eval()
        with torch.no_grad():
            logits.append(model(**batch).logits)
    assert torch.allclose(logits[0], logits[1], atol=TOL)


def test_summary_records_what_ran(full_runs):
    d = full_runs[3]["distributed"]
    assert (d["mode"], d["world_size"], d["backend"], d["wrapper"], d["offload"]) == \
        ("fsdp", 2, "gloo", "FSDP2 fully_shard", "none")
    assert d["sharding"] == "parameters, gradients and optimizer state per block (2 blocks + root)"
    assert full_runs[1]["distributed"]["mode"] == "single"
    # Each rank holds its shard of AdamW's two fp32 moments: about half of one process's state (rank 0's).
    one, sharded = full_runs[1]["optimizer_state_mb"], full_runs[3]["optimizer_state_mb"]
    assert 0.4 * one < sharded < 0.7 * one


@pytest.mark.parametrize("method", ["lora", "prompt_tuning"])
def test_peft_matches_one_process_and_the_adapter_loads_in_peft(method, tmp_path, tiny_llama, toy_data):
    """LoRA shards its adapters with the frozen base; prompt tuning keeps its soft prompt whole on every rank
    (FSDP.clip averages its gradient over the ranks)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(64, seed=1))
    sft = {"task": "sft", "data.train": str(data), "data.validation": "null", "train.max_steps": 8,
           "eval.forgetting": False, "train.lr": 1e-2}
    single = make(tmp_path / "single", tiny_llama, toy_data, method, **sft)
    sharded = fsdp2(make(tmp_path / "fsdp", tiny_llama, toy_data, method, **sft))
    api.train(single)
    assert trained(sharded, tmp_path)["distributed"]["mode"] == "fsdp"
    a, b = (load_file(Path(c.output.dir) / "adapter" / "adapter_model.safetensors") for c in (single, sharded))
    assert b and all(b[k].abs().max() > 0 for k in b)  # the trained values, not an empty adapter
    # Adam divides by sqrt(v): where a gradient element is near zero, the ~1e-7 of a different reduction order
    # can move its update by up to lr. Measured: one element 5.6e-5 apart (of values up to 0.61), all else <= 1.4e-6.
    assert max_diff(a, b) < 10 * TOL
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    ids = tok(["classify the review : the film was great"], return_tensors="pt")
    out = []
    for c in (None, single, sharded):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama)
        if c is not None:
            model = PeftModel.from_pretrained(model, Path(c.output.dir) / "adapter")
        with torch.no_grad():
            out.append(model.eval()(**ids).logits[:, -1])  # the next token (soft prompts lengthen the rest)
    assert torch.allclose(out[1], out[2], atol=TOL) and not torch.allclose(out[0], out[2], atol=1e-3)


def test_resume_under_2_processes_is_exact_and_1_is_refused(full_runs, tmp_path):
    """The uninterrupted FSDP run again from its checkpoint at step 10 (sharded weights and optimizer state):
    the same end, bit for bit."""
    _, _, sharded, ref = full_runs
    # The best model (step 8) stays best: the resume must rewrite it from checkpoint step-000008's shards.
    assert ref["best_step"] == 8
    run = tmp_path / "run"
    shutil.copytree(sharded.output.dir, run)
    # As if killed after step 12 (nothing after checkpoint step-000010 kept), and the best model lost.
    for done in ("summary.json", "model", "checkpoints/step-000015"):
        shutil.rmtree(run / done) if (run / done).is_dir() else (run / done).unlink()
    cfg = sharded.model_copy(update={"output": sharded.output.model_copy(update={"dir": str(run)})})
    step10 = run / "checkpoints" / "step-000010"
    assert (step10 / "dcp" / ".metadata").is_file() and (step10 / "dcp" / "__1_0.distcp").is_file()
    with pytest.raises(ConfigError, match=r"written by 2 process\(es\), resumed with 1: the global batch .* "
                                          r"from 8 to 4.*--nproc 2"):
        api.train(cfg, resume=str(step10))  # here, in one process
    resumed = trained(cfg, tmp_path, "--resume", str(step10))
    assert resumed["resumed_from"] == str(step10)
    a, b = (load_file(Path(d) / "model" / "model.safetensors") for d in (sharded.output.dir, run))
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run's best model differs"
    for key in ("steps", "best_step", "best_metrics", "evals"):
        assert resumed[key] == ref[key], key
    # Its checkpoint of step 15 (written again: the copy's was removed) holds the same weights and optimizer state.
    ref15, new15 = (dcp_dict(Path(d) / "checkpoints" / "step-000015", tmp_path / f"{i}.pt")
                    for i, d in enumerate((sharded.output.dir, run)))
    assert ref15.keys() == new15.keys() and ref15["optimizer"]["state"]
    assert all(torch.equal(x, y) for x, y in zip(flat(ref15), flat(new15), strict=True))


def dcp_dict(checkpoint: Path, out: Path) -> dict:
    """A sharded checkpoint's weights and optimizer state, read whole in this process (no process group)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(checkpoint / "dcp", out)
    return torch.load(out, weights_only=True)


def flat(tree) -> list[torch.Tensor]:
    if isinstance(tree, dict):
        return [t for k in sorted(tree, key=str) for t in flat(tree[k])]
    if isinstance(tree, list | tuple):
        return [t for x in tree for t in flat(x)]
    return [tree] if isinstance(tree, torch.Tensor) else []


def test_what_fsdp2_cannot_run_exits_2_with_the_reason(make_config, monkeypatch, capsys, tmp_path):
    from deltatune.cli import main

    path = tmp_path / "c.yaml"
    path.write_text(make_config(**{"train.distributed": "fsdp", "train.offload": "optimizer"}).to_yaml())
    monkeypatch.setattr("sys.argv", ["deltatune", "train", str(path)])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert "FSDP2 cannot offload the optimizer state alone" in err and "train.offload=all" in err


@pytest.mark.parametrize(("key", "value", "says"), [
    ("train.offload", "all", "nothing to offload"),
    ("train.deepspeed_config", "ds.json", "FSDP would ignore it"),
])
def test_settings_fsdp2_would_ignore_are_refused(key, value, says, make_config):
    from deltatune.engine.distributed import Dist
    from deltatune.engine.fsdp import FSDP
    from deltatune.engine.precision import Precision

    cfg = make_config(**{"train.distributed": "fsdp", key: value})
    with pytest.raises(ConfigError, match=says):
        FSDP(Dist(0, 1, 0, torch.device("cpu")), cfg, Precision("fp32", "cpu", "requested"))
