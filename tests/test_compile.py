"""train.compile: length buckets (bounded graphs, padding that changes nothing), the persistent cache directory,
compile time counted apart, and preflight's refusals. The one test that compiles is marked slow (C++ builds)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from deltatune import config, preflight
from deltatune.constants import IGNORE_INDEX
from deltatune.data.batching import collate, model_inputs
from deltatune.engine import compiling
from deltatune.engine.loop import task_loss
from deltatune.errors import ConfigError


def test_buckets_are_few_and_waste_at_most_half():
    assert compiling.buckets(128) == [16, 32, 48, 64, 96, 128]
    for max_length in (40, 128, 512, 4096, 32768):
        b = compiling.buckets(max_length)
        assert b == sorted(set(b)) and b[-1] == max_length
        assert len(b) <= 2 * math.log2(max_length)
        for n in range(1, max_length + 1):
            padded = compiling.bucket_length(n, max_length)
            assert padded >= n and padded in b
            assert n <= 32 or padded <= 1.5 * n, (n, padded)
    assert compiling.bucket_length(300, 256) == 300  # longer than max_length (packed rows): left as it is


def rows(lengths, vocab=100, lm=False):
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(5, vocab, (n,), generator=g).tolist() for n in lengths]
    out = {"input_ids": ids, "labels": [i % 2 for i in range(len(ids))]}
    if lm:
        out["labels"] = [[IGNORE_INDEX] * (len(x) // 2) + x[len(x) // 2:] for x in ids]
    return out


def test_padding_to_a_bucket_keeps_the_loss(tiny_bert):
    """Classification: padded positions are masked out of attention; labels are one per row."""
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2).eval()
    batch = collate(rows([21, 9, 14]), 0)
    padded = compiling.pad_to_bucket(batch, 0, 128)
    assert padded["input_ids"].shape == (3, 32) and int(padded["attention_mask"].sum()) == 21 + 9 + 14
    assert torch.equal(padded["labels"], batch["labels"])
    with torch.no_grad():
        a = task_loss(model(**model_inputs(batch, False)).logits, batch["labels"], False)
        b = task_loss(model(**model_inputs(padded, False)).logits, padded["labels"], False)
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("packed", [False, True])
def test_padding_to_a_bucket_keeps_the_lm_loss(tiny_llama, packed):
    """Language modelling: padded labels are no targets; packed rows' padding is one more segment from 0."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    data = rows([40, 33], lm=True)
    if packed:  # two examples in the first row, positions restarting at 0
        data["position_ids"] = [list(range(25)) + list(range(15)), list(range(33))]
    batch = collate(data, 0, lm=True)
    padded = compiling.pad_to_bucket(batch, 0, 128)
    assert padded["input_ids"].shape == (2, 48)
    assert (padded["labels"][:, 40:] == IGNORE_INDEX).all()
    if packed:
        assert padded["position_ids"][1].tolist() == list(range(33)) + list(range(15))  # collate's segment goes on
        assert padded["position_ids"][0].tolist() == list(range(25)) + list(range(15)) + list(range(8))
    with torch.no_grad():
        a = task_loss(model(**model_inputs(batch, True)).logits, batch["labels"], True)
        b = task_loss(model(**model_inputs(padded, True)).logits, padded["labels"], True)
    assert torch.allclose(a, b, rtol=1e-5)


def test_cache_dir_default_and_configured(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "dt"))
    assert compiling.cache_dir(config.TrainSection()) == tmp_path / "dt" / "compile"
    chosen = compiling.cache_dir(config.TrainSection(compile=True, compile_cache=str(tmp_path / "mine")))
    assert chosen == tmp_path / "mine" and chosen.is_dir()
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    compiling.enable_cache(chosen)
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    assert Path(cache_dir()) == chosen  # where inductor writes its kernels now


def test_preflight_compile(monkeypatch, tmp_path):
    def load(**kw):
        return config.load(None, ["data.train=x.jsonl", *(f"{k}={v}" for k, v in kw.items())])

    with pytest.raises(ConfigError, match="compile_cache.*train.compile=false.*Fix"):
        preflight._compile(load(**{"train.compile_cache": str(tmp_path)}))
    monkeypatch.setattr(preflight.precision, "default_device", lambda: torch.device("cpu"))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(ConfigError, match="no-such-compiler.*not on PATH.*Fix"):
        preflight._compile(load(**{"train.compile": "true"}))
    monkeypatch.delenv("CXX")
    preflight._compile(load(**{"train.compile": "true"}))  # g++ here


def test_clock_counts_only_steps_that_compiled(monkeypatch):
    graphs = iter([0, 0, 0, 2, 2, 2])
    monkeypatch.setattr(compiling, "graphs_compiled", lambda: next(graphs))
    clock = compiling.CompileClock(True, max_length=64)
    assert clock.stop(clock.start()) == 0.0
    assert clock.stop(clock.start()) > 0.0
    assert clock.stop(clock.start()) == 0.0
    s = clock.summary()
    assert s["steps_that_compiled"] == 1 and s["graphs"] == 2 and s["compile_s"] >= 0 and s["buckets"][-1] == 64
    assert compiling.CompileClock(False).summary()["compile_s"] == 0.0


SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from types import SimpleNamespace
    from deltatune.engine import compiling
    torch.manual_seed(0)
    emb, head = torch.nn.Embedding(50, 16), torch.nn.Linear(16, 2)
    model = torch.nn.Sequential(emb, head)
    net = compiling.compile_model(model, SimpleNamespace(compile_cache=sys.argv[1]), 64)
    clock = compiling.CompileClock(True, sys.argv[1], 64)
    for length in (5, 9, 14, 30, 31, 7):  # buckets 16, 16, 16, 32, 32, 16: two graphs
        batch = compiling.pad_to_bucket({"input_ids": torch.ones(4, length, dtype=torch.long)}, 0, 64)
        mark = clock.start()
        net(batch["input_ids"]).sum().backward()
        clock.stop(mark)
    print(json.dumps(clock.summary()))
""")


@pytest.mark.slow
def test_compile_graphs_are_bounded_and_cached(tmp_path):
    """Six lengths in two buckets compile two graphs; a second process finds them in the cache directory."""
    cache = tmp_path / "cache"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    results = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", SCRIPT, str(cache)], capture_output=True, text=True, env=env,
                             timeout=900)
        assert out.returncode == 0, out.stderr[-3000:]
        import json

        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    cold, warm = results
    assert cold["graphs"] == warm["graphs"] == 2 and cold["steps_that_compiled"] == 2
    assert any(cache.rglob("*.py")) or any(cache.rglob("*.so")), "nothing written to the compile cache"
    assert warm["compile_s"] < cold["compile_s"], (cold, warm)
