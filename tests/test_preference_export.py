"""A preference run is used like an sft run: `deltatune merge` merges it, `deltatune generate` answers with it,
`deltatune serve` serves it, each rendering prompts with the run's own template (data.template), as training did.

Five tiny runs on the tiny chat LLaMA, trained once for the module (about 10 s): DPO + LoRA (live reference),
SimPO + LoRA (no reference), DPO + LoRA on the Alpaca template, DPO with full fine-tuning (precomputed reference)
and an sft LoRA run over the same base.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from deltatune import api, config
from deltatune.evaluation import generation
from deltatune.export import merge
from deltatune.serve.app import Settings
from deltatune.serve.command import build
from tests.conftest import sft_rows, write_jsonl
from tests.test_preference_train import pairs  # the same learnable toy preference
from tests.test_serve import Server

PROMPTS = ["review 3 : the film was warm", "classify : dull and boring", "the plot was odd"]
NEW_TOKENS = 8


def train(out: Path, **overrides) -> Path:
    base = {"train.batch_size": 4, "train.max_steps": 8, "train.lr": 1e-2, "train.precision": "fp32",
            "train.threads": 1, "train.log_every": 4, "eval.every": 8, "eval.forgetting": "false",
            "output.dir": out, **overrides}
    api.train(config.load(None, [f"{k}={v}" for k, v in base.items()]))
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("preference-export")


@pytest.fixture(scope="module")
def runs(root, tiny_chat_llama) -> dict[str, Path]:
    data = root / "data"
    data.mkdir()
    preference = {"model.name": tiny_chat_llama, "task": "preference",  # data.template auto: chat here
                  "data.train": write_jsonl(data / "pairs.jsonl", pairs(16)),
                  "data.validation": write_jsonl(data / "pairs-val.jsonl", pairs(4, 100))}
    lora = {"method.name": "lora", "method.r": 4, "method.target_modules": "all-linear"}
    sft = {"model.name": tiny_chat_llama, "task": "sft", "data.template": "chat", "data.max_length": 64,
           "data.train": write_jsonl(data / "sft.jsonl", sft_rows(32, seed=1, fmt="messages")),
           "data.validation": write_jsonl(data / "sft-val.jsonl", sft_rows(4, seed=2, fmt="messages")),
           "eval.max_new_tokens": 2, "train.lr": 3e-2}
    return {"dpo": train(root / "dpo", **preference, **lora),
            "simpo": train(root / "simpo", **preference, **lora, **{"preference.loss": "simpo"}),
            # The Alpaca prompt on a tokenizer that has a chat template: only the run says which to render.
            "alpaca": train(root / "alpaca", **preference, **lora, **{"data.template": "alpaca"}),
            "full": train(root / "dpo-full", **preference, **{"method.name": "full", "train.lr": 3e-3,
                                                               "data.template": "chat"}),
            "sft": train(root / "sft", **sft, **lora)}


@pytest.fixture(scope="module")
def merged(runs, root) -> dict[str, tuple[Path, dict]]:
    """`deltatune merge` of each preference LoRA run: (the merged directory, the report merge returned)."""
    return {name: (root / f"{name}-merged", merge.merge(runs[name], root / f"{name}-merged"))
            for name in ("dpo", "simpo", "alpaca")}


def texts(source, template: str | None = None) -> list[str]:
    return [r["text"] for r in api.generate(source, PROMPTS, max_new_tokens=NEW_TOKENS, template=template)]


@pytest.mark.parametrize(("name", "template"), [("dpo", "chat"), ("simpo", "chat"), ("alpaca", "alpaca")])
def test_a_preference_lora_run_merges_and_the_merged_model_answers_as_the_run(runs, merged, name, template,
                                                                              tiny_chat_llama):
    out, report = merged[name]
    assert report["task"] == "preference" and report["max_diff"] <= report["tolerance"]
    # `deltatune generate` of the merged directory renders prompts as the run was trained (data.template); without
    # the record it would guess from the tokenizer, which has a chat template.
    assert report["prompt_template"] == template
    assert json.loads((out / "merge_report.json").read_text())["prompt_template"] == template
    answers = api.generate(out, PROMPTS, max_new_tokens=NEW_TOKENS)
    assert {r["template"] for r in answers} == {template}
    run = texts(runs[name])
    assert [r["text"] for r in answers] == run
    assert run != texts(tiny_chat_llama, template=template)  # the adapter changed the answers: the merge carried it


@pytest.mark.parametrize(("name", "template", "other"), [("dpo", "chat", "raw"), ("alpaca", "alpaca", "chat")])
def test_generate_renders_a_preference_runs_prompts_with_its_template(runs, monkeypatch, name, template, other):
    """The ids api.generate decodes from are `encode_prompt(..., template)`'s, and its answers are what the run's
    model gives for those ids by hand (transformers' own greedy generate)."""
    fed: list[list[list[int]]] = []
    real = generation.generate

    def spy(model, tokenizer, prompts, *args, **kwargs):
        fed.append(prompts)
        return real(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(generation, "generate", spy)
    gen = api.load_generator(runs[name])
    answers = api.generate(gen, PROMPTS, max_new_tokens=NEW_TOKENS)
    expected = [api.encode_prompt(gen.tokenizer, p, template) for p in PROMPTS]
    assert fed == [expected] and {r["template"] for r in answers} == {template}
    assert expected != [api.encode_prompt(gen.tokenizer, p, other) for p in PROMPTS]  # the template shows in ids
    eos = generation.eos_ids(gen.model, gen.tokenizer)
    for ids, answer in zip(expected, answers, strict=True):
        with torch.no_grad():
            out = gen.model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=int),
                                     max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos,
                                     pad_token_id=eos[0])
        new = out[0, len(ids):].tolist()
        new = new[:next((k for k, t in enumerate(new) if t in eos), len(new))]
        assert answer["text"] == gen.tokenizer.decode(new, skip_special_tokens=True)


