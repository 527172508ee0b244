"""One command, three recipes, one table: `make bench` (or `python bench/sst2_side_by_side.py`).

Trains MiniLM-L6 for one epoch on a seeded 2,000-row SST-2 sample (batch 16, identical
hyper-parameters) with (a) the Hugging Face Trainer as tutorials write it, (b) the Trainer tuned,
(c) deltatune; evaluates each on SST-2's 872-sentence test split. Each recipe runs in its own child
process (so peak RSS is its own), one after the other, never concurrently.

Timings on a shared 2-core VM vary by 10-25% from run to run, so (b) and (c) run REPEATS times,
alternating, and the table shows the run with the median training time; (a) takes minutes and
runs once. Every individual run is listed under the table.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import HPARAMS, SST2  # noqa: E402

RECIPES = {"a": ["trainer_recipe.py", "plain"], "b": ["trainer_recipe.py", "tuned"], "c": ["deltatune_recipe.py"]}
REPEATS = 5


def run(args: list[str]) -> dict:
    done = subprocess.run([sys.executable, str(HERE / args[0]), *args[1:]], capture_output=True, text=True,
                          cwd=HERE.parent)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        sys.exit(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    if not (SST2 / "train.tsv").exists():
        sys.exit(f"SST-2 not found at {SST2}; set DELTATUNE_SHARED to the folder holding data/sst2")
    runs: dict[str, list[dict]] = {"a": [], "b": [], "c": []}
    for key in ["a"] + ["b", "c"] * REPEATS:
        print(f"running ({key}) {' '.join(RECIPES[key])} ...", flush=True)
        runs[key].append(run(RECIPES[key]))
        print(f"  {runs[key][-1]}", flush=True)
    results = {k: sorted(v, key=lambda r: r["train_seconds"])[len(v) // 2] for k, v in runs.items()}
    a, b, c = results["a"], results["b"], results["c"]
    best_acc = max(r["accuracy"] for r in results.values())
    rows = ["| recipe | precision | train s | real tokens/s | vs (a) | vs (b) | peak RSS MB | accuracy | F1 |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key, r in results.items():
        rows.append(f"| ({key}) {r['recipe']} | {r['precision']} | {r['train_seconds']:.1f} | "
                    f"{r['real_tokens_per_s']:,.0f} | {r['real_tokens_per_s'] / a['real_tokens_per_s']:.2f}x | "
                    f"{r['real_tokens_per_s'] / b['real_tokens_per_s']:.2f}x | {r['peak_rss_mb']:,.0f} | "
                    f"{r['accuracy']:.4f} | {r['f1']:.4f} |")
    verdict = (f"deltatune vs (a): {c['real_tokens_per_s'] / a['real_tokens_per_s']:.2f}x (target >= 8x); "
               f"vs (b): {c['real_tokens_per_s'] / b['real_tokens_per_s']:.2f}x (target >= 1.2x); "
               f"accuracy {c['accuracy']:.4f} vs best {best_acc:.4f} (target: within 0.01)")
    text = "\n".join([
        f"# SST-2 side by side ({time.strftime('%Y-%m-%d')})", "",
        f"Machine: {platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores, "
        f"Python {platform.python_version()}. Hyper-parameters: {json.dumps(HPARAMS)}.", "",
        *rows, "", verdict, "", "All runs (train seconds):", "",
        *[f"- ({k}): " + ", ".join(f"{r['train_seconds']:.2f}" for r in v) for k, v in runs.items()], ""])
    out = HERE / "results" / "sst2.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
