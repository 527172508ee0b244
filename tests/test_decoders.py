"""Decoders: sft loss masks, packing isolation, generation, generation-based eval, forgetting probe."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from deltatune import api
from deltatune.constants import IGNORE_INDEX
from deltatune.data import packing, sft
from deltatune.data.batching import collate, model_inputs
from deltatune.evaluation import generation
from tests.conftest import sft_rows, write_jsonl


def loss_text(tok, enc) -> str:
    return tok.decode([t for t, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX])


def test_chat_masks_cover_exactly_the_assistant_turns(tiny_chat_llama):
    tok = AutoTokenizer.from_pretrained(tiny_chat_llama)
    chat = [{"role": "user", "content": "the film was good"}, {"role": "assistant", "content": "positive"},
            {"role": "user", "content": "and this one was bad"}, {"role": "assistant", "content": "negative film"}]
    enc = sft.encode(tok, chat, "chat", max_length=128)
    assert loss_text(tok, enc) == "positive [SEP] negative film [SEP]"
    # Everything else (both user turns, the turn markers, the prompt) carries no loss.
    text = tok.apply_chat_template(chat, tokenize=False)
    assert tok.decode(enc.input_ids).replace(" ", "").replace("[UNK]", ":") == text.replace(" ", "")
    assert enc.reference == "negative film"
    prompt = tok.decode(enc.prompt_ids).replace(" ", "").replace("[UNK]", ":")
    assert prompt.endswith("[CLS]assistant:") and "negativefilm" not in prompt


def test_alpaca_masks_and_eos(tiny_llama):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    enc = sft.encode(tok, sft.to_messages({"instruction": "classify the review", "input": "a good film",
                                          "output": "positive"}, "alpaca"), "alpaca", max_length=128)
    # The response, then EOS (so the model learns to stop); none of the prompt.
    assert loss_text(tok, enc) == f"positive {tok.eos_token}"
    assert enc.input_ids[-1] == tok.eos_token_id and enc.prompt_ids[-1] != tok.eos_token_id


def test_truncated_rows_without_response_are_dropped_and_counted(tiny_chat_llama, tmp_path):
    from deltatune import config
    from deltatune.data import build

    long = {"instruction": "classify the review " * 30, "input": "", "output": "positive"}
    path = write_jsonl(tmp_path / "t.jsonl", sft_rows(10) + [long])
    cfg = config.load(None, [f"data.train={path}", "data.validation=null", "task=sft", "data.max_length=64"])
    bundle = build(cfg.data, AutoTokenizer.from_pretrained(tiny_chat_llama), task="sft")
    assert bundle.stats["train_rows"] == 11 and bundle.stats["train"]["rows_without_target"] == 1
    assert bundle.stats["train_truncated"] >= 1 and len(bundle.train.dataset) == 10


def test_packing_plan_uses_every_example_once_within_max_length():
    lengths = [5, 9, 3, 12, 7, 7, 2, 16, 1, 4] * 3
    groups = packing.plan(lengths, 16, seed=0)
    flat = sorted(i for g in groups for i in g)
    assert flat == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in g) <= 16 for g in groups)
    assert len(groups) < len(lengths) / 2  # it actually packs


def test_packing_is_pure_and_build_makes_the_split():
    """packing.py imports nothing from deltatune but the leaves deltatune.constants and deltatune.data.columns
    (build.py imports it: the other way round was a cycle); it takes and returns plain datasets, and statistics."""
    import ast

    import datasets

    tree = ast.parse(open(packing.__file__, encoding="utf-8").read())
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert sorted(m for m in imported if m.startswith("deltatune")) == ["deltatune.constants", "deltatune.data.columns"]
    columns = ast.parse(open(packing.__file__.replace("packing.py", "columns.py"), encoding="utf-8").read())
    assert not [n for n in ast.walk(columns)
                if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("deltatune")]
    rows = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    ds = datasets.Dataset.from_dict({"input_ids": rows, "length": [len(r) for r in rows]})
    packed, stats = packing.pack_dataset(ds, 8, seed=0)
    assert isinstance(packed, datasets.Dataset) and sorted(packed["length"]) == [2, 7]
    assert stats == {"examples": 3, "sequences": 2, "examples_per_sequence": 1.5, "fill": 0.5625}


def tiny_gpt2(vocab: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


@pytest.mark.parametrize("arch,attention", [("llama", "eager"), ("llama", "sdpa"), ("gpt2", "eager"),
                                            ("gpt2", "sdpa")])
def test_packed_batch_equals_unpacked(tiny_llama, arch, attention):
    """No attention or position leakage: each example's logits are what it gets alone."""
    if arch == "llama":
        model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation=attention).eval()
    else:
        model = tiny_gpt2(120).eval()
        model.set_attn_implementation(attention)
    g = torch.Generator().manual_seed(0)
    examples = [torch.randint(5, 100, (n,), generator=g).tolist() for n in (7, 3, 11, 5, 9)]
    rows = packing.pack_rows(examples, None, [[0, 1, 2], [3, 4]])
    batch = collate(rows, pad_id=0, lm=True)  # row 2 is padded: padding is a segment of its own too
    assert batch["input_ids"].shape == (2, 21)
    with torch.no_grad():
        packed = model(**model_inputs(batch, lm=True)).logits
        for group_row, members in enumerate([[0, 1, 2], [3, 4]]):
            start = 0
            for i in members:
                alone = model(input_ids=torch.tensor([examples[i]])).logits[0]
                torch.testing.assert_close(packed[group_row, start:start + len(examples[i])], alone,
                                           atol=1e-5, rtol=1e-5)
                start += len(examples[i])
    # The first token of every example is never a target (it would be predicted from its neighbour).
    assert (batch["labels"][0, [0, 7, 10]] == -100).all()
    assert int((batch["labels"] != -100).sum()) == sum(len(x) - 1 for x in examples)