SERVED = {  # name: (where its expected answers come from, task, method, pooled with other adapters, template)
    "dpo": ("dpo", "preference", "lora", True, "chat"),
    "sft": ("sft", "sft", "lora", True, "chat"),
    "dpo-hot": ("dpo", "preference", "lora", False, "chat"),  # served merged (--merge): its own merged weights
    "alpaca": ("alpaca", "preference", "lora", True, "alpaca"),
    "dpo-full": ("full", "preference", "full", False, "chat"),  # --run: a full fine-tune, served as its own model
    "dpo-merged": ("dpo-merged", "causal_lm", "merged", False, "chat"),  # --run: `deltatune merge`'s output
}


@pytest.fixture(scope="module")
def server(runs, merged, tiny_chat_llama, root):
    settings = Settings(max_new_tokens=32, batch_window_ms=20)
    adapters = {n: str(runs[n]) for n in ("dpo", "sft", "alpaca")} | {"dpo-hot": str(runs["dpo"])}
    app = build(str(tiny_chat_llama), adapters, runs=[str(runs["full"]), str(merged["dpo"][0])], allowed_root=root,
                settings=settings, merge=["dpo-hot"])
    server = Server(app)
    yield server
    server.stop()


def chat(server: Server, model: str, prompt: str) -> str:
    r = server.http.post("/v1/chat/completions", json={"model": model, "max_tokens": NEW_TOKENS, "temperature": 0,
                                                       "messages": [{"role": "user", "content": prompt}]})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_served_preference_runs_answer_as_generate_does(server, runs, merged):
    """Preference LoRA runs pooled with an sft LoRA over one base (rows routed per adapter), the DPO run served
    merged, a full-fine-tuned DPO run (precomputed reference) and a merged one served as their own models: GET
    /v1/models lists each with its template, and each greedy chat completion equals api.generate of its run."""
    summary = json.loads((runs["full"] / "summary.json").read_text())
    assert summary["preference"]["reference"] == "precomputed"
    cards = {m["id"]: m for m in server.http.get("/v1/models").json()["data"]}
    assert {n: (c["task"], c["method"], c["mixed_batches"], c.get("template")) for n, c in cards.items()} == \
        {n: s[1:] for n, s in SERVED.items()}
    sources = {**runs, "dpo-merged": merged["dpo"][0]}
    answers = {}
    for name, (source, *_) in SERVED.items():
        answers[name] = [chat(server, name, p) for p in PROMPTS]
        assert answers[name] == texts(sources[source]), name
    assert answers["dpo"] != answers["sft"] != answers["alpaca"]  # each adapter answered with its own weights
