"""The tasks a run can train, and the rules that sort them (a leaf: anything may import it)."""

from __future__ import annotations

TASKS = ("classification", "causal_lm", "sft", "preference")


def is_lm(task: str) -> bool:
    """Whether `task` trains a language model (causal_lm, sft, preference: per-token log-probabilities, loss and
    perplexity) rather than a classifier (one label per text, a new head). The one place the code decides this."""
    return task != "classification"


def has_prompts(task: str) -> bool:
    """Whether `task`'s rows are prompts answered by the model (sft, preference): rendered with data.template
    (chat, alpaca), generated from, scored by generated answers. causal_lm continues raw text."""
    return task in ("sft", "preference")
