"""Preference data: pairs rendered with answer-only labels and one shared prompt, bad rows named by file and
line, truncation counted, pairs collated into 2N rows, the inspect-data view."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from transformers import AutoTokenizer

from deltatune.constants import IGNORE_INDEX
from deltatune.data import preference, validate
from deltatune.data.preference import PairError, to_pair
from deltatune.errors import DataError
from tests.conftest import CHAT_TEMPLATE, data_section, write_jsonl

USER = "the film was good"


@pytest.fixture(scope="module")
def chat_tok(tiny_chat_llama):
    return AutoTokenizer.from_pretrained(tiny_chat_llama)


def answer_text(tok, ids: list[int], labels: list[int]) -> str:
    return tok.decode([t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX])


@pytest.mark.parametrize("template", ["chat", "alpaca"])
def test_string_rows_carry_loss_only_on_each_answer_after_one_shared_prompt(chat_tok, template):
    pair = to_pair({"prompt": USER, "chosen": "positive", "rejected": "negative film"})
    e = preference.encode_pair(chat_tok, pair, template, max_length=256)
    eos = chat_tok.eos_token
    assert answer_text(chat_tok, e.chosen_ids, e.chosen_labels) == f"positive {eos}"
    assert answer_text(chat_tok, e.rejected_ids, e.rejected_labels) == f"negative film {eos}"
    n = len(e.prompt_ids)
    # Both sequences start with the same prompt tokens, none of which carries loss; each ends in EOS.
    assert e.chosen_ids[:n] == e.rejected_ids[:n] == e.prompt_ids and USER in chat_tok.decode(e.prompt_ids)
    assert set(e.chosen_labels[:n]) == set(e.rejected_labels[:n]) == {IGNORE_INDEX}
    assert e.chosen_ids[-1] == e.rejected_ids[-1] == chat_tok.eos_token_id
    assert e.truncated == (False, False) and e.has_target


def test_chat_rows_label_only_the_final_answer_not_earlier_assistant_turns(chat_tok):
    prompt = [{"role": "system", "content": "a critic"}, {"role": "user", "content": USER},
              {"role": "assistant", "content": "positive"}, {"role": "user", "content": "and this one was dull"}]
    row = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "negative"}], "rejected": "positive"}
    e = preference.encode_pair(chat_tok, to_pair(row), "chat", max_length=256)
    assert answer_text(chat_tok, e.chosen_ids, e.chosen_labels) == f"negative {chat_tok.eos_token}"
    assert answer_text(chat_tok, e.rejected_ids, e.rejected_labels) == f"positive {chat_tok.eos_token}"
    rendered = chat_tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert chat_tok.decode(e.prompt_ids) == chat_tok.decode(chat_tok(rendered, add_special_tokens=False)["input_ids"])


def test_each_sequence_ends_at_its_answers_eos_not_at_markup_after_it(chat_tok):
    tok = AutoTokenizer.from_pretrained(chat_tok.name_or_path)
    tok.chat_template = CHAT_TEMPLATE.replace("[SEP]{% endfor %}", "[SEP] and{% endfor %}")  # text after each turn
    e = preference.encode_pair(tok, to_pair({"prompt": USER, "chosen": "positive", "rejected": "negative"}), "chat",
                               max_length=256)
    assert e.chosen_ids[-1] == e.rejected_ids[-1] == tok.eos_token_id and e.chosen_labels[-1] == tok.eos_token_id
    assert len(e.chosen_ids) == len(e.chosen_labels)


def test_whole_conversations_split_at_the_turns_they_share():
    user = {"role": "user", "content": USER}
    row = {"prompt": USER, "chosen": [user, {"role": "assistant", "content": "positive"}],
           "rejected": [user, {"role": "assistant", "content": "negative"}]}
    assert to_pair(row) == to_pair({"prompt": [user], "chosen": "positive", "rejected": "negative"})
    assert to_pair({**row, "prompt": None}).prompt == [user]  # no prompt column: the shared turns are the prompt
    with pytest.raises(PairError, match="neither the turns"):
        to_pair({**row, "prompt": "another question"})
    other = {"role": "user", "content": "and this one"}
    with pytest.raises(PairError, match="`chosen` has user, assistant"):
        to_pair({**row, "chosen": [other, {"role": "assistant", "content": "positive"}]})
    with pytest.raises(PairError, match="exactly one assistant turn") as e:
        to_pair({**row, "rejected": row["rejected"] + [other, {"role": "assistant", "content": "x"}]})
    assert e.value.kind == "not a preference pair"


def test_whole_conversations_read_from_a_file_tokenize_as_the_explicit_rows_do(chat_tok, tmp_path):
    system, user = {"role": "system", "content": "a critic"}, {"role": "user", "content": USER}
    explicit = [{"prompt": [system, user], "chosen": "positive", "rejected": "negative"}]
    whole = [{"prompt": USER, "chosen": [system, user, {"role": "assistant", "content": "positive"}],
              "rejected": [system, user, {"role": "assistant", "content": "negative"}]}]
    out = []
    for name, rows in (("explicit", explicit), ("whole", whole)):
        path = write_jsonl(tmp_path / f"{name}.jsonl", rows)
        section = data_section(train=path, validation="null")
        ds, report = validate.read(str(path), section, "train", lm=True)
        out.append(preference.tokenize(preference.check(ds, section, report), chat_tok, "chat", 128, str(path))[0])
    assert out[0][:] == out[1][:] and "critic" in chat_tok.decode(out[1][0]["prompt_ids"])


def test_plain_text_pairs_without_a_prompt_and_missing_columns_are_refused_for_the_file():
    implicit = datasets.Dataset.from_list([{"chosen": "The sky is blue.", "rejected": "The sky is green."}])
    with pytest.raises(DataError, match=r"f.jsonl: no `prompt` column.*Fix: add a `prompt` column"):
        preference.require_columns(implicit, "f.jsonl")
    sft_like = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "hi"}], "chosen": "a"}])
    with pytest.raises(DataError, match=r"needs column\(s\) rejected \(a `messages` column is instruction data"):
        preference.require_columns(sft_like, "f.jsonl")
    preference.require_columns(datasets.Dataset.from_list([{"prompt": "q", "chosen": "a", "rejected": "b"}]), "f")


BAD = [  # (row, kind, what the message says), written to the file at lines 2, 3, ...
    ({"prompt": USER, "chosen": "positive", "rejected": " positive "}, "same answers",
     "`chosen` and `rejected` are both 'positive'"),
    ({"prompt": USER, "chosen": "   ", "rejected": "negative"}, "empty text", "`chosen` is empty"),
    ({"prompt": USER, "chosen": 3, "rejected": "negative"}, "not text", "`chosen` holds '3' (int)"),
    ({"prompt": USER, "chosen": "positive", "rejected": None}, "missing value", "`rejected` is missing"),
    ({"prompt": [{"role": "user"}], "chosen": "positive", "rejected": "negative"}, "not a preference pair",
     "`prompt` turn 1 is not {role, content}"),
]


def bad_file(tmp_path):
    good = [{"prompt": f"{USER} {i}", "chosen": "positive", "rejected": "negative"} for i in range(3)]
    return write_jsonl(tmp_path / "pairs.jsonl", good[:1] + [row for row, _, _ in BAD] + good[1:])


def test_bad_rows_are_named_by_file_and_line_and_raised(tmp_path):
    path = bad_file(tmp_path)
    section = data_section(train=path, validation="null")
    ds, report = validate.read(str(path), section, "train", lm=True)
    with pytest.raises(DataError) as e:
        preference.check(ds, section, report)
    msg = str(e.value)
    for line, (_, kind, detail) in enumerate(BAD, 2):
        assert f"line {line}: {detail}" in msg, (kind, msg)
    assert str(path) in msg and "data.on_error=skip" in msg and "1 row(s) whose chosen and rejected" in msg


def test_bad_rows_are_skipped_and_counted_per_problem(tmp_path):
    path = bad_file(tmp_path)
    section = data_section(train=path, validation="null", on_error="skip")
    ds, report = validate.read(str(path), section, "train", lm=True)
    kept = preference.check(ds, section, report)
    assert kept[validate.LINE] == [1, 7, 8] and kept["prompt"] == [f"{USER} {i}" for i in range(3)]
    counts = report.as_dict()
    assert (counts["rows_read"], counts["rows_used"], counts["rows_skipped"]) == (8, 3, 5)
    assert counts["skipped_by_problem"] == {kind: 1 for _, kind, _ in BAD}
    assert counts["skipped_sample"][0] == "line 2: `chosen` and `rejected` are both 'positive'"


def test_truncation_is_counted_per_side_and_pairs_without_an_answer_are_dropped(chat_tok):
    rows = [{"prompt": USER, "chosen": "positive", "rejected": "negative"},
            {"prompt": USER, "chosen": "positive", "rejected": "negative " + "film " * 40},  # rejected cut
            {"prompt": USER + " and" * 60, "chosen": "positive", "rejected": "negative"}]  # prompt fills it
    ds = datasets.Dataset.from_list(rows).add_column(validate.LINE, [1, 2, 3])
    out, counts = preference.tokenize(ds, chat_tok, "chat", 48, "pairs.jsonl")
    assert (counts.rows, counts.truncated_pairs, counts.truncated_chosen, counts.truncated_rejected) == (3, 2, 1, 2)
    assert counts.no_target == 1 and len(out) == 2 and out["reference"] == ["positive", "positive"]
    cut = out[1]
    assert len(cut["rejected_input_ids"]) == 48 == cut["length"] and cut["rejected_labels"][-1] != IGNORE_INDEX
    assert cut["rejected_input_ids"][-1] != chat_tok.eos_token_id  # the end, EOS included, was cut
    assert sorted(out.column_names) == sorted(["chosen_input_ids", "chosen_labels", "rejected_input_ids",
                                               "rejected_labels", "prompt_ids", "reference", "length"])


def test_a_prompt_tokenized_differently_before_each_answer_is_refused(chat_tok):
    # A template that writes the answer right after the prompt: "goo" + "d" becomes one token `good`.
    tok = AutoTokenizer.from_pretrained(chat_tok.name_or_path)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    ds = datasets.Dataset.from_list([{"prompt": "the film was goo", "chosen": "d", "rejected": "x"}])
    with pytest.raises(DataError, match=r"pairs.jsonl: line 4: the prompt is tokenized differently .*'good'"):
        preference.tokenize(ds.add_column(validate.LINE, [4]), tok, "chat", 64, "pairs.jsonl")


def test_collate_puts_the_chosen_rows_first_then_the_rejected_ones_padded(chat_tok):
    rows = [{"prompt": USER, "chosen": "positive", "rejected": "negative film " * k} for k in (1, 2, 3)]
    out, _ = preference.tokenize(datasets.Dataset.from_list(rows), chat_tok, "chat", 256, "f")
    batch = out[:]
    b = preference.collate(batch, pad_id=0)
    width = max(len(x) for x in batch["chosen_input_ids"] + batch["rejected_input_ids"])
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape == (6, width)
    chosen, rejected = b["input_ids"].chunk(2)
    for i in range(3):
        n_c, n_r = len(batch["chosen_input_ids"][i]), len(batch["rejected_input_ids"][i])
        assert chosen[i, :n_c].tolist() == batch["chosen_input_ids"][i]
        assert rejected[i, :n_r].tolist() == batch["rejected_input_ids"][i]
        assert b["attention_mask"][3 + i].sum() == n_r and (b["labels"][3 + i, n_r:] == IGNORE_INDEX).all()
    assert b["labels"].chunk(2)[1][2].ne(IGNORE_INDEX).sum() == len(chat_tok("negative film " * 3,
                                                                             add_special_tokens=False)["input_ids"]) + 1
    left = preference.collate(batch, pad_id=0, pad_side="left")
    assert torch.equal(left["input_ids"][0, -len(batch["chosen_input_ids"][0]):],
                       torch.tensor(batch["chosen_input_ids"][0]))


def test_show_pair_gives_the_prompt_once_then_each_answer_with_its_loss_tokens(chat_tok):
    ds = datasets.Dataset.from_list([{"prompt": USER, "chosen": "positive", "rejected": "negative film"}])
    out, _ = preference.tokenize(ds, chat_tok, "chat", 256, "f")
    view = preference.show_pair(chat_tok, out[0])
    assert not any(loss for _, loss in view.prompt) and "".join(t for t, _ in view.prompt).count("good") == 1
    loss = {side: [t for t, carries in getattr(view, side) if carries] for side in ("chosen", "rejected")}
    assert loss == {"chosen": ["po", "##s", "##it", "##i", "##v", "##e", "[SEP]"],
                    "rejected": ["n", "##e", "##g", "##a", "##t", "##i", "##v", "##e", "film", "[SEP]"]}
    json.dumps(view.__dict__)  # plain data, for a CLI or a JSON report
