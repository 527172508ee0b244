"""`deltatune plan` against measured runs: predicted vs measured peak memory increase per rank.

    python bench/plan_validation.py                 # every configuration, writes docs/plan-table.md
    python bench/plan_validation.py --only smollm2  # the rows whose name contains a word

Each configuration is a short real run (train.max_steps=6, no evaluation, no forgetting probe, a small
data.sample), one at a time, each inside `flock /tmp/prompts/heavy.lock` when that lock exists (a shared
machine). Measured: summary.json's `memory_per_rank` (engine/memory.py: with the model loaded, the method
applied and a frozen base cast, RSS read and the kernel's peak
counter restarted; the increase is the peak since then minus that RSS), the largest rank. Predicted:
deltatune.plan.memory.estimate at the longest tokenized row of the sample (the loop runs the longest batch
first) and, for sft, its most target tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = Path("/tmp/prompts/heavy.lock")
STEPS = 6

COMMON = ["train.max_steps=6", "data.validation=null", "eval.forgetting=false", "output.overwrite=true",
          "train.log_every=1", "train.warmup=0"]
MINILM = ["task=classification", "model.name=minilm-l6", "data.train=builtin:bbc-news", "data.max_length=256",
          "data.sample=96", "train.batch_size=8", "train.lr=1e-4"]
SMOL = ["task=causal_lm", "model.name=smollm2-135m", "data.train=builtin:bbc-news", "data.text=text",
        "data.max_length=256", "data.sample=48", "train.batch_size=4", "train.lr=1e-4"]
SMOL_SFT = ["task=sft", "model.name=smollm2-135m", "data.train=builtin:movie-reviews-instruct",
            "data.max_length=160", "data.sample=96", "train.batch_size=8", "train.lr=5e-4"]
LORA = ["method.name=lora", "method.r=16", "method.alpha=32", "method.target_modules=all-linear"]
QLORA = ["method.name=qlora", "method.r=16", "method.alpha=32", "method.target_modules=all-linear"]

# (name, overrides, processes)
CONFIGS: list[tuple[str, list[str], int]] = [
    ("minilm full fp32", [*MINILM, "method.name=full", "train.precision=fp32"], 1),
    ("minilm full bf16", [*MINILM, "method.name=full", "train.precision=bf16"], 1),
    ("minilm full fp32 checkpointing", [*MINILM, "method.name=full", "train.precision=fp32",
                                        "train.gradient_checkpointing=true"], 1),
    ("minilm lora fp32", [*MINILM, *LORA, "train.precision=fp32"], 1),
    ("minilm lora bf16 (frozen fp32)", [*MINILM, *LORA, "train.precision=bf16", "model.frozen_dtype=fp32"], 1),
    ("minilm qlora bf16", [*MINILM, *QLORA, "train.precision=bf16"], 1),
    ("minilm full fp32 DDP x2", [*MINILM, "method.name=full", "train.precision=fp32"], 2),
    ("minilm lora fp32 DDP x2", [*MINILM, *LORA, "train.precision=fp32"], 2),
    ("smollm2 full fp32", [*SMOL, "method.name=full", "train.precision=fp32"], 1),
    ("smollm2 full fp32 checkpointing", [*SMOL, "method.name=full", "train.precision=fp32",
                                         "train.gradient_checkpointing=true"], 1),
    ("smollm2 lora fp32", [*SMOL, *LORA, "train.precision=fp32"], 1),
    ("smollm2 lora bf16 (frozen fp32)", [*SMOL, *LORA, "train.precision=bf16", "model.frozen_dtype=fp32"], 1),
    ("smollm2 lora bf16 checkpointing", [*SMOL, *LORA, "train.precision=bf16", "model.frozen_dtype=fp32",
                                         "train.gradient_checkpointing=true"], 1),
    ("smollm2 qlora bf16", [*SMOL, *QLORA, "train.precision=bf16"], 1),
    ("smollm2 sft lora bf16 (frozen auto)", [*SMOL_SFT, *LORA, "train.precision=bf16"], 1),
    ("smollm2 lora fp32 DDP x2", [*SMOL, *LORA, "train.precision=fp32"], 2),
]

def predicted(overrides: list[str], nproc: int) -> tuple[float, dict]:
    """The planner's peak increase per rank (MB) at the sample's longest row and most target tokens."""
    import numpy as np

    from deltatune import config, models
    from deltatune import data as data_mod
    from deltatune.constants import IGNORE_INDEX
    from deltatune.plan import memory

    cfg = config.load(None, [*overrides, *COMMON])
    tok = models.load_tokenizer(cfg.model.name)
    bundle = data_mod.build(cfg.data, tok, task=cfg.task, min_rows=cfg.train.batch_size)
    ds = bundle.train.dataset
    longest = int(max(ds["length"]))
    targets = None
    if cfg.task == "sft":
        targets = int(max(int((np.asarray(lab[1:]) != IGNORE_INDEX).sum()) for lab in ds["labels"]))
    est = memory.estimate(cfg, devices=nproc, device="cpu", seq_len=longest, target_tokens=targets)
    return est.increase / 2**20, {"seq_len": longest, "target_tokens": targets,
                                  **{k: round(v / 2**20) for k, v in est.breakdown.items()}}


def measured(name: str, overrides: list[str], nproc: int, out_dir: Path) -> dict:
    """Run it (under the heavy lock when there is one); summary.json's measured increase per rank."""
    run_dir = out_dir / name.replace(" ", "-").replace("(", "").replace(")", "")
    cmd = [sys.executable, "-m", "deltatune", "train", *overrides, *COMMON, f"output.dir={run_dir}",
           *(["--nproc", str(nproc)] if nproc > 1 else [])]
    if LOCK.exists():
        cmd = ["flock", str(LOCK), *cmd]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["failed"], "seconds": seconds}
    ranks = json.loads((run_dir / "summary.json").read_text())["memory_per_rank"]
    return {"ranks": ranks, "increase_mb": max(r["peak_increase_mb"] for r in ranks), "seconds": seconds,
            "planned_in_summary_mb": ranks[0].get("planned_increase_mb")}


