"""Preference pairs (prompt, chosen answer, rejected answer) -> two token sequences with answer-only labels.

Row layouts (TRL's preference formats, docs/preference.md#data):
- explicit prompt: `prompt` a string or a list of chat turns [{role, content}, ...] (the conversation so far);
  `chosen` and `rejected` each a string, or a list holding one assistant turn.
- implicit prompt, conversational: `chosen` and `rejected` are whole conversations; the turns they share
  are the prompt and each must end in one assistant turn of its own (UltraFeedback-style data). A `prompt`
  column beside them must agree with those shared turns.
Refused: implicit prompt with plain strings (no `prompt`; where the prompt ends would be a guess at a
character), and answers of several turns.

Each side is rendered and masked by sft.encode (the same chat/alpaca rendering as instruction tuning, EOS
at the end of the answer). Only the final answer carries loss: labels are -100 on the prompt, including
any earlier assistant turns in it. The prompt tokens must be the same on both sides; a template or
tokenizer that renders them differently is refused, naming the line. Sequences longer than
data.max_length lose their end (as in sft); a pair whose answer on either side loses every token is
dropped and counted.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from deltatune.constants import IGNORE_INDEX
from deltatune.data import batching, sft, validate
from deltatune.data.validate import LINE, Problem
from deltatune.errors import DataError

ANSWERS = ("chosen", "rejected")
# The preference problems validate.py's messages know; the others reuse its kinds ("missing value", "not
# text", "empty text"), so skipped rows are counted by the same names in summary.json.
KINDS = {
    "same answers": ("whose chosen and rejected answers are the same",
                     "give each pair two different answers (the pair teaches nothing), or remove these rows"),
    "not a preference pair": ("that are not a usable preference pair",
                              "give `prompt` as a string or a list of {role, content} turns, and `chosen`/"
                              "`rejected` each as a string or a list of one assistant turn (or both as whole "
                              "conversations that share every turn before their last assistant turn)"),
}
validate.KINDS.update(KINDS)  # one table of kinds: validate's error messages and counts name these too


class PairError(ValueError):
    """One row that is not a usable pair: `kind` is a validate.KINDS key, `detail` says what is wrong."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind, self.detail = kind, detail


@dataclass
class Pair:
    prompt: list[dict]  # chat turns before the answers
    chosen: str
    rejected: str


# ---------------------------------------------------------------------------------------------
# Rows -> pairs


def require_columns(ds: datasets.Dataset, where: str) -> None:
    """The columns a preference file needs; plain-text answers without a prompt are refused as a whole."""
    have = [c for c in ds.column_names if c != LINE]
    missing = [c for c in ANSWERS if c not in have]
    if missing:
        hint = " (a `messages` column is instruction data: task sft)" if "messages" in have else ""
        raise DataError(f"{where}: task preference needs column(s) {', '.join(missing)}{hint}; columns are: "
                        f"{', '.join(have)}. Fix: give every row `prompt`, `chosen` and `rejected`.")
    first = next((r["chosen"] for r in ds.select_columns(["chosen"]) if r["chosen"] is not None), None)
    if "prompt" not in have and isinstance(first, str):
        raise DataError(f"{where}: no `prompt` column, and `chosen`/`rejected` hold whole texts (TRL's \"implicit "
                        f"prompt\" standard format): where the prompt ends would be a guess at a character, and "
                        f"it could not be rendered with a chat template. Fix: add a `prompt` column and keep only "
                        f"the answers in `chosen`/`rejected`, or write them as lists of chat turns.")


