"""task: preference trained by deltatune's loop: DPO with a live reference (LoRA, the adapter switched off) and
with a precomputed one (full fine-tuning), reference-free SimPO/ORPO, the reference equal to the base model,
the preference metrics in metrics.jsonl and summary.json, the best checkpoint by eval.metric, accumulation
equivalence and exact resume after a kill (the reference cache read back, never recomputed)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from deltatune import api, config, methods
from deltatune import data as data_mod
from deltatune.engine import loop, precision
from deltatune.engine import preference as objective
from deltatune.engine.distributed import Dist
from deltatune.errors import DeltatuneError
from deltatune.preference.losses import sequence_logps
from tests.conftest import write_jsonl

FILMS = ["good", "dull", "long", "warm", "odd", "bold", "slow", "kind"]


def pairs(n: int, offset: int = 0) -> list[dict]:
    """A learnable preference: whatever the review, the chosen answer is `positive`, the rejected `negative`."""
    return [{"prompt": f"review {i + offset}: the film was {FILMS[(i + offset) % len(FILMS)]}",
             "chosen": "positive", "rejected": "negative"} for i in range(n)]


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pairs")
    return {"train": write_jsonl(d / "train.jsonl", pairs(16)),
            "validation": write_jsonl(d / "val.jsonl", pairs(8, 100))}


def make(out: Path, model: Path, files: dict, method: str = "lora", **extra):
    overrides = {"model.name": model, "task": "preference", "data.train": files["train"],
                 "data.validation": files["validation"], "method.name": method, "train.batch_size": 4,
                 "train.max_steps": 8, "train.lr": 1e-2 if method == "lora" else 3e-3, "train.precision": "fp32",
                 "train.threads": 1, "train.log_every": 2, "eval.every": 4, "eval.forgetting": "false",
                 "output.dir": out, **extra}
    if method == "lora":
        overrides.setdefault("method.r", 4)
    return config.load(None, [f"{k}={v}" for k, v in overrides.items()])


def records(run: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [{k: v for k, v in r.items() if k not in ("time", "tokens_per_s")} for r in rows if "loss" in r]
    return train, [r["eval"] for r in rows if "eval" in r]


def test_dpo_with_lora_learns_the_preference_and_logs_its_metrics(tiny_chat_llama, pair_files, tmp_path):
    cfg = make(tmp_path / "run", tiny_chat_llama, pair_files, **{"eval.at_start": "true",
                                                                 "eval.metric": "reward_accuracy"})
    s = api.train(cfg)
    assert s["preference"]["reference"] == "live" and s["preference"]["hyper"] == {"beta": 0.1, "label_smoothing": 0.0}
    first, last = s["evals"][0], s["evals"][-1]
    # Before the first step the policy is the reference: every reward is 0, no pair is won (a tie is no win).
    assert first["step"] == 0 and first["reward_accuracy"] == 0.0 and first["loss"] == pytest.approx(math.log(2))
    assert last["reward_accuracy"] == 1.0 and last["reward_margin"] > 0 and last["loss"] < math.log(2)
    assert last["chosen_reward"] > last["rejected_reward"]
    train, evals = records(tmp_path / "run")
    assert [r["step"] for r in train] == [2, 4, 6, 8] and evals == s["evals"]
    for r in train:
        assert {"loss", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward", "chosen_logps",
                "rejected_logps"} <= r.keys()
    assert train[-1]["reward_accuracy"] == 1.0
    # eval.metric=reward_accuracy picks the first eval that reaches the highest accuracy.
    best = max(s["evals"], key=lambda e: e["reward_accuracy"])
    assert (s["best_metric"], s["best_step"], s["best_metrics"]) == ("reward_accuracy", best["step"], best)
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["preference"]["reference"] == "live" and on_disk["best_metrics"]["reward_margin"] > 0


def base_logps(model_dir: Path, split, averages: bool = False) -> torch.Tensor:
    """[pairs, 2] log-probabilities of a split's pairs under the base model loaded alone, one pair at a time."""
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for i in range(len(split.dataset)):
            batch = pair_batch(split, [i], 0)  # padding is masked (and not scored): any id
            logits = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            out.append(sequence_logps(logits, batch["labels"], averages))
    return torch.stack(out)


