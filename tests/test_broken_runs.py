"""A run whose saved model is missing, cut short or corrupt: every command that loads it (eval,
predict, generate, merge) says which file, what is wrong with it and how to fix it, without a traceback."""

from __future__ import annotations

import json
import shutil

import pytest

from deltatune import api, artifacts, config
from deltatune.cli import main
from deltatune.errors import DeltatuneError

WEIGHTS = {"full": "model/model.safetensors", "lora": "adapter/adapter_model.safetensors"}
CONFIGS = {"full": "model/config.json", "lora": "adapter/adapter_config.json"}
ARTIFACT = {"full": "model", "lora": "adapter"}


def tiny_run(out, tiny_bert, toy_data, **kw):
    """Trained once per module (make_config is per test): 8 steps, a checkpoint every 4."""
    base = {"model.name": str(tiny_bert), "data.train": str(toy_data["train"]),
            "data.validation": str(toy_data["validation"]), "train.max_steps": 8, "train.batch_size": 16,
            "train.lr": 1e-2, "train.precision": "fp32", "train.threads": 2, "train.save_every": 4,
            "eval.every": 100, "output.dir": str(out), **kw}
    api.train(config.load(None, [f"{k}={v}" for k, v in base.items()]))
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_bert, toy_data):
    root = tmp_path_factory.mktemp("broken")
    return {"full": tiny_run(root / "full", tiny_bert, toy_data),
            "lora": tiny_run(root / "lora", tiny_bert, toy_data, **{"method.name": "lora", "method.r": 4})}


@pytest.fixture
def copy(trained, tmp_path):
    """A fresh copy of a trained run, to break."""
    def make(kind: str):
        return shutil.copytree(trained[kind], tmp_path / kind)
    return make


def truncate(path, keep: float = 0.5) -> int:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    return int(len(data) * keep)


BREAKS = {
    "weights missing": lambda run, kind: ((run / WEIGHTS[kind]).unlink(), WEIGHTS[kind], "missing")[1:],
    "weights truncated": lambda run, kind: (WEIGHTS[kind], f"truncated or corrupt: {truncate(run / WEIGHTS[kind]):,} "
                                                           f"bytes"),
    "weights header garbage": lambda run, kind: ((run / WEIGHTS[kind]).write_bytes(b"\x00\x01garbage" * 100),
                                                 WEIGHTS[kind], "header unreadable")[1:],
    "config missing": lambda run, kind: ((run / CONFIGS[kind]).unlink(), CONFIGS[kind], "missing")[1:],
    "config corrupt": lambda run, kind: ((run / CONFIGS[kind]).write_text('{"model_type": "bert",'),
                                         CONFIGS[kind], "not valid JSON")[1:],
}


def run_main(monkeypatch, capsys, *args: str) -> str:
    monkeypatch.setattr("sys.argv", ["deltatune", *args])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "Traceback" not in err and err.count("error:") == 1
    return " ".join(err.split())  # rich wraps long lines


@pytest.mark.parametrize("kind", ["full", "lora"])
@pytest.mark.parametrize("broken", list(BREAKS))
@pytest.mark.parametrize("command", ["eval", "predict", "generate", "merge"])
def test_a_broken_artifact_is_one_sentence_with_file_cause_and_fix(monkeypatch, capsys, copy, tmp_path, kind,
                                                                   broken, command):
    if command == "merge" and kind == "full":
        pytest.skip("a full run has nothing to merge (refused before loading)")
    run = copy(kind)
    name, problem = BREAKS[broken](run, kind)
    args = {"eval": ["eval", str(run)], "predict": ["predict", str(run), "a good film"],
            "generate": ["generate", str(run), "--prompt", "hello"],
            "merge": ["merge", str(run), str(tmp_path / "merged")]}[command]
    err = run_main(monkeypatch, capsys, *args)
    assert str(run / name) in err and problem in err and "Fix:" in err
    assert "copy the run directory again" in err and "train it again" in err
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("broken", ["weights truncated", "config missing"])
def test_several_adapter_runs_are_checked_too(monkeypatch, capsys, trained, copy, broken):
    run = copy("lora")
    name, problem = BREAKS[broken](run, "lora")
    err = run_main(monkeypatch, capsys, "predict", "--run", str(trained["lora"]), "--run", str(run), "a good film")
    assert str(run / name) in err and problem in err and "Fix:" in err


def test_truncated_weights_say_how_long_the_file_should_be(copy):
    run = copy("full")
    full_size = (run / WEIGHTS["full"]).stat().st_size
    kept = truncate(run / WEIGHTS["full"], keep=0.9)
    with pytest.raises(DeltatuneError, match=f"{kept:,} bytes, but its header describes {full_size:,}"):
        api.load_run(run)


def test_an_unfinished_run_with_checkpoints_is_told_to_resume(copy):
    run = copy("lora")
    (run / "summary.json").unlink()
    (run / WEIGHTS["lora"]).unlink()
    assert (run / "checkpoints").is_dir()
    with pytest.raises(DeltatuneError, match=r"--resume auto` continues from its newest checkpoint \(step-\d+\)"):
        api.load_run(run)


@pytest.mark.parametrize("kind", ["full", "lora"])
@pytest.mark.parametrize("broken", ["weights missing", "weights truncated", "config corrupt"])
def test_the_loaders_own_errors_are_caught_too(monkeypatch, copy, kind, broken):
    """Second line of defence: with the checks before loading switched off, what transformers, peft and
    safetensors raise for the same files still becomes a sentence naming the artifact."""
    monkeypatch.setattr(artifacts, "_artifact_problem", lambda artifact: None)
    run = copy(kind)
    BREAKS[broken](run, kind)
    with pytest.raises(DeltatuneError) as e:
        api.load_run(run)
    msg = str(e.value)
    assert str(run / ARTIFACT[kind]) in msg and "Fix:" in msg


def test_a_sound_run_still_loads(trained):
    for kind in ("full", "lora"):
        assert api.predict(trained[kind], ["a good film"])[0]["label"] is not None
    assert json.loads((trained["lora"] / CONFIGS["lora"]).read_text())["peft_type"] == "LORA"
