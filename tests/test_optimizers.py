"""train.optimizer: every optimizer gets the same parameter groups, keeps the state it promises, trains, refuses
what cannot run (preflight), and resumes exactly from a checkpoint (its state_dict round-trips)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deltatune import api, config, preflight
from deltatune.engine import checkpoints, optim
from deltatune.errors import ConfigError
from tests.conftest import save_tiny_bert

NAMES = ("adamw", "adamw_8bit", "adafactor")  # paged_adamw_8bit needs CUDA (refused on CPU below)


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    # 64 x 128 = 8,192 elements: above bitsandbytes' min_8bit_size (4,096), so its states are 8-bit.
    return torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.LayerNorm(64), torch.nn.Linear(64, 4))


def train_cfg(name: str, **kw) -> config.TrainSection:
    return config.TrainSection(optimizer=name, lr=1e-2, weight_decay=0.1, **kw)


def scale(name: str) -> float:  # a LoRA+-like scale: the last layer trains 4x faster
    return 4.0 if name.startswith("2.") else 1.0


@pytest.mark.parametrize("name", NAMES)
def test_same_groups_for_every_optimizer(name):
    """No decay for biases and norms, LoRA+ scales kept: the groups param_groups makes, whatever the optimizer."""
    model = tiny_model()
    opt = optim.build_optimizer(model, train_cfg(name), torch.device("cpu"), scale)
    expected = optim.param_groups(model, 0.1, 1e-2, scale)
    got = [(g["lr"], g["weight_decay"], [id(p) for p in g["params"]]) for g in opt.param_groups]
    assert got == [(g["lr"], g["weight_decay"], [id(p) for p in g["params"]]) for g in expected]
    assert {(g["lr"], g["weight_decay"]) for g in opt.param_groups} == {(1e-2, 0.1), (1e-2, 0.0), (4e-2, 0.1),
                                                                        (4e-2, 0.0)}


def step_once(model, opt) -> None:
    model(torch.randn(8, 128, generator=torch.Generator().manual_seed(0))).pow(2).mean().backward()
    opt.step()


def test_each_optimizer_keeps_the_state_it_promises():
    """AdamW: two fp32 moments (8 bytes per parameter); 8-bit AdamW: two uint8 codes (2 bytes) for large
    tensors; Adafactor: factored rows and columns, far less than one value per parameter."""
    kinds = {}
    for name in NAMES:
        model = tiny_model()
        opt = optim.build_optimizer(model, train_cfg(name), torch.device("cpu"))
        step_once(model, opt)
        kinds[name] = (type(opt).__name__, optim.state_bytes(opt), opt.state[model[0].weight])
    n = sum(p.numel() for p in tiny_model().parameters())
    assert kinds["adamw"][0] == "AdamW" and kinds["adamw"][1] >= 8 * n
    assert kinds["adamw_8bit"][0] == "AdamW8bit"
    big = kinds["adamw_8bit"][2]
    assert big["state1"].dtype == big["state2"].dtype == torch.uint8
    assert kinds["adamw_8bit"][1] < 0.4 * kinds["adamw"][1]
    assert kinds["adafactor"][0] == "Adafactor" and kinds["adafactor"][1] < 0.1 * kinds["adamw"][1]
    assert kinds["adafactor"][2]["row_var"].numel() == 64 and kinds["adafactor"][2]["col_var"].numel() == 128


def test_fused_adamw_kept_and_clipping_folds_only_into_it():
    """Today's default stays fused AdamW (clipping folds into its grad_scale); the others clip the gradients."""
    from deltatune.engine.strategy import clip_gradients

    for name, fused in (("adamw", True), ("adamw_8bit", False), ("adafactor", False)):
        model = tiny_model()
        opt = optim.build_optimizer(model, train_cfg(name), torch.device("cpu"))
        assert bool(opt.defaults.get("fused")) == fused
        model(torch.randn(8, 128)).pow(2).sum().mul(1e3).backward()
        before = model[0].weight.grad.clone()
        clip_gradients(opt, 1.0, fold=True)
        assert torch.equal(model[0].weight.grad, before) == fused, name
        assert (getattr(opt, "grad_scale", None) is not None) == fused, name


def load(**overrides) -> config.RunConfig:
    base = {"data.train": "x.jsonl", "train.precision": "fp32"}
    base.update(overrides)
    return config.load(None, [f"{k}={v}" for k, v in base.items()])


