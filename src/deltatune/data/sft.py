"""Instruction tuning rows -> token ids with a loss mask that covers only the response.

Two row formats:
- `alpaca`: columns `instruction`, optional `input`, and `output` (the response).
- `messages`: a column `messages` holding chat turns [{"role": ..., "content": ...}, ...]; every
  assistant turn is a response.

Two ways to render them (`data.template`):
- `chat`: the tokenizer's own chat template (an alpaca row becomes one user turn and one assistant
  turn). Which characters belong to assistant turns is found by rendering the conversation up to
  each turn and comparing: the template itself is the source of truth, not a guess at its markup.
- `alpaca`: the Alpaca prompt ("### Instruction: ... ### Response:") followed by the response.

Every response ends in the tokenizer's EOS token, which carries loss too, so the tuned model learns
to stop.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from deltatune.constants import IGNORE_INDEX
from deltatune.errors import DataError

ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                 "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                       "context. Write a response that appropriately completes the request.\n\n"
                       "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss; aligned with input_ids (the loss shifts them)
    prompt_ids: list[int]  # everything before the last response: what generation starts from
    reference: str  # the last response's text
    truncated: bool


def detect_format(columns: list[str], requested: str, where: str) -> str:
    if requested in ("alpaca", "messages"):
        need = {"alpaca": ("instruction", "output"), "messages": ("messages",)}[requested]
        missing = [c for c in need if c not in columns]
        if missing:
            raise DataError(f"{where}: data.format={requested} needs column(s) {', '.join(missing)}; "
                            f"columns are: {', '.join(columns)}")
        return requested
    if requested == "text":
        raise DataError(f"{where}: data.format=text is for task causal_lm; task sft needs alpaca or messages")
    if "messages" in columns:
        return "messages"
    if "instruction" in columns and "output" in columns:
        return "alpaca"
    raise DataError(f"{where}: cannot tell the sft format from the columns ({', '.join(columns)}). Fix: provide "
                    f"`instruction`/`output` (+ optional `input`) columns for alpaca, or a `messages` column of "
                    f"chat turns, and set data.format.")


def resolve_template(requested: str, tokenizer: PreTrainedTokenizerBase) -> str:
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if requested == "chat" and not has_chat:
        raise DataError("data.template=chat: this tokenizer has no chat template. Fix: data.template=alpaca "
                        "(or auto), or use a chat model.")
    if requested == "auto":
        return "chat" if has_chat else "alpaca"
    return requested


def alpaca_prompt(instruction: str, context: str | None = None) -> str:
    if context and context.strip():
        return ALPACA_PROMPT_INPUT.format(instruction=instruction, input=context)
    return ALPACA_PROMPT.format(instruction=instruction)


def to_messages(row: dict, fmt: str) -> list[dict]:
    if fmt == "messages":
        return list(row["messages"])
    user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") and str(row["input"]).strip() else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]


def render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], template: str
           ) -> tuple[str, list[tuple[int, int]], str]:
    """Full text, the character spans of assistant responses, and the prompt before the last response."""
    if template == "alpaca":
        if len(messages) != 2 or messages[0]["role"] != "user" or messages[1]["role"] != "assistant":
            raise ValueError("the Alpaca prompt holds one instruction and one response; multi-turn chats need "
                             "data.template=chat")
        prompt = messages[0]["content"]
        if "### Instruction:" not in prompt:
            prompt = alpaca_prompt(prompt)
        return prompt + messages[1]["content"], [(len(prompt), len(prompt) + len(messages[1]["content"]))], prompt
    spans, prompt = [], ""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
        if not (text.startswith(before) and text.startswith(through) and through.startswith(before)):
            raise ValueError("the chat template renders earlier turns differently once later turns follow, so "
                             "the response tokens cannot be located; use data.template=alpaca")
        spans.append((len(before), len(through)))
        prompt = before
    if not spans:
        raise ValueError("no assistant turn: nothing to learn from this conversation")
    return text, spans, prompt


def encode(tokenizer: PreTrainedTokenizerBase, messages: list[dict], template: str, max_length: int) -> Encoded:
    """Token ids with labels on response tokens (up to and including EOS), truncated to max_length."""
    text, spans, prompt = render(tokenizer, messages, template)
    # A chat template writes its own special tokens (BOS, turn markers); the Alpaca text gets the
    # tokenizer's usual ones.
    special = template != "chat"
    enc = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    eos = tokenizer.eos_token_id
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        inside = [i for i, (a, b) in enumerate(offsets) if b > a and start <= a < end]
        eos_at = [i for i in inside if ids[i] == eos]
        if eos_at:  # the template closes the turn with EOS: learn up to it, not the newline after it
            inside = [i for i in inside if i <= eos_at[0]]
        for i in inside:
            labels[i] = ids[i]
    if eos is not None and eos not in [t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX]:
        # Every response ends in EOS, so the model learns to stop: label the tokenizer's own trailing
        # EOS (e.g. added by a post-processor), or append one.
        if ids and ids[-1] == eos:
            labels[-1] = eos
        else:
            ids, labels = ids + [eos], labels + [eos]
    prompt_ids = open_prompt(tokenizer, prompt, special)
    truncated = len(ids) > max_length
    return Encoded(ids[:max_length], labels[:max_length], prompt_ids, messages[-1]["content"] if
                   messages[-1]["role"] == "assistant" else "", truncated)


def open_prompt(tokenizer: PreTrainedTokenizerBase, text: str, special: bool = True) -> list[int]:
    """Token ids of a rendered prompt, ending exactly where the answer begins: a post-processor's
    trailing EOS (which would close the text) is dropped. `special`: the tokenizer's own BOS/EOS; off
    for text a chat template rendered, which carries its own."""
    ids = tokenizer(text, add_special_tokens=special)["input_ids"]
    return ids[:-1] if special and ids and ids[-1] == tokenizer.eos_token_id else ids


def show(tokenizer: PreTrainedTokenizerBase, ids: list[int], labels: list[int]) -> list[tuple[str, bool]]:
    """(token text, carries loss) pairs, for `deltatune inspect-data`."""
    return [(tokenizer.decode([t]), lab != IGNORE_INDEX) for t, lab in zip(ids, labels)]


def row_problems(rows: list[dict], fmt: str) -> list[tuple[int, str]]:
    """(row index, what is wrong) for rows that are not a usable example: an empty instruction or
    response, or turns that are not {role, content} with at least one assistant turn."""
    problems = []
    for i, row in enumerate(rows):
        if fmt == "alpaca":
            for col in ("instruction", "output"):
                if row.get(col) is None or not str(row[col]).strip():
                    problems.append((i, f"`{col}` is empty"))
                    break
            continue
        turns = row.get("messages")
        if not isinstance(turns, list) or not turns:
            problems.append((i, "`messages` must be a non-empty list of {role, content} turns"))
        elif not all(isinstance(t, dict) and "role" in t and "content" in t for t in turns):
            problems.append((i, "every turn needs `role` and `content`"))
        elif not any(t["role"] == "assistant" for t in turns):
            problems.append((i, "no assistant turn (nothing to learn)"))
    return problems