def table(rows: list[dict]) -> str:
    ok = [r for r in rows if "error" not in r]
    within = sum(abs(r["error_pct"]) <= 20 for r in ok)
    lines = [
        f"# `deltatune plan` vs measured runs ({time.strftime('%Y-%m-%d')})", "",
        f"Peak memory increase per rank over the loaded model: predicted by `deltatune.plan.memory.estimate` "
        f"(config.json only, no weights) vs measured (peak RSS minus RSS after loading, largest rank), on this "
        f"CPU ({os.cpu_count()} cores). {STEPS} optimizer steps per run, no evaluation; the planner is given the "
        f"longest tokenized row of the sample (the loop runs the longest batch first). Produced by "
        f"`python bench/plan_validation.py`. Within 20%: {within} of {len(ok)}.", "",
        "| configuration | processes | predicted MB | measured MB | error | largest predicted parts (MB) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['nproc']} | {r['predicted_mb']:,.0f} | failed: {r['error'][0][:80]} "
                         f"| | |")
            continue
        parts = sorted(((v, k) for k, v in r["parts"].items() if isinstance(v, int) and k != "seq_len"
                        and k != "target_tokens"), reverse=True)[:4]
        lines.append(f"| {r['name']} | {r['nproc']} | {r['predicted_mb']:,.0f} | {r['measured_mb']:,.0f} | "
                     f"{r['error_pct']:+.1f}% | {', '.join(f'{k} {v:,}' for v, k in parts)}; "
                     f"T={r['parts']['seq_len']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="run only configurations whose name contains this")
    ap.add_argument("--out", default=str(ROOT / "docs" / "plan-table.md"))
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "plan_validation.json"))
    ap.add_argument("--reuse", action="store_true", help="predict again, but take the measurements from --json "
                    "(after changing the planner: no runs)")
    args = ap.parse_args()
    before = {r["name"]: r for r in json.loads(Path(args.json).read_text())} if args.reuse else {}
    out_dir = Path(tempfile.mkdtemp(prefix="plan-runs-"))
    rows = []
    for name, overrides, nproc in CONFIGS:
        if args.only and args.only not in name:
            continue
        pred, parts = predicted(overrides, nproc)
        if args.reuse and name not in before:
            continue
        got = ({k: before[name][k] for k in ("ranks", "increase_mb", "seconds", "summary_increase_mb",
                                             "planned_in_summary_mb", "error") if k in before[name]}
               if args.reuse else measured(name, overrides, nproc, out_dir))
        row = {"name": name, "nproc": nproc, "predicted_mb": pred, "parts": parts, **got}
        if "error" not in got:
            row["measured_mb"] = got["increase_mb"]
            row["error_pct"] = 100 * (pred - got["increase_mb"]) / got["increase_mb"]
            print(f"{name}: predicted {pred:,.0f} MB, measured {got['increase_mb']:,.0f} MB "
                  f"({row['error_pct']:+.1f}%) {parts}", flush=True)
        else:
            print(f"{name}: FAILED {got['error']}", flush=True)
        rows.append(row)
    shutil.rmtree(out_dir, ignore_errors=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=1), encoding="utf-8")
    Path(args.out).write_text(table(rows), encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
