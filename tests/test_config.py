"""Config: loading, overrides, and errors that name the key, the place and the nearest valid key."""

from __future__ import annotations

from pathlib import Path

import pytest

from deltatune import config
from deltatune.errors import ConfigError

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_validates(path):
    cfg = config.load(path)
    assert cfg.data.train


def test_shipped_configs_exist():
    assert any(p.name == "quickstart.yaml" for p in CONFIGS)


def test_overrides_are_yaml(tmp_path):
    cfg = config.load(None, ["data.train=x.csv", "train.lr=1e-4", "train.batch_size=8", "data.columns=[a,b]",
                             "data.validation=0.2", "eval.every=50", "data.validation=dev.csv"])
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.train.batch_size == 8
    assert cfg.data.columns == ["a", "b"]
    assert cfg.data.validation == "dev.csv"
    assert cfg.eval.every == 50


def test_unknown_key_suggests_nearest_and_names_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  train: x.csv\ntrain:\n  epochs: 1\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        config.load(p)
    msg = str(e.value)
    assert f"{p}:5" in msg and "unknown key `train.lrr`" in msg and "did you mean `train.lr`" in msg


def test_unknown_section_suggests(tmp_path):
    with pytest.raises(ConfigError, match="unknown key `trian`.*did you mean `train`"):
        config.load(None, ["data.train=x.csv", "trian.lr=0.1"])


def test_wrong_type_and_range_name_the_override():
    with pytest.raises(ConfigError) as e:
        config.load(None, ["data.train=x.csv", "train.batch_size=lots", "train.lr=5"])
    msg = str(e.value)
    assert "override `train.batch_size=lots`: `train.batch_size`" in msg and "'lots'" in msg
    assert "`train.lr`" in msg and "between 0 and 1" in msg


def test_bad_literal_lists_choices():
    with pytest.raises(ConfigError, match="train.precision.*'fp32'.*'bf16'"):
        config.load(None, ["data.train=x.csv", "train.precision=fp8"])


def test_unknown_method_suggests():
    with pytest.raises(ConfigError, match="unknown method `ful`.*did you mean `full`"):
        config.load(None, ["data.train=x.csv", "method.name=ful"])


def test_missing_train_data_is_required():
    with pytest.raises(ConfigError, match="`data.train` is required"):
        config.load(None, [])


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="section.key=value"):
        config.load(None, ["train.lr"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        config.load(tmp_path / "nope.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(p)


def test_roundtrip_resolved_yaml(tmp_path):
    cfg = config.load(None, ["data.train=x.csv", "train.epochs=2"])
    p = tmp_path / "resolved.yaml"
    p.write_text(cfg.to_yaml())
    again = config.load(p)
    assert again.model_dump() == cfg.model_dump()
    assert cfg.train.lr_auto and not again.train.lr_auto  # the file holds the number auto resolved to


QUICKSTART = Path(__file__).parent.parent / "configs" / "quickstart.yaml"


def test_recipe_metric_follows_a_task_set_on_the_command_line(capsys):
    # quickstart.yaml sets eval.metric: accuracy, which causal_lm does not have.
    cfg = config.load(QUICKSTART, ["task=causal_lm"])
    assert cfg.eval.metric == "auto" and cfg.metric == "loss"
    note = capsys.readouterr().err
    assert "eval.metric=accuracy" in note and f"{QUICKSTART}:" in note and "task causal_lm" in note
    assert "loss" in note
    # A metric the new task has is kept as written.
    assert config.load(QUICKSTART, ["task=classification"]).eval.metric == "accuracy"


def test_metric_set_on_the_command_line_does_not_follow(capsys):
    cfg = config.load(QUICKSTART, ["task=causal_lm", "eval.metric=accuracy"])
    assert cfg.eval.metric == "accuracy"  # api.preflight refuses it, naming the task (test_methods)
    assert "eval.metric" not in capsys.readouterr().err


def test_metric_and_task_both_from_the_file_do_not_follow(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("task: causal_lm\ndata:\n  train: x.jsonl\neval:\n  metric: accuracy\n")
    assert config.load(p).eval.metric == "accuracy"  # the file contradicts itself: preflight says so


@pytest.mark.parametrize("text,first,second,key", [
    ("data:\n  train: a.csv\ntrain:\n  lr: 0.1\n  epochs: 2\n  lr: 0.2\n", 4, 6, "train.lr"),
    ("task: classification\ndata:\n  train: a.csv\ntask: causal_lm\n", 1, 4, "task"),
    ("data:\n  train: a.csv\nmethod:\n  name: lora\n  target_modules: [a]\n  r: 4\n  target_modules: [b]\n",
     5, 7, "method.target_modules"),
    ("data:\n  train: a.csv\ndata:\n  validation: 0.2\n", 1, 3, "data"),
])
def test_duplicate_keys_are_errors_naming_both_lines(tmp_path, text, first, second, key):
    p = tmp_path / "dup.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        config.load(p)
    msg = str(e.value)
    assert f"`{key}`" in msg and f"{p}:{first}" in msg and f"{p}:{second}" in msg and "Fix:" in msg, msg


def test_lr_auto_is_each_methods_measured_default_and_an_explicit_lr_wins():
    """Switching method.name alone must not keep another method's learning rate (issue 15: LoRA at full
    fine-tuning's 1e-4 lands points behind): train.lr=auto, the default, takes the method's own."""
    from deltatune.methods import REGISTRY

    for name, method in REGISTRY.items():
        cfg = config.load(None, ["data.train=x", f"method.name={name}"])
        assert (cfg.train.lr, cfg.train.lr_auto) == (method.default_lr, True), name
    assert config.load(None, ["data.train=x", "method.name=lora"]).train.lr == 5e-4
    assert config.load(None, ["data.train=x", "method.name=ia3"]).train.lr != \
        config.load(None, ["data.train=x", "method.name=full"]).train.lr
    explicit = config.load(None, ["data.train=x", "method.name=lora", "train.lr=2e-4"])
    assert (explicit.train.lr, explicit.train.lr_auto) == (2e-4, False)
    assert "lr: 0.0005" in config.load(None, ["data.train=x", "method.name=lora"]).to_yaml()  # the run's value
    with pytest.raises(ConfigError, match="or auto"):
        config.load(None, ["data.train=x", "train.lr=0"])


def test_method_recipes_pin_no_learning_rate():
    """configs/ recipes use the method defaults (one home for them), except where a model or a stage needs its
    own, measured: full fine-tuning of SmolLM2 (docs/decoders-table.md), DPO after sft (docs/preference-table.md)."""
    root = Path(__file__).resolve().parents[1] / "configs"
    pinned = {p.name for p in root.glob("*.yaml") if not config.load(p, ["data.train=x"]).train.lr_auto}
    assert pinned == {"smollm2-sentiment-full.yaml", "smollm2-sentiment-dpo.yaml"}
