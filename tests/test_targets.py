"""Which layers layer-picking methods wrap (`method.target_modules: auto`) on each architecture family.

Tiny BERT, RoBERTa, GPT-2 and LLaMA (hidden 32, 2 layers), as classifiers and, for the decoders, as
causal LMs. GPT-2's projections are transformers' `Conv1D` (weights stored in x out), not nn.Linear:
`auto` must find them too, and peft must treat them as fan_in_fan_out.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from deltatune import api
from deltatune.errors import ConfigError
from deltatune.methods import lora
from deltatune.methods.common import layer_stack, quiet_third_party, wrappable_names

LAYERS = 2
# Per block, relative to the block: what `auto` must pick (every attention and MLP projection).
PROJECTIONS = {
    "bert": ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
             "intermediate.dense", "output.dense"],
    "gpt2": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
    "llama": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
}
PROJECTIONS["roberta"] = PROJECTIONS["bert"]


def _toy_tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    bert_tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    return PreTrainedTokenizerFast(tokenizer_object=bert_tok.backend_tokenizer, bos_token="[CLS]",
                                   eos_token="[SEP]", unk_token="[UNK]", pad_token="[PAD]")


def _save_tiny_gpt2(out, tokenizer_dir, positions: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = _toy_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=LAYERS, n_head=2, n_positions=positions,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.2)
    GPT2LMHeadModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory, tokenizer_dir):
    return _save_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"), tokenizer_dir, positions=512)


def test_forgetting_probe_fits_a_model_with_few_positions(tmp_path_factory, tokenizer_dir, make_config):
    """GPT-2 learns a table of positions: 256-token probe articles on a 64-position model indexed past its
    end (IndexError after training). The probe reads as many tokens as the model has positions."""
    small = _save_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2-64"), tokenizer_dir, positions=64)
    cfg = make_config(model=small, **{"task": "causal_lm", "method.name": "lora", "train.max_steps": 2,
                                      "eval.every": 100, "eval.forgetting_rows": 2, "data.max_length": 64})
    summary = api.train(cfg)
    assert "first 64 tokens" in summary["forgetting"]["text"]
    assert summary["forgetting"]["tokens"] == 2 * 64


@pytest.fixture(scope="session")
def tiny_roberta(tmp_path_factory, tokenizer_dir):
    from transformers import RobertaConfig, RobertaModel

    tok = _toy_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    # RoBERTa offsets positions by pad_token_id + 1, hence the extra positions.
    cfg = RobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128 + tok.pad_token_id + 2,
                        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    out = tmp_path_factory.mktemp("tiny-roberta")
    RobertaModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture
def model_dirs(tiny_bert, tiny_roberta, tiny_gpt2, tiny_llama):
    return {"bert": tiny_bert, "roberta": tiny_roberta, "gpt2": tiny_gpt2, "llama": tiny_llama}


CASES = [(arch, "classification") for arch in PROJECTIONS] + [("gpt2", "causal_lm"), ("llama", "causal_lm")]


def _load(model_dir, task):
    from deltatune.models import load_model, load_tokenizer

    tok = load_tokenizer(str(model_dir))
    return load_model(task, str(model_dir), ["negative", "positive"], tok, attention="eager")


@pytest.mark.parametrize("arch,task", CASES)
def test_auto_targets_are_the_block_projections(arch, task, model_dirs):
    model = _load(model_dirs[arch], task)
    stack, count = layer_stack(model)
    expected = [f"{stack}.{i}.{rel}" for i in range(count) for rel in PROJECTIONS[arch]]
    assert sorted(lora.targets(model, "auto")) == sorted(expected)


@pytest.mark.parametrize("arch,task", CASES)
def test_lora_with_defaults_trains_on_every_architecture(arch, task, model_dirs, make_config, capsys):
    cfg = make_config(model=model_dirs[arch], **{"task": task, "method.name": "lora", "method.init": "gaussian",
                                                 "train.max_steps": 3, "eval.every": 100, "train.lr": 1e-2})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # peft's fan_in_fan_out notice (or any other) would be noise here
        quiet_third_party()  # as at import (pytest resets warning filters for each test)
        summary = api.train(cfg)
    shown = capsys.readouterr().err
    leaves = ", ".join(PROJECTIONS[arch])
    assert f"lora targets: {leaves} (x{LAYERS} layers = {LAYERS * len(PROJECTIONS[arch])} modules)" in shown
    run = api.load_run(cfg.output.dir, device="cpu")
    wrapped = {n.removesuffix(".base_layer") for n, m in run.model.named_modules() if n.endswith(".base_layer")}
    stack, _ = layer_stack(run.model.get_base_model())
    assert sorted(w.split("model.", 2)[-1] for w in wrapped) == sorted(
        f"{stack}.{i}.{rel}" for i in range(LAYERS) for rel in PROJECTIONS[arch])
    if task == "classification":
        # The new head trains and is saved with the adapter (peft's modules_to_save).
        head = "score" if arch in ("gpt2", "llama") else "classifier"
        assert any(f"{head}.modules_to_save" in n for n, _ in run.model.named_parameters())
        assert summary["trainable_params"] > sum(p.numel() for n, p in run.model.named_parameters() if "lora_" in n)
    if arch == "gpt2":
        assert run.model.peft_config["default"].fan_in_fan_out is True
    assert summary["best_metrics"]["step"] == 3


def test_ia3_with_defaults_trains_on_gpt2(tiny_gpt2, make_config):
    cfg = make_config(model=tiny_gpt2, **{"task": "causal_lm", "method.name": "ia3", "train.max_steps": 2,
                                          "eval.every": 100})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet_third_party()
        summary = api.train(cfg)
    assert summary["trainable_params"] > 0


@pytest.mark.parametrize("name,overrides", [("freeze", {"method.train_layers": 1}),
                                            ("adapter", {"method.style": "houlsby"}),
                                            ("ln_tuning", {}), ("bitfit", {})])
def test_other_layer_picking_methods_work_on_gpt2(name, overrides, tiny_gpt2, make_config):
    cfg = make_config(model=tiny_gpt2, **{"task": "classification", "method.name": name, **overrides,
                                          "train.max_steps": 2, "eval.every": 100})
    assert api.train(cfg)["trainable_params"] > 0


def test_explicit_target_typo_names_the_model_layers(tiny_gpt2, make_config):
    cfg = make_config(model=tiny_gpt2, **{"method.name": "lora", "method.target_modules": ["c_atn"]})
    with pytest.raises(ConfigError) as e:
        api.train(cfg)
    msg = str(e.value)
    assert "method.target_modules: `c_atn` matches no layer" in msg
    assert "c_attn" in msg and "c_fc" in msg and "did you mean `c_attn`" in msg
    assert "Fix:" in msg


def test_auto_on_a_model_with_no_recognisable_blocks_explains():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = torch.nn.Linear(4, 4)
            self.out = torch.nn.Linear(4, 2)

    with pytest.raises(ConfigError, match=r"method.target_modules=auto.*Odd.*layers: inp, out.*Fix: set "
                                          r"method.target_modules"):
        lora.targets(Odd(), "auto")


def test_wrappable_names_cover_conv1d_and_embeddings(tiny_gpt2):
    model = _load(tiny_gpt2, "causal_lm")
    assert {"c_attn", "c_proj", "c_fc", "wte", "wpe", "lm_head"} <= set(wrappable_names(model))


def test_gpt2_lora_through_the_cli_trains_merges_and_generates_without_noise(tiny_gpt2, toy_data, tmp_path):
    """The chapter's own example: GPT-2 + LoRA with default targets, as a user runs it (a real process, so
    what reaches the terminal is what the user sees: no bitsandbytes `kernels` notice, no FutureWarning)."""
    import os
    import subprocess
    import sys

    from typer.testing import CliRunner

    from deltatune.cli import app

    run_dir, merged = tmp_path / "run", tmp_path / "merged"
    env = {**os.environ, "PYTHONWARNINGS": ""}
    done = subprocess.run(
        [sys.executable, "-m", "deltatune", "train", f"model.name={tiny_gpt2}", "task=causal_lm",
         f"data.train={toy_data['train']}", "data.validation=0.1", "method.name=lora", "method.init=gaussian",
         "train.max_steps=4", "train.precision=fp32", "train.threads=2", "eval.forgetting=false",
         f"output.dir={run_dir}"], capture_output=True, text=True, env=env, timeout=300)
    shown = done.stdout + done.stderr
    assert done.returncode == 0, shown
    assert "lora targets: attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj (x2 layers = 8 modules)" in shown
    assert "pip install kernels" not in shown and "FutureWarning" not in shown, shown
    assert "Warning" not in shown, shown  # nor peft's fan_in_fan_out notice, nor any other
    runner = CliRunner()
    r = runner.invoke(app, ["merge", str(run_dir), str(merged)], catch_exceptions=False)
    assert r.exit_code == 0 and "merged lora adapter" in r.output, r.output
    r = runner.invoke(app, ["generate", str(merged), "-p", "the film was", "--max-new-tokens", "4", "--json"],
                      catch_exceptions=False)
    assert r.exit_code == 0 and '"text"' in r.output, r.output


def test_prefix_tuning_on_a_decoder_prints_no_deprecation_noise(tiny_llama, make_config):
    """peft passes prefixes as `past_key_values`, which transformers deprecated: not the user's concern."""
    cfg = make_config(model=tiny_llama, **{"task": "causal_lm", "method.name": "prefix_tuning", "train.max_steps": 2,
                                           "eval.every": 100, "eval.forgetting": False})
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        quiet_third_party()
        api.train(cfg)
