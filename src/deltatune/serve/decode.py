"""Step-by-step decoding of a batch of prompts, each row with its own settings.

transformers' `generate` takes one set of sampling settings per call, streams only batches of one and
knows no stop strings; a server batches requests that differ in all three, and rows that belong to
different LoRA adapters (peft `adapter_names`). This loop does what greedy `generate` does step for
step (left padding, positions from the attention mask, the KV cache, EOS ends a row, finished rows are fed
padding), so greedy answers equal `deltatune generate`; on top, each row samples with its own
temperature/top_p and its own seeded generator (so batching never changes a sampled answer either),
stops at its own stop strings, and reports text as it grows (server-sent events).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class Row:
    """One prompt to answer and, as decoding goes, its answer."""
    ids: list[int]
    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    adapter: str | None = None  # the peft adapter name in a shared model (mixed batches)
    on_text: Callable[[str], None] | None = None  # called with each new piece of text (streaming)
    cancelled: Callable[[], bool] = lambda: False  # the client is gone or timed out: stop early
    new: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" (EOS or a stop string) or "length"
    sent: str = ""  # what on_text has been given so far
    generator: torch.Generator | None = None
    processors: object = None  # the model's greedy LogitsProcessorList for this row (see `processors`)


def pick(row: Row, logits: torch.Tensor) -> int:
    """The next token: the model's own logits processors first (its generation_config's repetition penalty,
    n-gram ban, minimum length...: what `generate` applies even when greedy), then argmax for greedy; else
    temperature, then nucleus (top_p) filtering as transformers' TemperatureLogitsWarper and TopPLogitsWarper
    do, then a draw from the row's own generator."""
    if row.processors:
        logits = row.processors(torch.tensor([row.ids + row.new]), logits[None])[0]
    if row.temperature <= 0:
        return int(logits.argmax())
    scores = logits / row.temperature
    if row.top_p < 1.0:
        ordered, index = torch.sort(scores, descending=False)
        cumulative = ordered.softmax(-1).cumsum(-1)
        remove = cumulative <= (1 - row.top_p)
        remove[-1] = False  # keep at least the most likely token
        scores = scores.masked_fill(remove.scatter(0, index, remove), -float("inf"))
    if row.generator is None:
        row.generator = torch.Generator().manual_seed(row.seed)
    return int(torch.multinomial(scores.softmax(-1), 1, generator=row.generator))


def visible(text: str, stops: list[str], final: bool) -> str:
    """How much of the text so far can be streamed without taking anything back: up to the last whitespace
    (a word's later tokens can change how its start decodes), never a possible beginning of a stop string,
    never a half-decoded character (U+FFFD while a multi-byte character is incomplete)."""
    if final:
        return text
    cut = max(text.rfind(" "), text.rfind("\n")) + 1
    hold = max((len(s) - 1 for s in stops), default=0)
    cut = min(cut, len(text) - hold)
    shown = text[:max(cut, 0)]
    return shown[:shown.find("\ufffd")] if "\ufffd" in shown else shown


def advance(row: Row, token: int, eos: list[int], decode: Callable[[list[int]], str]) -> None:
    """Add one token to a row: EOS, a stop string or max_tokens finish it; stream what became visible."""
    if token in eos:
        row.finish_reason = "stop"
    else:
        row.new.append(token)
        row.text = decode(row.new)
        hits = [i for i in (row.text.find(s) for s in row.stop if s) if i >= 0]
        if hits:
            row.text, row.finish_reason = row.text[:min(hits)], "stop"
        elif len(row.new) >= row.max_tokens:
            row.finish_reason = "length"
    if row.on_text is not None:
        shown = visible(row.text, row.stop, final=row.finish_reason is not None)
        if len(shown) > len(row.sent) and shown.startswith(row.sent):
            row.on_text(shown[len(row.sent):])
            row.sent = shown


def processors(model: torch.nn.Module, rows: list[Row], eos: list[int]) -> None:
    """Give each row the logits processors `generate` would build from the model's generation_config with
    sampling off (`deltatune generate` greedy; sampling settings are the row's own). None when there are none,
    as for most models."""
    from deltatune.serve.weights import inner_model

    inner = inner_model(model)
    config = copy.deepcopy(inner.generation_config)
    config.update(do_sample=False, temperature=None, top_p=None, top_k=None, eos_token_id=eos)
    config._eos_token_tensor = torch.tensor(eos)  # what generate's _prepare_special_tokens sets (min lengths)
    for r in rows:
        built = inner._get_logits_processor(config, input_ids_seq_length=len(r.ids), device="cpu", model_kwargs={})
        r.processors = built or None


def routing(model: torch.nn.Module, names: list[str | None]) -> dict:
    """How a batch reaches its adapters in a shared peft model: every row for one adapter -> make it the active
    one and run peft's plain forward; rows for several -> peft's `adapter_names` (the mixed-batch forward, which
    splits each layer's input by adapter: measurably slower, so only when needed). Not a shared model: {}."""
    if names[0] is None:
        return {}
    if len(set(names)) > 1:
        return {"adapter_names": names}
    if model.active_adapter != names[0]:
        model.set_adapter(names[0], inference_mode=True)
    return {}


def _accepts(model: torch.nn.Module, name: str) -> bool:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return name in inspect.signature(inner.forward).parameters


@torch.no_grad()
def decode(model: torch.nn.Module, rows: list[Row], pad: int, eos: list[int],
           text_of: Callable[[list[int]], str]) -> None:
    """Answer every row (fills row.new, row.text, row.finish_reason). Rows with `adapter` set go through a
    shared peft model with per-row adapter names."""
    device = next(model.parameters()).device
    processors(model, rows, eos)
    width = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):  # left padding: every prompt ends where its answer starts
        ids[i, width - len(r.ids):] = torch.tensor(r.ids)
        mask[i, width - len(r.ids):] = 1
    position = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    extra = routing(model, [r.adapter for r in rows])
    if _accepts(model, "logits_to_keep"):
        extra["logits_to_keep"] = 1  # as generate does: the head runs on the last position only
    cache = None
    step = ids
    while True:
        out = model(input_ids=step.to(device), attention_mask=mask.to(device), position_ids=position.to(device),
                    cache=cache, use_cache=True, **extra)
        cache = out.cache
        logits = out.logits[:, -1].float().cpu()
        tokens = []
        for i, r in enumerate(rows):
            if r.finish_reason is None and r.cancelled():
                r.finish_reason = "cancelled"
            if r.finish_reason is not None:
                tokens.append(pad)
                continue
            token = pick(r, logits[i])
            advance(r, token, eos, text_of)
            tokens.append(token)
        if all(r.finish_reason is not None for r in rows):
            return
        step = torch.tensor(tokens, dtype=torch.long)[:, None]
        mask = torch.cat([mask, torch.ones_like(step)], dim=-1)
        position = position[:, -1:] + 1
