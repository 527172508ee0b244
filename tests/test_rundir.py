"""Run-directory safety: one writer per run (a lock), output.overwrite that never leaves nothing, failed
starts that leave nothing, save errors and signals that say what happened and how to go on."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from deltatune import api
from deltatune.engine import checkpoints, runlock
from deltatune.errors import DeltatuneError


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def spawn(cfg, tmp_path: Path, name: str, extra_args=(), **env) -> subprocess.Popen:
    path = tmp_path / f"{name}.yaml"
    path.write_text(cfg.to_yaml())
    return subprocess.Popen([sys.executable, "-m", "deltatune", "train", str(path), *extra_args],
                            env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(cond, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while not cond():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def flat(text: str) -> str:
    return " ".join(text.split())


# ---------------------------------------------------------------------------------------------
# One writer per run directory


def test_two_trainings_into_one_output_dir(make_config, tmp_path):
    """The second `deltatune train` is refused at once, naming the first one's pid; the first finishes and
    everything in the run directory comes from it."""
    run = tmp_path / "run"
    go = tmp_path / "go"
    first = make_config(**{"train.max_steps": 6, "train.log_every": 1, "train.seed": 1})
    second = make_config(**{"train.max_steps": 4, "train.log_every": 1, "train.seed": 2, "train.lr": 1e-3})
    a = spawn(first, tmp_path, "a", DELTATUNE_TEST_HOLD=f"step:2:{go}")  # holds after step 2 until `go` exists
    wait_for(lambda: (run / "metrics.jsonl").exists() and '"step": 2,' in (run / "metrics.jsonl").read_text(), a)
    t0 = time.time()
    b = spawn(second, tmp_path, "b")
    out_b, _ = b.communicate(timeout=120)
    assert b.returncode == 2, out_b
    assert f"pid {a.pid}" in flat(out_b) and "in use by another deltatune process" in flat(out_b)
    assert "deltatune train" in flat(out_b) and time.time() - t0 < 60
    go.touch()
    out_a, _ = a.communicate(timeout=120)
    assert a.returncode == 0, out_a
    assert (run / "config.yaml").read_text() == first.to_yaml()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r and "step" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert not (run / runlock.LOCK).exists()


def test_a_lock_left_by_a_killed_process_is_taken_over(make_config, tmp_path, capsys):
    cfg = make_config(**{"train.max_steps": 6, "train.save_every": 2, "output.overwrite": False})
    proc = spawn(cfg, tmp_path, "a", DELTATUNE_TEST_KILL="step:3")
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    run = Path(cfg.output.dir)
    left = json.loads((run / runlock.LOCK).read_text())
    assert left["pid"] == proc.pid and "deltatune train" in left["command"]
    # The lock file does not count as something the unfinished run left, nor hide its checkpoint.
    assert checkpoints.leftovers(run) == ["checkpoints/step-000002"]
    s = api.train(cfg, resume="auto")
    err = flat(capsys.readouterr().err)
    assert f"taking over the lock left by pid {proc.pid}" in err and "no longer running" in err
    assert s["steps"] == 6 and s["resumed_from"].endswith("step-000002")
    assert not (run / runlock.LOCK).exists()


def test_a_held_lock_refuses_another_train_in_the_same_process(make_config, tmp_path):
    cfg = make_config(**{"train.max_steps": 2})
    with runlock.hold(cfg.output.dir, "deltatune train other.yaml"):
        with pytest.raises(DeltatuneError, match=rf"pid {os.getpid()}: `deltatune train other.yaml`"):
            api.train(cfg)
    api.train(cfg)  # released: free again


# ---------------------------------------------------------------------------------------------
# output.overwrite: the old run goes only once the new one has saved something


def finished(make_config, **kw):
    cfg = make_config(**{"train.max_steps": 4, "eval.every": 2, **kw})
    api.train(cfg)
    return cfg, files(Path(cfg.output.dir))


def test_overwrite_keeps_the_old_run_until_the_new_one_saved(make_config, tmp_path, monkeypatch, capsys):
    from deltatune.engine import loop

    cfg, before = finished(make_config)
    run = Path(cfg.output.dir)
    again = make_config(**{"train.max_steps": 4, "eval.every": 2, "train.seed": 7})

    def fail(*a, **k):  # the new run fails before its first save
        raise RuntimeError("boom")

    real = loop.train
    monkeypatch.setattr(loop, "train", fail)
    with pytest.raises(RuntimeError, match="boom"):
        api.train(again)
    assert files(run) == before
    assert "previous run is back" in flat(capsys.readouterr().err)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    # Disk full at the new run's first save: the old run is back, and the error says what happened.
    monkeypatch.setattr(loop, "train", real)
    from transformers import PreTrainedModel

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    with pytest.raises(DeltatuneError, match="no space left on the device"):
        api.train(again)
    assert files(run) == before
    monkeypatch.undo()
    s = api.train(again)  # succeeds: the old run is gone, nothing is left aside
    assert s["steps"] == 4 and files(run) != before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_overwrite_killed_before_its_first_save_is_put_back(make_config, tmp_path, capsys):
    cfg, before = finished(make_config)
    run = Path(cfg.output.dir)
    again = make_config(**{"train.max_steps": 4, "eval.every": 2, "train.seed": 7})
    proc = spawn(again, tmp_path, "again", DELTATUNE_TEST_KILL="step:1")
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    aside = tmp_path / f".run.replaced-{proc.pid}"
    assert aside.is_dir() and files(aside) == before and files(run) != before
    api.load_run(run)  # the next command that opens the run puts it back
    assert "put the previous run back" in flat(capsys.readouterr().err)
    assert files(run) == before and not aside.exists()


def test_a_replacement_that_had_saved_is_finished_by_the_next_command(make_config, tmp_path, capsys):
    cfg, before = finished(make_config)
    run = Path(cfg.output.dir)
    aside = tmp_path / ".run.replaced-999999"  # as a process killed right after the new run's first save leaves it
    aside.mkdir()
    (aside / "config.yaml").write_text("old")
    api.load_run(run)
    assert "removed" in flat(capsys.readouterr().err) and not aside.exists() and files(run) == before


def test_overwrite_refuses_a_directory_that_is_not_a_run(make_config, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(DeltatuneError, match="not a deltatune run"):
        api.train(make_config(**{"output.dir": str(mine), "train.max_steps": 2}))
    assert files(mine) == {"thesis.tex": b"years of work"}


# ---------------------------------------------------------------------------------------------
# A failed start leaves nothing


@pytest.mark.parametrize("bad", ["data", "model"])
def test_a_failed_start_leaves_no_new_directory(make_config, tmp_path, bad):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "good film", "label": "positive"}\n{"text": "", "label": "negative"}\n')
    kw = {"data.train": str(broken)} if bad == "data" else {"model.name": str(tmp_path / "no-such-model")}
    run = tmp_path / "new" / "run"
    with pytest.raises(DeltatuneError):
        api.train(make_config(**{"output.dir": str(run), "output.overwrite": False}, **kw))
    assert not run.exists()
    empty = tmp_path / "empty"  # an existing directory is left as it was
    empty.mkdir()
    with pytest.raises(DeltatuneError):
        api.train(make_config(**{"output.dir": str(empty), "output.overwrite": False}, **kw))
    assert list(empty.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Save errors: the file, the cause, the fix; nothing half-written


def test_disk_full_in_the_final_model_save(make_config, tmp_path, monkeypatch):
    from safetensors import SafetensorError
    from transformers import PreTrainedModel

    def full(self, *a, **k):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                              '"No space left on device" })')

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    cfg = make_config(**{"train.max_steps": 2, "output.overwrite": False})
    with pytest.raises(DeltatuneError) as e:
        api.train(cfg)
    msg = flat(str(e.value))
    assert "run/model" in msg and "no space left on the device" in msg and "MB free" in msg and "Fix:" in msg
    assert not any(p.name.startswith(".") for p in Path(cfg.output.dir).iterdir())


def test_disk_full_in_a_checkpoint_save_keeps_the_previous_checkpoint(make_config, tmp_path, monkeypatch):
    real = torch.save
    calls = {"n": 0}

    def save(obj, f, *a, **k):
        if str(f).endswith("optimizer.pt"):
            calls["n"] += 1
            if calls["n"] == 2:  # the second checkpoint
                raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 1024 vs 998")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    cfg = make_config(**{"train.max_steps": 6, "train.save_every": 2, "output.overwrite": False})
    with pytest.raises(DeltatuneError) as e:
        api.train(cfg)
    msg = flat(str(e.value))
    assert "checkpoints/.tmp-step-000004/optimizer.pt" in msg and "a full disk is the usual cause" in msg
    assert "inline_container" in msg and "Fix:" in msg
    ckdir = Path(cfg.output.dir) / "checkpoints"
    assert sorted(p.name for p in ckdir.iterdir()) == ["step-000002"]


def test_a_read_only_output_directory(make_config, tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:  # root writes anywhere: make the directory refuse writes as a read-only disk would
        real = os.open

        def refuse(path, flags, *a, **k):
            if str(path).startswith(str(ro)) and flags & os.O_CREAT:
                raise OSError(errno.EROFS, "Read-only file system", str(path))
            return real(path, flags, *a, **k)

        monkeypatch.setattr(os, "open", refuse)
        cause = "read-only"
    else:
        ro.chmod(0o555)
        cause = "permission denied"
    with pytest.raises(DeltatuneError) as e:
        api.train(make_config(**{"output.dir": str(ro / "run"), "train.max_steps": 2}))
    msg = flat(str(e.value))
    assert str(ro / "run") in msg and cause in msg and "output.dir" in msg
    ro.chmod(0o755)
    assert list(ro.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a chmod-555 directory")
def test_a_chmod_555_output_directory(make_config, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(DeltatuneError, match="permission denied"):
            api.train(make_config(**{"output.dir": str(ro), "train.max_steps": 2}))
    finally:
        ro.chmod(0o755)


# ---------------------------------------------------------------------------------------------
# SIGTERM / SIGINT: where to resume


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_run_says_where_to_resume(make_config, tmp_path, sig):
    go = tmp_path / "go"
    cfg = make_config(**{"train.max_steps": 8, "train.save_every": 2, "train.log_every": 1, "output.overwrite": False})
    proc = spawn(cfg, tmp_path, "cfg", DELTATUNE_TEST_HOLD=f"step:3:{go}")
    run = Path(cfg.output.dir)
    wait_for(lambda: (run / "checkpoints" / "step-000002").is_dir() and '"step": 3,' in
             (run / "metrics.jsonl").read_text(), proc)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, out
    text = flat(out)
    assert f"stopped by {signal.Signals(sig).name}" in text
    assert f"last complete checkpoint: {run / 'checkpoints' / 'step-000002'}" in text
    assert f"deltatune train {tmp_path / 'cfg.yaml'} --resume auto" in text
    assert "Traceback" not in out
    assert not (run / runlock.LOCK).exists()


def test_a_run_stopped_before_any_checkpoint_says_how_to_get_some(make_config, tmp_path):
    go = tmp_path / "go"
    cfg = make_config(**{"train.max_steps": 8, "train.log_every": 1, "output.overwrite": False})
    proc = spawn(cfg, tmp_path, "cfg", DELTATUNE_TEST_HOLD=f"step:2:{go}")
    run = Path(cfg.output.dir)
    wait_for(lambda: (run / "metrics.jsonl").exists() and '"step": 2,' in (run / "metrics.jsonl").read_text(), proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out
    assert "no checkpoint was saved" in flat(out) and "train.save_every" in flat(out)
