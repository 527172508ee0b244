"""Whole-process time outside the training loop: imports only where used, the tokenization cache reused,
no work done twice, no slow shutdown. Each test guards one measured cut (numbers in bench/README.md)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from deltatune.data import build
from deltatune.data.columns import column, rows_of

from .conftest import data_section, toy_rows, write_jsonl

# Heavy packages and what importing each cost here (seconds, measured after torch + transformers).
HEAVY = {"deepspeed": 0.7, "bitsandbytes": 0.5, "peft": 1.3, "sklearn": 1.3, "matplotlib": 0.5}


def imported_after(code: str) -> set[str]:
    """Top-level packages present in a fresh interpreter after running `code`."""
    probe = code + "\nimport sys, json\nprint(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def test_cli_and_help_import_no_ml_stack():
    """`deltatune --help` (the typer app) must not pay for torch, datasets or any optional backend."""
    loaded = imported_after("import deltatune.cli")
    assert not loaded & {"torch", "transformers", "datasets", *HEAVY}, loaded & {"torch", "transformers", "datasets",
                                                                               *HEAVY}


def test_library_front_imports_no_optional_backend():
    """`deltatune.api` (what `deltatune train` imports) loads torch, transformers and datasets, but no optional
    backend and not scikit-learn, which only scoring a classifier needs."""
    loaded = imported_after("import deltatune.api")
    assert {"torch", "transformers", "datasets"} <= loaded
    assert not loaded & set(HEAVY), loaded & set(HEAVY)


def test_metrics_still_computed_with_lazy_sklearn():
    from deltatune.evaluation import metrics

    assert metrics.classification([0, 1, 1, 0], [0, 1, 0, 0], 2) == {
        "accuracy": 0.75, "precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3)}


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_saving_a_model_does_not_import_deepspeed(tmp_path, tiny_bert):
    """transformers' save_pretrained asks accelerate whether the model is a DeepSpeedEngine, which imported
    deepspeed (0.7-1 s) in every run's save; the saved model is the same."""
    code = f"""
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from pathlib import Path
from deltatune.engine.artifact import save_model
model = AutoModelForSequenceClassification.from_pretrained({str(tiny_bert)!r}, num_labels=2)
save_model(model, AutoTokenizer.from_pretrained({str(tiny_bert)!r}), Path({str(tmp_path)!r}) / "model")
import accelerate.utils.other as other
assert other.is_deepspeed_available(), "the probe must be restored after the save"
again = AutoModelForSequenceClassification.from_pretrained({str(tmp_path)!r} + "/model")
assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
"""
    assert "deepspeed" not in imported_after(code)


def test_exit_skips_the_final_garbage_collections():
    """Python's shutdown collections over the loaded ML stack took 2.5-3 s per process: deltatune freezes
    the heap at exit so they skip it. Checked by an exit handler that runs after deltatune's."""
    code = ("import atexit, gc\n"
            "atexit.register(lambda: print('frozen', gc.get_freeze_count() > 0))\n"
            "import deltatune\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "frozen True"


def test_each_text_is_tokenized_once_and_long_rows_still_truncated(tmp_path, tok):
    """Rows that fit are not tokenized a second time; rows that do not are cut exactly as the tokenizer
    cuts them, and counted."""
    rows = toy_rows(40)
    rows[3]["text"] = " ".join(["good film"] * 40)  # far over max_length
    b = build(data_section(train=write_jsonl(tmp_path / "t.jsonl", rows), validation="null", max_length=16), tok)
    expected = tok([r["text"] for r in rows], truncation=True, max_length=16)["input_ids"]
    assert rows_of(b.train.dataset, "input_ids") == expected
    assert b.train.truncated == sum(len(x) > 16 for x in tok([r["text"] for r in rows])["input_ids"]) >= 1
    assert column(b.train.dataset, "length").tolist() == [len(x) for x in expected]


def test_tokenized_splits_come_from_the_cache_when_nothing_changed(tmp_path, tok):
    """The second build of the same data with the same tokenizer reads the cached tokens, also after a call
    that left truncation set on the tokenizer (long rows); a different setting is a different entry."""
    rows = toy_rows(60)
    rows[5]["text"] = " ".join(["dull plot"] * 40)
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    first = build(data_section(train=path, validation="null", max_length=16), tok).train.dataset
    tok(["a long enough text to cut"], truncation=True, max_length=4)  # leaves truncation set on the backend
    second = build(data_section(train=path, validation="null", max_length=16), tok).train.dataset
    assert first.cache_files and first.cache_files == second.cache_files
    other = build(data_section(train=path, validation="null", max_length=12), tok).train.dataset
    assert other.cache_files != first.cache_files


def test_tokenizer_fingerprint_is_the_same_in_another_process(tokenizer_dir):
    """The cache key must not depend on the process (ids, hash seeds): otherwise every run re-tokenizes."""
    from transformers import AutoTokenizer

    from deltatune.data.build import tokenizer_fingerprint

    here = tokenizer_fingerprint(AutoTokenizer.from_pretrained(tokenizer_dir))
    code = (f"from transformers import AutoTokenizer\nfrom deltatune.data.build import tokenizer_fingerprint\n"
            f"print(tokenizer_fingerprint(AutoTokenizer.from_pretrained({str(tokenizer_dir)!r})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHONHASHSEED": "123"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == here


def test_column_reads_match_row_by_row_reads():
    import datasets

    ds = datasets.Dataset.from_dict({"length": [3, 1, 4, 1, 5], "ids": [[1], [2, 3], [], [4], [5, 6]]})
    picked = ds.select([4, 0, 2])
    assert column(picked, "length").tolist() == list(picked["length"]) == [5, 3, 4]
    assert rows_of(picked, "ids") == list(picked["ids"]) == [[5, 6], [1], []]
