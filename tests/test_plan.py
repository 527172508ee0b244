"""Planning without weights: parameter counts and peak memory from config.json alone (deltatune.plan).

Decoder configs far too large for this machine (LLaMA-7B, LLaMA-65B) stay on the meta device / fake
tensors; their LoRA counts are checked against the closed form r x (in + out) per wrapped Linear, and
their memory against published figures (QLoRA paper; the usual 7B full/LoRA recipes).
"""

from __future__ import annotations

import json

import pytest

from deltatune import config
from deltatune.plan import memory, params

GiB = 2**30


def llama_dir(tmp_path, name: str, hidden: int, inter: int, layers: int, heads: int, vocab: int = 32000):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": heads, "vocab_size": vocab, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": False}))
    return d


@pytest.fixture(scope="module")
def llama7b(tmp_path_factory):
    return llama_dir(tmp_path_factory.mktemp("cfg"), "llama-7b", 4096, 11008, 32, 32)


@pytest.fixture(scope="module")
def llama65b(tmp_path_factory):
    return llama_dir(tmp_path_factory.mktemp("cfg"), "llama-65b", 8192, 22016, 80, 64)


def load(model, *overrides: str):
    return config.load(None, [f"model.name={model}", "data.train=unused", *overrides])


def lora_closed_form(r: int, hidden: int, inter: int, layers: int, names: list[str]) -> int:
    shapes = {"q_proj": (hidden, hidden), "k_proj": (hidden, hidden), "v_proj": (hidden, hidden),
              "o_proj": (hidden, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
              "down_proj": (inter, hidden)}
    return layers * sum(r * (shapes[n][0] + shapes[n][1]) for n in names)


# ---------------------------------------------------------------------------------------------
# params: the model the task trains


@pytest.mark.parametrize("task", ["causal_lm", "sft"])
def test_params_builds_the_causal_lm_for_decoder_tasks(llama7b, task):
    result = params.count(load(llama7b, f"task={task}", "method.name=lora", "method.r=8",
                               "method.target_modules=[q_proj,v_proj]"))
    assert result["architecture"] == "LlamaForCausalLM"
    assert result["base_params"] == 6_738_415_616  # LLaMA-7B with its untied output layer
    assert result["trainable_params"] == lora_closed_form(8, 4096, 11008, 32, ["q_proj", "v_proj"]) == 4_194_304


def test_params_all_linear_on_65b_stays_on_meta(llama65b):
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    result = params.count(load(llama65b, "task=causal_lm", "method.name=qlora", "method.r=64",
                               "method.target_modules=all-linear"))
    assert result["trainable_params"] == lora_closed_form(64, 8192, 22016, 80, names)
    assert result["base_params"] == 65_285_660_672


def test_params_classification_builds_the_classifier(llama7b):
    result = params.count(load(llama7b, "task=classification", "method.name=full"))
    assert result["architecture"] == "LlamaForSequenceClassification"
    assert result["head_params"] == 2 * 4096  # score layer, 2 labels, no bias


def test_params_cli_on_a_decoder_config(llama7b):
    """The command from the issue that ended in a traceback."""
    from typer.testing import CliRunner

    from deltatune.cli import app

    r = CliRunner().invoke(app, ["params", "configs/quickstart.yaml", "task=causal_lm", f"model.name={llama7b}",
                                 "method.name=lora"])
    assert r.exit_code == 0, r.output
    all_seven = lora_closed_form(8, 4096, 11008, 32, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                      "up_proj", "down_proj"])
    assert f"{all_seven:,}" in r.output


# ---------------------------------------------------------------------------------------------
# memory: the arithmetic on a tiny LLaMA


@pytest.fixture
def tiny(tiny_llama):
    def make(*overrides: str):
        return load(tiny_llama, "task=causal_lm", "train.precision=fp32", "train.batch_size=4",
                    "data.max_length=64", *overrides)
    return make


def test_full_fine_tuning_arithmetic(tiny):
    cfg = tiny("method.name=full")
    trainable = params.count(cfg)["trainable_params"]
    est = memory.estimate(cfg, device="cpu")
    assert est.breakdown["gradients"] == 4 * trainable
    assert est.breakdown["optimizer states"] == 8 * trainable
    assert est.breakdown["weights"] == est.loaded == 4 * trainable
    assert est.increase == est.total - est.loaded


