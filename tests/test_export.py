"""Merge with verification, many adapters over one base, and parameter counts without weights."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from deltatune import api, config
from deltatune.errors import DeltatuneError


def train(make_config, tmp_path, name, **kw):
    cfg = make_config(**{"output.dir": str(tmp_path / name), "train.max_steps": 8, "train.lr": 1e-2,
                         "eval.every": 100, **kw})
    api.train(cfg)
    return tmp_path / name


@pytest.mark.parametrize("method", [{"method.name": "lora", "method.r": 4},
                                    {"method.name": "lora", "method.variant": "dora"},
                                    {"method.name": "lora", "method.variant": "rslora", "method.init": "gaussian"},
                                    {"method.name": "ia3"}], ids=["lora", "dora", "rslora", "ia3"])
def test_merge_equals_unmerged_and_loads_in_plain_transformers(make_config, tmp_path, method):
    run = train(make_config, tmp_path, "run", **method)
    from deltatune.export.merge import merge

    report = merge(run, tmp_path / "merged")
    assert report["max_abs_diff"] < 1e-4 and report["samples"] > 0
    # Trained adapters are non-trivial: the merged model is not the base model.
    loaded = api.load_run(run, device="cpu")
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    enc = tok(["a good film", "dull and boring plot"], padding=True, return_tensors="pt")
    with torch.no_grad():
        a = loaded.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        b = plain(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        base = loaded.model.get_base_model()
        with loaded.model.disable_adapter():
            c = base(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    assert torch.allclose(a, b, atol=1e-4)
    assert not torch.allclose(a, c, atol=1e-3)
    assert "lora_" not in json.dumps(list(plain.state_dict()))


def test_merge_refused_for_soft_prompts_and_full(make_config, tmp_path):
    from deltatune.export.merge import merge

    run = train(make_config, tmp_path, "pt", **{"method.name": "prompt_tuning", "method.num_virtual_tokens": 4})
    with pytest.raises(DeltatuneError, match="cannot be merged: soft prompts add virtual tokens"):
        merge(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    run = train(make_config, tmp_path, "full", **{"method.name": "full"})
    with pytest.raises(DeltatuneError, match="nothing to merge"):
        merge(run, tmp_path / "out")


def test_many_adapters_over_one_base_and_mixed_batches(make_config, tmp_path, toy_data):
    from deltatune.inference import MultiAdapter

    a = train(make_config, tmp_path, "a", **{"method.name": "lora", "method.r": 4, "train.seed": 1})
    b = train(make_config, tmp_path, "b", **{"method.name": "lora", "method.r": 8, "train.seed": 2,
                                             "train.lr": 3e-2})
    served = MultiAdapter([a, b])
    texts = ["a good film", "the plot was dull", "superb warm story", "awful boring script"]
    alone = {r: served.predict(texts, r) for r in (a, b)}
    # Each adapter answers as its own run does when loaded by itself.
    for r in (a, b):
        own = api.predict(r, texts)
        assert [x["score"] for x in alone[r]] == pytest.approx([x["score"] for x in own], abs=1e-5)
    assert [x["score"] for x in alone[a]] != pytest.approx([x["score"] for x in alone[b]], abs=1e-3)
    # A mixed batch (rows for different adapters) equals running each adapter alone.
    runs = [a, b, b, a]
    mixed = served.predict_mixed(texts, runs)
    for i, (row, r) in enumerate(zip(mixed, runs)):
        assert row["score"] == pytest.approx(alone[r][i]["score"], abs=1e-5)


def test_multi_adapter_holds_full_runs_too(make_config, tmp_path):
    from deltatune.inference import MultiAdapter

    full = train(make_config, tmp_path, "full", **{"method.name": "full"})
    ia3 = train(make_config, tmp_path, "ia3", **{"method.name": "ia3"})
    served = MultiAdapter([ia3, full])
    texts = ["a good film", "the plot was dull"]
    for run in (full, ia3):  # each as its own run answers, whatever else is loaded
        assert [x["score"] for x in served.predict(texts, run)] == pytest.approx(
            [x["score"] for x in api.predict(run, texts)], abs=1e-5)
    with pytest.raises(DeltatuneError, match="is not one of the loaded runs"):
        served.predict(texts, tmp_path / "other")
    with pytest.raises(DeltatuneError, match="not a finished deltatune run"):
        MultiAdapter([tmp_path])


def test_params_counts_roberta_base_lora_without_weights(tmp_path):
    """LoRA paper, Table 2: RoBERTa-base with r=8 on query and value trains 0.3M parameters."""
    from transformers import RobertaConfig

    from deltatune.plan.params import count

    RobertaConfig().save_pretrained(tmp_path)  # a config.json only: there are no weights to load
    cfg = config.load(None, [f"model.name={tmp_path}", "data.train=unused", "method.name=lora", "method.r=8",
                             "method.target_modules=[query,value]"])
    result = count(cfg)
    assert result["method_params"] == 294_912 == result["added_params"]
    assert result["base_params"] == 124_646_402  # roberta-base body + its 2-label classification head


def test_params_cli_prints_the_table(tmp_path):
    from transformers import RobertaConfig
    from typer.testing import CliRunner

    from deltatune.cli import app

    RobertaConfig().save_pretrained(tmp_path)
    r = CliRunner().invoke(app, ["params", f"model.name={tmp_path}", "method.name=lora",
                                 "method.target_modules=[query,value]"])
    assert r.exit_code == 0, r.output
    assert "294,912" in r.output


def test_merge_causal_lm_lora(make_config, tmp_path, tiny_llama):
    from deltatune.export.merge import merge

    run = train(make_config, tmp_path, "lm", **{"model.name": str(tiny_llama), "task": "causal_lm",
                                                 "method.name": "lora", "method.r": 4})
    report = merge(run, tmp_path / "merged")
    assert report["max_abs_diff"] < 1e-4
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged").config.model_type == "llama"


# ---------------------------------------------------------------------------------------------
# Merge targets: never delete what is not a previous merge (issue 10)


@pytest.fixture
def lora_in_parent(make_config, tmp_path):
    """p/ holding the run p/lora, another run p/other and an unrelated file."""
    parent = tmp_path / "p"
    run = train(make_config, parent, "lora", **{"method.name": "lora", "method.r": 4})
    (parent / "other").mkdir()
    (parent / "other" / "summary.json").write_text("{}")
    (parent / "notes.txt").write_text("keep me")
    return parent, run


def listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_merge_into_a_parent_or_the_run_itself_is_refused_before_loading(lora_in_parent, tmp_path, monkeypatch):
    from deltatune.cli import app
    from deltatune.export import merge as merge_mod

    parent, run = lora_in_parent
    before = listing(parent)
    monkeypatch.setattr(merge_mod.api, "load_run", lambda *a, **k: pytest.fail("weights loaded"))
    link = tmp_path / "link-to-p"
    link.symlink_to(parent)
    for out in (parent, run, run / "adapter", run / "merged", tmp_path, link):
        for overwrite in (False, True):
            with pytest.raises(DeltatuneError, match="contains the run|inside the run"):
                merge_mod.merge(run, out, overwrite=overwrite)
    from typer.testing import CliRunner

    r = CliRunner().invoke(app, ["merge", str(run), str(parent), "--overwrite"])
    assert r.exit_code != 0 and "contains the run" in " ".join(str(r.exception).split())
    assert listing(parent) == before


def test_merge_into_a_non_empty_directory_needs_overwrite_and_a_previous_merge(lora_in_parent, tmp_path):
    from deltatune.export.merge import merge

    parent, run = lora_in_parent
    before = listing(parent)
    for overwrite in (False, True):  # other runs and files are never replaced
        with pytest.raises(DeltatuneError, match="not empty" if not overwrite else "not a previous merge"):
            merge(run, parent / "other", overwrite=overwrite)
    assert listing(parent) == before
    out = tmp_path / "merged"
    merge(run, out)
    first = (out / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(DeltatuneError, match="--overwrite"):
        merge(run, out)
    (out / "mine.txt").write_text("x")  # a previous merge is replaced as a whole, with --overwrite only
    merge(run, out, overwrite=True)
    assert (out / "merge_report.json").exists() and not (out / "mine.txt").exists()
    assert (out / "model.safetensors").stat().st_mtime_ns != first
    assert not any(p.name.startswith(".") for p in out.iterdir()), "the lock file is gone after the merge"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    with pytest.raises(DeltatuneError, match="verification failed"):  # a failed merge leaves no new directory
        merge(run, tmp_path / "never", tolerance=-1.0)
    assert not (tmp_path / "never").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    merge(run, empty)  # an existing empty directory is fine
    assert (empty / "merge_report.json").exists()


def test_the_merge_check_measures_the_difference_relative_to_the_largest_logit():
    """float32 rounding grows with the values: the same 3e-4 is 1e-5 of logits reaching 30 (passes the default
    1e-4), and stays 3e-4 where logits are below 1 (the scale is floored at 1)."""
    from deltatune.export.merge import merge_checked

    class Fake(torch.nn.Module):
        def __init__(self, logits, merged=None):
            super().__init__()
            self.logits, self.merged = logits, merged

        def forward(self, **batch):
            return SimpleNamespace(logits=self.logits)

        def merge_and_unload(self):
            return self.merged

    for logits, expected in ((torch.tensor([[30.0, -12.0]]), 1e-5), (torch.tensor([[0.5, -0.2]]), 3e-4)):
        merged, before, diff = merge_checked(Fake(logits, Fake(logits + 3e-4)), {})
        assert diff == pytest.approx(expected, rel=1e-2) and torch.equal(before, logits)
