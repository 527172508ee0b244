"""Crash safety: a run killed with SIGKILL anywhere (between steps, while writing a checkpoint, while
swapping in a new best model, or at a random moment from outside) and resumed with `--resume auto`
ends with exactly the weights and metrics of a run that was never interrupted (fp32, dropout on).

Kill points are random; the seed is printed on failure and can be fixed with DELTATUNE_TEST_SEED.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deltatune import api, config
from deltatune.engine import checkpoints
from deltatune.errors import ConfigError
from tests.conftest import save_tiny_bert

SEED = int(os.environ.get("DELTATUNE_TEST_SEED", time.time_ns() % 100_000))
STEPS = 32  # 256 rows / 16 = 16 steps per epoch, 2 epochs: the resume also crosses an epoch boundary


@pytest.fixture(scope="module")
def dropout_bert(tmp_path_factory, tokenizer_dir) -> Path:
    """The tiny BERT with dropout on, so exact resume needs the RNG state restored too."""
    return save_tiny_bert(tmp_path_factory.mktemp("dropout-bert"), tokenizer_dir, dropout=0.1)


def make(out: Path, model: Path, toy_data, method: str = "full", **extra):
    overrides = {"model.name": str(model), "data.train": str(toy_data["train"]),
                 "data.validation": str(toy_data["validation"]), "train.epochs": 2, "train.batch_size": 16,
                 "train.lr": 3e-3, "train.precision": "fp32", "train.log_every": 1, "train.threads": 1,
                 "train.save_every": 5, "train.keep_last": 2, "eval.every": 8, "eval.metric": "loss",
                 "output.dir": str(out), "method.name": method, **extra}
    if method == "lora":
        overrides.update({"method.r": 4, "method.dropout": 0.1, "method.init": "gaussian", "train.lr": 1e-2})
    return config.load(None, [f"{k}={v}" for k, v in overrides.items()])


@pytest.fixture(scope="module")
def reference(tmp_path_factory, dropout_bert, toy_data):
    """Uninterrupted runs (full fine-tuning and LoRA), in this process."""
    runs = {}
    for method in ("full", "lora"):
        out = tmp_path_factory.mktemp(f"ref-{method}") / "run"
        cfg = make(out, dropout_bert, toy_data, method)
        runs[method] = (cfg, api.train(cfg))
    return runs


def records(run: Path) -> tuple[list[dict], list[dict]]:
    """(training-loss records, eval records) of metrics.jsonl, without wall-clock fields."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [{k: v for k, v in r.items() if k not in ("time", "tokens_per_s")} for r in rows if "loss" in r]
    return losses, [r["eval"] for r in rows if "eval" in r]


def assert_same_run(a: Path, b: Path, sa: dict, sb: dict) -> None:
    artifact = "model/model.safetensors" if (a / "model").exists() else "adapter/adapter_model.safetensors"
    wa, wb = load_file(a / artifact), load_file(b / artifact)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), "best model differs"
    newest_a, newest_b = checkpoints.latest(a / "checkpoints"), checkpoints.latest(b / "checkpoints")
    assert newest_a.name == newest_b.name
    ca, cb = load_file(newest_a / "weights.safetensors"), load_file(newest_b / "weights.safetensors")
    assert all(torch.equal(ca[k], cb[k]) for k in ca), "weights of the newest checkpoint differ"
    oa = torch.load(newest_a / "optimizer.pt", weights_only=True)["state"]
    ob = torch.load(newest_b / "optimizer.pt", weights_only=True)["state"]
    assert all(torch.equal(oa[i][k], ob[i][k]) for i in oa for k in oa[i]), "optimizer state differs"
    names = [sorted(p.name for p in (run / "checkpoints").iterdir()) for run in (a, b)]
    assert names[0] == names[1]
    la, ea = records(a)
    lb, eb = records(b)
    assert la == lb, "logged training losses differ"
    assert ea == eb and len(ea) == STEPS // 8, "evaluations differ"
    for key in ("steps", "best_step", "best_metrics", "evals", "skipped_steps"):
        assert sa[key] == sb[key], key


