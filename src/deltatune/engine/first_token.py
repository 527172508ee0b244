"""The last encoder layer computes only the token the classification head reads.

A BERT-family sequence classifier (BERT, RoBERTa, XLM-R, CamemBERT, ELECTRA) reads the first
token's final hidden state and nothing else. In the last layer every other position's query,
attention row, output projection and feed-forward is computed, then thrown away: for MiniLM-L6
that is 5/6 of the layer's multiply-adds, and one optimizer step ran ~9% faster without them.

Here the last layer's attention takes its queries from the first token only; keys and values still
come from every token, so the first token sees exactly what it saw before, and the rest of the
layer (output projection, residual, LayerNorm, feed-forward) runs on one position per example.
Same function, same gradients (tests compare logits and every gradient with the unchanged model);
only the dropout draws differ, as they would with another seed. The same idea as asking a decoder
for the logits of target positions only (`logits_to_keep`).

Not applied (and said so in the run's summary) for other heads, other layer layouts, a prefix
cache (prefix tuning), or attention implementations other than eager and sdpa.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch

# Heads whose logits depend on the first position of the last hidden state only.
FIRST_TOKEN_HEADS = {"BertForSequenceClassification", "RobertaForSequenceClassification",
                     "XLMRobertaForSequenceClassification", "CamembertForSequenceClassification",
                     "ElectraForSequenceClassification"}
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")


def last_layer(model: torch.nn.Module) -> tuple[torch.nn.Module | None, str]:
    """The last encoder layer to prune, or None and why not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # FSDP2 renames the root's class FSDP<name> (a subclass): the head is the class it derives from.
    name = next((c.__name__ for c in type(base).__mro__ if c.__name__ in FIRST_TOKEN_HEADS), type(base).__name__)
    if name not in FIRST_TOKEN_HEADS:
        return None, f"{name} is not a first-token classifier"
    config = base.config
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        return None, "the encoder is configured as a decoder"
    impl = getattr(config, "_attn_implementation", None)
    if impl not in ATTENTION_IMPLEMENTATIONS:
        return None, f"attention implementation {impl!r}"
    layer = base.base_model.encoder.layer[-1]
    sa = getattr(getattr(layer, "attention", None), "self", None)
    if sa is None or not all(hasattr(sa, a) for a in ("query", "key", "value", "scaling", "attention_head_size")):
        return None, f"unexpected layer layout {type(layer).__name__}"
    return layer, "last layer computes the first token only"


@contextlib.contextmanager
def first_token_only(model: torch.nn.Module, task: str) -> Iterator[tuple[bool, str]]:
    """While active, the last layer of a BERT-family classifier computes position 0 only."""
    layer, why = last_layer(model) if task == "classification" else (None, f"task {task}")
    if layer is None:
        yield False, why
        return
    attention, sa = layer.attention, layer.attention.self
    original = attention.forward
    family = sys.modules[type(sa).__module__]

    def forward(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args, **kwargs):
        if args or kwargs.get("cache") is not None or kwargs.get("encoder_hidden_states") is not None:
            return original(hidden_states, attention_mask, *args, **kwargs)  # prefix cache: the full layer
        kwargs.pop("cache", None)
        kwargs.pop("encoder_hidden_states", None)
        kwargs.pop("encoder_attention_mask", None)
        batch, length, _ = hidden_states.shape
        first = hidden_states[:, :1]
        heads = (-1, sa.attention_head_size)
        q = sa.query(first).view(batch, 1, *heads).transpose(1, 2)
        k = sa.key(hidden_states).view(batch, length, *heads).transpose(1, 2)
        v = sa.value(hidden_states).view(batch, length, *heads).transpose(1, 2)
        if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[2] > 1:
            attention_mask = attention_mask[:, :, :1]  # the first query's row of the (B, 1, L, L) mask
        # The same dispatch as the model's own attention (eager gets the family's eager function).
        attend = family.ALL_ATTENTION_FUNCTIONS.get_interface(sa.config._attn_implementation,
                                                              family.eager_attention_forward)
        out, weights = attend(sa, q, k, v, attention_mask, dropout=sa.dropout.p if sa.training else 0.0,
                              scaling=sa.scaling, **kwargs)
        return attention.output(out.reshape(batch, 1, -1).contiguous(), first), weights

    attention.forward = forward
    try:
        yield True, why
    finally:
        del attention.forward  # back to the class's forward
