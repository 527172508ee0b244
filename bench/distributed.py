"""What sharding saves: per-rank peak memory and tokens/s of SmolLM2-135M, 1 process vs 2 under each engine.

`python bench/distributed.py [--rounds N] [--steps N]` trains configs/smollm2-sentiment-{full,lora}.yaml for a
few optimizer steps at one global batch of 8 (1 process x batch 8; 2 processes x batch 4), fp32 so that the
arithmetic below is exact, without evaluation, as: one process; DDP x2; FSDP2 x2; DeepSpeed ZeRO-2 x2 and
ZeRO-3 x2 — each in its own torchrun, one after another, alternating the order over rounds; the table reports
medians and is written to docs/distributed-table.md.

What each rank holds after training (summary.json `live_tensor_mb_per_rank`: every tensor storage alive in
the process, counted once) against the ZeRO paper's arithmetic for fp32 + AdamW on N ranks: weights 4 bytes
per parameter, Adam moments 8 per trainable one; one process and DDP keep all of it on every rank, ZeRO-1/2
divide the optimizer state by N, ZeRO-3 and FSDP2 divide everything by N. (During a step gradients add 4 bytes
per trainable parameter, divided by N under ZeRO-2/3 and FSDP2.) Peak RSS is shown too, but it is set by
loading the model whole (SmolLM2 is read from a GGUF file and converted) and by allocator slack, before any
engine shards anything.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / ".work" / "distributed"
MODES = [("1 process", 1, []), ("DDP x2", 2, ["train.distributed=ddp"]),
         ("FSDP2 x2", 2, ["train.distributed=fsdp"]),
         ("ZeRO-2 x2", 2, ["train.distributed=deepspeed", "train.zero_stage=2"]),
         ("ZeRO-3 x2", 2, ["train.distributed=deepspeed", "train.zero_stage=3"])]
GB = 1e9


def run(method: str, label: str, nproc: int, extra: list[str], steps: int) -> dict:
    out = WORK / method / label.replace(" ", "_")
    args = [str(ROOT / "configs" / f"smollm2-sentiment-{method}.yaml"), f"output.dir={out}", "output.overwrite=true",
            "data.validation=null", "data.sample=256", f"train.max_steps={steps}", f"train.batch_size={8 // nproc}",
            "train.precision=fp32", "train.log_every=1", "eval.forgetting=false", "eval.at_start=false", *extra]
    launcher = [sys.executable, "-m", "deltatune", "train"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m",
        "deltatune", "train"]
    threads = str(max(1, (os.cpu_count() or 2) // nproc))
    done = subprocess.run([*launcher, *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": threads})
    if done.returncode != 0:
        sys.exit(f"{method} {label} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads((out / "summary.json").read_text())


def expected_gb(trainable: int, total: int, label: str) -> float:
    """Weights and Adam state per rank after training (fp32; 2 ranks), from the arithmetic."""
    weights, adam = 4 * total, 8 * trainable
    if label.startswith(("ZeRO-3", "FSDP2")):
        return (weights + adam) / 2 / GB
    if label.startswith("ZeRO-2"):
        return (weights + adam / 2) / GB
    return (weights + adam) / GB


def main() -> None:
    rounds = int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else 1
    steps = int(sys.argv[sys.argv.index("--steps") + 1]) if "--steps" in sys.argv else 6
    results: dict[tuple[str, str], list[dict]] = {}
    for r in range(rounds):
        order = MODES if r % 2 == 0 else MODES[::-1]
        for method in ("full", "lora"):
            for label, nproc, extra in order:
                print(f"round {r + 1}: {method} {label} ...", flush=True)
                results.setdefault((method, label), []).append(run(method, label, nproc, extra, steps))
    write_table(results, rounds, steps)


def write_table(results: dict[tuple[str, str], list[dict]], rounds: int, steps: int) -> None:
    lines = [f"# Distributed training: what sharding saves ({time.strftime('%Y-%m-%d')})", "",
             f"SmolLM2-135M-Instruct (`configs/smollm2-sentiment-{{full,lora}}.yaml`), {steps} optimizer steps at a "
             f"global batch of 8 (1 process x 8, or 2 processes x 4), fp32, this 2-core CPU (gloo; one torch thread "
             f"per rank with 2 ranks, two with one), median of {rounds} round(s). Produced by "
             f"`python bench/distributed.py --rounds {rounds} --steps {steps}`.", "",
             "*Held after training* is every tensor alive in the rank at the end (weights, optimizer state, the "
             "engine's buffers), largest rank; *expected* is weights + Adam moments from the arithmetic. Peak RSS "
             "is set by loading the model whole before any sharding (see bench/README.md).", "",
             "| method | engine | what runs (summary.json) | expected per rank | held after training | "
             "x of DDP: expected / held | peak RSS per rank | tokens/s |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for method in ("full", "lora"):
        first = results[(method, "DDP x2")][0]
        ddp_exp = expected_gb(first["trainable_params"], first["total_params"], "DDP x2")
        ddp_held = statistics.median(max(s["live_tensor_mb_per_rank"]) for s in results[(method, "DDP x2")])
        for label, _, _ in MODES:
            runs = results[(method, label)]
            d = runs[0]["distributed"]
            what = d["wrapper"] + (f", ZeRO {d['zero_stage']}" if d.get("zero_stage") else "") + \
                f"; sharding: {d['sharding']}"
            exp = expected_gb(runs[0]["trainable_params"], runs[0]["total_params"], label)
            held = statistics.median(max(x["live_tensor_mb_per_rank"]) for x in runs)
            rss = statistics.median(max(x["peak_rss_mb_per_rank"]) for x in runs)
            rate = statistics.median(x["tokens_per_s"] for x in runs)
            lines.append(f"| {method} | {label} | {what} | {exp * 1000:,.0f} MB | {held * 1.048576:,.0f} MB | "
                         f"{exp / ddp_exp:.2f} / {held / ddp_held:.2f} | {rss:,.0f} MB | {rate:,.0f} |")
    text = "\n".join(lines) + "\n"
    (ROOT / "docs" / "distributed-table.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
