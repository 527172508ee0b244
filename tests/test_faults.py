"""Injected numerical faults and out-of-memory errors: skipped and counted, or stopped with a diagnosis;
never NaN weights on disk."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from deltatune import api
from deltatune.engine import checkpoints, loop, precision
from deltatune.engine.faults import NumericalError
from deltatune.errors import DeltatuneError


class NaNGrad(torch.autograd.Function):
    """Identity forward; NaN gradient backward: a finite loss with non-finite gradients."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def inject(monkeypatch, bad_steps: set[int], kind: str = "loss"):
    """Make the training loss (or only its gradient) non-finite on the given optimizer steps (1-based)."""
    real, calls = loop.task_loss, {"n": 0}

    def task_loss(logits, labels, lm, *rest):
        loss = real(logits, labels, lm, *rest)
        if not torch.is_grad_enabled():  # evaluation
            return loss
        calls["n"] += 1  # one micro-batch per step in these runs
        if calls["n"] in bad_steps:
            return loss * float("nan") if kind == "loss" else NaNGrad.apply(loss)
        return loss

    monkeypatch.setattr(loop, "task_loss", task_loss)


def cfg_for(make_config, tmp_path, **kw):
    base = {"train.max_steps": 12, "train.threads": 1, "train.log_every": 1, "eval.every": 4,
            "train.save_every": 4, "output.dir": str(tmp_path / "run")}
    return make_config(**{**base, **kw})


def finite_weights(run) -> bool:
    weights = load_file(run / "model" / "model.safetensors")
    return all(torch.isfinite(t).all() for t in weights.values())


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_isolated_non_finite_steps_are_skipped_and_counted(make_config, monkeypatch, tmp_path, kind):
    inject(monkeypatch, {3, 7}, kind)
    cfg = cfg_for(make_config, tmp_path)
    s = api.train(cfg)
    assert s["steps"] == 12 and s["skipped_steps"] == 2
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in lines if "skipped_step" in r]
    what = "loss is nan" if kind == "loss" else "gradient norm is nan"
    assert [r["skipped_step"] for r in skipped] == [3, 7] and all(what in r["reason"] for r in skipped)
    losses = [r["loss"] for r in lines if "loss" in r]
    assert len(losses) == 12 - 2 + 2 and all(x == x for x in losses)  # windows of a skipped step log no NaN
    assert finite_weights(tmp_path / "run")
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["skipped_steps"] == 2


def test_a_skipped_step_never_reaches_the_optimizer(make_config, monkeypatch, tmp_path):
    """The skipped step's batch is consumed, but the optimizer (whose fused kernel would spread a NaN into
    every weight) is not called for it."""
    seen = []
    real_step = torch.optim.AdamW.step

    def step(self, *a, **k):
        seen.append(1)
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    inject(monkeypatch, {3})
    api.train(cfg_for(make_config, tmp_path, **{"train.max_steps": 5, "data.validation": None}))
    assert len(seen) == 4  # 5 steps, one skipped


def test_k_non_finite_steps_in_a_row_stop_with_a_diagnosis(make_config, monkeypatch, tmp_path):
    inject(monkeypatch, {6, 7, 8, 9, 10})
    cfg = cfg_for(make_config, tmp_path, **{"train.max_bad_steps": 3})
    with pytest.raises(NumericalError) as e:
        api.train(cfg)
    msg = str(e.value)
    run = tmp_path / "run"
    last = checkpoints.latest(run / "checkpoints")
    assert checkpoints.step_of(last) == 4  # written before the fault; nothing after it
    assert "stopped at step 8" in msg and "3 steps in a row (steps 6-8" in msg
    assert "train.lr=0.003" in msg and "precision: fp32" in msg
    assert f"last good checkpoint: {last} (step 4;" in msg and "train.max_grad_norm=0.25 (now 1)" in msg
    assert "best model so far" in msg and "no NaN weights were written" in msg
    assert finite_weights(run)
    assert not (run / "summary.json").exists()  # not mistaken for a finished run
    w = load_file(last / "weights.safetensors")
    assert all(torch.isfinite(t).all() for t in w.values())


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: "
                                                "can't allocate memory: you tried to allocate 9663676416 bytes")])
