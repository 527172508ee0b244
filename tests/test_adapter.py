"""Bottleneck adapters (methods/adapter.py) on the tiny BERT and LLaMA classifiers.

Adapters are initialised non-trivially (init_std) wherever a check would otherwise pass vacuously:
with up = 0 an adapter is the identity, so "differs from the base" and "reloads exactly" prove nothing.
"""

from __future__ import annotations

import json

import pytest
import torch

from deltatune.errors import ConfigError
from deltatune.methods import adapter
from deltatune.methods.common import head_modules

HIDDEN, LAYERS = 32, 2  # the conftest models


def load(path, seed: int = 0):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)  # the head is freshly initialised: the seed decides its values
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = 0
    return model.eval()


@pytest.fixture(params=["bert", "llama"])
def base_dir(request, tiny_bert, tiny_llama):
    return tiny_bert if request.param == "bert" else tiny_llama


def batch(vocab: int = 100) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab, (4, 9), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 1, 0])}


def adapted(path, init_std: float = 0.0, **cfg):
    torch.manual_seed(0)
    model = load(path)
    return adapter.apply(model, adapter.Config(**cfg), "classification", init_std=init_std)


def head_numel(model) -> int:
    base = model.get_base_model()
    return sum(p.numel() for h in head_modules(base) for p in base.get_submodule(h).parameters())


@pytest.mark.parametrize("style,per_block", [("houlsby", 2), ("pfeiffer", 1)])
@pytest.mark.parametrize("rf", [16, 4, 64])
def test_parameter_count_is_closed_form_and_only_adapters_and_head_train(base_dir, style, per_block, rf):
    model = adapted(base_dir, style=style, reduction_factor=rf)
    b = max(1, HIDDEN // rf)
    per_linear = (HIDDEN * b + b) + (b * HIDDEN + HIDDEN)
    added = sum(p.numel() for n, p in model.named_parameters() if ".adapter_" in n)
    assert added == LAYERS * per_block * per_linear
    assert len(model.target_modules) == LAYERS * per_block
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    heads = tuple(f"base_model.{h}." for h in head_modules(model.get_base_model()))
    assert trainable and all(".adapter_" in n or n.startswith(heads) for n in trainable)
    assert any(n.startswith(heads) for n in trainable), "the task head must train"
    assert sum(p.numel() for n, p in model.named_parameters() if p.requires_grad) == added + head_numel(model)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".base_layer." in n)


@pytest.mark.parametrize("style", ["houlsby", "pfeiffer"])
def test_wraps_the_sublayer_outputs_of_every_block(tiny_bert, tiny_llama, style):
    expect = {"bert": ["attention.output.dense", "output.dense"], "llama": ["self_attn.o_proj", "mlp.down_proj"]}
    for arch, path in (("bert", tiny_bert), ("llama", tiny_llama)):
        model = adapted(path, style=style)
        stack = "bert.encoder.layer" if arch == "bert" else "model.layers"
        rel = expect[arch] if style == "houlsby" else expect[arch][1:]
        assert model.target_modules == [f"{stack}.{i}.{r}" for i in range(LAYERS) for r in rel]
        wrappers = [n for n, m in model.get_base_model().named_modules() if isinstance(m, adapter.BottleneckLayer)]
        assert wrappers == model.target_modules
        for i in range(LAYERS):
            assert sum(n.startswith(f"{stack}.{i}.") for n in wrappers) == (2 if style == "houlsby" else 1)


def test_default_init_is_the_identity_and_wrapper_passes_through(base_dir):
    base = load(base_dir)
    with torch.no_grad():
        want = base(**batch()).logits
    model = adapted(base_dir)  # same seed -> same head as `base`
    with torch.no_grad():
        assert torch.equal(model(**batch()).logits, want)  # up = 0: training starts at the base model
    assert model.config is model.get_base_model().config
    assert model.get_input_embeddings() is model.get_base_model().get_input_embeddings()
    layer = model.get_base_model().get_submodule(model.target_modules[0])
    assert layer.weight is layer.base_layer.weight and layer.out_features == HIDDEN


@pytest.mark.parametrize("non_linearity", ["relu", "gelu", "silu", "tanh"])
def test_layer_computes_output_plus_bottleneck(non_linearity):
    torch.manual_seed(0)
    linear = torch.nn.Linear(8, HIDDEN)
    layer = adapter.BottleneckLayer(linear, 16, non_linearity, init_std=0.1)
    x = torch.randn(3, 8)
    act = {"relu": torch.relu, "gelu": torch.nn.functional.gelu, "silu": torch.nn.functional.silu,
           "tanh": torch.tanh}[non_linearity]
    down, up = layer.adapter_down["default"], layer.adapter_up["default"]
    assert (down.out_features, up.out_features) == (2, HIDDEN)
    with torch.no_grad():
        assert torch.equal(layer(x), linear(x) + up(act(down(linear(x)))))
    layer.reset_adapter()  # the training default: up = 0, so the layer is exactly the Linear
    with torch.no_grad():
        assert torch.equal(layer(x), linear(x))
    assert torch.count_nonzero(down.weight) > 0  # else no gradient could ever reach down or up.weight


