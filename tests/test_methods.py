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
    "qlora": {"method.r": 4, "method.alpha": 8},  # needs hidden >= 64: covered in test_qlora.py
    "ia3": {},
    "ln_tuning": {},
    "prompt_tuning": {"method.num_virtual_tokens": 4},
    "p_tuning": {"method.num_virtual_tokens": 4, "method.encoder_hidden_size": 16},
    "prefix_tuning": {"method.num_virtual_tokens": 4, "method.encoder_hidden_size": 16},
}


# Every method on a BERT classifier, a LLaMA classifier and a LLaMA causal LM. Prefix tuning needs a
# key/value cache, which transformers-5 BERT does not take (tested to refuse below).
METHODS = sorted(set(METHOD_OVERRIDES) - {"qlora"})
CASES = [(m, arch, "classification") for m in METHODS for arch in ("bert", "llama")
         if (m, arch) != ("prefix_tuning", "bert")] + [(m, "llama", "causal_lm") for m in METHODS if m != "bitfit"]


def test_every_registered_method_is_covered():
    assert set(METHOD_OVERRIDES) == set(REGISTRY)


def base_state(cfg):
    """The model before training, built exactly as api.train builds it (same seed)."""
    from deltatune.engine.loop import seed_everything
    from deltatune.models import load_model, load_tokenizer

    tok = load_tokenizer(cfg.model.name)
    seed_everything(cfg.train.seed)
    model = load_model(cfg.task, cfg.model.name, ["negative", "positive"], tok, attention="eager")
    model = methods.apply(model, cfg.method, cfg.task)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return model, {n: p.detach().clone() for n, p in model.named_parameters()}, trainable


def inputs(run):
    enc = run.tokenizer(["a good film", "the plot was dull and boring", "great"], padding=True,
                        return_tensors="pt")
    return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}


@pytest.mark.parametrize("name,arch,task", CASES)
def test_method_trains_only_its_parameters_and_reloads_exactly(name, arch, task, make_config, tiny_bert, tiny_llama):
    model_dir = tiny_bert if arch == "bert" else tiny_llama
    cfg = make_config(model=model_dir, **{"method.name": name, **METHOD_OVERRIDES[name], "train.max_steps": 6,
                                          "eval.every": 100, "train.lr": 1e-2, "task": task})
    model, before, trainable = base_state(cfg)
    summary = api.train(cfg)
    assert summary["trainable_params"] == sum(before[n].numel() for n in trainable)
    run = api.load_run(cfg.output.dir, device="cpu")
    after = dict(run.model.named_parameters())
    # p-tuning and projected prefixes save the encoder's output embeddings, not the encoder (peft's format).
    shared = set(before) & set(after)
    assert shared == set(before) or name in ("p_tuning", "prefix_tuning"), set(before) ^ set(after)
    changed = {n for n in shared if not torch.equal(before[n], after[n].detach())}
    assert changed, "nothing trained"
    assert changed <= trainable, f"frozen parameters changed: {sorted(changed - trainable)[:5]}"
    artifact = REGISTRY[name].saves
    assert summary["artifact"] == artifact and summary["artifact_mb"] > 0
    # Save -> load is exact: the reloaded run reproduces the in-memory model's final evaluation.
    final = summary["best_metrics"]
    assert final["step"] == 6
    again = api.evaluate(cfg.output.dir)
    assert again["loss"] == pytest.approx(final["loss"], abs=1e-6)
    assert again.get("accuracy") == final.get("accuracy")
    # Bottleneck adapters are deltatune's format; prefix-tuned classifiers need deltatune's cache shim.
    if artifact == "adapter" and name != "adapter" and (name, task) != ("prefix_tuning", "classification"):
        # ... and plain peft loads the adapter (head included) to the same outputs.
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        if task == "classification":
            base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
        else:
            base = AutoModelForCausalLM.from_pretrained(model_dir)
        base.config.pad_token_id = run.tokenizer.pad_token_id
        plain = PeftModel.from_pretrained(base, f"{cfg.output.dir}/adapter").eval()
        with torch.no_grad():
            a = run.model(**inputs(run)).logits
            c = plain(**inputs(run)).logits
        assert torch.allclose(a, c, atol=1e-5), (a, c)


