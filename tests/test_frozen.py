"""model.frozen_dtype: the frozen base's linear weights stored in bf16 for adapter methods trained in bf16."""

from __future__ import annotations

import json

import pytest
import torch

from deltatune import api, config, methods
from deltatune.engine import frozen
from deltatune.engine.precision import cpu_supports_bf16
from deltatune.errors import ConfigError

needs_bf16 = pytest.mark.skipif(not cpu_supports_bf16(), reason="this CPU has no native bf16")


@pytest.mark.parametrize("requested,precision,saves,strategy,quantized,expected", [
    ("auto", "bf16", "adapter", "single", False, "bf16"),
    ("auto", "bf16", "adapter", "ddp", False, "bf16"),
    ("auto", "fp32", "adapter", "single", False, "fp32"),  # nothing casts to bf16 in an fp32 run
    ("auto", "bf16", "model", "single", False, "fp32"),  # the saved model would change
    ("auto", "bf16", "adapter", "fsdp", False, "fp32"),
    ("auto", "bf16", "adapter", "single", True, "fp32"),
    ("fp32", "bf16", "adapter", "single", False, "fp32"),
    ("bf16", "bf16", "adapter", "deepspeed", False, ConfigError),
    ("bf16", "fp32", "adapter", "single", False, ConfigError),
    ("bf16", "bf16", "model", "single", False, ConfigError),
])
def test_resolve(requested, precision, saves, strategy, quantized, expected):
    if expected is ConfigError:
        with pytest.raises(ConfigError, match=r"model\.frozen_dtype=bf16: .*Fix: "):
            frozen.resolve(requested, precision, saves, strategy, quantized)
    else:
        name, why = frozen.resolve(requested, precision, saves, strategy, quantized)
        assert name == expected and why


def _lora_llama(tiny_llama, variant="lora"):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    cfg = config.load(None, ["task=causal_lm", f"model.name={tiny_llama}", "method.name=lora",
                             f"method.variant={variant}", "method.dropout=0",
                             "method.target_modules=all-linear", "data.train=x.jsonl"])
    model = methods.apply(model, cfg.method, cfg.task)
    torch.manual_seed(1)  # B is zero at init: give both factors values so that every gradient is non-zero
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = torch.randn_like(p) * 0.1
    return model


def test_only_frozen_linear_weights_are_cast(tiny_llama):
    model = _lora_llama(tiny_llama)
    before = sum(p.numel() * p.element_size() for p in model.parameters())
    tensors, saved = frozen.cast_frozen_linears(model, torch.bfloat16)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    base_linears = [n for n in dtypes if n.endswith("base_layer.weight")]
    assert len(base_linears) == 14  # 7 projections x 2 layers (LLaMA has no biases)
    assert tensors == 15 and dtypes["base_model.model.lm_head.weight"] == torch.bfloat16  # the untied output layer
    assert all(dtypes[n] == torch.bfloat16 for n in base_linears)
    assert all(dtypes[n] == torch.float32 for n in dtypes if "lora_" in n or "norm" in n or "embed" in n)
    tied = _lora_llama(tiny_llama)
    tied.get_base_model().lm_head.weight = tied.get_base_model().model.embed_tokens.weight
    assert frozen.cast_frozen_linears(tied, torch.bfloat16)[0] == 14  # a tied output layer is the fp32 embedding
    assert saved == before - sum(p.numel() * p.element_size() for p in model.parameters())


@needs_bf16
def test_bf16_frozen_base_computes_what_autocast_computed(tiny_llama):
    """Autocast casts a frozen fp32 weight to bf16 at every use; storing it in bf16 once gives the same
    numbers: same logits and same adapter gradients, bit for bit."""
    torch.manual_seed(0)
    ids = torch.randint(5, 150, (2, 12))
    results = []
    for cast in (False, True):
        model = _lora_llama(tiny_llama)
        if cast:
            frozen.cast_frozen_linears(model, torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=ids).logits
        logits.float().logsumexp(-1).sum().backward()
        results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (a, grads_a), (b, grads_b) = results
    assert torch.equal(a, b)
    assert grads_a.keys() == grads_b.keys() and all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)
    assert all(g.abs().max() > 0 for g in grads_a.values())


