"""Combinations that cannot work are refused before any weight (or tokenizer) is loaded, with the reason
and the fix; so are merges of methods that cannot merge, and models that would run their own code."""

from __future__ import annotations

import json
import shutil

import pytest

from deltatune import api, config, models
from deltatune.errors import ConfigError, DeltatuneError


@pytest.fixture
def nothing_loads(monkeypatch):
    """Fail the test if anything heavier than the config is touched."""
    def boom(*a, **k):
        raise AssertionError("preflight let a model or tokenizer load")

    for name in ("load_model", "load_tokenizer"):
        monkeypatch.setattr(models, name, boom)


@pytest.mark.parametrize("overrides, expected", [
    ({"train.precision": "fp16"}, r"fp16 needs a CUDA GPU.*Fix: use train.precision=bf16 or auto"),
    ({"eval.metric": "perplexity"}, r"eval.metric=perplexity does not exist for task `classification`.*Fix: use "
                                    r"one of accuracy, f1"),
    ({"method.name": "qlora", "method.init": "pissa"}, r"qlora with method.init=pissa.*Fix: method.init=default"),
    ({"data.validation": None, "eval.patience": 2}, r"eval.patience=2 needs validation data.*Fix: set "
                                                    r"data.validation"),
    ({"train.offload": "all"}, r"train.offload=all needs a sharding engine.*Fix: set train.distributed=fsdp"),
    ({"train.distributed": "ddp", "train.deepspeed_config": "ds.json"},
     r"deepspeed_config=ds.json is read only by DeepSpeed, but train.distributed=ddp"),
    ({"train.distributed": "deepspeed", "train.deepspeed_config": "missing.json"}, r"missing.json does not exist"),
    ({"train.distributed": "fsdp", "train.compile": True}, r"train.compile=true is not supported with "
                                                           r"train.distributed=fsdp"),
    ({"train.distributed": "deepspeed", "method.name": "qlora"}, r"qlora with train.distributed=deepspeed.*Fix: use "
                                                                r"train.distributed=ddp"),
    ({"train.distributed": "deepspeed", "train.zero_stage": 3, "method.name": "prompt_tuning"},
     r"prompt_tuning with ZeRO stage 3.*Fix: train.zero_stage=2"),
    ({"train.distributed": "deepspeed", "train.offload": "all"}, r"only ZeRO stage 3 partitions"),
])
def test_impossible_combinations_fail_before_loading(make_config, nothing_loads, overrides, expected):
    cfg = make_config(**overrides)
    if cfg.train.precision == "fp16":
        import torch

        if torch.cuda.is_available():
            pytest.skip("fp16 is fine on a GPU")
    with pytest.raises(ConfigError, match=expected):
        api.train(cfg)


def test_qlora_without_bitsandbytes(make_config, nothing_loads, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name))
    with pytest.raises(ConfigError, match=r"qlora needs bitsandbytes.*Fix: pip install"):
        api.train(make_config(**{"method.name": "qlora"}))


