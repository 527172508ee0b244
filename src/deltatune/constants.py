"""Conventions shared across the package. A leaf: imports nothing from deltatune, so any module may use it."""

# The label a token (or example) carries when the loss must skip it: padding, prompt tokens in instruction
# tuning, the first token of every packed example. It is what torch's cross-entropy and transformers'
# models ignore by default (`ignore_index`), so batches built here can be handed to either.
IGNORE_INDEX = -100