def test_prefix_tuning_on_an_encoder_classifier_explains(make_config):
    from deltatune.errors import ConfigError

    with pytest.raises(ConfigError, match="prefix_tuning: `bert` classifiers take no key/value cache.*prompt_tuning"):
        base_state(make_config(**{"method.name": "prefix_tuning"}))


def test_prefix_tuning_changes_a_decoder_classifier_output(make_config, tiny_llama):
    model, _, _ = base_state(make_config(model=tiny_llama, **{"method.name": "prefix_tuning",
                                                              "method.num_virtual_tokens": 4}))
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    with torch.no_grad():
        with_prefix = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        without = model.get_base_model()(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert with_prefix.shape == (2, 2) and not torch.allclose(with_prefix, without)


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


def test_loraplus_reaches_the_training_optimizer(make_config):
    cfg = make_config(**{"method.name": "lora", "method.r": 4, "method.loraplus_lr_ratio": 16, "train.max_steps": 1,
                         "data.validation": None})
    groups = api.train(cfg)["param_groups"]
    lrs = sorted({g["lr"] for g in groups})
    assert lrs == pytest.approx([cfg.train.lr, 16 * cfg.train.lr])
    b_params = sum(g["params"] for g in groups if g["lr"] == pytest.approx(16 * cfg.train.lr))
    assert b_params == 2 * 4 * (4 * 32 + 64 + 32)  # every lora_B: r x out_features, summed over 2 layers


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
    # The init took effect, in every wrapped layer. default: A ~ U(+-1/sqrt(in)) (kaiming), B = 0;
    # gaussian: A ~ N(0, 1/r) (beyond that bound somewhere), B = 0; pissa: A and B from the top singular
    # vectors, taken out of the base weight (base + scaling * B @ A is the original weight).
    original = dict(base_state(make_config())[0].named_parameters())
    layers = {n.removeprefix("base_model.model.") + ".weight": m for n, m in model.named_modules()
              if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert len(layers) == 2 * 6  # query, key, value, attention output, intermediate, output; 2 layers
    for name, layer in layers.items():
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        bound, r, base = layer.in_features ** -0.5, a.shape[0], layer.base_layer.weight
        if init == "pissa":
            assert b.abs().max() > 0 and not torch.equal(base, original[name])
            assert torch.allclose(base + layer.scaling["default"] * b @ a, original[name], atol=1e-5)
        else:
            assert torch.equal(b, torch.zeros_like(b)) and torch.equal(base, original[name])
            if init == "default":
                assert a.abs().max() <= bound
            else:
                assert a.abs().max() > bound and a.std().item() == pytest.approx(1 / r, rel=0.25)


def test_preflight_refuses_method_task_mismatch_before_loading(make_config, monkeypatch):
    import dataclasses

    from deltatune.errors import ConfigError

    causal_only = dataclasses.replace(REGISTRY["prompt_tuning"], tasks=("causal_lm",), why_not_task="(test)")
    monkeypatch.setitem(REGISTRY, "prompt_tuning", causal_only)
    cfg = make_config(**{"method.name": "prompt_tuning", "model.name": "/nonexistent/never-loaded"})
    with pytest.raises(ConfigError, match="does not support task `classification`"):
        api.train(cfg)


@pytest.mark.parametrize("name", ["full", "lora", "prompt_tuning", "adapter"])
def test_causal_lm_loss_falls(name, make_config, tiny_llama):
    """Language modelling on the toy sentences: held-out per-token loss falls.

    The tiny LLaMA is random, with a frozen random output layer for the delta methods, so they can
    only nudge its distribution; full fine-tuning must cut perplexity sharply.
    """
    cfg = make_config(model=tiny_llama, **{"task": "causal_lm", "method.name": name, **METHOD_OVERRIDES[name],
                                           "train.epochs": 4, "train.lr": 1e-2, "eval.every": 4})
    s = api.train(cfg)
    first, last = s["evals"][0], s["evals"][-1]
    assert s["best_metric"] == "loss" and set(last) >= {"loss", "perplexity"}
    assert last["loss"] < first["loss"] - 1e-3, (first, last)
    if name == "full":
        assert last["perplexity"] < 0.5 * first["perplexity"], (first, last)


def test_causal_lm_targets_are_every_next_token_and_end_in_eos(tiny_llama, toy_data):
    from deltatune import config
    from deltatune.data import build
    from deltatune.data.batching import collate
    from deltatune.engine.loop import count_targets
    from deltatune.models import load_tokenizer

    tok = load_tokenizer(str(tiny_llama))
    bundle = build(config.load(None, [f"data.train={toy_data['train']}", "data.validation=null"]).data, tok,
                   task="causal_lm")
    assert bundle.labels == []
    rows = bundle.train.dataset[:3]
    assert all(ids[-1] == tok.eos_token_id for ids in rows["input_ids"])
    batch = collate(rows, tok.pad_token_id, lm=True)
    assert torch.equal(batch["labels"][batch["attention_mask"] == 1], batch["input_ids"][batch["attention_mask"] == 1])
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    assert count_targets(batch["labels"], lm=True) == sum(len(x) - 1 for x in rows["input_ids"])


def test_method_that_trains_nothing_is_an_error(make_config, tiny_llama):
    from deltatune.errors import ConfigError

    with pytest.raises(ConfigError, match="bitfit: nothing .* would train.*no bias terms"):
        api.train(make_config(model=tiny_llama, **{"task": "causal_lm", "method.name": "bitfit"}))


def test_metric_must_exist_for_task(make_config, tiny_llama):
    from deltatune.errors import ConfigError

    with pytest.raises(ConfigError, match="eval.metric=accuracy does not exist for task `causal_lm`"):
        api.train(make_config(model=tiny_llama, **{"task": "causal_lm", "eval.metric": "accuracy"}))


# Closed forms on the tiny BERT: hidden 32, intermediate 64, 2 layers; the 2-label head has 32*2+2.
HEAD = 32 * 2 + 2
CLOSED_FORM = {
    # every bias: per layer q,k,v,attn-out (4x32), attn LayerNorm 32, intermediate 64, output 32, output
    # LayerNorm 32; plus the embeddings LayerNorm and the pooler
    "bitfit": ({"method.name": "bitfit"}, 2 * (4 * 32 + 32 + 64 + 32 + 32) + 32 + 32),
    # LayerNorm weight+bias: embeddings + 2 per layer
    "ln_tuning": ({"method.name": "ln_tuning"}, (1 + 2 * 2) * 2 * 32),
    # 4 virtual tokens x hidden
    "prompt_tuning": ({"method.name": "prompt_tuning", "method.num_virtual_tokens": 4}, 4 * 32),
    # IA3 for BERT (peft defaults): key, value scale their 32 outputs; `output.dense` (both the attention
    # output and the feed-forward output, treated as feed-forward) scale their inputs: 32 and 64
    "ia3": ({"method.name": "ia3"}, 2 * (32 + 32 + 32 + 64)),
    # the top layer: attention q,k,v,out (4x(32x32+32)), 2 LayerNorms (2x64), intermediate 32x64+64, output 64x32+32
    "freeze": ({"method.name": "freeze", "method.train_layers": 1},
               4 * (32 * 32 + 32) + 2 * 64 + (32 * 64 + 64) + (64 * 32 + 32)),
}


@pytest.mark.parametrize("name", sorted(CLOSED_FORM))
def test_trainable_counts_equal_the_closed_form(name, make_config):
    overrides, expected = CLOSED_FORM[name]
    model, _, trainable = base_state(make_config(**overrides))
    counted = sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    assert counted == expected + HEAD


def test_methods_listing_shows_real_defaults_only():
    from deltatune.cli import method_options

    shown = {name: method_options(m) for name, m in REGISTRY.items()}
    assert not any("Undefined" in s for s in shown.values()), shown
    assert "patterns" not in shown["freeze"] and "train_layers" not in shown["freeze"]  # empty / unset
    assert "r=8" in shown["lora"] and "target_modules='auto'" in shown["lora"]
    assert shown["full"] == "-"


def test_lr_auto_is_printed_at_start_and_recorded(make_config, capsys):
    summary = api.train(make_config(**{"method.name": "lora", "train.lr": "auto", "train.max_steps": 2,
                                       "data.validation": None}))
    assert (summary["lr"], summary["lr_auto"]) == (5e-4, True)
    assert "lr 0.0005 (train.lr=auto: lora's measured default" in " ".join(capsys.readouterr().err.split())
    summary = api.train(make_config(**{"method.name": "lora", "train.max_steps": 2, "data.validation": None}))
    assert (summary["lr"], summary["lr_auto"]) == (3e-3, False)  # make_config names train.lr: it wins
