"""Golden loss curves: the first 8 logged losses of three tiny fp32 runs, pinned to 1e-5.

The invariants elsewhere (exact resume, accumulation, packing) compare the engine with itself, so a change
that shifts every run the same way passes them. These numbers were computed once, from commit 98490e4
(before the issue-11 engine refactor), and catch any change in numerics: the data order, the loss, the
schedule, the optimizer, the method's initialisation.

If one of these fails after a change that is *meant* to change numerics, recompute the values from the
commit that makes that change and say so in its message; never widen the tolerance to make it pass.
Threads are pinned (train.threads=2, and OMP_NUM_THREADS=2 from conftest): other thread counts may reduce
in a different order and differ in the last bits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deltatune import api
from tests.conftest import FILLER, NEGATIVE, POSITIVE, _save_tiny_llama, save_tiny_bert

STEPS = 8

# Each run: model fixture (below), config overrides.
RUNS = {
    # (a) full fine-tuning of the BERT classifier: every weight trains.
    "bert_classifier": ("golden_bert", {}),
    # (b) full fine-tuning of the LLaMA causal LM on the same text (labels are the shifted inputs).
    "llama_causal_lm": ("golden_llama", {"task": "causal_lm", "eval.forgetting": False}),
    # (c) LoRA on the BERT classifier, chosen over a causal-LM LoRA because its loss moves: the head trains
    # in full next to the adapters (B = 0 at first), so the curve shows what trains and at which lr. On the
    # tiny LLaMA (0.02 init) the frozen output layer keeps the loss near log(vocab) whatever the adapters do.
    # The head dominates the first steps, so small scaling changes are below 1e-5 (lora_alpha x1.5 is not).
    "bert_lora": ("golden_bert", {"method.name": "lora", "method.r": 4, "method.alpha": 8, "method.dropout": 0.0}),
}

GOLDEN = {
    "bert_classifier": [
        0.6927064657211304,
        0.7015520334243774,
        0.682010293006897,
        0.6724021434783936,
        0.6864213943481445,
        0.6512349247932434,
        0.698830783367157,
        0.7422784566879272,
    ],
    "llama_causal_lm": [
        4.445616957720588,
        4.339114102450284,
        4.2507138324873095,
        4.172704800692472,
        4.121676224928636,
        4.084249462601701,
        4.048608234950474,
        4.039622645224294,
    ],
    "bert_lora": [
        0.6927064657211304,
        0.6950070858001709,
        0.6891906261444092,
        0.6853564381599426,
        0.6901344060897827,
        0.6779747009277344,
        0.6937557458877563,
        0.7077478170394897,
    ],
}


@pytest.fixture(scope="module")
def fixed_tokenizer_dir(tmp_path_factory):
    """conftest's toy tokenizer with a vocabulary that is the same in every process.

    conftest's `tokenizer_dir` is *trained*, and the tokenizers trainer breaks ties between equally
    frequent characters in hash-map order, so its vocabulary (which pieces, and their ids) changes from
    one pytest process to the next: fine for the other tests, fatal for numbers pinned to 1e-5. Here the
    vocabulary is written out: the specials, every character (alone and as a `##` continuation), and
    every whole word of the toy task, in sorted order."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    words = sorted(set(POSITIVE + NEGATIVE + FILLER))
    chars = sorted(set("".join(words)))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars), *words]
    vocab = list(dict.fromkeys(vocab))  # `a` is a character and a word
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]")
    out = tmp_path_factory.mktemp("golden-tokenizer")
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def golden_bert(tmp_path_factory, fixed_tokenizer_dir):
    """conftest's tiny BERT (seeded init, dropout off) over the fixed vocabulary."""
    return save_tiny_bert(tmp_path_factory.mktemp("golden-bert"), fixed_tokenizer_dir)


@pytest.fixture(scope="module")
def golden_llama(tmp_path_factory, fixed_tokenizer_dir):
    """conftest's tiny LLaMA (hidden 32, seeded init) over the fixed vocabulary."""
    return _save_tiny_llama(tmp_path_factory.mktemp("golden-llama"), fixed_tokenizer_dir, 32)


def golden_losses(make_config, model, overrides) -> list[float]:
    """Train STEPS steps logging every one, and return the logged losses from metrics.jsonl."""
    cfg = make_config(model=model, **{"data.validation": None, "train.max_steps": STEPS, "train.log_every": 1,
                                      "train.precision": "fp32", "train.threads": 2, **overrides})
    api.train(cfg)
    rows = [json.loads(x) for x in (Path(cfg.output.dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.parametrize("name", sorted(RUNS))
def test_first_losses_match_the_golden_curve(name, make_config, request):
    fixture, overrides = RUNS[name]
    losses = golden_losses(make_config, request.getfixturevalue(fixture), overrides)
    assert len(losses) == STEPS, losses
    assert losses == pytest.approx(GOLDEN[name], abs=1e-5, rel=0), f"{name}: {losses!r}"