def test_optimizers_change_only_their_states(tiny):
    adamw = memory.estimate(tiny("method.name=full"), device="cpu")
    eight = memory.estimate(tiny("method.name=full", "train.optimizer=adamw_8bit"), device="cpu")
    factored = memory.estimate(tiny("method.name=full", "train.optimizer=adafactor"), device="cpu")
    # bitsandbytes keeps 32-bit states for tensors under 4,096 values: most of a hidden-32 model's
    assert eight.breakdown["optimizer states"] < 0.75 * adamw.breakdown["optimizer states"]
    assert factored.breakdown["optimizer states"] < 0.2 * adamw.breakdown["optimizer states"]
    assert eight.breakdown["gradients"] == factored.breakdown["gradients"] == adamw.breakdown["gradients"]


def test_lora_trains_only_its_adapters(tiny):
    est = memory.estimate(tiny("method.name=lora", "method.r=4"), device="cpu")
    lora = params.count(tiny("method.name=lora", "method.r=4"))["trainable_params"]
    assert est.breakdown["gradients"] == 4 * lora and est.breakdown["optimizer states"] == 8 * lora


def test_activations_scale_with_batch_and_shrink_with_checkpointing(tiny):
    base = memory.estimate(tiny("method.name=full"), device="cpu")
    double = memory.estimate(tiny("method.name=full"), device="cpu", micro_batch=8)
    ckpt = memory.estimate(tiny("method.name=full", "train.gradient_checkpointing=true"), device="cpu")
    assert double.breakdown["activations"] == 2 * base.breakdown["activations"]
    assert double.breakdown["logits"] == 2 * base.breakdown["logits"]
    assert ckpt.breakdown["activations"] < base.breakdown["activations"]
    longer = memory.estimate(tiny("method.name=full"), device="cpu", seq_len=128)
    assert longer.breakdown["activations"] > 2 * base.breakdown["activations"]  # eager scores grow as T^2


def test_bf16_frozen_weights_and_4bit_bases(tiny):
    fp32 = memory.estimate(tiny("method.name=lora", "train.precision=bf16", "model.frozen_dtype=fp32"), device="cpu")
    bf16 = memory.estimate(tiny("method.name=lora", "train.precision=bf16"), device="cpu")  # auto: bf16 here
    nf4 = memory.estimate(tiny("method.name=qlora", "train.precision=bf16"), device="cpu")
    int8 = memory.estimate(tiny("method.name=qlora", "method.bits=8", "train.precision=bf16"), device="cpu")
    assert bf16.breakdown["weights"] < fp32.breakdown["weights"]
    assert nf4.breakdown["weights"] < int8.breakdown["weights"] < bf16.breakdown["weights"]
    # hidden 32, intermediate 64, one key/value head of 16, 2 layers: q,o 32x32, k,v 16x32, gate,up 64x32,
    # down 32x64: 2 x 9,216 = 18,432 quantized values in 2 x 256 = 512 rows. int8: a byte each + an fp32
    # scale per row; NF4: half a byte + (1 + 4/256) bytes per 64 values (double quantization).
    assert int8.breakdown["weights"] - nf4.breakdown["weights"] == pytest.approx(
        (18432 + 4 * 512) - (18432 / 2 + (1 + 4 / 256) * 18432 / 64), abs=2)
    # no per-step bf16 copies of frozen weights held for backward
    assert bf16.breakdown["activations"] < fp32.breakdown["activations"]
    # auto keeps fp32 where engine/frozen.py does: fp32 training, whole-model methods, FSDP2
    for other in (tiny("method.name=lora"), tiny("method.name=full", "train.precision=bf16")):
        assert not memory.frozen_bf16(other, other.train.precision)
    assert not memory.frozen_bf16(tiny("method.name=lora", "train.precision=bf16"), "bf16", "fsdp")


def test_distribution_shards_or_replicates(tiny):
    one = memory.estimate(tiny("method.name=full"), device="cpu")
    ddp = memory.estimate(tiny("method.name=full"), devices=2, device="cpu")
    fsdp = memory.estimate(tiny("method.name=full", "train.distributed=fsdp"), devices=2, device="cpu")
    zero1 = memory.estimate(tiny("method.name=full", "train.distributed=deepspeed", "train.zero_stage=1"),
                            devices=2, device="cpu")
    assert ddp.breakdown["ddp gradient buckets"] == one.breakdown["gradients"]
    for key in ("weights", "gradients", "optimizer states"):
        assert fsdp.breakdown[key] == one.breakdown[key] // 2
    assert zero1.breakdown["gradients"] == one.breakdown["gradients"]
    assert zero1.breakdown["optimizer states"] == one.breakdown["optimizer states"] // 2


