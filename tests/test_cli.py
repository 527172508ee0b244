"""End to end through the CLI on a tiny model: train, eval, predict, listings, and readable errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from deltatune.cli import app, main

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_bert, toy_data):
    out = tmp_path_factory.mktemp("cli") / "run"
    cfg = tmp_path_factory.mktemp("cfg") / "c.yaml"
    cfg.write_text(f"model:\n  name: {tiny_bert}\ndata:\n  train: {toy_data['train']}\n"
                   f"  validation: {toy_data['validation']}\ntrain:\n  epochs: 5\n  batch_size: 16\n  lr: 3.0e-3\n"
                   f"  precision: fp32\noutput:\n  dir: {out}\n")
    r = run("train", str(cfg), "train.seed=3", "eval.metric=f1")
    assert r.exit_code == 0, r.output
    return out


def test_train_writes_a_complete_run_dir(trained):
    for name in ("config.yaml", "labels.json", "metrics.jsonl", "summary.json", "model/config.json",
                 "model/model.safetensors", "model/tokenizer.json"):
        assert (trained / name).exists(), name
    resolved = (trained / "config.yaml").read_text()
    assert "seed: 3" in resolved and "metric: f1" in resolved
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["best_metrics"]["accuracy"] > 0.9
    assert json.loads((trained / "model" / "config.json").read_text())["id2label"] == {"0": "negative",
                                                                                       "1": "positive"}


def test_eval_on_a_file(trained, toy_data):
    r = run("eval", str(trained), "--data", str(toy_data["validation"]), "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.output)
    summary = json.loads((trained / "summary.json").read_text())
    assert result["accuracy"] == pytest.approx(summary["best_metrics"]["accuracy"])
    assert set(result) >= {"accuracy", "precision", "recall", "f1", "loss", "rows"}


def test_predict_args_and_file(trained, tmp_path):
    r = run("predict", str(trained), "a great superb film", "an awful boring film", "--json")
    assert r.exit_code == 0, r.output
    preds = [json.loads(line) for line in r.output.splitlines()]
    assert [p["label"] for p in preds] == ["positive", "negative"]
    assert all(abs(sum(p["scores"].values()) - 1) < 1e-5 for p in preds)
    f = tmp_path / "texts.txt"
    f.write_text("lovely warm story\n\nthe plot was dull\n")
    r = run("predict", str(trained), "--file", str(f))
    assert r.exit_code == 0 and "positive" in r.output and "negative" in r.output


def test_print_config_and_listings(tiny_bert):
    r = run("train", "data.train=x.csv", "train.lr=2e-5", "--print-config")
    assert r.exit_code == 0 and "lr: 2.0e-05" in r.output
    assert "minilm-l6" in run("models").output
    out = run("datasets").output
    assert "builtin:movie-reviews" in out and "builtin:bbc-news" in out


def test_errors_are_one_clear_line_and_exit_2(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr("sys.argv", ["deltatune", "train", "data.train=x.csv", "train.lrr=1"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown key `train.lrr`" in err and "did you mean `train.lr`" in err and "Traceback" not in err
    monkeypatch.setattr("sys.argv", ["deltatune", "eval", str(tmp_path)])
    with pytest.raises(SystemExit):
        main()
    assert "not a finished deltatune run" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "deltatune", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "train" in r.stdout


def test_causal_lm_through_the_cli(tmp_path, tiny_llama, toy_data):
    """train -> eval -> merge for a LoRA causal LM, all from the command line."""
    out = tmp_path / "lm"
    r = run("train", f"model.name={tiny_llama}", f"data.train={toy_data['train']}",
            f"data.validation={toy_data['validation']}", "task=causal_lm", "method.name=lora", "method.r=4",
            "train.epochs=1", "train.lr=1e-2", "train.precision=fp32", f"output.dir={out}")
    assert r.exit_code == 0, r.output
    assert (out / "adapter" / "adapter_config.json").exists()
    r = run("eval", str(out), "--json")
    assert r.exit_code == 0 and "perplexity" in json.loads(r.output)
    r = run("merge", str(out), str(tmp_path / "merged"))
    assert r.exit_code == 0 and "max |merged - unmerged|" in r.output, r.output
    assert (tmp_path / "merged" / "model.safetensors").exists()
    with pytest.raises(Exception, match="classification run"):
        from deltatune import api

        api.predict(out, ["a good film"])


def test_serve_passes_its_flags_to_the_library_call(monkeypatch, tmp_path):
    """`deltatune serve` is a thin call into deltatune.serve.command.serve (which tests/test_serve.py runs)."""
    from deltatune.serve import command

    seen = {}
    monkeypatch.setattr(command, "serve", lambda *a, **kw: seen.update(args=a, kw=kw))
    r = runner.invoke(app, ["serve", "--base", "minilm-l6", "--adapter", "a=runs/a", "--adapter", "b=runs/b",
                            "--port", "8123", "--allowed-root", str(tmp_path), "--max-batch", "4", "--merge", "b",
                            "--log-level", "warning"])
    assert r.exit_code == 0, r.output
    base, adapters, runs, host, port, root, revision, settings = seen["args"]
    assert (base, adapters, runs, host, port, root) == ("minilm-l6", {"a": "runs/a", "b": "runs/b"}, [],
                                                       "127.0.0.1", 8123, tmp_path)
    assert settings.max_batch == 4 and settings.admin_token is None
    assert seen["kw"] == {"log_level": "warning", "merge": ["b"]}
    r = runner.invoke(app, ["serve", "--base", "minilm-l6", "--adapter", "a=x", "--log-level", "loud"])
    assert r.exit_code == 2 and "--log-level" in r.output and "loud" in r.output
    r = runner.invoke(app, ["serve", "--base", "minilm-l6", "--adapter", "a=x", "--adapter", "a=y"])
    assert r.exit_code != 0 and "given twice" in str(r.exception or r.output)
