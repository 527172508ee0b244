"""SmolLM2-135M-Instruct on movie-review sentiment phrased as instructions: LoRA vs full fine-tuning.

`python bench/smollm2_sentiment.py [--reuse]` runs configs/smollm2-sentiment-{lora,full}.yaml (and the
full recipe again at lr 1e-4), each in its own process, one after the other, and writes
docs/decoders-table.md: zero-shot accuracy of the base model (measured at step 0 of each run: the
same base, so they must agree), accuracy after tuning (answers generated greedily, scored by the
label they name first), exact match (the answer is exactly the label word), trainable parameters,
training time, peak RSS, and the forgetting probe (perplexity on 32 BBC News articles before and
after).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from common import train_recipe

ROOT = Path(__file__).resolve().parents[1]
# (label, recipe, overrides): full fine-tuning also at a 3x higher learning rate, to show how much of
# the forgetting comes from how far the weights are moved rather than from which weights move.
RUNS = [("lora", "smollm2-sentiment-lora", []), ("full", "smollm2-sentiment-full", []),
        ("full-lr1e-4", "smollm2-sentiment-full", ["train.lr=1e-4"])]


def main() -> None:
    rows = []
    for label, recipe, overrides in RUNS:
        print(f"training {label} ...", flush=True)
        rows.append(train_recipe(recipe, "decoders", "--reuse" in sys.argv, overrides, label))
    generated = rows[0]["best_metrics"].get("generated_rows", 0)
    lines = [f"# SmolLM2-135M: LoRA vs full fine-tuning ({time.strftime('%Y-%m-%d')})", "",
             f"Task: builtin:movie-reviews-instruct (\"Classify the sentiment of this movie review. Answer with one "
             f"word: positive or negative.\"), trained on a seeded sample of {rows[0]['data']['train_rows']:,} rows "
             f"for one epoch; accuracy from answers generated greedily for {generated} "
             f"held-out reviews. 2-core CPU, bf16 autocast, one run at a time. Produced by "
             f"`python bench/smollm2_sentiment.py`.", "",
             "| method | trainable params | zero-shot accuracy | tuned accuracy | tuned exact match | train time "
             "| tokens/s | peak RSS | general-text perplexity before -> after | change |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (_, recipe, overrides), r in zip(RUNS, rows):
        zero = r["evals"][0]
        best = r["best_metrics"]
        f = r["forgetting"]
        how = f"`configs/{recipe}.yaml`" + "".join(f" `{o}`" for o in overrides)
        lines.append(f"| {r['method']} ({how}, lr {r['param_groups'][0]['lr']:g}) | {r['trainable_params']:,} "
                     f"({r['trainable_percent']:.2f}%) | {zero['label_accuracy']:.4f} | {best['label_accuracy']:.4f} "
                     f"| {best['exact_match']:.4f} | {r['train_seconds']:.0f} s | {r['tokens_per_s']:.0f} "
                     f"| {r['peak_rss_mb']:,.0f} MB | {f['perplexity_before']:.2f} -> {f['perplexity_after']:.2f} "
                     f"| {f['change_percent']:+.2f}% |")
    lines += ["", "Sample answers after tuning (first validation rows):", ""]
    for (label, _, _), r in zip(RUNS, rows):
        zero, best = r["evals"][0], r["best_metrics"]
        lines.append(f"- {label}: zero-shot " + "; ".join(f"\"{s['answer']}\" ({s['reference']})"
                                                             for s in zero["samples"])
                     + " / tuned " + "; ".join(f"\"{s['answer']}\" ({s['reference']})" for s in best["samples"]))
    text = "\n".join(lines) + "\n"
    (ROOT / "docs" / "decoders-table.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
