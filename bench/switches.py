"""Each efficiency switch's effect on a short real run.

    python bench/switches.py [--rounds N] [--steps N] [--only WORD]

Two recipes, MiniLM-L6 classification and SmolLM2-135M SFT (LoRA r=16 all-linear and full fine-tuning are the
decoders' usual cases; here full fine-tuning, where the optimizer state is largest), each with the baseline
(fused AdamW) and one switch at a time: 8-bit AdamW, Adafactor, activation checkpointing, torch.compile (cold: an
empty cache; warm: the cache the cold run filled). Every variant runs in its own child process (so its memory is
its own), the variants alternate within each round, and the table reports medians over the rounds:
- steps/s and tokens/s over training time without compiling (summary.json's compute_seconds - compile_s);
- peak RSS increase: summary.json's `memory_per_rank` (the peak since the model was loaded, minus RSS then);
- compile_s (compile variants), and optimizer state (summary.json's optimizer_state_mb, when recorded).
Writes docs/efficiency-table.md. Children run under `flock /tmp/prompts/heavy.lock` when that file exists.

Check that it works (minutes, not a measurement): `python bench/switches.py --tiny`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / ".work" / "switches"
LOCK = Path("/tmp/prompts/heavy.lock")

RECIPES = {
    "minilm-l6 classification": ["task=classification", "model.name=minilm-l6", "data.train=builtin:movie-reviews",
                                 "data.sample=2000", "data.max_length=128", "train.batch_size=16", "train.lr=1e-4",
                                 "method.name=full", "train.precision=fp32"],
    "smollm2-135m sft": ["task=sft", "model.name=smollm2-135m", "data.train=builtin:movie-reviews-instruct",
                         "data.sample=800", "data.max_length=160", "train.batch_size=8", "train.lr=5e-5",
                         "method.name=full", "train.precision=fp32", "eval.forgetting=false"],
}
COMMON = ["data.validation=null", "output.overwrite=true", "train.log_every=1", "train.warmup=0"]
# (name, overrides); "compile warm" reuses the cache "compile cold" filled in the same round.
SWITCHES: list[tuple[str, list[str]]] = [
    ("baseline (fused AdamW)", []),
    ("adamw_8bit", ["train.optimizer=adamw_8bit"]),
    ("adafactor", ["train.optimizer=adafactor", "train.lr=1e-3"]),
    ("gradient checkpointing", ["train.gradient_checkpointing=true"]),
    ("compile (cold cache)", ["train.compile=true"]),
    ("compile (warm cache)", ["train.compile=true"]),
]
if torch.cuda.is_available():
    SWITCHES.insert(2, ("paged_adamw_8bit", ["train.optimizer=paged_adamw_8bit"]))

def run_one(recipe: str, switch: str, overrides: list[str], steps: int, cache: Path, extra: list[str]) -> dict:
    """One child `deltatune train`; its summary.json (memory: `memory_per_rank`, engine/memory.py)."""
    out = WORK / f"{recipe}-{switch}".replace(" ", "-").replace("(", "").replace(")", "")
    compile_cache = [f"train.compile_cache={cache}"] if "train.compile=true" in overrides else []
    cmd = [sys.executable, "-m", "deltatune", "train", *RECIPES[recipe], *COMMON, f"train.max_steps={steps}",
           *overrides, *compile_cache, *extra, f"output.dir={out}"]
    if LOCK.exists():
        cmd = ["flock", str(LOCK), *cmd]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"{recipe} / {switch} failed:\n{done.stderr[-3000:]}\n{done.stdout[-2000:]}")
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    train_s = summary["compute_seconds"] - summary.get("compile_s", 0.0)
    train_s = max(train_s, 1e-9)
    return {"steps_per_s": summary["steps"] / train_s, "tokens_per_s": summary["tokens"] / train_s,
            "increase_mb": summary["memory_per_rank"][0]["peak_increase_mb"], "compile_s": summary.get("compile_s"),
            "optimizer_state_mb": summary.get("optimizer_state_mb")}


def median(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def table(results: dict, rounds: int, steps: int, tiny: bool) -> str:
    lines = [f"# Efficiency switches, measured ({time.strftime('%Y-%m-%d')})", "",
             f"Each row: one `deltatune train` process, {steps} optimizer steps, no evaluation; medians of {rounds} "
             f"round(s), the variants alternating within each round. Training speed excludes compile time. Peak "
             f"RSS increase: peak resident memory during training minus resident memory once the model is loaded. "
             f"Produced by `python bench/switches.py` on {os.cpu_count()} CPU core(s)"
             f"{' and ' + torch.cuda.get_device_name() if torch.cuda.is_available() else ''}. See "
             f"[efficiency.md](efficiency.md) for what each switch does.", ""]
    if tiny:
        lines += ["**A `--tiny` check run (a few steps on small samples): these numbers measure nothing.**", ""]
    for recipe, by_switch in results.items():
        base = by_switch[SWITCHES[0][0]]
        b_rate, b_mem = median(base, "tokens_per_s"), median(base, "increase_mb")
        lines += [f"## {recipe}", "", "`" + " ".join(RECIPES[recipe]) + "`", "",
                  "| switch | steps/s | tokens/s | vs baseline | peak RSS increase | vs baseline | compile s "
                  "| optimizer state |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for switch, rows in by_switch.items():
            rate, mem, comp, opt = (median(rows, k) for k in ("tokens_per_s", "increase_mb", "compile_s",
                                                               "optimizer_state_mb"))
            lines.append(f"| {switch} | {median(rows, 'steps_per_s'):.2f} | {rate:,.0f} | {rate / b_rate:.2f}x | "
                         f"{mem:,.0f} MB | {mem / max(b_mem, 1e-9):.2f}x | "
                         f"{'-' if not comp else f'{comp:.0f}'} | {'-' if opt is None else f'{opt:,.0f} MB'} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--only", default="", help="only the recipes and switches whose name contains this word")
    ap.add_argument("--skip", action="append", default=[], help="leave out `RECIPE / SWITCH` pairs containing this "
                    "(repeatable), e.g. --skip 'smollm2-135m sft / compile'")
    ap.add_argument("--tiny", action="store_true", help="check that the bench works: 2 steps on 32 rows, 1 round, "
                    "no compile; writes nothing to docs/")
    args = ap.parse_args()
    extra = ["data.sample=32"] if args.tiny else []
    rounds, steps = (1, 2) if args.tiny else (args.rounds, args.steps)
    switches = [s for s in SWITCHES if not (args.tiny and "compile" in s[0])]
    results: dict[str, dict[str, list[dict]]] = {}
    for _ in range(rounds):
        for recipe in RECIPES:
            cache = Path(tempfile.mkdtemp(prefix="switch-compile-cache-"))  # cold in each round, warm after
            for switch, overrides in switches:
                if args.only and args.only not in recipe and args.only not in switch:
                    continue
                if any(word in f"{recipe} / {switch}" for word in args.skip):
                    continue
                print(f"{recipe} / {switch} ...", flush=True)
                row = run_one(recipe, switch, overrides, steps, cache, extra)
                results.setdefault(recipe, {}).setdefault(switch, []).append(row)
                print(f"  {row['tokens_per_s']:,.0f} tokens/s, +{row['increase_mb']:,.0f} MB"
                      + (f", compile {row['compile_s']:.0f} s" if row.get("compile_s") else ""), flush=True)
            shutil.rmtree(cache, ignore_errors=True)
    results = {r: s for r, s in results.items() if SWITCHES[0][0] in s}
    text = table(results, rounds, steps, args.tiny)
    target = WORK / "efficiency-table.md" if args.tiny else ROOT / "docs" / "efficiency-table.md"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text + "\n", encoding="utf-8")
    print(text)
    print(f"written: {target}")


if __name__ == "__main__":
    main()