def train_subprocess(cfg, tmp_path: Path, kill: str | None = None) -> subprocess.Popen:
    path = tmp_path / "config.yaml"
    path.write_text(cfg.to_yaml())
    env = dict(os.environ)
    if kill:
        env["DELTATUNE_TEST_KILL"] = kill
    return subprocess.Popen([sys.executable, "-m", "deltatune", "train", str(path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def killed_then_resumed(cfg, tmp_path: Path, kill: str | None = None, external_at: int | None = None) -> dict:
    proc = train_subprocess(cfg, tmp_path, kill)
    out = Path(cfg.output.dir)
    if external_at is not None:  # watch the log and kill from outside once the run passes that step
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            metrics = out / "metrics.jsonl"
            if metrics.exists() and f'"step": {external_at},' in metrics.read_text(errors="replace"):
                proc.kill()
                break
            time.sleep(0.002)
    log, _ = proc.communicate(timeout=180)
    assert proc.returncode == -9, f"expected a SIGKILLed process (seed {SEED}), got {proc.returncode}:\n{log}"
    assert not (out / "summary.json").exists()
    return api.train(cfg, resume="auto")


def saved_and_best_steps(ref: dict) -> tuple[list[int], list[int]]:
    """(steps that wrote a checkpoint, steps that wrote a new best model) in an uninterrupted run of `make`:
    a checkpoint every 5 steps and at each improved eval (eval.metric=loss), none at the last step."""
    best, bests = None, []
    for e in ref["evals"]:
        if best is None or e["loss"] < best:
            best = e["loss"]
            bests.append(e["step"])
    return sorted(s for s in set(range(5, STEPS, 5)) | set(bests) if s < STEPS), bests


def newest_before(saved: list[int], step: int) -> int | None:
    return max((s for s in saved if s < step), default=None)


@pytest.mark.parametrize("case", ["step", "checkpoint", "artifact", "external", "lora"])
def test_kill_and_resume_equals_uninterrupted(case, reference, dropout_bert, toy_data, tmp_path):
    rng = random.Random(f"{SEED}-{case}")
    method = "lora" if case == "lora" else "full"
    ref_cfg, ref = reference[method]
    cfg = make(tmp_path / "run", dropout_bert, toy_data, method)
    kill, external_at = None, None
    if case in ("step", "lora"):
        kill = f"step:{rng.randint(1, STEPS - 2)}"
    elif case == "checkpoint":  # checkpoints are written at steps 5, 8 (best), 10, 15, 16 (best), ...
        kill = f"checkpoint:{rng.randint(1, 6)}"
    elif case == "artifact":  # a new best model at the evals of steps 8 and 16 (loss still falls)
        kill = f"artifact:{rng.randint(1, 2)}"
    else:
        external_at = rng.randint(2, STEPS - 8)
    note = f"seed {SEED}, kill {kill or f'external after step {external_at}'}"
    print(f"\n[{case}] {note}", end="; ")
    resumed = killed_then_resumed(cfg, tmp_path, kill, external_at)
    print(f"resumed from {resumed['resumed_from']}", end="")
    assert resumed["resumed_from"] is None or Path(resumed["resumed_from"]).parent == tmp_path / "run" / "checkpoints"
    assert not any(p.name.startswith(".") for p in (tmp_path / "run" / "checkpoints").iterdir()), note
    assert_same_run(Path(ref_cfg.output.dir), tmp_path / "run", ref, resumed)
    # A resume from an older checkpoint, or none, would end the same: check it used the newest complete one.
    got = resumed["resumed_from"] and checkpoints.step_of(Path(resumed["resumed_from"]))
    saved, bests = saved_and_best_steps(ref)
    n = int(kill.split(":")[1]) if kill else 0
    if case == "external":  # killed some time after external_at was logged: at least the checkpoint before it
        floor = newest_before(saved, external_at)
        assert (got is None and floor is None) or (got in saved and got >= (floor or 0)), f"{note}: step {got}"
    else:
        if case == "checkpoint":  # killed writing the n-th checkpoint: that one is ignored
            expected = saved[n - 2] if n > 1 else None
        elif case == "artifact":  # killed swapping in the n-th best model, before that step's checkpoint
            expected = newest_before(saved, bests[n - 1])
        else:  # killed after step n and its checkpoint, if it had one
            expected = newest_before(saved, n + 1)
        assert got == expected, f"{note}: resumed from step {got}, expected {expected} (checkpoints {saved})"
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["resume"] for r in lines if "resume" in r] == \
        ([{"from": resumed["resumed_from"], "step": got}] if got else []), note


def test_a_torn_checkpoint_is_never_read(reference, tmp_path):
    """A checkpoint directory without its completion (trainer_state.json) or still under its temp name is
    ignored by --resume auto, refused as a --resume PATH, and cleaned up."""
    cfg, _ = reference["full"]
    run = tmp_path / "run"
    shutil.copytree(cfg.output.dir, run)
    (run / "summary.json").unlink()
    ckdir = run / "checkpoints"
    newest = checkpoints.latest(ckdir)
    torn = ckdir / "step-000031"
    shutil.copytree(newest, torn)
    (torn / "trainer_state.json").unlink()
    (ckdir / ".tmp-step-000099").mkdir()
    assert checkpoints.latest(ckdir) == newest
    moved = cfg.model_copy(update={"output": cfg.output.model_copy(update={"dir": str(run)})})
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        checkpoints.resolve(moved, str(torn))
    with pytest.raises(ConfigError, match="no such checkpoint directory"):
        checkpoints.resolve(moved, str(ckdir / "step-000777"))
    assert checkpoints.resolve(moved, "auto") == newest
    assert checkpoints.resolve(moved, str(run)) == newest  # a run directory means its newest checkpoint
    assert sorted(checkpoints.remove_debris(ckdir)) == [".tmp-step-000099", "step-000031"]
    assert not torn.exists()


def test_rotation_keeps_the_newest_and_the_best(reference, dropout_bert, toy_data, tmp_path):
    cfg, s = reference["full"]
    kept = sorted(checkpoints.step_of(p) for p in checkpoints.complete(Path(cfg.output.dir) / "checkpoints"))
    assert kept[-2:] == [25, 30]  # keep_last=2 of every 5 steps (32 total; none at the end)
    # A best older than every checkpoint keep_last keeps survives rotation. At lr 1e-12 the weights do not
    # move, so no eval improves on the first (accuracy must rise to count): the best stays at step 8, while
    # checkpoints come at 10, 15, ..., 30 and keep_last=1 keeps only the newest of them.
    acc = make(tmp_path / "acc", dropout_bert, toy_data, **{"eval.metric": "accuracy", "train.keep_last": 1,
                                                            "train.lr": 1e-12})
    sa = api.train(acc)
    assert sa["best_step"] == 8 and [e["step"] for e in sa["evals"]] == [8, 16, 24, 32]
    steps = sorted(checkpoints.step_of(p) for p in checkpoints.complete(tmp_path / "acc" / "checkpoints"))
    assert steps == [8, 30]
    for p in (tmp_path / "acc" / "checkpoints").iterdir():
        assert sorted(f.name for f in p.iterdir()) == ["optimizer.pt", "rng-rank0.pt", "scheduler.pt",
                                                       "trainer_state.json", "weights.safetensors"]
        meta = json.loads((p / "trainer_state.json").read_text())
        assert meta["epoch"] == meta["step"] // 16 and meta["batch_in_epoch"] == meta["step"] % 16


def test_resume_refuses_another_config_and_other_data(reference, toy_data, tmp_path):
    cfg, _ = reference["full"]
    run = tmp_path / "run"
    shutil.copytree(cfg.output.dir, run)
    (run / "summary.json").unlink()
    changed = config.load(None, [f"{k}={v}" for k, v in {
        "model.name": cfg.model.name, "data.train": cfg.data.train, "data.validation": cfg.data.validation,
        "train.epochs": 2, "train.batch_size": 16, "train.lr": 1e-3, "train.precision": "fp32", "train.log_every": 1,
        "train.save_every": 5, "eval.every": 8, "eval.metric": "loss", "output.dir": str(run)}.items()])
    with pytest.raises(ConfigError) as e:
        api.train(changed, resume="auto")
    msg = str(e.value)
    assert "train.lr: 0.003 in the checkpoint, 0.001 now" in msg and "train.lr" in msg
    assert "train.threads" not in msg  # threads may change between a run and its resume
    with pytest.raises(ConfigError, match="data.train"):  # the data path is part of the config
        api.train(changed.model_copy(update={"data": changed.data.model_copy(update={"train": "x.jsonl"})}),
                  resume="auto")


def test_resume_refuses_changed_data(dropout_bert, toy_data, tmp_path):
    data = tmp_path / "train.jsonl"
    shutil.copy(toy_data["train"], data)
    cfg = make(tmp_path / "run", dropout_bert, {"train": data, "validation": toy_data["validation"]},
               **{"train.max_steps": 4, "train.save_every": 2})
    api.train(cfg)
    (tmp_path / "run" / "summary.json").unlink()  # as if killed after its checkpoint at step 2
    lines = data.read_text().splitlines()
    data.write_text("\n".join(reversed(lines)) + "\n")  # same rows, another order: another run
    with pytest.raises(ConfigError, match="training data differs"):
        api.train(cfg, resume="auto")


def test_resume_auto_without_checkpoint_and_unfinished_runs(reference, dropout_bert, toy_data, tmp_path, capsys):
    cfg, s = reference["full"]
    # A finished run: --resume auto has nothing to do and says so.
    assert api.train(cfg, resume="auto") == s
    assert "holds a finished run; nothing to resume" in capsys.readouterr().err
    # An unfinished run without checkpoints: a plain train refuses to mix with it; --resume auto starts over.
    run = tmp_path / "run"
    fresh = make(run, dropout_bert, toy_data, **{"train.save_every": "null", "train.max_steps": 3,
                                                 "output.overwrite": False})
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    (run / "model").mkdir()
    with pytest.raises(ConfigError, match=r"holds an unfinished run \(model, metrics.jsonl\).*--resume auto"):
        api.train(fresh)
    out = api.train(fresh, resume="auto")
    assert out["steps"] == 3 and out["resumed_from"] is None
    assert "no complete checkpoint" in capsys.readouterr().err
    assert len(records(run)[0]) == 3  # the old metrics.jsonl was replaced, not appended to
    with pytest.raises(ConfigError, match="no such checkpoint directory"):
        api.train(fresh, resume=str(tmp_path / "nowhere"))


def test_resume_from_an_older_checkpoint_drops_the_abandoned_branch(reference, tmp_path):
    """`--resume PATH` to an older checkpoint: newer checkpoints and later metrics go (a later --resume auto
    must not pick them up), and the finished run becomes unfinished until the resume finishes."""
    cfg, s = reference["full"]
    run = tmp_path / "run"
    shutil.copytree(cfg.output.dir, run)
    older = checkpoints.complete(run / "checkpoints")[0]
    moved = cfg.model_copy(update={"output": cfg.output.model_copy(update={"dir": str(run)})})
    again = api.train(moved, resume=str(older))
    assert again["resumed_from"] == str(older)
    assert_same_run(Path(cfg.output.dir), run, s, again)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines.count({"resume": {"from": str(older), "step": checkpoints.step_of(older)}}) == 1


def test_checkpoints_load_with_weights_only_and_code_has_no_unsafe_loads():
    """Checkpoint files hold only tensors and plain data; no deltatune code unpickles anything else."""
    import ast

    src = Path(__file__).parent.parent / "src" / "deltatune"
    for path in src.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "load" and \
                    getattr(node.func.value, "id", None) == "torch":
                kw = {k.arg: k.value for k in node.keywords}
                assert "weights_only" in kw and getattr(kw["weights_only"], "value", None) is True, \
                    f"{path}:{node.lineno}: torch.load without weights_only=True"
            for k in getattr(node, "keywords", []):
                if k.arg == "weights_only":
                    assert getattr(k.value, "value", None) is True, f"{path}:{node.lineno}: weights_only=False"
                if k.arg == "trust_remote_code":  # only ever the config's value, never a literal True
                    assert getattr(k.value, "value", None) is not True, f"{path}:{node.lineno}"


@pytest.mark.parametrize("method", ["adapter", "prompt_tuning", "bitfit", "qlora"])
def test_resume_is_exact_for_other_methods(method, dropout_bert, tiny_llama64, toy_data, tmp_path):
    """Each method family keeps different parameters trainable (bottleneck adapters, a soft prompt, biases,
    LoRA over a 4-bit base): resuming from a middle checkpoint reproduces the uninterrupted run."""
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    model = tiny_llama64 if method == "qlora" else dropout_bert
    extra = {"method.r": 4} if method == "qlora" else {}
    cfg = make(tmp_path / "run", model, toy_data, method, **{"train.max_steps": 10, "train.save_every": 3,
                                                              "train.keep_last": 5,
                                                              "eval.every": 5, "train.lr": 1e-2, **extra})
    s = api.train(cfg)
    ref = tmp_path / "ref"
    shutil.copytree(tmp_path / "run", ref)
    middle = tmp_path / "run" / "checkpoints" / "step-000003"
    assert middle.is_dir()
    again = api.train(cfg, resume=str(middle))
    artifact = "adapter" if (ref / "adapter").exists() else "model"
    for f in (ref / artifact).glob("*.safetensors"):
        a, b = load_file(f), load_file(tmp_path / "run" / artifact / f.name)
        assert all(torch.equal(a[k], b[k]) for k in a), f"{method}: {f.name} differs after resume"
    newest = checkpoints.latest(ref / "checkpoints").name
    a = load_file(ref / "checkpoints" / newest / "weights.safetensors")
    b = load_file(tmp_path / "run" / "checkpoints" / newest / "weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert s["evals"] == again["evals"] and s["best_metrics"] == again["best_metrics"]


def test_resume_through_the_command_line(reference, tmp_path):
    """`deltatune train CONFIG --resume auto | PATH`, and errors that read as one line with exit code 2."""
    from typer.testing import CliRunner

    from deltatune.cli import app, main

    cfg, s = reference["full"]
    path = tmp_path / "config.yaml"
    path.write_text(cfg.to_yaml())
    r = CliRunner().invoke(app, ["train", str(path), "--resume", "auto"], catch_exceptions=False)
    assert r.exit_code == 0 and "nothing to resume" in " ".join(r.output.split())
    import sys as _sys

    argv = _sys.argv
    try:
        _sys.argv = ["deltatune", "train", str(path), "--resume", str(tmp_path / "step-000005")]
        with pytest.raises(SystemExit) as e:
            main()
    finally:
        _sys.argv = argv
    assert e.value.code == 2


def test_a_best_model_swap_cut_by_a_kill_is_repaired_by_the_next_command(reference, tmp_path, capsys):
    """Killed between moving the old best model aside and renaming the new one in: the next command that
    reads the run puts the complete old copy back (a partial new one is dropped), and says the run is
    unfinished."""
    cfg, _ = reference["full"]
    run = tmp_path / "run"
    shutil.copytree(cfg.output.dir, run)
    (run / "summary.json").unlink()
    before = load_file(run / "model" / "model.safetensors")
    (run / "model").rename(run / ".model.old")
    (run / ".model.tmp").mkdir()
    (run / ".model.tmp" / "model.safetensors").write_bytes(b"partial")
    loaded = api.load_run(run)
    assert "did not finish" in " ".join(capsys.readouterr().err.split())
    assert sorted(p.name for p in run.iterdir() if p.name.startswith((".", "model"))) == ["model"]
    assert all(torch.equal(before[k], loaded.model.state_dict()[k]) for k in before)


def test_train_state_saves_and_restores_every_field():
    """Every field of TrainState survives state_dict -> JSON -> load_state_dict: a field added to the state
    but not to the checkpoint fails here (only the window's throughput clock is meant to restart)."""
    import dataclasses

    from deltatune.engine.train_state import TrainState

    saved = TrainState(16, step=21, best=0.25, best_step=16, best_metrics={"loss": 0.25}, evals=[{"step": 8}],
                       bad_evals=1, stopped_early=True, tokens=1234, compute_s=5.5, probe_before={"perplexity": 9.0})
    saved.skips.skipped, saved.skips.in_a_row, saved.skips.first_bad = 3, 1, 20
    saved.window.add(1.5, 0.75, 32.0)
    d = json.loads(json.dumps(saved.state_dict()))
    assert (d["step"], d["epoch"], d["batch_in_epoch"]) == (21, 1, 5)
    restored = TrainState(16)
    restored.load_state_dict(d)
    for f in dataclasses.fields(TrainState):
        assert getattr(restored, f.name) != getattr(TrainState(16), f.name) or f.name == "steps_per_epoch", f.name
    for f in dataclasses.fields(TrainState):
        a, b = getattr(saved, f.name), getattr(restored, f.name)
        if f.name == "window":
            assert (a.loss, a.items, a.norm) == (b.loss, b.items, b.norm)
        else:
            assert a == b, f.name


def test_a_checkpoint_of_the_old_layout_is_refused_with_a_sentence(reference, tmp_path):
    """trainer_state.json from before TrainState (no state_version) is not read; the error says what to do."""
    cfg, _ = reference["full"]
    run = tmp_path / "run"
    shutil.copytree(cfg.output.dir, run)
    (run / "summary.json").unlink()
    newest = checkpoints.latest(run / "checkpoints")
    meta = json.loads((newest / "trainer_state.json").read_text())
    del meta["state_version"]
    (newest / "trainer_state.json").write_text(json.dumps(meta))
    moved = cfg.model_copy(update={"output": cfg.output.model_copy(update={"dir": str(run)})})
    with pytest.raises(ConfigError, match="written by an older deltatune.*Fix: start the run over"):
        api.train(moved, resume="auto")