def test_preflight_refuses_what_cannot_run(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    check = preflight._optimizer
    check(load(**{"train.optimizer": "adamw_8bit"}), "cpu")  # bitsandbytes' 8-bit kernels run on CPU
    check(load(**{"train.optimizer": "paged_adamw_8bit"}), "cuda")
    check(load(**{"train.optimizer": "adafactor", "train.distributed": "ddp"}), "cpu")
    with pytest.raises(ConfigError, match="paged_adamw_8bit.*unified memory.*cpu.*Fix: train.optimizer=adamw_8bit"):
        check(load(**{"train.optimizer": "paged_adamw_8bit"}), "cpu")
    for mode in ("fsdp", "deepspeed"):
        for name in ("adamw_8bit", "adafactor"):
            with pytest.raises(ConfigError, match=f"optimizer={name} with train.distributed={mode}.*Fix"):
                check(load(**{"train.optimizer": name, "train.distributed": mode}), "cpu")
    with pytest.raises(ConfigError, match="train.offload=optimizer"):
        check(load(**{"train.optimizer": "adafactor", "train.distributed": "deepspeed"}), "cpu")
    check(load(**{"train.distributed": "deepspeed"}), "cpu")
    real = preflight.importlib.util.find_spec
    monkeypatch.setattr(preflight.importlib.util, "find_spec", lambda n: None if n == "bitsandbytes" else real(n))
    with pytest.raises(ConfigError, match="needs bitsandbytes.*pip install"):
        check(load(**{"train.optimizer": "adamw_8bit"}), "cpu")
    check(load(**{"train.optimizer": "adafactor"}), "cpu")


# ---------------------------------------------------------------------------------------------
# Exact resume with every optimizer (tiny BERT, dropout on, fp32), as tests/test_resume.py checks AdamW

STEPS = 12


@pytest.fixture(scope="module")
def dropout_bert(tmp_path_factory, tokenizer_dir) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("dropout-bert"), tokenizer_dir, dropout=0.1)


def run_config(out: Path, model: Path, toy_data, name: str) -> config.RunConfig:
    overrides = {"model.name": str(model), "data.train": str(toy_data["train"]), "data.validation": "null",
                 "train.max_steps": STEPS, "train.batch_size": 16, "train.lr": 3e-3, "train.precision": "fp32",
                 "train.log_every": 1, "train.threads": 1, "train.save_every": 4, "train.keep_last": 3,
                 "train.optimizer": name, "output.dir": str(out)}
    return config.load(None, [f"{k}={v}" for k, v in overrides.items()])


def same(a, b) -> bool:
    """Equal state values: tensors (moments, codes, scales, step counts), plain numbers (bitsandbytes' step), or
    dicts of them (bitsandbytes nests its quantization state)."""
    if isinstance(a, dict) or isinstance(b, dict):
        return isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


@pytest.mark.parametrize("name", ["adamw_8bit", "adafactor"])
def test_resume_from_a_checkpoint_equals_uninterrupted(name, dropout_bert, toy_data, tmp_path):
    """Resumed from the step-4 checkpoint, the run ends with the uninterrupted run's weights, optimizer state and
    losses: the optimizer's state_dict survives the checkpoint (torch.load weights_only) whole."""
    ref_cfg = run_config(tmp_path / "ref", dropout_bert, toy_data, name)
    ref = api.train(ref_cfg)
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "ref", resumed_dir)
    (resumed_dir / "summary.json").unlink()
    ckdir = resumed_dir / "checkpoints"
    for path in checkpoints.complete(ckdir)[1:]:  # keep only step 4
        shutil.rmtree(path)
    cfg = run_config(resumed_dir, dropout_bert, toy_data, name)
    got = api.train(cfg, resume="auto")
    assert checkpoints.step_of(Path(got["resumed_from"])) == 4
    a, b = checkpoints.latest(tmp_path / "ref" / "checkpoints"), checkpoints.latest(ckdir)
    assert a.name == b.name == "step-000008"  # written again by the resumed run (none at the last step)
    wa, wb = load_file(a / "weights.safetensors"), load_file(b / "weights.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), "weights differ"
    ma, mb = (load_file(run / "model" / "model.safetensors") for run in (tmp_path / "ref", resumed_dir))
    assert all(torch.equal(ma[k], mb[k]) for k in ma), "the final model differs"
    oa = torch.load(a / "optimizer.pt", weights_only=True)["state"]
    ob = torch.load(b / "optimizer.pt", weights_only=True)["state"]
    assert oa.keys() == ob.keys() and all(same(oa[i][k], ob[i][k]) for i in oa for k in oa[i]), "optimizer differs"
    losses = [[json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
              for run in (tmp_path / "ref", resumed_dir)]
    assert losses[0][-STEPS + 4:] == losses[1][-STEPS + 4:] and len(losses[0]) == STEPS
    assert ref["steps"] == got["steps"] == STEPS
    if name == "adamw_8bit":  # the tiny BERT's word embeddings are large enough for 8-bit states
        nested = [v for s in ob.values() for v in s.get("__bnb_optimizer_quant_state__", {}).values()]
        assert any(isinstance(v, torch.Tensor) and v.dtype == torch.uint8 for v in nested)