def test_out_of_memory_in_a_step_names_remedies_for_this_run(make_config, monkeypatch, tmp_path, error):
    real = loop.task_loss

    def task_loss(logits, labels, lm, *rest):
        if torch.is_grad_enabled():
            raise error
        return real(logits, labels, lm, *rest)

    monkeypatch.setattr(loop, "task_loss", task_loss)
    cfg = cfg_for(make_config, tmp_path, **{"train.batch_size": 16, "train.grad_accum": 2})
    with pytest.raises(DeltatuneError) as e:
        api.train(cfg)
    msg = str(e.value)
    assert msg.startswith("out of memory at step 1 (micro-batch of 16 rows x ")
    assert "train.batch_size=8 train.grad_accum=4" in msg  # same global batch of 32
    assert "method.name=lora (now full)" in msg
    assert ("train.precision=bf16" in msg) == precision.cpu_supports_bf16()
    assert "train.gradient_checkpointing=true" in msg
    # A PEFT run is not told to use a PEFT method.
    cfg = cfg_for(make_config, tmp_path, **{"method.name": "lora", "train.batch_size": 1})
    with pytest.raises(DeltatuneError) as e:
        api.train(cfg)
    assert "method.name=" not in str(e.value) and "train.batch_size=" not in str(e.value)


def test_out_of_memory_while_evaluating_and_other_errors(make_config, monkeypatch, tmp_path):
    real = loop.task_loss

    def task_loss(logits, labels, lm, *rest):
        if not torch.is_grad_enabled():
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(logits, labels, lm, *rest)

    monkeypatch.setattr(loop, "task_loss", task_loss)
    with pytest.raises(DeltatuneError, match=r"out of memory while evaluating after step 4(.|\n)*eval.batch_size=16"):
        api.train(cfg_for(make_config, tmp_path))

    def broken(*args):
        raise RuntimeError("shape mismatch")  # a bug, not memory: keeps its traceback

    monkeypatch.setattr(loop, "task_loss", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        api.train(cfg_for(make_config, tmp_path))



def test_out_of_memory_context_is_passed_by_the_loop(make_config, monkeypatch, tmp_path):
    """The loop hands the failing step and micro-batch to the message (nothing is read from stack frames):
    an out-of-memory error in the third step says step 3 and that micro-batch's shape."""
    from deltatune.engine import faults

    real, calls = loop.task_loss, {"n": 0}

    def task_loss(logits, labels, lm, *rest):
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 3:
                raise torch.OutOfMemoryError("CUDA out of memory")
        return real(logits, labels, lm, *rest)

    monkeypatch.setattr(loop, "task_loss", task_loss)
    with pytest.raises(DeltatuneError, match=r"^out of memory at step 3 \(micro-batch of 8 rows x \d+ tokens\)"):
        api.train(cfg_for(make_config, tmp_path, **{"train.batch_size": 8, "data.validation": None}))
    cfg = cfg_for(make_config, tmp_path)
    oom = torch.OutOfMemoryError("CUDA out of memory")
    msg = str(faults.out_of_memory(oom, cfg, torch.device("cpu"), faults.Where("train", 7, (4, 96))))
    assert msg.startswith("out of memory at step 7 (micro-batch of 4 rows x 96 tokens) on cpu")
    assert f"data.max_length={cfg.data.max_length // 2}" in msg or cfg.data.max_length <= 64
    assert str(faults.out_of_memory(oom, cfg, torch.device("cpu"), faults.Where("eval", 0))).startswith(
        "out of memory while evaluating before training on cpu")
    assert str(faults.out_of_memory(oom, cfg, torch.device("cpu"))).startswith("out of memory during training")
