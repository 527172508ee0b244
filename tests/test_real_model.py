"""A short real fine-tune of the built-in MiniLM-L6 on the built-in movie reviews (slow: ~1 minute)."""

from __future__ import annotations

import json
import re

import pytest

from deltatune import api, config


@pytest.mark.slow
def test_minilm_short_finetune_learns_sentiment(tmp_path):
    cfg = config.load("configs/quickstart.yaml", [
        "train.max_steps=60", "train.threads=2", "eval.every=60", f"output.dir={tmp_path / 'run'}",
        "data.validation=0.05",
    ])
    s = api.train(cfg)
    assert s["model"] == "minilm-l6" and s["steps"] == 60
    assert s["data"]["train_rows"] + s["data"]["validation_rows"] == 10_568
    # Chance is 0.5; 60 steps of full fine-tuning already separate the classes clearly.
    assert s["best_metrics"]["accuracy"] > 0.75, s["best_metrics"]
    preds = api.predict(tmp_path / "run", ["A moving, beautifully acted film.", "Tedious, ugly and far too long."])
    assert [p["label"] for p in preds] == ["positive", "negative"]
    labels = json.loads((tmp_path / "run" / "labels.json").read_text())
    assert labels == ["negative", "positive"]


@pytest.mark.slow
def test_qlora_on_minilm_trains_and_merges(tmp_path):
    """The real encoder in 4 bits: the new head stays full precision, training runs, merge verifies."""
    pytest.importorskip("bitsandbytes")
    from deltatune.export.merge import merge

    cfg = config.load("configs/lora.yaml", ["method.name=qlora", "train.max_steps=8", "eval.every=8",
                                            "data.validation=0.02", f"output.dir={tmp_path / 'run'}"])
    s = api.train(cfg)
    assert s["quantized_base"] and s["steps"] == 8
    report = merge(tmp_path / "run", tmp_path / "merged")
    assert report["max_abs_diff"] < 1e-4


@pytest.mark.slow
def test_smollm2_lora_sft_steps_generate_and_probe(tmp_path):
    """A few LoRA steps on the real SmolLM2-135M-Instruct (converted once from the package's GGUF)."""
    from deltatune.models.catalogue import BUILTIN_MODELS

    pytest.importorskip("gguf")
    cfg = config.load("configs/smollm2-sentiment-lora.yaml", [
        "data.sample=24", "data.validation=0.002", "train.max_steps=3", "train.batch_size=8", "train.threads=2",
        "eval.generate_rows=3", "eval.forgetting_rows=2", "eval.at_start=false", f"output.dir={tmp_path / 'run'}"])
    s = api.train(cfg)
    assert s["steps"] == 3 and s["data"]["template"] == "chat" and s["artifact"] == "adapter"
    # 3 generated rows, all of them in the samples: label_accuracy is checked answer by answer. The instruct
    # model answers in one word (docs/decoders-table.md), so each answer names exactly one label.
    best = s["best_metrics"]
    assert best["generated_rows"] == 3 and len(best["samples"]) == 3, best
    named = [{w for w in ("positive", "negative") if re.search(rf"\b{w}\b", x["answer"].lower())}
             for x in best["samples"]]
    assert all(len(n) == 1 for n in named), best["samples"]
    right = sum(n == {x["reference"].lower()} for n, x in zip(named, best["samples"]))
    assert best["label_accuracy"] == pytest.approx(right / 3), best
    # The base model (adapters off) is a fluent LLM: single-digit-to-tens perplexity on news, not thousands.
    assert 1.0 < s["forgetting"]["perplexity_before"] < 100.0
    assert (BUILTIN_MODELS["smollm2-135m"].path() / "model.safetensors").exists()  # the cached conversion
    out = api.generate(tmp_path / "run", ["Classify the sentiment of this movie review. Answer with one word: "
                                          "positive or negative.\n\nA gorgeous, moving film."], max_new_tokens=8)
    assert out[0]["template"] == "chat" and out[0]["text"].strip()