def to_pair(row: dict) -> Pair:
    """A row as (prompt turns, chosen text, rejected text); PairError when it is not a usable pair."""
    for col in ANSWERS:
        _check_value(row.get(col), col)
    chosen, rejected = row["chosen"], row["rejected"]
    if _conversation(chosen) or _conversation(rejected):
        if not (_conversation(chosen) and _conversation(rejected)):
            one = "chosen" if _conversation(chosen) else "rejected"
            raise PairError("not a preference pair", f"`{one}` is a whole conversation but the other answer is "
                                                     f"not; write both the same way")
        pair = _split_shared(chosen, rejected)
        _check_given_prompt(row.get("prompt"), pair.prompt)
    else:
        prompt = row.get("prompt")
        _check_value(prompt, "prompt")
        turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        pair = Pair(turns, _answer(chosen, "chosen"), _answer(rejected, "rejected"))
    if pair.chosen.strip() == pair.rejected.strip():
        raise PairError("same answers", f"`chosen` and `rejected` are both {pair.chosen.strip()[:60]!r}")
    return pair


def _check_value(value: object, col: str) -> None:
    """A string that is not blank, or a non-empty list of {role, content} turns with string content."""
    if value is None:
        raise PairError("missing value", f"`{col}` is missing")
    if isinstance(value, str):
        if not value.strip():
            raise PairError("empty text", f"`{col}` is empty")
        return
    if not isinstance(value, list):
        raise PairError("not text", f"`{col}` holds {str(value)[:60]!r} ({type(value).__name__}), not a string "
                                    f"or a list of chat turns")
    if not value:
        raise PairError("empty text", f"`{col}` is an empty list of turns")
    for i, turn in enumerate(value):
        if not (isinstance(turn, dict) and isinstance(turn.get("role"), str) and isinstance(turn.get("content"), str)):
            raise PairError("not a preference pair", f"`{col}` turn {i + 1} is not {{role, content}} with text "
                                                     f"content: {str(turn)[:60]}")


def _conversation(value: object) -> bool:
    """A whole conversation (implicit prompt), not an answer given as a one-turn list."""
    return isinstance(value, list) and (len(value) > 1 or value[0]["role"] != "assistant")


def _answer(value: str | list, col: str) -> str:
    if isinstance(value, str):
        return value
    if not value[0]["content"].strip():
        raise PairError("empty text", f"`{col}` is empty")
    return value[0]["content"]