def pair_batch(split, rows: list[int], pad_id: int) -> dict:
    from deltatune.data import preference as pair_data

    return pair_data.collate(split.dataset[rows], pad_id)


@pytest.mark.parametrize(("loss", "loss_at_start"), [("dpo", math.log(2)), ("ipo", (1 / (2 * 0.1)) ** 2)])
def test_full_fine_tuning_precomputes_the_initial_models_reference(tiny_chat_llama, pair_files, tmp_path, loss,
                                                                    loss_at_start):
    """DPO (summed log-probabilities) and IPO (averaged): the reference file holds the base model's."""
    cfg = make(tmp_path / "run", tiny_chat_llama, pair_files, "full", **{"train.log_every": 1,
                                                                         "preference.loss": loss})
    s = api.train(cfg)
    assert s["preference"]["reference"] == "precomputed" and s["evals"][-1]["reward_accuracy"] == 1.0
    cache = load_file(s["preference"]["reference_cache"])
    bundle = data_mod.build(cfg.data, AutoTokenizer.from_pretrained(tiny_chat_llama), task="preference")
    for name in ("train", "validation"):
        expected = base_logps(tiny_chat_llama, getattr(bundle, name), averages=loss == "ipo")
        assert torch.allclose(cache[name], expected, atol=1e-4), name
    # Step 1 is scored before its update, so the policy is the reference: each pair's loss is the loss at a zero
    # margin - only if every pair found its own precomputed row (a misplaced row gives another pair's values).
    first = records(tmp_path / "run")[0][0]
    assert first["step"] == 1 and first["loss"] == pytest.approx(loss_at_start, abs=1e-3)
    assert first["reward_margin"] == pytest.approx(0.0, abs=1e-5)


def test_a_precomputed_reference_for_an_adapter_is_the_base_model_not_the_initial_soft_prompt(
        tiny_chat_llama, pair_files, tmp_path):
    """preference.reference=precomputed with prompt tuning: the table holds the base model's log-probabilities
    (the adapter switched off), not those of the randomly initialised virtual tokens."""
    cfg = make(tmp_path / "run", tiny_chat_llama, pair_files, "prompt_tuning",
               **{"preference.reference": "precomputed", "train.max_steps": 2, "eval.every": 2})
    s = api.train(cfg)
    assert s["preference"]["reference"] == "precomputed" and "preference.reference" in s["preference"]["reference_why"]
    cache = load_file(s["preference"]["reference_cache"])
    bundle = data_mod.build(cfg.data, AutoTokenizer.from_pretrained(tiny_chat_llama), task="preference")
    assert torch.allclose(cache["validation"], base_logps(tiny_chat_llama, bundle.validation), atol=1e-4)


@pytest.mark.parametrize("method", ["lora", "prompt_tuning"])
def test_the_live_reference_is_the_base_model_alone(tiny_chat_llama, pair_files, tmp_path, method):
    """The adapter switched off gives the base model's log-probabilities (prompt tuning: the base model on the
    plain sequence, its virtual tokens gone), while the policy with the adapter on differs."""
    cfg = make(tmp_path / "run", tiny_chat_llama, pair_files, method)
    tok = AutoTokenizer.from_pretrained(tiny_chat_llama)
    bundle = data_mod.build(cfg.data, tok, task="preference")
    torch.manual_seed(0)
    model = methods.apply(AutoModelForCausalLM.from_pretrained(tiny_chat_llama, dtype=torch.float32), cfg.method,
                          "preference")
    with torch.no_grad():  # a trained-looking LoRA (B starts at 0, which would make the comparison vacuous)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    cpu = torch.device("cpu")
    run = SimpleNamespace(model=model, prec=precision.resolve("fp32", cpu), dist=Dist(0, 1, 0, cpu))
    ref = objective.Reference("live", "", averages=False, base_only=loop.base_only, adapter_off=True)
    assert objective.reference_kind(cfg, model)[0] == "live"
    batch = pair_batch(bundle.train, [0, 1, 2], 0)
    chosen, rejected = ref.of_batch(run, batch)
    expected = base_logps(tiny_chat_llama, bundle.train)[:3]
    assert torch.allclose(torch.stack([chosen, rejected], dim=1), expected, atol=1e-5)
    with torch.no_grad():
        policy = sequence_logps(model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits,
                                batch["labels"], False)
    assert not torch.allclose(policy, torch.cat([chosen, rejected]), atol=1e-3)  # the adapter does change it
    assert model.training  # the reference pass ran in eval mode and gave the model back in train mode


