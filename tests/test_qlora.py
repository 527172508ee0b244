"""QLoRA: LoRA over a 4-bit NF4 base or an 8-bit LLM.int8 base (bitsandbytes on CPU), trained, reloaded and
merged into 32 bits."""

from __future__ import annotations

import pytest
import torch

from deltatune import api, config
from deltatune.errors import ConfigError

pytest.importorskip("bitsandbytes")

LAYER = {4: "Linear4bit", 8: "Linear8bitLt"}
CASES = [("classification", 4), ("causal_lm", 4), ("causal_lm", 8)]


@pytest.fixture
def qlora_run(make_config, tiny_llama64, tmp_path):
    def run(task: str, bits: int):
        cfg = make_config(model=tiny_llama64, **{"task": task, "method.name": "qlora", "method.r": 4,
                                                 "method.bits": bits, "train.max_steps": 6, "eval.every": 100,
                                                 "train.lr": 1e-2, "output.dir": str(tmp_path / f"{task}-{bits}")})
        return cfg, api.train(cfg)
    return run


@pytest.mark.parametrize(("task", "bits"), CASES)
def test_qlora_trains_on_a_quantized_base_and_reloads_exactly(qlora_run, task, bits):
    cfg, s = qlora_run(task, bits)
    assert s["quantized_base"] is True and s["artifact"] == "adapter"
    # LoRA on q,k,v,o (64x64, k/v out 32), gate/up (64->128), down (128->64), 2 layers, r=4 (+ head).
    lora = 2 * 4 * ((64 + 64) + (64 + 32) * 2 + (64 + 64) + 2 * (64 + 128) + (128 + 64))
    head = 64 * 2 if task == "classification" else 0
    assert s["trainable_params"] == lora + head
    # Totals count the parameters the packed 4-/8-bit tensors stand for, not their bytes.
    fp32 = api.train(cfg.model_copy(update={"method": cfg.method.model_copy(update={"name": "lora"}),
                                            "output": cfg.output.model_copy(update={"dir": cfg.output.dir + "-fp32"})}))
    assert s["total_params"] == fp32["total_params"]
    run = api.load_run(cfg.output.dir, device="cpu")
    quantized = [m for m in run.model.modules() if type(m).__module__.startswith("bitsandbytes")]
    assert [type(m).__name__ for m in quantized] == [LAYER[bits]] * 14  # 7 projections x 2 layers
    again = api.evaluate(cfg.output.dir)
    assert again["loss"] == pytest.approx(s["best_metrics"]["loss"], abs=1e-6)


@pytest.mark.parametrize(("task", "bits"), CASES)
def test_qlora_merges_into_32_bit_weights_equal_to_the_trained_model(qlora_run, task, bits, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from deltatune.export.merge import merge

    cfg, _ = qlora_run(task, bits)
    report = merge(cfg.output.dir, tmp_path / "merged")
    assert report["max_abs_diff"] < 1e-4 and report["into"] == f"fp32 copy of the dequantized {bits}-bit base"
    # The quantized kernels approximate the dequantized product; a wrongly dequantized base (a scale
    # dropped) would put the copy far from what was trained.
    assert report["quantized_kernel_max_abs_diff"] < 0.05
    auto = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    merged = auto.from_pretrained(tmp_path / "merged")
    assert not any(type(m).__name__ in LAYER.values() for m in merged.modules())
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32


def test_four_bit_options_with_eight_bits_are_refused():
    with pytest.raises(ConfigError, match=r"method.bits=8"):
        config.load(None, ["method.name=qlora", "method.bits=8", "method.quant_type=fp4", "data.train=x.jsonl"])
    assert config.load(None, ["method.name=qlora", "method.bits=8", "data.train=x.jsonl"]).method.bits == 8