def test_largest_micro_batch_keeps_the_global_batch(tiny):
    est = memory.estimate(tiny("method.name=full", "train.batch_size=8", "train.grad_accum=2"), device="cpu")
    fixed = est.total - est.per_example * 8
    b, accum = est.largest_micro_batch(int(fixed + 3.5 * est.per_example))
    assert (b, accum) == (3, 6)  # 16 examples a step: 3 x 6 >= 16
    assert est.largest_micro_batch(int(fixed)) is None
    assert "does not fit" in memory.refusal(est, int(fixed))
    assert est.largest_micro_batch(10**15) == (16, 1)


def test_start_line_and_free_memory(tiny):
    est = memory.estimate(tiny("method.name=full"), device="cpu")
    assert "fits" in memory.start_line(est, 10**15) and "WILL NOT FIT" in memory.start_line(est, est.total // 2)
    assert 0 < memory.free_memory_bytes("cpu")


def test_plan_cli_json(tiny_llama):
    from typer.testing import CliRunner

    from deltatune.cli import app

    r = CliRunner().invoke(app, ["plan", f"model.name={tiny_llama}", "task=causal_lm", "method.name=lora",
                                 "--memory", "64", "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.output)
    assert result["fits"] and result["total_bytes"] == sum(result["breakdown_bytes"].values())
    refused = CliRunner().invoke(app, ["plan", f"model.name={tiny_llama}", "task=causal_lm", "--memory",
                                       "0.001", "--device", "cpu"])
    assert refused.exit_code == 1 and "does not fit" in refused.output


# ---------------------------------------------------------------------------------------------
# Published sanity cases (GPU, bf16)


def test_llama65b_qlora_fits_one_48gb_gpu(llama65b):
    """QLoRA paper: 65B, r=64 on all linear layers, batch 1, checkpointing, paged 8-bit AdamW, one 48 GB GPU."""
    est = memory.estimate(load(llama65b, "task=causal_lm", "method.name=qlora", "method.r=64",
                               "method.target_modules=all-linear", "train.batch_size=1", "data.max_length=512",
                               "train.gradient_checkpointing=true", "train.optimizer=paged_adamw_8bit"),
                          device="cuda")
    assert est.fits(48 * GiB)
    assert 30 * GiB < est.breakdown["weights"] < 38 * GiB  # 64.5B 4-bit Linear weights + fp32 embeddings/head


def test_llama7b_full_needs_sharding(llama7b):
    cfg = ["task=causal_lm", "method.name=full", "train.precision=bf16", "train.batch_size=1",
           "data.max_length=512"]
    assert not memory.estimate(load(llama7b, *cfg), device="cuda").fits(80 * GiB)
    for dist in (["train.distributed=deepspeed", "train.zero_stage=3"], ["train.distributed=fsdp"]):
        assert memory.estimate(load(llama7b, *cfg, *dist), devices=8, device="cuda").fits(80 * GiB)


def test_llama7b_lora_qv_fits_16gb(llama7b):
    """bf16 frozen base, r=8 on q and v, batch 1 x 512 tokens, no LoRA dropout: 16 GiB (a thin margin: the
    frozen weights alone are 12.8 GiB)."""
    est = memory.estimate(load(llama7b, "task=causal_lm", "method.name=lora", "method.r=8", "method.dropout=0",
                               "method.target_modules=[q_proj,v_proj]", "train.precision=bf16",
                               "train.batch_size=1", "data.max_length=512"), device="cuda")
    assert est.fits(16 * GiB) and not est.fits(14 * GiB)


# ---------------------------------------------------------------------------------------------
# deltatune train: the plan at start, the prediction next to the measurement


def test_train_prints_the_plan_warns_when_it_will_not_fit_and_records_it(make_config, monkeypatch, capsys):
    from deltatune import api

    monkeypatch.setattr(memory, "free_memory_bytes", lambda device: 2**20)  # a machine with 1 MiB free
    s = api.train(make_config(**{"train.max_steps": 3, "data.validation": None}))
    out = " ".join(capsys.readouterr().err.split())  # the console writes to stderr, wrapped
    assert "memory plan: peak ~" in out and "WILL NOT FIT the 1 MiB free" in out
    mem = s["memory_per_rank"][0]
    assert mem["planned_increase_mb"] > 0 and mem["peak_increase_mb"] is not None  # trained anyway: a warning
    assert mem["measured"] == "RSS" and mem["peak_mb"] >= mem["loaded_mb"]