@pytest.mark.parametrize(("loss", "reference_forwards"), [("simpo", 0), ("orpo", 0), ("dpo", 6)])
def test_reference_free_losses_run_no_reference_forward(tiny_chat_llama, pair_files, tmp_path, monkeypatch, loss,
                                                        reference_forwards):
    """Forward passes without gradients (no validation, no probe: only a reference makes them) counted."""
    from transformers.models.llama import modeling_llama

    real, grad_modes = modeling_llama.LlamaModel.forward, []

    def counted(self, *args, **kwargs):
        grad_modes.append(torch.is_grad_enabled())
        return real(self, *args, **kwargs)

    monkeypatch.setattr(modeling_llama.LlamaModel, "forward", counted)
    monkeypatch.setattr(loop, "memory_plan", lambda run: "")  # the planner measures on a model of its own
    cfg = make(tmp_path / "run", tiny_chat_llama, pair_files, **{"preference.loss": loss, "data.validation": "null",
                                                                 "train.max_steps": 6, "train.lr": 2e-2})
    s = api.train(cfg)
    assert (grad_modes.count(True), grad_modes.count(False)) == (6, reference_forwards)
    assert s["preference"]["reference"] == ("live" if loss == "dpo" else "none")
    assert not (tmp_path / "run" / objective.CACHE_DIR).exists()
    assert records(tmp_path / "run")[0][-1]["reward_accuracy"] == 1.0  # each loss learns the toy preference


def test_batch_4_equals_batch_2_with_accumulation_2(tiny_chat_llama, pair_files, tmp_path):
    runs = {}
    for batch, accum in ((4, 1), (2, 2)):
        out = tmp_path / f"b{batch}x{accum}"
        api.train(make(out, tiny_chat_llama, pair_files, **{"train.batch_size": batch, "train.grad_accum": accum,
                                                            "train.max_steps": 4, "data.validation": "null",
                                                            "train.log_every": 1}))
        runs[batch] = (load_file(out / "adapter" / "adapter_model.safetensors"), records(out)[0])
    (wa, la), (wb, lb) = runs[4], runs[2]
    assert all(torch.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-6) for k in wa)
    for ra, rb in zip(la, lb, strict=True):
        for key in ("loss", "reward_accuracy", "reward_margin", "chosen_logps"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-5), (ra["step"], key)


