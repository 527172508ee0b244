"""Shared fixtures: tiny BERT and LLaMA models built from configs, a fixed toy tokenizer, toy data.

Nothing here touches the network. Models are a few layers with hidden size 32, so a training
step takes milliseconds and whole runs fit in a test.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

# Two cores: more threads than that made steps 10x slower through oversubscription.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

POSITIVE = ["good", "great", "fine", "lovely", "superb", "brilliant", "warm", "funny"]
NEGATIVE = ["bad", "awful", "dull", "boring", "poor", "weak", "clumsy", "tedious"]
FILLER = ["the", "film", "was", "a", "movie", "plot", "actors", "story", "really", "quite", "and", "but",
          "with", "its", "this", "scene", "ending", "script", "very", "not"]


def toy_rows(n: int, seed: int = 0) -> list[dict]:
    """A learnable sentiment task: the label is carried by one sentiment word among fillers."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["positive", "negative"])
        words = rng.choices(FILLER, k=rng.randint(3, 14))
        words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label == "positive" else NEGATIVE))
        rows.append({"text": " ".join(words), "label": label})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


VOCAB = Path(__file__).parent / "fixtures" / "toy-vocab.txt"


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A WordPiece tokenizer over the toy vocabulary, saved as a BERT tokenizer.

    The vocabulary was trained once (WordPieceTrainer, vocab_size=200, on toy_rows(500)) and written
    to fixtures/toy-vocab.txt. Training it here again made a different vocabulary in each pytest
    process (the trainer breaks ties between equally frequent pieces in hash-map order), so results
    of the tiny models, and the tests near their thresholds, changed from run to run."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    vocab = VOCAB.read_text(encoding="utf-8").splitlines()
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    fast = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]")
    out = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(out)
    return out


def save_tiny_bert(out: Path, tokenizer_dir: Path, dropout: float = 0.0) -> Path:
    """A 2-layer, hidden-32 BERT sharing the toy vocabulary."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=dropout,
                     attention_probs_dropout_prob=dropout, pad_token_id=tok.pad_token_id)
    BertModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tok(tokenizer_dir):
    """The toy tokenizer, loaded."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def data_section(**kw):
    """A validated `data:` section from keyword values, e.g. data_section(train=path, validation="null")."""
    from deltatune import config

    return config.load(None, [f"data.{k}={v}" for k, v in kw.items()]).data


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory, tokenizer_dir) -> Path:
    """Dropout off, so batch-size invariants can be exact."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), tokenizer_dir)


def _save_tiny_llama(out: Path, tokenizer_dir: Path, hidden: int, init_range: float = 0.02) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bert_tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok = PreTrainedTokenizerFast(tokenizer_object=bert_tok.backend_tokenizer, bos_token="[CLS]",
                                  eos_token="[SEP]", unk_token="[UNK]")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=2 * hidden, max_position_embeddings=128,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, attention_dropout=0.0,
                      initializer_range=init_range)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tokenizer_dir) -> Path:
    """A 2-layer, hidden-32 LLaMA decoder sharing the toy vocabulary (no pad token of its own)."""
    return _save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer_dir, 32)


@pytest.fixture(scope="session")
def tiny_llama64(tmp_path_factory, tokenizer_dir) -> Path:
    """Hidden 64: bitsandbytes' CPU 4-bit kernels need rows of at least one 64-value block (QLoRA)."""
    return _save_tiny_llama(tmp_path_factory.mktemp("tiny-llama64"), tokenizer_dir, 64)


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("toy-data")
    return {"train": write_jsonl(d / "train.jsonl", toy_rows(256, seed=1)),
            "validation": write_jsonl(d / "validation.jsonl", toy_rows(64, seed=2))}


@pytest.fixture
def make_config(tmp_path, toy_data, tiny_bert):
    """RunConfig for a fast tiny run; keyword overrides use `section.key` names."""
    from deltatune import config

    def make(model: Path | None = None, **overrides):
        base = {
            "model.name": str(model or tiny_bert), "data.train": str(toy_data["train"]),
            "data.validation": str(toy_data["validation"]), "train.epochs": 2, "train.batch_size": 16,
            "train.lr": 3e-3, "train.precision": "fp32", "train.log_every": 5, "train.threads": 2,
            "output.dir": str(tmp_path / "run"), "output.overwrite": True,
        }
        base.update(overrides)
        return config.load(None, [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in base.items()])

    return make


CHAT_TEMPLATE = ("{% for m in messages %}[CLS]{{ m['role'] }} : {{ m['content'] }}[SEP]{% endfor %}"
                 "{% if add_generation_prompt %}[CLS]assistant : {% endif %}")


@pytest.fixture(scope="session")
def tiny_chat_llama(tmp_path_factory, tokenizer_dir) -> Path:
    """The tiny LLaMA with a chat template: turns open with [CLS] and close with EOS ([SEP]).

    Initialised 10x wider than usual: with hidden 32 and the default 0.02, the frozen output layer
    maps every state to near-uniform logits, so adapters (which never touch it) could not move the
    loss far, unlike in a real pretrained model."""
    from transformers import AutoTokenizer

    out = _save_tiny_llama(tmp_path_factory.mktemp("tiny-chat-llama"), tokenizer_dir, 32, init_range=0.2)
    tok = AutoTokenizer.from_pretrained(out)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)
    return out


def sft_rows(n: int, seed: int = 0, fmt: str = "alpaca") -> list[dict]:
    """The toy sentiment task phrased as instructions: answer `positive` or `negative`."""
    rows = []
    for r in toy_rows(n, seed):
        if fmt == "alpaca":
            rows.append({"instruction": "classify the review", "input": r["text"], "output": r["label"]})
        else:
            rows.append({"messages": [{"role": "user", "content": f"classify : {r['text']}"},
                                      {"role": "assistant", "content": r["label"]}]})
    return rows
