"""LoRA vs full fine-tuning, side by side: training tokens/s and peak training memory.

`python bench/peft_efficiency.py [--rounds 3] [--steps 20] [--with-before]` trains, one process at a time and
alternating recipes round after round, on the same config, data, steps, batch and precision, changing only
`method`:

- SmolLM2-135M sft (configs/smollm2-sentiment-full.yaml): full fine-tuning, LoRA r=16 all-linear as it now
  runs, and with `--with-before` LoRA with the defaults it had before issue 13 (dropout 0.05, frozen base kept
  in fp32 under autocast; peft's per-layer input cast, since removed, cannot be switched back on);
- MiniLM-L6 classification (configs/quickstart.yaml): full fine-tuning and LoRA r=8.

Evaluation, the forgetting probe and the validation split are off (data.validation=null), so the numbers are
the training steps alone: tokens/s is summary.json `tokens_per_s` (non-pad tokens over the time inside optimizer
steps), memory is `memory_per_rank[0].peak_increase_mb` (peak RSS after the model was loaded and the method
applied, minus RSS at that point). Medians over the rounds, and the median of the per-round ratios (each round's
runs are neighbours in time, so their ratio cancels much of the machine's drift); writes
docs/peft-efficiency-table.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from common import train_recipe

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["data.validation=null", "eval.at_start=false", "eval.forgetting=false"]
LORA16 = ["method.name=lora", "method.r=16", "method.alpha=32", "method.target_modules=all-linear"]
BEFORE = ["method.dropout=0.05", "model.frozen_dtype=fp32"]  # LoRA's defaults before issue 13
# (model label, recipe, label, overrides); the first of each model is the reference the others are compared to.
RECIPES = [
    ("smollm2-135m sft", "smollm2-sentiment-full", "full", []),
    ("smollm2-135m sft", "smollm2-sentiment-full", "lora r=16 all-linear", LORA16),
    ("smollm2-135m sft", "smollm2-sentiment-full", "lora r=16, dropout 0.05, fp32 frozen base", LORA16 + BEFORE),
    ("minilm-l6 classification", "quickstart", "full", []),
    ("minilm-l6 classification", "quickstart", "lora r=8", ["method.name=lora", "method.r=8", "method.alpha=16"]),
]


def run_all(rounds: int, steps: int, recipes: list[int]) -> dict[int, list[dict]]:
    results: dict[int, list[dict]] = {i: [] for i in recipes}
    for r in range(rounds):
        for i in recipes:
            model, recipe, label, overrides = RECIPES[i]
            print(f"round {r + 1}/{rounds}: {model}, {label} ...", flush=True)
            s = train_recipe(recipe, "peft-efficiency", False,
                             [*QUIET, f"train.max_steps={steps}", *overrides], f"{i}")
            results[i].append(s)
            mem = s["memory_per_rank"][0]
            print(f"  {s['tokens_per_s']:.0f} tokens/s, peak increase {mem['peak_increase_mb']:,.0f} MB, "
                  f"frozen {s['frozen_dtype']}", flush=True)
    return results


def median(runs: list[dict], key) -> float:
    return statistics.median(key(s) for s in runs)


def table(results: dict[int, list[dict]], rounds: int, steps: int) -> str:
    lines = [f"# LoRA vs full fine-tuning: speed and memory ({time.strftime('%Y-%m-%d')})", "",
             f"Produced by `python bench/peft_efficiency.py --rounds {rounds} --steps {steps}`: {steps} optimizer "
             f"steps per run, recipes alternated, medians of {rounds} rounds, one process at a time on the 2-core CPU. "
             f"Same config, data, steps, batch and precision in each group; only `method` changes. Memory is the "
             f"peak RSS increase over the model as loaded (what training adds).", "",
             "| model, task | method | trainable params | precision | frozen base | tokens/s | vs full | "
             "vs full, median of per-round ratios | peak memory increase | vs full |",
             "|---|---|---:|---|---|---:|---:|---:|---:|---:|"]
    ref = None
    for i, runs in results.items():
        model, _, label, _ = RECIPES[i]
        speed = median(runs, lambda s: s["tokens_per_s"])
        mem = median(runs, lambda s: s["memory_per_rank"][0]["peak_increase_mb"])
        if label == "full":
            ref, ref_speed, ref_mem = runs, speed, mem
        paired = statistics.median(s["tokens_per_s"] / f["tokens_per_s"] for s, f in zip(runs, ref, strict=True))
        s = runs[0]
        lines.append(f"| {model} | {label} | {s['trainable_params']:,} | {s['precision']} | {s['frozen_dtype']} "
                     f"| {speed:,.0f} | {speed / ref_speed:.2f}x | {paired:.2f}x | {mem:,.0f} MB | "
                     f"{100 * mem / ref_mem:.0f}% |")
    lines += ["", "Per round (tokens/s; peak increase MB):", ""]
    for i in results:
        model, _, label, _ = RECIPES[i]
        lines.append(f"- {model}, {label}: " + ", ".join(
            f"{s['tokens_per_s']:.0f}; {s['memory_per_rank'][0]['peak_increase_mb']:,.0f}" for s in results[i]))
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--with-before", action="store_true", help="also LoRA with its pre-issue-13 defaults")
    args = ap.parse_args()
    recipes = [i for i, r in enumerate(RECIPES) if args.with_before or "dropout 0.05" not in r[2]]
    text = table(run_all(args.rounds, args.steps, recipes), args.rounds, args.steps)
    (ROOT / "docs" / "peft-efficiency-table.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
