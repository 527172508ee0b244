"""One command, three recipes, one table: `make bench` (or `python bench/sst2_side_by_side.py`).

Trains MiniLM-L6 for one epoch on a seeded 2,000-row SST-2 sample (batch 16, identical
hyper-parameters) with (a) the Hugging Face Trainer as tutorials write it, (b) the Trainer tuned,
(c) deltatune; evaluates each on SST-2's 872-sentence test split. Each recipe runs in its own child
process (so peak RSS is its own), one after the other, never concurrently.

Two times per run: the training call (in-loop, what tokens/s is computed from) and the whole process as a
user times the command (interpreter start, imports, reading and tokenizing, model load, training, saving,
test evaluation, exit), measured here around the child process. The sample files and the token count are
made once here, before any recipe starts, so neither time includes benchmark bookkeeping.

Timings on a shared 2-core VM vary by 10-25% from run to run, so (b) and (c) run REPEATS times,
alternating, and the table shows the run with the median training time (with that run's process time);
(a) takes minutes and runs once. Every individual run is listed under the table.

    python bench/sst2_side_by_side.py [--repeats N] [--skip-plain] [--rows N|all]

`--rows all` trains on the whole train.tsv (60,614 rows; about 5-10 minutes per run here) and writes
results/sst2-all.md instead of results/sst2.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
# `--rows` must reach common.HPARAMS (and the children) before common is imported.
if "--rows" in sys.argv[:-1]:
    os.environ["DELTATUNE_BENCH_ROWS"] = sys.argv[sys.argv.index("--rows") + 1]
from common import HPARAMS, SST2, prepare, read_tsv, real_tokens  # noqa: E402

RECIPES = {"a": ["trainer_recipe.py", "plain"], "b": ["trainer_recipe.py", "tuned"], "c": ["deltatune_recipe.py"]}
REPEATS = 5


def run(args: list[str]) -> dict:
    """One recipe in a child process; its result plus `process_seconds`, the child's whole wall time."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, str(HERE / args[0]), *args[1:]], capture_output=True, text=True,
                          cwd=HERE.parent)
    seconds = time.perf_counter() - t0
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        sys.exit(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return {**json.loads(lines[-1].removeprefix("RESULT ")), "process_seconds": round(seconds, 2)}


def epoch_tokens(train_file: Path) -> int:
    """Non-pad tokens in the training epochs: the same work for every recipe, counted once."""
    from deltatune.models import load_tokenizer

    return real_tokens(load_tokenizer(HPARAMS["model"]), [r["text"] for r in read_tsv(train_file)]) * HPARAMS["epochs"]


def table(results: dict[str, dict]) -> list[str]:
    a, b = results.get("a"), results["b"]
    rows = ["| recipe | precision | train s (loop) | process s (whole) | outside loop s | real tokens/s (loop) | "
            "vs (a) | vs (b) loop | vs (b) whole | peak RSS MB | accuracy | F1 |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, r in results.items():
        vs_a = f"{r['real_tokens_per_s'] / a['real_tokens_per_s']:.2f}x" if a else "-"
        rows.append(f"| ({key}) {r['recipe']} | {r['precision']} | {r['train_seconds']:.1f} | "
                    f"{r['process_seconds']:.1f} | {r['process_seconds'] - r['train_seconds']:.1f} | "
                    f"{r['real_tokens_per_s']:,.0f} | {vs_a} | "
                    f"{r['real_tokens_per_s'] / b['real_tokens_per_s']:.2f}x | "
                    f"{b['process_seconds'] / r['process_seconds']:.2f}x | {r['peak_rss_mb']:,.0f} | "
                    f"{r['accuracy']:.4f} | {r['f1']:.4f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=REPEATS, help="alternating runs of (b) and (c)")
    parser.add_argument("--skip-plain", action="store_true", help="leave out (a), which takes minutes")
    parser.add_argument("--rows", default="2000", help="training rows sampled from train.tsv, or 'all' (read above, "
                        "through DELTATUNE_BENCH_ROWS, so the child recipes see it)")
    opts = parser.parse_args()
    if not (SST2 / "train.tsv").exists():
        sys.exit(f"SST-2 not found at {SST2}; set DELTATUNE_SHARED to the folder holding data/sst2")
    files = prepare()
    tokens = epoch_tokens(files["train"])
    keys = ([] if opts.skip_plain else ["a"]) + ["b", "c"] * opts.repeats
    runs: dict[str, list[dict]] = {k: [] for k in dict.fromkeys(keys)}
    for key in keys:
        print(f"running ({key}) {' '.join(RECIPES[key])} ...", flush=True)
        r = run(RECIPES[key])
        r["real_tokens_per_s"] = round(tokens / r["train_seconds"], 1)
        runs[key].append(r)
        print(f"  {r}", flush=True)
    results = {k: sorted(v, key=lambda r: r["train_seconds"])[len(v) // 2] for k, v in runs.items()}
    a, b, c = results.get("a"), results["b"], results["c"]
    best_acc = max(r["accuracy"] for r in results.values())
    median_process = {k: statistics.median(r["process_seconds"] for r in v) for k, v in runs.items()}
    verdict = ((f"deltatune vs (a): {c['real_tokens_per_s'] / a['real_tokens_per_s']:.2f}x (target >= 8x); "
                if a else "") +
               f"vs (b): {c['real_tokens_per_s'] / b['real_tokens_per_s']:.2f}x in the loop (target >= 1.2x), "
               f"{median_process['b'] / median_process['c']:.2f}x over the whole process (medians "
               f"{median_process['c']:.1f} s vs {median_process['b']:.1f} s); "
               f"accuracy {c['accuracy']:.4f} vs best {best_acc:.4f} (target: within 0.01)")
    text = "\n".join([
        f"# SST-2 side by side ({time.strftime('%Y-%m-%d')})", "",
        f"Machine: {platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores, "
        f"Python {platform.python_version()}. Hyper-parameters: {json.dumps(HPARAMS)}.", "",
        *table(results), "", verdict, "",
        "All runs (train seconds in the loop / whole-process seconds):", "",
        *[f"- ({k}): " + ", ".join(f"{r['train_seconds']:.2f} / {r['process_seconds']:.2f}" for r in v)
          for k, v in runs.items()], ""])
    out = HERE / "results" / ("sst2.md" if opts.rows == "2000" else f"sst2-{opts.rows}.md")
    out.parent.mkdir(exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
