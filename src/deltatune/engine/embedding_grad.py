"""Word-embedding gradient kept in one persistent buffer, zeroed only where it was written.

The dense word-embedding gradient (vocab x hidden: 30,522 x 384 fp32 = 47 MB for MiniLM) is the
largest tensor a step touches, yet a batch writes only a few hundred of its rows. Autograd
allocates and zero-fills the whole tensor every step: on our 2-core CPU that fill alone took
40-60 ms of a ~150 ms step. Here the embedding's backward adds the rows into a buffer that stays
attached as `weight.grad`, and before the next step only the rows written last time are zeroed.

Same maths: the gradient values are exactly what autograd computes (index_add of the same rows,
padding row excluded), and the optimizer still sees a dense gradient and updates every row.
Not used with DDP (its reducer hooks autograd's gradient accumulation) or tied embeddings.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F


class _Rows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids: torch.Tensor, weight: torch.Tensor, owner: RowGradBuffer) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.owner = owner
        return F.embedding(ids, weight, owner.padding_idx)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (ids,) = ctx.saved_tensors
        ctx.owner.accumulate(ids, grad_out)
        return None, None, None  # the weight's gradient went straight into the buffer


class RowGradBuffer:
    def __init__(self, embedding: torch.nn.Embedding):
        self.weight = embedding.weight
        self.padding_idx = embedding.padding_idx
        self.buffer = torch.zeros_like(self.weight)
        self.touched: list[torch.Tensor] = []
        self._rows: torch.Tensor | None = None

    def rows(self) -> torch.Tensor:
        """The row indices written since the last clear: the only rows of the gradient that can be non-zero."""
        if self._rows is None:
            self._rows = torch.cat(self.touched).unique() if self.touched else torch.zeros(0, dtype=torch.long)
        return self._rows

    def written(self) -> torch.Tensor:
        """The non-zero part of the gradient: its norm is the whole gradient's, for a fraction of the reads."""
        return self.buffer.index_select(0, self.rows())

    def accumulate(self, ids: torch.Tensor, grad_out: torch.Tensor) -> None:
        if self.weight.grad is None:
            # A new optimizer step (zero_grad set grads to None): clear only last step's rows.
            if self.touched:
                self.buffer.index_fill_(0, self.rows(), 0.0)
                self.touched.clear()
            self.weight.grad = self.buffer
        elif self.weight.grad is not self.buffer:
            raise RuntimeError("embedding gradient replaced behind the row buffer's back")
        flat = ids.reshape(-1)
        rows = grad_out.reshape(-1, grad_out.shape[-1]).to(self.buffer.dtype)
        if self.padding_idx is not None:
            keep = flat != self.padding_idx
            flat, rows = flat[keep], rows[keep]
        self.buffer.index_add_(0, flat, rows)
        self.touched.append(flat)
        self._rows = None  # recomputed on demand; clipping's rows are reused to zero them next step


def eligible(model: torch.nn.Module, world: int) -> torch.nn.Embedding | None:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if world != 1 or type(emb) is not torch.nn.Embedding or not emb.weight.requires_grad:
        return None
    if emb.max_norm is not None or emb.scale_grad_by_freq or emb.sparse:
        return None
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None and out.weight is emb.weight:  # tied: the head's gradient lands there too
        return None
    return emb


@contextlib.contextmanager
def row_buffered(model: torch.nn.Module, world: int) -> Iterator[RowGradBuffer | None]:
    """Route the input embedding's gradient through a RowGradBuffer for the duration (None: not eligible)."""
    emb = eligible(model, world)
    if emb is None:
        yield None
        return
    owner = RowGradBuffer(emb)

    def forward(ids: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return _Rows.apply(ids, emb.weight, owner)
        return F.embedding(ids, emb.weight, emb.padding_idx)

    emb.forward = forward
    try:
        yield owner
    finally:
        del emb.forward  # back to the class's forward
        if emb.weight.grad is owner.buffer:
            emb.weight.grad = None