@pytest.mark.parametrize("arch,non_linearity", [("bert", "relu"), ("llama", "silu")])
def test_training_changes_outputs_and_only_adapter_and_head(tiny_bert, tiny_llama, arch, non_linearity):
    base_dir = tiny_bert if arch == "bert" else tiny_llama
    base = load(base_dir)
    with torch.no_grad():
        base_logits = base(**batch()).logits
    model = adapted(base_dir, init_std=0.05, style="houlsby", non_linearity=non_linearity)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        assert not torch.allclose(model(**batch()).logits, base_logits)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(**batch()).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed == trainable
    assert any(".adapter_down." in n for n in changed) and any(".adapter_up." in n for n in changed)


@pytest.mark.parametrize("style", ["houlsby", "pfeiffer"])
def test_save_and_load_reproduce_logits_exactly(base_dir, style, tmp_path):
    from safetensors.torch import load_file

    model = adapted(base_dir, init_std=0.05, style=style, reduction_factor=8, non_linearity="gelu").eval()
    with torch.no_grad():
        want = model(**batch()).logits
    model.save_pretrained(tmp_path, safe_serialization=True)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["peft_type"] == "BOTTLENECK_ADAPTER" and meta["library"] == "deltatune"
    assert (meta["style"], meta["reduction_factor"], meta["non_linearity"]) == (style, 8, "gelu")
    assert meta["target_modules"] == model.target_modules and meta["task"] == "classification"
    assert meta["base_model_name_or_path"] == str(base_dir)
    state = load_file(str(tmp_path / "adapter_model.safetensors"))
    heads = head_modules(model.get_base_model())
    assert all(k.startswith("base_model.model.") for k in state)
    assert all(".adapter_down." in k or ".adapter_up." in k or k.split(".")[2] in heads for k in state)
    assert len(state) == 4 * len(model.target_modules) + sum(1 for h in heads for _ in model.get_submodule(
        f"base_model.{h}").parameters())
    assert sum(t.numel() for t in state.values()) == sum(p.numel() for p in model.parameters() if p.requires_grad)

    fresh = load(base_dir, seed=123)  # a different random head: the saved one must replace it
    loaded = adapter.from_pretrained(fresh, tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(**batch()).logits, want)
    assert not any(p.requires_grad for p in loaded.parameters())  # inference by default, as in peft
    assert adapter.is_saved_adapter(tmp_path)
    trainable = adapter.from_pretrained(load(base_dir), tmp_path, is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad}


def test_loading_is_strict(tiny_bert, tmp_path):
    from safetensors.torch import load_file, save_file

    adapted(tiny_bert, init_std=0.05).save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    state = load_file(str(weights))
    save_file({**state, "base_model.model.extra.weight": torch.zeros(1)}, str(weights))
    with pytest.raises(ConfigError, match="unexpected.*extra"):
        adapter.from_pretrained(load(tiny_bert), tmp_path)
    dropped = sorted(state)[0]
    save_file({k: v for k, v in state.items() if k != dropped}, str(weights))
    with pytest.raises(ConfigError, match="missing"):
        adapter.from_pretrained(load(tiny_bert), tmp_path)
    save_file({**state, dropped: torch.zeros(3, 3)}, str(weights))
    with pytest.raises(ConfigError, match="shape"):
        adapter.from_pretrained(load(tiny_bert), tmp_path)


def test_unsupported_architecture_and_bad_config_explain():
    from pydantic import ValidationError
    from transformers import OPTConfig, OPTForSequenceClassification

    # OPT names its sublayer outputs self_attn.out_proj and fc2: not a layout the adapter knows.
    opt = OPTForSequenceClassification(OPTConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2,
                                                 ffn_dim=32, word_embed_proj_dim=16, vocab_size=50, pad_token_id=0))
    with pytest.raises(ConfigError, match="method adapter.*lora"):
        adapter.apply(opt, adapter.Config(), "classification")
    with pytest.raises(ValidationError):
        adapter.Config(reduction_factor=0)
    with pytest.raises(ValidationError):
        adapter.Config(rank=4)  # extra keys are typos, not silently ignored


def test_applies_on_meta_device_for_planning(tiny_llama):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    cfg = AutoConfig.from_pretrained(tiny_llama, num_labels=2, pad_token_id=0)
    with torch.device("meta"):
        model = adapter.apply(AutoModelForSequenceClassification.from_config(cfg), adapter.Config(style="houlsby"),
                              "classification")
    b = HIDDEN // 16
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == (
        LAYERS * 2 * (2 * HIDDEN * b + b + HIDDEN) + HIDDEN * 2)
