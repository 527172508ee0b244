"""Conformance of every method on a tiny BERT classifier: what trains, what is saved, what reloads.

Each method trains a few steps from the same start; then:
- only the parameters the method declares trainable changed, and frozen weights are bit-identical;
- the saved run reloads to identical outputs, and peft artifacts load in plain peft too;
- parameter counts match the closed form where there is one.
"""

from __future__ import annotations

import pytest
import torch

from deltatune import api, methods
from deltatune.methods import REGISTRY

METHOD_OVERRIDES = {
    "adapter": {"method.style": "houlsby", "method.reduction_factor": 4},
    "full": {},
    "freeze": {"method.train_layers": 1},
    "bitfit": {},
    "lora": {"method.r": 4, "method.alpha": 8},
    "ia3": {},
    "ln_tuning": {},
    "prompt_tuning": {"method.num_virtual_tokens": 4},
    "p_tuning": {"method.num_virtual_tokens": 4, "method.encoder_hidden_size": 16},
    "prefix_tuning": {"method.num_virtual_tokens": 4, "method.encoder_hidden_size": 16},
}


# prefix tuning cannot drive transformers-5 sequence classifiers through peft (tested to refuse below).
CASES = [(m, arch) for m in sorted(METHOD_OVERRIDES) for arch in ("bert", "llama") if m != "prefix_tuning"]


def test_every_registered_method_is_covered():
    assert set(METHOD_OVERRIDES) == set(REGISTRY)


def base_state(cfg):
    """The model before training, built exactly as api.train builds it (same seed)."""
    from deltatune.engine.loop import seed_everything
    from deltatune.models import load_classifier, load_tokenizer

    tok = load_tokenizer(cfg.model.name)
    seed_everything(cfg.train.seed)
    model = load_classifier(cfg.model.name, ["negative", "positive"], tok, attention="eager")
    model = methods.apply(model, cfg.method, cfg.task)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return model, {n: p.detach().clone() for n, p in model.named_parameters()}, trainable


def inputs(run):
    enc = run.tokenizer(["a good film", "the plot was dull and boring", "great"], padding=True,
                        return_tensors="pt")
    return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}


@pytest.mark.parametrize("name,arch", CASES)
def test_method_trains_only_its_parameters_and_reloads_exactly(name, arch, make_config, tiny_bert, tiny_llama):
    model_dir = tiny_bert if arch == "bert" else tiny_llama
    cfg = make_config(model=model_dir, **{"method.name": name, **METHOD_OVERRIDES[name], "train.max_steps": 6,
                                          "eval.every": 100, "train.lr": 1e-2})
    model, before, trainable = base_state(cfg)
    summary = api.train(cfg)
    assert summary["trainable_params"] == sum(before[n].numel() for n in trainable)
    run = api.load_run(cfg.output.dir, device="cpu")
    after = dict(run.model.named_parameters())
    # p-tuning saves the prompt encoder's output embeddings, not the encoder itself (peft's format).
    shared = set(before) & set(after)
    assert shared == set(before) or name == "p_tuning", set(before) ^ set(after)
    changed = {n for n in shared if not torch.equal(before[n], after[n].detach())}
    assert changed, "nothing trained"
    assert changed <= trainable, f"frozen parameters changed: {sorted(changed - trainable)[:5]}"
    artifact = REGISTRY[name].saves
    assert summary["artifact"] == artifact and summary["artifact_mb"] > 0
    # Save -> load is exact: the reloaded run reproduces the in-memory model's final evaluation.
    final = summary["best_metrics"]
    assert final["step"] == 6
    again = api.evaluate(cfg.output.dir)
    assert again["loss"] == pytest.approx(final["loss"], abs=1e-6) and again["accuracy"] == final["accuracy"]
    if artifact == "adapter" and name != "adapter":  # bottleneck adapters are deltatune's format only
        # ... and plain peft loads the adapter (head included) to the same outputs.
        from peft import PeftModel
        from transformers import AutoModelForSequenceClassification

        base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
        base.config.pad_token_id = run.tokenizer.pad_token_id
        plain = PeftModel.from_pretrained(base, f"{cfg.output.dir}/adapter").eval()
        with torch.no_grad():
            a = run.model(**inputs(run)).logits
            c = plain(**inputs(run)).logits
        assert torch.allclose(a, c, atol=1e-5), (a, c)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_prefix_tuning_for_classification_explains(make_config, tiny_bert, tiny_llama, arch):
    from deltatune.errors import ConfigError

    cfg = make_config(model=tiny_bert if arch == "bert" else tiny_llama, **{"method.name": "prefix_tuning"})
    with pytest.raises(ConfigError, match="prefix_tuning.*past_key_values.*prompt_tuning"):
        base_state(cfg)


def test_lora_parameter_count_is_closed_form(make_config, tiny_bert):
    # tiny BERT: hidden 32, intermediate 64, 2 layers. auto targets q, k, v, attn-out (32x32),
    # intermediate (32->64), output (64->32): r*(in+out) each.
    r = 4
    model, _, trainable = base_state(make_config(**{"method.name": "lora", "method.r": r}))
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert lora == 2 * r * (4 * (32 + 32) + (32 + 64) + (64 + 32))
    head = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n)
    assert head == 32 * 2 + 2  # the classifier trains and is saved with the adapter


def test_bitfit_and_freeze_select_the_right_tensors(make_config):
    _, _, trainable = base_state(make_config(**{"method.name": "bitfit"}))
    assert trainable and all(n.endswith(".bias") or n.startswith("classifier.") for n in trainable)
    _, _, trainable = base_state(make_config(**{"method.name": "freeze", "method.train_layers": 1}))
    assert any(".layer.1." in n for n in trainable) and not any(".layer.0." in n for n in trainable)
    assert "classifier.weight" in trainable and "bert.embeddings.word_embeddings.weight" not in trainable


def test_loraplus_gives_b_matrices_a_larger_lr(make_config):
    from deltatune.engine.optim import build_optimizer
    from deltatune.methods import lora

    cfg = make_config(**{"method.name": "lora", "method.loraplus_lr_ratio": 16})
    model, _, _ = base_state(cfg)
    opt = build_optimizer(model, cfg.train, torch.device("cpu"), lambda n: lora.lr_scale(cfg.method, n))
    names = {id(p): n for n, p in model.named_parameters()}
    for g in opt.param_groups:
        kinds = {("B" if "lora_B" in names[id(p)] else "other") for p in g["params"]}
        assert len(kinds) == 1
        assert g["lr"] == pytest.approx(cfg.train.lr * (16 if kinds == {"B"} else 1))


@pytest.mark.parametrize("variant,init", [("dora", "default"), ("rslora", "gaussian"), ("lora", "pissa")])
def test_lora_variants_and_inits_apply(make_config, variant, init):
    model, _, trainable = base_state(make_config(**{"method.name": "lora", "method.variant": variant,
                                                    "method.init": init}))
    peft_cfg = model.peft_config["default"]
    assert peft_cfg.use_dora == (variant == "dora") and peft_cfg.use_rslora == (variant == "rslora")
    if variant == "dora":
        assert any("lora_magnitude_vector" in n for n in trainable)


def test_preflight_refuses_method_task_mismatch_before_loading(make_config):
    from deltatune.errors import ConfigError

    cfg = make_config(**{"method.name": "prefix_tuning", "model.name": "/nonexistent/never-loaded"})
    with pytest.raises(ConfigError, match="does not support task `classification`"):
        api.train(cfg)
