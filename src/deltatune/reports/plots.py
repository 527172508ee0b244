"""PNG plots for reports, drawn with matplotlib's Agg canvas.

Figures are built with `matplotlib.figure.Figure` directly, not pyplot: no global figure state, no GUI
backend chosen at import, so reports can be drawn from any thread or process (Agg renders the PNG).
"""

from __future__ import annotations

import io
from collections.abc import Sequence

from matplotlib.figure import Figure

SIZE = (6.4, 3.6)


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    # No metadata: the same data gives the same bytes (no matplotlib version or date inside).
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


def lines(series: Sequence[tuple[str, Sequence[float], Sequence[float]]], title: str, xlabel: str, ylabel: str,
          logy: bool = False, markers: bool = False) -> bytes:
    """One line per (label, xs, ys); a legend when there is more than one."""
    fig = Figure(figsize=SIZE)
    ax = fig.subplots()
    for label, xs, ys in series:
        ax.plot(list(xs), list(ys), label=label, marker="o" if markers else None, markersize=3)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if logy:
        ax.set_yscale("log")
    if len(series) > 1:
        ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return _png(fig)


def confusion(matrix: Sequence[Sequence[int]], labels: Sequence[str]) -> bytes:
    """Rows: true label, columns: predicted label; each cell shows its count."""
    n = len(labels)
    side = min(9.0, 2.5 + 0.5 * n)
    fig = Figure(figsize=(side, side))
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, shrink=0.8)
    ax.set_xticks(range(n), labels, rotation=45, ha="right")
    ax.set_yticks(range(n), labels)
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix (validation)")
    top = max((max(row) for row in matrix), default=0) or 1
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            ax.text(j, i, str(count), ha="center", va="center", color="white" if count > top / 2 else "black")
    return _png(fig)


def histogram(values: Sequence[int], title: str, xlabel: str, limit: int | None = None) -> bytes:
    """A histogram of `values`, with a dashed line at `limit` (e.g. data.max_length)."""
    fig = Figure(figsize=SIZE)
    ax = fig.subplots()
    ax.hist(list(values), bins=min(40, max(1, len(set(values)))), color="#4c72b0")
    if limit is not None:
        ax.axvline(limit, color="#c44e52", linestyle="--", label=f"limit {limit}")
        ax.legend(fontsize="small")
    ax.set(title=title, xlabel=xlabel, ylabel="rows")
    ax.grid(alpha=0.3)
    return _png(fig)


def tradeoff(points: Sequence[tuple[str, float, float]], front: Sequence[int], title: str, xlabel: str, ylabel: str,
             logx: bool = False) -> bytes:
    """Scatter of (label, cost, quality); the points in `front` are joined as the Pareto front."""
    fig = Figure(figsize=SIZE)
    ax = fig.subplots()
    ax.scatter([p[1] for p in points], [p[2] for p in points], color="#4c72b0", zorder=3)
    for label, x, y in points:
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize="small")
    on_front = sorted((points[i] for i in front), key=lambda p: p[1])
    if on_front:
        ax.plot([p[1] for p in on_front], [p[2] for p in on_front], color="#c44e52", marker="o", linestyle="--",
                label="Pareto front", zorder=4)
        ax.legend(fontsize="small")
    if logx:
        ax.set_xscale("log")
    ax.margins(0.12)  # room for the labels of the outermost points
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    return _png(fig)