def test_killed_preference_run_resumes_exactly_with_its_reference_cache(tiny_chat_llama, pair_files, tmp_path):
    """Full DPO (precomputed reference), killed after step 5 (checkpoints every 2 steps), resumed: the same
    weights, training records and evaluations as a run never interrupted; the reference file is read back
    (not rewritten), and a resume without it is refused rather than recomputed from a half-trained model."""
    extra = {"train.save_every": 2, "train.log_every": 3}  # the checkpoint of step 4 holds an open window
    ref = api.train(make(tmp_path / "ref", tiny_chat_llama, pair_files, "full", **extra))
    cfg = make(tmp_path / "run", tiny_chat_llama, pair_files, "full", **extra)
    path = tmp_path / "config.yaml"
    path.write_text(cfg.to_yaml())
    proc = subprocess.run([sys.executable, "-m", "deltatune", "train", str(path)], capture_output=True, text=True,
                          env={**os.environ, "DELTATUNE_TEST_KILL": "step:5"}, timeout=120)
    assert proc.returncode == -9, proc.stdout + proc.stderr
    cache = next((tmp_path / "run" / objective.CACHE_DIR).glob("*.safetensors"))
    written = cache.stat().st_mtime_ns
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "run", copy)
    shutil.rmtree(copy / objective.CACHE_DIR)
    moved = cfg.model_copy(update={"output": cfg.output.model_copy(update={"dir": str(copy)})})
    with pytest.raises(DeltatuneError, match="cannot be recomputed from a half-trained model"):
        api.train(moved, resume="auto")
    resumed = api.train(cfg, resume="auto")
    assert resumed["resumed_from"].endswith("step-000004") and cache.stat().st_mtime_ns == written
    wa = load_file(tmp_path / "ref" / "model" / "model.safetensors")
    wb = load_file(tmp_path / "run" / "model" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "best model differs"
    assert records(tmp_path / "ref") == records(tmp_path / "run")
    for key in ("steps", "best_step", "best_metrics", "evals"):
        assert ref[key] == resumed[key], key


@pytest.mark.parametrize("method", ["full", "lora"])
def test_ddp_two_processes_reach_the_preference_run_of_one(tiny_chat_llama, tmp_path, method):
    """Global batch 8 (one process 4 x accumulation 2, two ranks 2 x 2) over 17 pairs: the last global batch holds
    one pair, so one rank runs only stand-ins. The step losses and preference metrics (summed over the ranks),
    the sharded evaluation (and, for full, the sharded reference pass) and the weights agree with one process."""
    from tests.multiproc import deltatune, largest_difference, weights

    files = {"train": write_jsonl(tmp_path / "train.jsonl", pairs(17)),
             "validation": write_jsonl(tmp_path / "val.jsonl", pairs(7, 100))}
    extra = {"train.grad_accum": 2, "train.max_steps": 6, "train.log_every": 1, "eval.every": 3,
             "eval.batch_size": 2}
    single = api.train(make(tmp_path / "one", tiny_chat_llama, files, method, **{"train.batch_size": 4, **extra}))
    cfg = make(tmp_path / "two", tiny_chat_llama, files, method, **{"train.batch_size": 2, **extra})
    (tmp_path / "two.yaml").write_text(cfg.to_yaml())
    done = deltatune([str(tmp_path / "two.yaml")])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert (two["distributed"]["mode"], two["world_size"], two["global_batch"]) == ("ddp", 2, single["global_batch"])
    assert two["preference"]["reference"] == single["preference"]["reference"]
    for x, y in zip(records(tmp_path / "one")[0], records(tmp_path / "two")[0], strict=True):
        for key in ("step", "loss", "reward_accuracy", "reward_margin", "chosen_logps", "rejected_logps"):
            assert y[key] == pytest.approx(x[key], abs=1e-5), (x["step"], key)
    for e1, e2 in zip(single["evals"], two["evals"], strict=True):
        for key in ("loss", "reward_accuracy", "reward_margin", "chosen_logps"):
            assert e2[key] == pytest.approx(e1[key], abs=1e-4), (e1["step"], key)
    assert largest_difference(weights(tmp_path / "one"), weights(tmp_path / "two")) < 5e-5



@pytest.mark.parametrize("method", ["lora", "full"])
def test_deltatune_eval_of_a_saved_run_repeats_the_runs_own_evaluation(tiny_chat_llama, pair_files, tmp_path,
                                                                       method):
    """api.evaluate of a saved preference run gives the metrics of its best evaluation: the reference as in
    training (lora: the adapter switched off; full: the base model loaded alone, as its table was computed)."""
    s = api.train(make(tmp_path / "run", tiny_chat_llama, pair_files, method))
    again = api.evaluate(tmp_path / "run")
    best = s["best_metrics"]
    assert best["reward_margin"] != 0.0  # a reference equal to the policy would give 0 everywhere
    for key in ("loss", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward",
                "preference_accuracy"):
        assert again[key] == pytest.approx(best[key], abs=1e-4), key
    assert again["rows"] == 8


def test_preference_accuracy_and_generated_answers_are_evaluated_from_the_start(tiny_chat_llama, pair_files,
                                                                                tmp_path):
    """preference_accuracy ranks the answers by the policy alone (defined at step 0, where every reward is 0);
    eval.metric=label_accuracy generates answers to the prompts and scores them against the chosen answers."""
    cfg = make(tmp_path / "run", tiny_chat_llama, pair_files, **{"eval.at_start": "true",
                                                                 "eval.metric": "label_accuracy",
                                                                 "eval.max_new_tokens": 3})
    s = api.train(cfg)
    first, last = s["evals"][0], s["evals"][-1]
    assert first["step"] == 0 and first["reward_accuracy"] == 0.0
    assert 0.0 <= first["preference_accuracy"] <= 1.0 and last["preference_accuracy"] == 1.0
    assert first["generated_rows"] == 8 and {x["reference"] for x in first["samples"]} == {"positive"}
    assert "label_accuracy" in last and s["best_metric"] == "label_accuracy"


def test_every_preference_metric_can_pick_the_best_checkpoint(tiny_chat_llama, pair_files, tmp_path):
    """eval.metric accepts each metric task preference evaluates (the config's list and the task's agree)."""
    from deltatune.evaluation.metrics import HIGHER_IS_BETTER, TASK_METRICS

    for metric in TASK_METRICS["preference"]:
        cfg = make(tmp_path / "run", tiny_chat_llama, pair_files, **{"eval.metric": metric})
        assert cfg.metric == metric and metric in HIGHER_IS_BETTER


def test_sft_then_dpo_starts_from_the_sft_runs_model(tiny_chat_llama, pair_files, tmp_path):
    """model.name may name a finished run: a full sft run stands for the model it saved; an adapter run is
    refused with the merge command, and its merged output is the DPO run's base (and reference)."""
    from deltatune.export.merge import merge
    from deltatune.models.catalogue import resolve

    sft_rows = [{"instruction": p["prompt"], "output": p["chosen"]} for p in pairs(16)]
    sft_file = write_jsonl(tmp_path / "sft.jsonl", sft_rows)
    sft = {"task": "sft", "data.train": sft_file, "data.validation": "null"}
    for method in ("full", "lora"):
        api.train(make(tmp_path / f"sft-{method}", tiny_chat_llama, pair_files, method, **sft))
    assert Path(resolve(str(tmp_path / "sft-full"))) == tmp_path / "sft-full" / "model"
    with pytest.raises(config.ConfigError, match=r"deltatune merge .*sft-lora .*sft-lora-merged"):
        api.train(make(tmp_path / "dpo", tiny_chat_llama, pair_files, **{"model.name": tmp_path / "sft-lora"}))
    merge(tmp_path / "sft-lora", tmp_path / "sft-lora-merged")
    for base in ("sft-full", "sft-lora-merged"):
        s = api.train(make(tmp_path / f"dpo-{base}", tmp_path / base, pair_files, **{"eval.at_start": "true"}))
        assert s["base"]["name"] == str(tmp_path / base) and s["evals"][-1]["reward_accuracy"] == 1.0
        # At step 0 the DPO policy is the sft model: its validation log-probabilities are the sft model's.
        sft_dir = Path(resolve(str(tmp_path / base)))
        bundle = data_mod.build(make(tmp_path / "x", sft_dir, pair_files).data, AutoTokenizer.from_pretrained(sft_dir),
                                task="preference")
        expected = base_logps(sft_dir, bundle.validation)
        assert s["evals"][0]["chosen_logps"] == pytest.approx(float(expected[:, 0].mean()), abs=1e-4)
