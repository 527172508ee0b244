"""deltatune compare: each method trained in its own process on one config and budget, resumable, failures
recorded; finished runs compared without training; the lr sweep keeps each method's best."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deltatune.cli import app
from deltatune.compare import child, compare, compare_methods, compare_runs, lr_grid, recipes, records
from deltatune.errors import ConfigError, DeltatuneError


@pytest.fixture(scope="module")
def config_file(tmp_path_factory, tiny_bert, toy_data) -> Path:
    path = tmp_path_factory.mktemp("compare-cfg") / "c.yaml"
    path.write_text(f"model:\n  name: {tiny_bert}\ndata:\n  train: {toy_data['train']}\n"
                    f"  validation: {toy_data['validation']}\ntrain:\n  epochs: 1\n  batch_size: 16\n  lr: 3.0e-3\n"
                    f"  precision: fp32\n  threads: 2\noutput:\n  dir: unused\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def compared(tmp_path_factory, config_file):
    """full (the config's own method), lora (its recipe's lr and options) and prefix_tuning, which BERT
    classifiers cannot run (refused before training): 2 steps each."""
    out = tmp_path_factory.mktemp("compare") / "out"
    result = compare_methods(config_file, "full,lora,prefix_tuning", budget_steps=2, out=out, show_training=False,
                             render=False)
    return out, result


def summary(run_dir: str) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text(encoding="utf-8"))


def test_every_row_holds_what_its_run_recorded(compared):
    out, result = compared
    on_disk = json.loads((out / "compare.json").read_text(encoding="utf-8"))
    assert {k: v for k, v in on_disk.items() if k != "written"} == result
    assert (result["task"], result["metric"], result["higher_is_better"], result["budget_steps"]) == \
        ("classification", "accuracy", True, 2)
    rows = {r["method"]: r for r in result["runs"]}
    assert list(rows) == ["full", "lora", "prefix_tuning"]
    for name in ("full", "lora"):
        row, s = rows[name], summary(rows[name]["run_dir"])
        assert set(records.KEYS) <= set(row) and row["status"] == "done"
        assert row["run_dir"] == str(out / name)
        assert s["steps"] == 2  # the budget reached the run
        assert row["best_metric"] == s["best_metrics"]["accuracy"]
        assert (row["trainable_params"], row["total_params"], row["trainable_pct"]) == \
            (s["trainable_params"], s["total_params"], s["trainable_percent"])
        assert (row["artifact_mb"], row["tokens_per_s"], row["wall_s"], row["forgetting"]) == \
            (s["artifact_mb"], s["tokens_per_s"], s["train_seconds"], s["forgetting"])
        assert row["peak_memory_mb"] == s["memory_per_rank"][0]["peak_mb"]
        weights = sum(f.stat().st_size for f in (out / name / s["artifact"]).glob("*.safetensors")) / 2**20
        assert row["artifact_mb"] == pytest.approx(weights, abs=1e-3)
    # full keeps the config's lr; lora takes its recipe's lr and options instead of full's 3e-3.
    assert rows["full"]["lr"] == 3e-3
    lora_recipe = recipes.config_mod.load(recipes.RECIPES_DIR / "lora.yaml")
    lora_cfg = records.read_config(out / "lora")
    assert rows["lora"]["lr"] == lora_recipe.train.lr == lora_cfg["train"]["lr"]
    assert lora_cfg["method"]["r"] == lora_recipe.method.r and lora_cfg["data"]["train"] == \
        records.read_config(out / "full")["data"]["train"]


def test_a_failed_method_is_recorded_and_the_others_finish(compared):
    _, result = compared
    rows = {r["method"]: r for r in result["runs"]}
    assert rows["prefix_tuning"]["status"].startswith("failed: ")
    assert "key/value cache" in rows["prefix_tuning"]["status"]  # the child's own error message
    assert rows["prefix_tuning"]["best_metric"] is None
    assert rows["full"]["status"] == rows["lora"]["status"] == "done"


def test_a_second_invocation_trains_nothing_again(compared, config_file, capsys):
    out, first = compared
    touched = {p: p.stat().st_mtime_ns for name in ("full", "lora")
               for p in (out / name / "summary.json", out / "logs" / f"{name}.log")}
    again = compare_methods(config_file, "full,lora", budget_steps=2, out=out, show_training=False, render=False)
    assert {p: p.stat().st_mtime_ns for p in touched} == touched
    said = capsys.readouterr().err
    assert said.count("skipped, finished earlier") == 2 and "training in" not in said
    assert again["runs"] == first["runs"][:2]


def test_a_run_dir_of_another_config_is_refused_before_training(compared, config_file):
    out, _ = compared
    with pytest.raises(ConfigError, match=r"(?s)full holds a run of another config \(train.max_steps 2 -> 3\).*"
                                          r"another --out"):
        compare_methods(config_file, "full", budget_steps=3, out=out, show_training=False, render=False)


def test_finished_runs_compare_without_training(compared, tmp_path):
    out, result = compared
    dirs = [str(out / "full"), str(out / "lora")]
    r = CliRunner().invoke(app, ["compare", *dirs, "--out", str(tmp_path / "cmp")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    again = json.loads((tmp_path / "cmp" / "compare.json").read_text(encoding="utf-8"))
    assert again["runs"] == result["runs"][:2] and again["budget_steps"] == 2
    assert (tmp_path / "cmp" / "compare.html").is_file()  # the renderer was called
    assert sorted(p.name for p in (tmp_path / "cmp").iterdir() if p.is_dir()) == []  # nothing trained there
    with pytest.raises(ConfigError, match="every argument must be one"):
        compare([dirs[0], str(out / "logs" / "full.yaml")])
    with pytest.raises(ConfigError, match="train from a CONFIG"):
        compare(dirs, methods="lora")
    with pytest.raises(DeltatuneError, match="not a deltatune run directory"):
        compare_runs([out / "logs"])


def test_lr_sweep_keeps_each_methods_best(config_file, tmp_path):
    """Scored by validation loss (lower is better): lr 0.5 blows the tiny BERT up (loss ~6.6 after 4 steps),
    1e-7 leaves it at ln 2. Listed first, the worse lr is the one a wrong direction or `first point` keeps."""
    result = compare_methods(config_file, "full", ["eval.metric=loss"], lrs=[0.5, 1e-7], budget_steps=4,
                             out=tmp_path, show_training=False, render=False)
    (row,) = result["runs"]
    assert result["lr_sweep"] and (result["metric"], result["higher_is_better"]) == ("loss", False)
    assert row["lr"] == 1e-7 and row["run_dir"] == str(tmp_path / "full-lr1e-7")
    assert [(p["lr"], p["status"]) for p in row["lr_grid"]] == [(0.5, "done"), (1e-7, "done")]
    bad, good = (p["best_metric"] for p in row["lr_grid"])
    assert bad > 2 > 0.7 > good
    assert row["best_metric"] == good == summary(row["run_dir"])["best_metrics"]["loss"]


def test_lr_grid_looks_upwards_for_soft_prompts_and_ia3():
    assert lr_grid("lora", 5e-4) == [1.67e-4, 5e-4, 1.5e-3]
    assert lr_grid("dora", 5e-4) == lr_grid("lora", 5e-4)
    assert lr_grid("ia3", 3e-3) == [3e-3, 3e-2, 3e-1]
    assert lr_grid("prompt_tuning", 3e-2) == [3e-3, 3e-2, 3e-1]  # 3.0 is no learning rate: a decade down
    assert recipes.lr_tag(5e-4) == "5e-4" and recipes.lr_tag(1.67e-4) == "1.67e-4"


def test_methods_are_checked_and_aliases_resolve(config_file):
    with pytest.raises(ConfigError, match="did you mean `lora`"):
        recipes.parse_methods("full,lroa")
    with pytest.raises(ConfigError, match="more than once"):
        recipes.parse_methods("lora,ia3,lora")
    cfg = recipes.config_mod.load(config_file)
    dora = recipes.setting("dora", cfg, recipes.recipes("classification"))
    assert dora.method["name"] == "lora" and dora.method["variant"] == "dora"
    assert records.method_label({"method": dora.method}) == "dora"
    with pytest.raises(ConfigError, match="--methods is required"):
        compare([str(config_file)])
    with pytest.raises(ConfigError, match="only section.key=value overrides; not: runs/x"):
        compare([str(config_file), "runs/x"], methods="lora")
    with pytest.raises(ConfigError, match="between 0 and 1"):
        compare_methods(config_file, "lora", lrs=[1e-3, 5])
    own = recipes.setting("full", cfg, recipes.recipes("classification"))
    assert own.lr == 3e-3 and own.source == "as the config has them"


def test_failure_reason_is_the_childs_error():
    out = "loading...\nerror: invalid config:\n  override `method.r=0`: must be >= 1\n"
    assert child.failure_reason(out, 2) == "invalid config: override `method.r=0`: must be >= 1"
    assert child.failure_reason("Traceback ...\n  File x\nValueError: boom\n", 1) == "ValueError: boom"
    assert child.failure_reason("", -9) == "no output (killed by signal 9)"


def test_an_unfinished_run_is_trained_again(compared, config_file, tmp_path, capsys):
    """A run killed before its summary (and without checkpoints) starts over; a finished one beside it is kept."""
    import shutil

    out, _ = compared
    for name in ("full", "lora"):
        shutil.copytree(out / name, tmp_path / name)
    (tmp_path / "full" / "summary.json").unlink()
    result = compare_methods(config_file, "full,lora", budget_steps=2, out=tmp_path, show_training=False,
                             render=False)
    assert [r["status"] for r in result["runs"]] == ["done", "done"]
    said = capsys.readouterr().err
    assert "full (lr 0.003): training in" in said and "lora (lr 0.0005): skipped, finished earlier" in said
    log = (tmp_path / "logs" / "full.log").read_text(encoding="utf-8")
    assert "starting over" in log and summary(tmp_path / "full")["steps"] == 2


def test_a_method_without_a_recipe_trains_at_its_own_default_lr_not_the_configs():
    from deltatune import config as config_mod
    from deltatune.compare import recipes
    from deltatune.methods import REGISTRY

    cfg = config_mod.load(None, ["data.train=x", "train.lr=1e-4"])  # full fine-tuning's lr, chosen by the user
    assert recipes.setting("full", cfg, {}).lr == 1e-4  # the config's own method keeps it
    for name in ("prefix_tuning", "ia3", "lora"):
        assert recipes.setting(name, cfg, {}).lr == REGISTRY[name].default_lr != 1e-4