def test_logits_only_at_targets_give_the_same_loss_and_gradients(tiny_chat_llama):
    from deltatune.engine.loop import accepts_logits_mask, task_loss

    tok = AutoTokenizer.from_pretrained(tiny_chat_llama)
    encs = [sft.encode(tok, sft.to_messages(r, "alpaca"), "chat", 64) for r in sft_rows(6)]
    batch = collate({"input_ids": [e.input_ids for e in encs], "labels": [e.labels for e in encs]}, 0, lm=True)
    results = []
    for keep in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_chat_llama)
        assert accepts_logits_mask(model)
        loss = task_loss(model(**model_inputs(batch, True, keep)).logits, batch["labels"], True, keep)
        loss.backward()
        results.append((loss.detach(), model.model.layers[0].self_attn.q_proj.weight.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


def test_generation_stops_at_eos(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.pad_token = tok.eos_token
    prompts = [tok("the film was good")["input_ids"][:-1], tok("bad")["input_ids"][:-1]]
    free = generation.generate(model, tok, prompts, max_new_tokens=5)
    assert all(len(ids) == 5 and not stopped for ids, stopped in free)  # a random model never says EOS
    # A head that always predicts EOS: generation ends after it, and EOS is not part of the answer.
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    torch.nn.init.zeros_(head.weight)
    with torch.no_grad():
        head.bias.fill_(-10.0)
        head.bias[tok.eos_token_id] = 10.0
    model.lm_head = head
    assert generation.generate(model, tok, prompts, max_new_tokens=5) == [([], True), ([], True)]


def test_label_accuracy_reads_the_first_label_named():
    refs = ["positive", "negative", "positive"]
    answers = ["The sentiment is positive, not negative.", "Negative.", "I cannot tell"]
    assert generation.label_accuracy(answers, refs) == pytest.approx(2 / 3)
    assert generation.exact_match(answers, refs) == pytest.approx(1 / 3)
    assert generation.label_accuracy(["a"] * 60, [str(i) for i in range(60)]) is None  # not a label set


def sft_config(d, model, **overrides):
    from deltatune import config

    train = write_jsonl(d / "train.jsonl", sft_rows(256, seed=1, fmt="messages"))
    val = write_jsonl(d / "val.jsonl", sft_rows(48, seed=2, fmt="messages"))
    base = {"model.name": model, "task": "sft", "data.train": train, "data.validation": val,
            "data.packing": True, "data.max_length": 128, "train.batch_size": 4, "train.precision": "fp32",
            "train.threads": 2, "eval.max_new_tokens": 8, "eval.forgetting_rows": 4, "output.dir": d / "run"}
    base.update(overrides)
    return config.load(None, [f"{k}={v}" for k, v in base.items()])


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny_chat_llama):
    """Full fine-tuning on the toy task in messages format, packed, scored by generated labels.

    (Adapters on a *random* tiny model learn the answer format but hardly the sentiment: the frozen
    random layers carry no usable features. The real-model test below runs LoRA.)"""
    cfg = sft_config(tmp_path_factory.mktemp("sft"), tiny_chat_llama, **{
        "method.name": "full", "train.epochs": 10, "train.lr": 1e-2, "eval.metric": "label_accuracy",
        "eval.at_start": "true", "eval.every": 80})
    return api.train(cfg)


@pytest.fixture(scope="module")
def lora_sft_run(tmp_path_factory, tiny_chat_llama):
    cfg = sft_config(tmp_path_factory.mktemp("sft-lora"), tiny_chat_llama, **{
        "method.name": "lora", "method.target_modules": "all-linear", "train.epochs": 1, "train.lr": 1e-2,
        "eval.forgetting": "false"})
    return api.train(cfg)


def test_sft_run_learns_labels_and_reports_zero_shot_and_forgetting(sft_run):
    evals = sft_run["evals"]
    assert evals[0]["step"] == 0 and "label_accuracy" in evals[0]  # the base model, before any step
    assert sft_run["best_metrics"]["label_accuracy"] >= 0.85 > evals[0]["label_accuracy"]
    assert sft_run["best_metrics"]["generated_rows"] == 48
    f = sft_run["forgetting"]
    assert f["perplexity_before"] > 0 and f["perplexity_after"] > 0 and "bbc-news" in f["text"]
    assert f["change_percent"] == pytest.approx(100 * (f["perplexity_after"] / f["perplexity_before"] - 1), abs=0.01)
    assert sft_run["data"]["packing"]["examples_per_sequence"] > 1
    assert sft_run["data"]["format"] == "messages" and sft_run["data"]["template"] == "chat"


def test_generate_from_full_run_stops_at_eos(sft_run):
    answers = api.generate(sft_run["run_dir"], ["classify : the film was superb", "classify : dull and boring"],
                           max_new_tokens=12)
    assert [a["text"].strip() for a in answers] == ["positive", "negative"]
    assert all(a["stopped_at_eos"] and a["template"] == "chat" for a in answers)
    sampled = api.generate(sft_run["run_dir"], ["classify : a warm story"] * 2, sample=True, seed=1)
    assert sampled == api.generate(sft_run["run_dir"], ["classify : a warm story"] * 2, sample=True, seed=1)


def test_generate_from_adapter_and_merged_model_agree(lora_sft_run, tmp_path):
    from deltatune.export.merge import merge

    prompts = ["classify : the film was superb", "classify : dull and boring"]
    answers = api.generate(lora_sft_run["run_dir"], prompts, max_new_tokens=8)
    merge(lora_sft_run["run_dir"], tmp_path / "merged")
    merged = api.generate(tmp_path / "merged", prompts, max_new_tokens=8)
    assert [a["template"] for a in merged] == ["chat", "chat"]  # as the run was trained, from merge_report.json
    assert [a["text"] for a in merged] == [a["text"] for a in answers]


def test_cli_generate_and_inspect_data(sft_run, tiny_chat_llama, tmp_path):
    from typer.testing import CliRunner

    from deltatune.cli import app

    runner = CliRunner()
    data = write_jsonl(tmp_path / "e.jsonl", sft_rows(8, seed=5, fmt="messages"))
    res = runner.invoke(app, ["eval", sft_run["run_dir"], "--data", str(data)])
    assert res.exit_code == 0, res.output
    assert "label_accuracy" in res.output and "answer" in res.output and "samples" not in res.output
    res = runner.invoke(app, ["generate", sft_run["run_dir"], "--prompt", "classify : the film was superb", "--json",
                              "--max-new-tokens", "12"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output.strip().splitlines()[-1])["text"].strip() == "positive"
    data = write_jsonl(tmp_path / "d.jsonl", sft_rows(8))
    res = runner.invoke(app, ["inspect-data", "--rows", "2", f"model.name={tiny_chat_llama}",
                              "task=sft", f"data.train={data}", "data.validation=null"])
    assert res.exit_code == 0, res.output
    assert "train example 1" in res.output and "carry loss" in res.output


def test_packing_refused_for_classification_and_soft_prompts(make_config):
    from deltatune import preflight
    from deltatune.errors import ConfigError

    with pytest.raises(ConfigError, match="data.packing=true does not apply to task classification"):
        preflight.run(make_config(**{"data.packing": True}))
    with pytest.raises(ConfigError, match="prompt_tuning"):
        preflight.run(make_config(**{"data.packing": True, "task": "sft", "method.name": "prompt_tuning"}))


def test_causal_lm_on_a_text_file_with_packing(tiny_llama, tmp_path):
    from deltatune import config
    from tests.conftest import toy_rows

    lines = [r["text"] for r in toy_rows(120, seed=3)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(lines[:5]) + "\n" + "\n".join(lines[5:]) + "\n", encoding="utf-8")  # blanks skipped
    cfg = config.load(None, [f"model.name={tiny_llama}", "task=causal_lm", f"data.train={path}",
                             "data.validation=0.1", "data.packing=true", "data.max_length=64", "train.epochs=2",
                             "train.batch_size=4", "train.lr=3e-3", "train.precision=fp32", "train.threads=2",
                             "eval.forgetting=false", "eval.at_start=true", f"output.dir={tmp_path / 'run'}"])
    s = api.train(cfg)
    assert s["data"]["train_rows"] + s["data"]["validation_rows"] == 120
    assert s["data"]["packing"]["examples"] == s["data"]["train_rows"]
    assert s["data"]["packing"]["examples_per_sequence"] > 2 and s["data"]["packing"]["fill"] > 0.8
    assert s["evals"][0]["step"] == 0 and s["evals"][-1]["loss"] < s["evals"][0]["loss"] - 0.3
    assert s["best_metrics"]["perplexity"] < 120  # a 177-token vocabulary: chance is ~177


def test_eval_of_an_sft_run_on_a_file_scores_generated_labels(sft_run, tmp_path):
    data = write_jsonl(tmp_path / "more.jsonl", sft_rows(24, seed=7, fmt="messages"))
    result = api.evaluate(sft_run["run_dir"], str(data))
    assert result["rows"] == 24 and result["generated_rows"] == 24 and result["label_accuracy"] >= 0.8
    assert result["loss"] < 1.0


def test_bad_sft_rows_are_named_or_skipped_and_counted(tiny_chat_llama, tmp_path):
    from deltatune import config
    from deltatune.data import build
    from deltatune.errors import DataError

    rows = sft_rows(6, fmt="messages")
    rows[2] = {"messages": [{"role": "user", "content": "no answer here"}]}
    rows[4] = {"messages": "not a list"}
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    tok = AutoTokenizer.from_pretrained(tiny_chat_llama)
    overrides = [f"data.train={path}", "data.validation=null", "task=sft"]
    with pytest.raises(DataError, match=r"(?s)2 row\(s\) that are not a usable.*line 3: no assistant turn"
                                        r".*line 5: `messages` must be"):
        build(config.load(None, overrides).data, tok, task="sft")
    bundle = build(config.load(None, overrides + ["data.on_error=skip"]).data, tok, task="sft")
    train = bundle.stats["train"]
    assert (train["rows_read"], train["rows_used"], train["rows_skipped"]) == (6, 4, 2)
    assert len(bundle.train.dataset) == 4