def custom_code_model(tiny_bert, tmp_path, model_type: str):
    model = tmp_path / f"custom-{model_type}"
    shutil.copytree(tiny_bert, model)
    marker = tmp_path / "code-ran"
    (model / "custom.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    meta = json.loads((model / "config.json").read_text())
    meta["auto_map"] = {"AutoConfig": "custom.Config", "AutoModelForSequenceClassification": "custom.Model"}
    meta["model_type"] = model_type
    (model / "config.json").write_text(json.dumps(meta))
    return model, marker


def test_a_model_that_needs_its_own_code_is_refused_unless_trusted(make_config, nothing_loads, tiny_bert,
                                                                     tmp_path):
    assert config.load(None, ["data.train=x"]).model.trust_remote_code is False  # off by default
    model, marker = custom_code_model(tiny_bert, tmp_path, "my-own-arch")
    with pytest.raises(ConfigError, match=r"needs its own Python code.*model.trust_remote_code=true"):
        api.train(make_config(model=model))
    assert not marker.exists()


def test_code_is_never_run_past_preflight(tiny_bert, tmp_path, capsys):
    """Where preflight cannot look (e.g. a hub id), transformers' refusal reads as a config error; and a
    known architecture loads with transformers' own code, with a note, never the checkpoint's."""
    model, marker = custom_code_model(tiny_bert, tmp_path, "my-own-arch")
    tok = models.load_tokenizer(str(tiny_bert))
    with pytest.raises(ConfigError, match="needs its own Python code to load"):
        models.load_model("classification", str(model), ["a", "b"], tok)
    known, _ = custom_code_model(tiny_bert, tmp_path / "k", "bert")
    from deltatune import preflight

    preflight.run(config.load(None, ["data.train=x", f"model.name={known}"]))
    assert "transformers' own `bert` implementation is used" in " ".join(capsys.readouterr().err.split())
    assert type(models.load_model("classification", str(known), ["a", "b"], tok)).__name__ == \
        "BertForSequenceClassification"
    assert not marker.exists() and not (tmp_path / "k" / "code-ran").exists()


def fake_run(tmp_path, method: str, extra: list[str] | None = None):
    """A run directory as `deltatune train` leaves it, with an empty artifact: loading it would fail."""
    run = tmp_path / method
    cfg = config.load(None, ["data.train=x.jsonl", f"method.name={method}", *(extra or [])])
    run.mkdir()
    (run / "config.yaml").write_text(cfg.to_yaml())
    (run / "labels.json").write_text('["negative", "positive"]')
    (run / ("model" if method in ("full", "freeze", "bitfit") else "adapter")).mkdir()
    (run / "summary.json").write_text("{}")
    return run


@pytest.mark.parametrize("method, expected", [
    ("prefix_tuning", "cannot be merged: prefixes add key/value positions"),
    ("prompt_tuning", "cannot be merged: soft prompts add virtual tokens"),
    ("adapter", "cannot be merged: a bottleneck adapter is a non-linear block"),
    ("full", "already produced a full model"),
])
def test_merge_refuses_before_loading(tmp_path, nothing_loads, method, expected):
    from deltatune.export.merge import merge

    with pytest.raises(DeltatuneError, match=expected):
        merge(fake_run(tmp_path, method), tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_merge_into_the_run_directory_is_refused(tmp_path, nothing_loads):
    from deltatune.export.merge import merge

    run = fake_run(tmp_path, "lora")
    with pytest.raises(DeltatuneError, match="inside the run directory"):
        merge(run, run / "merged")


def test_one_home_for_preflight(make_config, nothing_loads, tmp_path, monkeypatch):
    """preflight.run holds every check that needs no weights, including those api.train made itself before:
    precision for the device, metric and method for the task, and a finished run in output.dir."""
    import dataclasses

    import torch

    from deltatune import preflight
    from deltatune.methods import REGISTRY

    assert getattr(api, "preflight", preflight) is preflight  # the module: api keeps no checks of its own
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
            preflight.run(make_config(**{"train.precision": "fp16"}))
    with pytest.raises(ConfigError, match="eval.metric=perplexity does not exist for task `classification`"):
        preflight.run(make_config(**{"eval.metric": "perplexity"}))
    causal_only = dataclasses.replace(REGISTRY["prefix_tuning"], tasks=("causal_lm",), why_not_task="(test)")
    monkeypatch.setitem(REGISTRY, "prefix_tuning", causal_only)
    with pytest.raises(ConfigError, match="method.name=prefix_tuning does not support task `classification`"):
        preflight.run(make_config(**{"method.name": "prefix_tuning"}))
    cfg = make_config(**{"output.dir": str(tmp_path / "done"), "output.overwrite": False})
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "summary.json").write_text("{}")
    with pytest.raises(ConfigError, match="already holds a finished run"):
        preflight.run(cfg)
    preflight.run(cfg, resuming=True)  # a resume continues it