def _split_shared(chosen: list[dict], rejected: list[dict]) -> Pair:
    """TRL's extract_prompt on turns: the longest shared prefix is the prompt; one assistant turn must follow."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == len(chosen) == len(rejected):
        raise PairError("same answers", "`chosen` and `rejected` are the same conversation")
    for col, turns in (("chosen", chosen), ("rejected", rejected)):
        rest = turns[n:]
        if len(rest) != 1 or rest[0]["role"] != "assistant":
            roles = ", ".join(t["role"] for t in rest) or "nothing"
            raise PairError("not a preference pair", f"after the {n} turn(s) both conversations share, `{col}` has "
                                                     f"{roles}; it must end in exactly one assistant turn of its own")
    if n == 0:
        raise PairError("not a preference pair", "`chosen` and `rejected` share no turn: there is no prompt")
    pair = Pair(chosen[:n], chosen[n]["content"], rejected[n]["content"])
    for col, text in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        if not text.strip():
            raise PairError("empty text", f"`{col}`'s answer is empty")
    return pair


def _check_given_prompt(given: object, shared: list[dict]) -> None:
    """A `prompt` beside whole conversations must be what they share (or its last user turn): never ignored
    silently, since it may say the data is not what it looks like."""
    if given is None or given == shared:
        return
    users = [t["content"] for t in shared if t["role"] == "user"]
    if isinstance(given, str) and users and given.strip() == users[-1].strip():
        return
    raise PairError("not a preference pair", f"`prompt` ({str(given)[:40]!r}) is neither the turns `chosen` and "
                                             f"`rejected` share nor their last user turn")


def row_problems(rows: list[dict]) -> list[tuple[int, str, str]]:
    """(row index, kind, what is wrong) for every row that is not a usable pair."""
    found = []
    for i, row in enumerate(rows):
        try:
            to_pair(row)
        except PairError as e:
            found.append((i, e.kind, e.detail))
    return found


def check(ds: datasets.Dataset, section, report: validate.SplitReport) -> datasets.Dataset:
    """Rows that are not a usable pair, named by file and line: raised, or skipped and counted per kind
    (data.on_error), like every other bad row."""
    rows = ds.to_list()
    found = row_problems(rows)
    if not found:
        return ds
    problems = [Problem(f"{report.unit} {rows[i].get(LINE, i + 1)}", kind, detail) for i, kind, detail in found]
    if section.on_error == "raise":
        validate._raise(report.where, problems)
    report.skipped += problems
    if len(found) == len(ds):
        raise DataError(f"{report.where}: every one of its {len(ds)} rows is bad (first: {problems[0]}). "
                        f"Fix: {validate.KINDS[problems[0].kind][1]}.")
    bad = {i for i, _, _ in found}
    return ds.select([i for i in range(len(ds)) if i not in bad])


# ---------------------------------------------------------------------------------------------
# Pairs -> token ids


@dataclass
class EncodedPair:
    prompt_ids: list[int]  # the shared prompt, as both sequences begin (before truncation)
    chosen_ids: list[int]  # prompt + chosen answer + EOS, cut to max_length
    chosen_labels: list[int]  # IGNORE_INDEX except on the answer's tokens (and its EOS)
    rejected_ids: list[int]
    rejected_labels: list[int]
    truncated: tuple[bool, bool]  # (chosen, rejected) cut by max_length

    @property
    def has_target(self) -> bool:
        """Both answers keep a token the loss can score (position 0 has no context to predict it from). With one
        prompt and the same max_length, both sides lose their answers together; asked of both all the same."""
        return all(any(t != IGNORE_INDEX for t in lab[1:]) for lab in (self.chosen_labels, self.rejected_labels))


def encode_pair(tokenizer: PreTrainedTokenizerBase, pair: Pair, template: str, max_length: int) -> EncodedPair:
    """Both sides rendered and masked by sft.encode; labels kept on the final answer only; each sequence
    ends at its answer's last labelled token (EOS), then is cut to max_length. ValueError when the two
    sides do not begin with the same prompt tokens."""
    sides = []
    for answer in (pair.chosen, pair.rejected):
        enc = sft.encode(tokenizer, pair.prompt + [{"role": "assistant", "content": answer}], template, sys.maxsize)
        start, end = answer_span(enc.labels)
        sides.append((enc.input_ids[:end], [IGNORE_INDEX] * start + enc.labels[start:end], start))
    (c_ids, c_labels, c_start), (r_ids, r_labels, r_start) = sides
    if c_ids[:c_start] != r_ids[:r_start]:
        n = next((i for i, (a, b) in enumerate(zip(c_ids, r_ids)) if a != b), min(c_start, r_start))
        raise ValueError(f"the prompt is tokenized differently before the chosen answer "
                         f"({tokenizer.decode(c_ids[n:c_start])!r}) and before the rejected one "
                         f"({tokenizer.decode(r_ids[n:r_start])!r}): the end of the prompt merges with the answer's "
                         f"first characters (e.g. a prompt ending in a space), so the two answers would not be "
                         f"scored after the same context. Fix: end the prompt where a token ends (move a trailing "
                         f"space into the answers), or use another data.template")
    return EncodedPair(c_ids[:c_start], c_ids[:max_length], c_labels[:max_length], r_ids[:max_length],
                       r_labels[:max_length], (len(c_ids) > max_length, len(r_ids) > max_length))


def answer_span(labels: list[int]) -> tuple[int, int]:
    """[start, end) of the last run of labelled tokens: the final answer (sft.encode labels every assistant
    turn, so earlier turns of a multi-turn prompt are runs before it)."""
    end = max((i for i, t in enumerate(labels) if t != IGNORE_INDEX), default=-1) + 1
    if end == 0:
        raise ValueError("the answer has no token to learn (the tokenizer has no EOS and the answer rendered "
                         "to nothing)")
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return start, end


@dataclass
class Counts:
    """What tokenizing a split did to its pairs, for summary.json."""
    rows: int = 0  # pairs tokenized
    truncated_pairs: int = 0  # either side cut by data.max_length
    truncated_chosen: int = 0
    truncated_rejected: int = 0
    no_target: int = 0  # pairs dropped: an answer lost every token to data.max_length


def tokenize(ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, template: str, max_length: int,
             where: str, fingerprint: str | None = None, unit: str = "line") -> tuple[datasets.Dataset, Counts]:
    """Checked rows -> one row per pair: chosen_input_ids, chosen_labels, rejected_input_ids, rejected_labels,
    prompt_ids, reference (the chosen answer's text), length (the longer side: what a batch pads to).
    `fingerprint`: the map's cache key (build.map_fingerprint), so a run reuses the tokens of the last one;
    `unit`: how errors name a row (validate.SplitReport.unit: "line", or "row" for parquet)."""

    def encode(row: dict) -> dict:
        try:
            pair = to_pair(row)
            e = encode_pair(tokenizer, pair, template, max_length)
        except ValueError as err:  # a template problem, not a bad row: every row would have it
            raise DataError(f"{where}: {unit} {row.get(LINE, '?')}: {err}") from None
        return {"chosen_input_ids": e.chosen_ids, "chosen_labels": e.chosen_labels,
                "rejected_input_ids": e.rejected_ids, "rejected_labels": e.rejected_labels,
                "prompt_ids": e.prompt_ids, "reference": pair.chosen,
                "length": max(len(e.chosen_ids), len(e.rejected_ids)), "truncated_chosen": e.truncated[0],
                "truncated_rejected": e.truncated[1], "has_target": e.has_target}

    out = ds.map(encode, remove_columns=ds.column_names, desc="tokenizing pairs", new_fingerprint=fingerprint)
    flags = out.select_columns(["truncated_chosen", "truncated_rejected", "has_target"])[:]
    c, r, keep = flags["truncated_chosen"], flags["truncated_rejected"], flags["has_target"]
    counts = Counts(rows=len(out), truncated_pairs=sum(a or b for a, b in zip(c, r)), truncated_chosen=sum(c),
                    truncated_rejected=sum(r), no_target=len(out) - sum(keep))
    kept = out.select([i for i, ok in enumerate(keep) if ok]) if counts.no_target else out
    return kept.remove_columns(["truncated_chosen", "truncated_rejected", "has_target"]), counts


# ---------------------------------------------------------------------------------------------
# Batches and the inspect-data view


def collate(rows: dict[str, list], pad_id: int, pad_side: str = "right") -> dict[str, torch.Tensor]:
    """N pairs -> 2N padded rows, the N chosen sequences first, then the N rejected ones in the same order
    (TRL's concatenated layout): one forward pass scores both, and `x.chunk(2)` splits any per-row result
    back into (chosen, rejected). Labels are IGNORE_INDEX outside the answers and on padding."""
    both = {"input_ids": rows["chosen_input_ids"] + rows["rejected_input_ids"],
            "labels": rows["chosen_labels"] + rows["rejected_labels"]}
    return batching.collate(both, pad_id, pad_side, lm=True)


@dataclass
class PairView:
    """One pair as the model sees it: (token text, carries loss) for the shared prompt and each answer."""
    prompt: list[tuple[str, bool]]
    chosen: list[tuple[str, bool]]
    rejected: list[tuple[str, bool]]


def show_pair(tokenizer: PreTrainedTokenizerBase, row: dict) -> PairView:
    """A tokenized pair (a row of `tokenize`'s dataset), for `deltatune inspect-data`: the prompt once, then
    each answer's tokens after it (after truncation, which may cut into the prompt too)."""
    n = len(row["prompt_ids"])
    tokens = {side: sft.show(tokenizer, row[f"{side}_input_ids"], row[f"{side}_labels"]) for side in ANSWERS}
    return PairView(tokens["chosen"][:n], tokens["chosen"][n:], tokens["rejected"][n:])