@needs_bf16
def test_lora_run_in_bf16_keeps_the_base_in_bf16_and_reports_it(make_config, tiny_llama, tmp_path):
    cfg = make_config(model=tiny_llama, **{"method.name": "lora", "train.precision": "bf16", "train.max_steps": 6,
                                           "data.validation": None})
    s = api.train(cfg)
    assert s["frozen_dtype"] == "bf16" and s["frozen_dtype_reason"].startswith("auto")
    memory = s["memory_per_rank"][0]
    assert memory["peak_increase_mb"] == pytest.approx(memory["peak_mb"] - memory["loaded_mb"], abs=0.2)
    # The adapter was saved in fp32 and loads over the fp32 base as usual.
    adapter_cfg = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["peft_type"] == "LORA"
    full = api.train(make_config(model=tiny_llama, **{"train.precision": "bf16", "train.max_steps": 2,
                                                      "data.validation": None, "output.dir": str(tmp_path / "f")}))
    assert full["frozen_dtype"] == "fp32" and "saves the whole model" in full["frozen_dtype_reason"]


def _saved_bytes_and_results(model, ids):
    """Logits, adapter gradients, and the bytes autograd held for backward in one forward pass (each storage
    counted once: a tensor saved by two nodes is held once)."""
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=ids).logits
    logits.float().logsumexp(-1).sum().backward()
    return sum(saved.values()), logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@needs_bf16
def test_adapter_inputs_are_not_cast_to_fp32_under_autocast(tiny_llama):
    """peft casts each LoRA layer's bf16 input to fp32, which autocast casts back to bf16 and keeps for
    backward. Without that round trip: the same logits and gradients bit for bit, and no second bf16 copy of
    an input the graph holds anyway."""
    torch.manual_seed(0)
    ids = torch.randint(5, 150, (2, 12))
    runs = []
    for skip in (False, True):
        model = _lora_llama(tiny_llama)
        frozen.cast_frozen_linears(model, torch.bfloat16)
        if skip:
            assert frozen.skip_adapter_input_casts(model, "bf16") == 14
        runs.append(_saved_bytes_and_results(model, ids))
    assert frozen.skip_adapter_input_casts(_lora_llama(tiny_llama), "fp32") == 0  # no autocast: peft's cast stays
    # DoRA rounds its extra elementwise work on the input differently in bf16 (measured: logits differ)
    assert frozen.skip_adapter_input_casts(_lora_llama(tiny_llama, "dora"), "bf16") == 0
    (bytes_cast, a, grads_a), (bytes_kept, b, grads_b) = runs
    assert torch.equal(a, b)
    assert grads_a.keys() == grads_b.keys() and all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)
    # Only o_proj and down_proj get bf16 inputs (q,k,v,gate,up read the fp32 output of RMSNorm, which peft
    # leaves alone). o_proj's input, the attention output, is held for backward anyway, so its cast copy
    # was a second one: 2 layers x 24 tokens x 32 values x 2 bytes. (down_proj's input is held only by the
    # adapter: the copy replaced it, same bytes either way.)
    assert bytes_cast - bytes_kept == 2 * 24 * 32 * 2


@needs_bf16
def test_run_in_bf16_records_the_skipped_input_casts(make_config, tiny_llama):
    s = api.train(make_config(model=tiny_llama, **{"method.name": "lora", "train.precision": "bf16",
                                                   "train.max_steps": 2, "data.validation": None}))
    assert s["adapter_input_casts_skipped"] == 14
    assert api.train(make_config(model=tiny_llama, **{"method.name": "lora", "train.precision": "fp32",
                                                      "train.max_steps": 2, "data.validation": None,
                                                      "output.overwrite": True}))["adapter_input_casts_skipped"] == 0
