"""Load test of `deltatune serve` (issue 14): many concurrent clients over three adapters, on loopback.

    python bench/serve_load.py [--clients 200] [--seconds 30] [--rounds 1] [--quick]

1. Trains (or reuses, under bench/.work/serve/) three MiniLM-L6 classification adapters on
   builtin:movie-reviews with `deltatune.api.train` -- LoRA r=8 twice (other seeds) and IA3, 40 steps each:
   they only need to exist -- and three full fine-tunes (10 steps, other seeds), the storage table's "full models".
2. Starts the real command line, `python -m deltatune serve`, on 127.0.0.1 and a free port, serving the three
   adapters: dynamic batching (--max-batch 32, the default) and one request per batch (--max-batch 1); then
   lora-a alone, unmerged and merged (--merge lora-a: the hot-adapter fast path). A fresh server per mode, ROUNDS
   times, in that order.
3. Drives each from a separate client process: CLIENTS asyncio tasks, each with its own httpx.AsyncClient
   (one keep-alive connection), loop POST /v1/classify with one short text to a random adapter. A warm-up
   phase first (not counted), then SECONDS measured: requests/s, latency percentiles, and every answer that
   is not a 200 with one classified row counted as an error, by status (429 included). GET /metrics before
   and after the measured phase gives the mean batch size the server formed; /proc gives the CPU time the
   server and the client used in it (100% of a core on the client side means the client set the pace).
4. Storage: adapters vs full models on disk (artifact directories, the base once) and in RAM (the server's
   RSS after answering one request per served name, with 1, 2 and 10 LoRA adapters, 1 and 10 IA3, the 3
   adapters, lora-a merged, and 1 and 3 full models -- the same run served under several names: LoRA is loaded
   once per name, other models share all their equal tensors).
Writes docs/serve-table.md (`--quick`: bench/.work/serve/serve-table-quick.md) and prints it.

Cores: this machine has 2; by default the server is pinned to CPU 1 with one torch thread and the client
process to CPU 0 (--server-cpus / --client-cpus), so neither steals the other's core. When
/tmp/prompts/heavy.lock exists the whole run holds it (fcntl); do not wrap the script in `flock` as well.

Check that the script works (about a minute when the runs exist): `python bench/serve_load.py --quick`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import os
import platform
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / ".work" / "serve"
TABLE = ROOT / "docs" / "serve-table.md"
LOCK = Path("/tmp/prompts/heavy.lock")

COMMON = ["task=classification", "model.name=minilm-l6", "data.train=builtin:movie-reviews", "data.sample=640",
          "data.validation=null", "data.max_length=64", "train.batch_size=16", "train.max_steps=40",
          "train.warmup=0", "train.precision=fp32", "train.threads=2", "train.log_every=10",
          "output.overwrite=true"]
ADAPTERS = {  # served name -> overrides. Two LoRAs share one base in the server; IA3 is served on its own copy
    "lora-a": ["method.name=lora", "method.r=8", "train.seed=1", "train.lr=1e-3"],
    "lora-b": ["method.name=lora", "method.r=8", "train.seed=2", "train.lr=1e-3"],
    "ia3": ["method.name=ia3", "train.seed=3", "train.lr=3e-3"],
}
FULLS = {f"full-{i}": ["method.name=full", "train.max_steps=10", "train.lr=5e-5", f"train.seed={3 + i}"]
         for i in (1, 2, 3)}  # three different full fine-tunes: the storage table's "N full models"
BATCHED, SINGLE = "dynamic batching (--max-batch 32)", "batch size 1 (--max-batch 1)"
HOT, HOT_MERGED = "one LoRA adapter (lora-a), unmerged", "one LoRA adapter (lora-a), --merge lora-a"
MODES = {BATCHED: ["--max-batch", "32"], SINGLE: ["--max-batch", "1"]}  # over the 3 adapters
HOT_MODES = {HOT: [], HOT_MERGED: ["--merge", "lora-a"]}  # lora-a alone, every request to it, batching on
# What the RAM table's rows served. The same run under several names: LoRA adapters are loaded once per name
# into the pooled model; other models share every equal tensor, so IA3 x10 costs its per-model bookkeeping.
THREE, AFTER = "the 3 adapters (2 LoRA + IA3)", "the 3 adapters, after the load test"
LORA_10, IA3_10 = "10 LoRA (lora-a under 10 names)", "10 IA3 (ia3 under 10 names: its vectors shared too)"
FULL_3, MERGED = "3 full models (3 different full fine-tunes)", "lora-a, and lora-a merged as lora-a-hot (--merge)"
TEXTS = ["a warm, funny film", "dull and far too long", "the actors were superb", "I want my two hours back",
         "a quiet, moving story", "the plot makes no sense", "beautifully shot and well acted", "boring",
         "one of the best films this year", "the dialogue was painful", "charming from start to finish",
         "a mess of a movie", "it made me laugh and cry", "predictable and flat", "a small masterpiece",
         "not worth the ticket"]


# -- runs ------------------------------------------------------------------------------------------------

def trained(name: str, overrides: list[str]) -> Path:
    """WORK/name, trained with COMMON + overrides unless a finished run with the same recipe is there."""
    out, stamp = WORK / name, WORK / f"{name}.recipe.json"
    recipe = [*COMMON, *overrides]
    if (out / "summary.json").exists() and stamp.exists() and json.loads(stamp.read_text()) == recipe:
        return out
    from deltatune import api, config

    started = time.perf_counter()
    api.train(config.load(None, [*recipe, f"output.dir={out}"]))
    stamp.write_text(json.dumps(recipe))
    print(f"trained {name} in {time.perf_counter() - started:.0f} s", flush=True)
    return out


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def weights_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


# -- the server ------------------------------------------------------------------------------------------

def pinned(cpus: set[int] | None):
    return None if cpus is None else (lambda: os.sched_setaffinity(0, cpus))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m deltatune serve ...` in its own process, pinned to `cpus`; its log goes to WORK/<label>.log."""

    def __init__(self, label: str, args: list[str], cpus: set[int] | None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = WORK / f"{label}.log"
        threads = str(len(cpus or os.sched_getaffinity(0)))  # torch's default is every core, not the pinned ones
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
               "TOKENIZERS_PARALLELISM": "false"}
        cmd = [sys.executable, "-m", "deltatune", "serve", "--base", "minilm-l6", "--allowed-root", str(WORK),
               "--host", "127.0.0.1", "--port", str(self.port), *args]
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         preexec_fn=pinned(cpus))
        self.pid = self.proc.pid

    def wait_ready(self, timeout_s: float = 180) -> None:
        import httpx

        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"the server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            time.sleep(0.5)
        self.stop()
        sys.exit(f"the server did not answer /healthz within {timeout_s:.0f} s; its log: {self.log}")

    def answer_once(self, names: list[str]) -> None:
        """One request per served run (lazy allocations happen on the first forward), checked."""
        import httpx

        for name in names:
            r = httpx.post(f"{self.url}/v1/classify", json={"adapter": name, "texts": TEXTS[:1]}, timeout=60)
            if r.status_code != 200:
                self.stop()
                sys.exit(f"{name}: {r.status_code} {r.text}")

    def memory_mb(self) -> dict[str, float]:
        """VmRSS (now), VmHWM (peak), and RSS in anonymous memory and in mapped files, of the server, in MiB; and
        the weights its served models hold, each tensor counted once (GET /v1/models `weights_mb`)."""
        import httpx

        fields = dict(line.split(":", 1) for line in Path(f"/proc/{self.pid}/status").read_text().splitlines())
        out = {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}
        return {**out, "weights": httpx.get(f"{self.url}/v1/models", timeout=30).json()["weights_mb"]}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # graceful: in-flight requests are answered first
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -- the clients (a separate process: `--drive URL`) -----------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (/proc/PID/stat fields 14 and 15)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def batch_rows(metrics_text: str) -> tuple[float, float]:
    """(rows, batches) so far for classification, from deltatune_batch_rows_{sum,count}{kind="classify"}."""
    found = {}
    for part in ("sum", "count"):
        m = re.search(rf'^deltatune_batch_rows_{part}{{kind="classify"}} (\S+)$', metrics_text, re.M)
        found[part] = float(m.group(1)) if m else 0.0
    return found["sum"], found["count"]


async def client(http, adapters: list[str], deadline: float, rng: random.Random, out: list) -> None:
    import httpx

    while time.perf_counter() < deadline:
        body = {"adapter": rng.choice(adapters), "texts": [rng.choice(TEXTS)]}
        start = time.perf_counter()
        try:
            r = await http.post("/v1/classify", json=body)
            if r.status_code == 200:  # a 200 must hold the one row asked for, labelled
                rows = r.json()["results"]
                status = "200" if len(rows) == 1 and rows[0]["label"] else "200 without a labelled row"
            else:
                status = str(r.status_code)
        except httpx.HTTPError as e:
            status = type(e).__name__
        out.append((time.perf_counter() - start, status))


async def phase(url: str, adapters: list[str], clients: int, seconds: float, seed: int) -> tuple[list, float]:
    """All clients loop until `seconds` have passed (requests in flight then are finished and counted)."""
    import httpx

    out: list = []
    https = [httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=1))
             for _ in range(clients)]
    try:
        start = time.perf_counter()
        await asyncio.gather(*(client(h, adapters, start + seconds, random.Random(seed * 100_003 + i), out)
                               for i, h in enumerate(https)))
        return out, time.perf_counter() - start
    finally:
        await asyncio.gather(*(h.aclose() for h in https))


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


async def drive(url: str, adapters: list[str], clients: int, seconds: float, warmup: float, server_pid: int) -> dict:
    import httpx

    await phase(url, adapters, clients, warmup, seed=1)  # connections, first forwards: not counted
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        before = batch_rows((await http.get("/metrics")).text)
        cpu_server, cpu_client = cpu_seconds(server_pid), time.process_time()
        done, wall = await phase(url, adapters, clients, seconds, seed=2)
        cpu_server, cpu_client = cpu_seconds(server_pid) - cpu_server, time.process_time() - cpu_client
        after = batch_rows((await http.get("/metrics")).text)
    if not done:
        sys.exit("no request was answered")
    latencies = sorted(s for s, _ in done)
    statuses: dict[str, int] = {}
    for _, status in done:
        statuses[status] = statuses.get(status, 0) + 1
    rows, batches = after[0] - before[0], after[1] - before[1]
    return {"clients": clients, "seconds": round(wall, 2), "requests": len(done),
            "requests_per_s": len(done) / wall, "errors": len(done) - statuses.get("200", 0), "statuses": statuses,
            "p50_ms": 1000 * percentile(latencies, 0.50), "p90_ms": 1000 * percentile(latencies, 0.90),
            "p99_ms": 1000 * percentile(latencies, 0.99), "max_ms": 1000 * latencies[-1],
            "mean_batch": rows / batches if batches else 0.0, "batches": int(batches),
            "server_cpu": cpu_server / wall, "client_cpu": cpu_client / wall}


def load_test(server: Server, args, cpus: set[int] | None, names: list[str]) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--drive", server.url, "--server-pid", str(server.pid),
           "--clients", str(args.clients), "--seconds", str(args.seconds), "--warmup", str(args.warmup),
           "--names", ",".join(names)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, preexec_fn=pinned(cpus))
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        server.stop()
        sys.exit(f"the client process failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


# -- the report ------------------------------------------------------------------------------------------

def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = int(Path("/proc/meminfo").read_text().split()[1]) / 1024**2
    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GB RAM; Python {platform.python_version()}, torch "
            f"{version('torch')}, fastapi {version('fastapi')}, uvicorn {version('uvicorn')}, httpx {version('httpx')}")


def mb(n: float) -> str:
    return f"{n / 1e6:,.2f}" if n < 1e7 else f"{n / 1e6:,.0f}"


def load_table(results: list[dict], rounds: int) -> list[str]:
    lines = ["| serving | clients | requests | requests/s | p50 ms | p90 ms | p99 ms | max ms | errors | mean batch "
             "| server CPU | client CPU |", "|---|" + "---:|" * 11]
    for r in results:
        errors = str(r["errors"]) if not r["errors"] else f"{r['errors']} ({r['statuses']})"
        name = r["mode"] + (f", round {r['round']}" if rounds > 1 else "")
        lines.append(f"| {name} | {r['clients']} | {r['requests']:,} | {r['requests_per_s']:,.0f} | "
                     f"{r['p50_ms']:,.0f} | {r['p90_ms']:,.0f} | {r['p99_ms']:,.0f} | {r['max_ms']:,.0f} | {errors} | "
                     f"{r['mean_batch']:.1f} | {r['server_cpu']:.0%} | {r['client_cpu']:.0%} |")
    return lines


def storage_tables(disk: dict, ram: dict[str, dict]) -> list[str]:
    adapter_dir = sum(disk["adapter_dirs"].values()) / len(disk["adapter_dirs"])
    lines = ["On disk (what serving needs: each run's artifact directory -- weights, tokenizer, configs -- and, for "
             "adapters, the base model once):", "",
             "| run | method | weights (safetensors) MB | artifact directory MB |", "|---|---|---:|---:|"]
    for name, method in (("lora-a", "lora r=8"), ("lora-b", "lora r=8"), ("ia3", "ia3"), ("full-1", "full")):
        lines.append(f"| {name} | {method} | {mb(disk['weights'][name])} | {mb(disk['dirs'][name])} |")
    lines += [f"| base minilm-l6 | -- | {mb(disk['base'])} | {mb(disk['base_dir'])} |", "",
              "| N tasks | N adapters + the base, MB | N full models, MB | full / adapters |", "|---:|---:|---:|---:|"]
    for n in (1, 3, 10, 100):
        a, f = disk["base_dir"] + n * adapter_dir, n * disk["dirs"]["full-1"]
        lines.append(f"| {n} | {mb(a)} | {mb(f)} | {f / a:.1f}x |")
    rss = {k: m["VmRSS"] for k, m in ram.items()}
    weights = disk["weights"]["full-1"] / 2**20
    lora_step = (rss[LORA_10] - rss["1 LoRA"]) / 9  # each further LoRA adapter on the shared base
    full_step = (rss[FULL_3] - rss["1 full model"]) / 2  # each further full model, as measured
    lines += ["", "In RAM (the server process's RSS after one request per served name, and the weights its models "
              "hold, each tensor counted once; a full model's weights are "
              f"{weights:,.0f} MiB in fp32):", "", "| served | weights held MiB | RSS MiB | peak RSS MiB |",
              "|---|---:|---:|---:|"]
    for name, m in ram.items():
        lines.append(f"| {name} | {m['weights']:,.1f} | {m['VmRSS']:,.0f} | {m['VmHWM']:,.0f} |")
    ia3_step = (rss[IA3_10] - rss["1 IA3"]) / 9
    lines += ["", f"Each further LoRA adapter adds {lora_step:,.1f} MiB ((10 LoRA - 1 LoRA) / 9) for "
              f"{disk['weights']['lora-a'] / 2**20:.1f} MiB of weights; identical tokenizers are loaded once. Each "
              f"further IA3 model adds {ia3_step:,.1f} MiB: it has a model of its own, whose base weights are the "
              f"ones already loaded (served models share every equal tensor). Each further full model added "
              f"{full_step:,.0f} MiB ((3 full - 1 full) / 2); beyond 3 the table adds the larger of that step and "
              "the weights. Measured where N was served, otherwise ~ projected:", "",
              "| N tasks | N LoRA adapters on one base, MiB | N full models, MiB | their weights alone, MiB "
              "| full / LoRA |", "|---:|---:|---:|---:|---:|"]
    for n in (1, 3, 10, 100):
        a = rss["1 LoRA"] if n == 1 else rss[LORA_10] if n == 10 else rss["1 LoRA"] + (n - 1) * lora_step
        f = (rss["1 full model"] if n == 1 else rss[FULL_3] if n == 3
             else rss[FULL_3] + (n - 3) * max(full_step, weights))
        a_cell = f"{'' if n in (1, 10) else '~ '}{a:,.0f}"
        f_cell = f"{'' if n in (1, 3) else '~ '}{f:,.0f}"
        lines.append(f"| {n} | {a_cell} | {f_cell} | {n * weights:,.0f} | {f / a:.1f}x |")
    held = {k: m["weights"] for k, m in ram.items()}
    lines += ["", f"The load test's 3 adapters hold {held[THREE] - held['1 LoRA']:,.1f} MiB of weights more than 1 "
              f"LoRA (IA3 shares the base), yet their RSS is {rss[THREE] - rss['1 LoRA']:,.0f} MiB more: a model "
              "that is not pooled is loaded whole before its equal tensors are shared, so both copies live for a "
              f"moment (peak RSS {ram[THREE]['VmHWM']:,.0f} MiB), and not all of the freed copy goes back to the "
              f"system. Serving lora-a merged next to lora-a holds {held[MERGED] - held['1 LoRA']:+,.1f} MiB of "
              "weights more than lora-a alone: the merged model's own copy of the weights the merge changed (the "
              "adapted projections); embeddings, norms and the rest stay shared."]
    return lines


def report(args, results: list[dict], disk: dict, ram: dict[str, dict], split: str) -> str:
    rps = {(r["mode"], r["round"]): r["requests_per_s"] for r in results}

    def ratio_of(fast: str, slow: str, digits: int = 1) -> str:
        ratios = [rps[fast, k] / rps[slow, k] for k in range(1, args.rounds + 1)]
        rounds = ", ".join(f"{x:.{digits}f}x" for x in ratios)
        return f"{statistics.median(ratios):.{digits}f}x" + ("" if len(ratios) == 1 else
                                                              f" (median; per round {rounds})")
    ratio, hot = ratio_of(BATCHED, SINGLE), ratio_of(HOT_MERGED, HOT, 2)
    errors = sum(r["errors"] for r in results)
    command = " ".join([Path(sys.argv[0]).resolve().relative_to(ROOT).as_posix(), *sys.argv[1:]])
    lines = ["# `deltatune serve` under load (bench/serve_load.py)", "",
             f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {machine()}.", "",
             f"Command: `python {command}`. "
             f"Three MiniLM-L6 classification adapters (LoRA r=8 twice, IA3; trained 40 steps on "
             f"builtin:movie-reviews) served by `python -m deltatune serve` on 127.0.0.1; {args.clients} concurrent "
             f"clients (asyncio, one httpx.AsyncClient and keep-alive connection each) send one short text per "
             f"request to a random adapter, {args.warmup:g} s warm-up, then {args.seconds:g} s measured; "
             f"{args.rounds} round(s), each a fresh server per mode, in the table's order. The hot-adapter rows serve "
             f"lora-a alone, every request to it, with batching, unmerged and merged. {split}",
             "", "## Throughput and latency", ""]
    lines += load_table(results, args.rounds)
    lines += ["", f"Dynamic batching answers **{ratio}** the requests/s of batch-size-1 serving (the issue's "
              f"target: >= 2x), with {errors} errors over all runs. Latency is client-side, from sending the "
              "request to reading the whole answer; mean batch is rows per batch from the server's /metrics "
              "(deltatune_batch_rows) over the measured phase; CPU is the process's CPU time / wall time over it "
              "(100% = one core).", "", f"A single hot LoRA adapter served merged (`--merge lora-a`) answers **{hot}** "
              "the requests/s of the same adapter unmerged: the merged model does no adapter work per token.", "",
              "## Storage: N adapters vs N full models", ""]
    lines += storage_tables(disk, ram)
    lines += ["", "## Every run's numbers", "", "```json",
              json.dumps({"load": results, "disk_bytes": disk, "ram_mib": ram}, indent=1), "```", ""]
    return "\n".join(lines)


# -- main ------------------------------------------------------------------------------------------------

def cpus_arg(text: str) -> set[int] | None:
    return None if text == "all" or (os.cpu_count() or 1) < 2 else {int(c) for c in text.split(",")}


def memory_points(runs: dict[str, Path], cpus: set[int] | None) -> dict[str, dict]:
    """The server's RSS with 1, 2 and 10 LoRA adapters on one base, 1 and 10 IA3, lora-a merged, and with 1 and
    3 full models."""
    def named(prefix: str, run: Path, n: int) -> dict[str, Path]:
        return {f"{prefix}-{i}": run for i in range(n)}

    points = {"1 LoRA": {"lora-a": runs["lora-a"]}, "2 LoRA": {n: runs[n] for n in ("lora-a", "lora-b")},
              LORA_10: named("lora", runs["lora-a"], 10), "1 IA3": {"ia3": runs["ia3"]},
              IA3_10: named("ia3", runs["ia3"], 10), MERGED: {"lora-a": runs["lora-a"], "lora-a-hot": runs["lora-a"]},
              "1 full model": {"full-1": runs["full-1"]}, FULL_3: {n: runs[n] for n in FULLS}}
    out = {}
    for label, served in points.items():
        args = [a for name, run in served.items() for a in ("--adapter", f"{name}={run}")]
        args += ["--merge", "lora-a-hot"] if label == MERGED else []
        server = Server("server-" + re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-"), args, cpus)
        try:
            server.wait_ready()
            server.answer_once(list(served))
            out[label] = server.memory_mb()
        finally:
            server.stop()
    return out


def load_rounds(args, runs: dict[str, Path], server_cpus: set[int] | None, client_cpus: set[int] | None,
                ram: dict[str, dict]) -> list[dict]:
    """Each round: a fresh server per mode under the same load -- batching, then batch size 1, over the three
    adapters; then lora-a alone, unmerged and merged. The first batching server's RSS (before and after its
    load) goes into `ram`."""
    three = [a for name in ADAPTERS for a in ("--adapter", f"{name}={runs[name]}")]
    modes = {label: (three + flags, list(ADAPTERS)) for label, flags in MODES.items()}
    modes.update({label: (["--adapter", f"lora-a={runs['lora-a']}", *flags], ["lora-a"])
                  for label, flags in HOT_MODES.items()})
    results = []
    for round_ in range(1, args.rounds + 1):
        for label, (server_args, names) in modes.items():
            server = Server("server-" + re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-"), server_args,
                            server_cpus)
            first = round_ == 1 and label == BATCHED
            try:
                server.wait_ready()
                server.answer_once(names)
                if first:
                    ram[THREE] = server.memory_mb()
                print(f"round {round_}, {label}: {args.clients} clients, {args.seconds:g} s ...", flush=True)
                results.append({"mode": label, "round": round_, **load_test(server, args, client_cpus, names)})
                print(json.dumps(results[-1]), flush=True)
                if first:
                    ram[AFTER] = server.memory_mb()
            finally:
                server.stop()
    return results


def measure(args) -> str:
    WORK.mkdir(parents=True, exist_ok=True)
    runs = {name: trained(name, overrides) for name, overrides in ADAPTERS.items()}
    runs.update({name: trained(name, overrides) for name, overrides in FULLS.items()})
    server_cpus, client_cpus = cpus_arg(args.server_cpus), cpus_arg(args.client_cpus)
    split = ("No pinning: the server and the client share every core." if server_cpus is None else
             f"The server runs on CPU {args.server_cpus} (torch threads: {len(server_cpus)}), the client process "
             f"on CPU {args.client_cpus}.")
    ram: dict[str, dict] = {}
    results = load_rounds(args, runs, server_cpus, client_cpus, ram)
    ram.update(memory_points(runs, server_cpus))
    ram = {k: ram[k] for k in ("1 LoRA", "2 LoRA", LORA_10, "1 IA3", IA3_10, THREE, AFTER, MERGED, "1 full model",
                               FULL_3)}
    from deltatune.serve.registry import model_dir

    base = model_dir("minilm-l6")
    disk = {"weights": {n: weights_bytes(r / ("model" if n in FULLS else "adapter")) for n, r in runs.items()},
            "dirs": {n: dir_bytes(r / ("model" if n in FULLS else "adapter")) for n, r in runs.items()},
            "base": weights_bytes(base), "base_dir": dir_bytes(base)}
    disk["adapter_dirs"] = {n: disk["dirs"][n] for n in ADAPTERS}
    return report(args, results, disk, ram, split)


@contextlib.contextmanager
def heavy_lock():
    """Hold /tmp/prompts/heavy.lock (when it exists) so no other heavy job shares the CPU while we time."""
    if not LOCK.exists():
        yield
        return
    with open(LOCK) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for {LOCK} ...", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--seconds", type=float, default=30.0, help="measured time per serving mode")
    p.add_argument("--rounds", type=int, default=1, help="rounds of the two serving modes (alternating)")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of load before measuring (not counted)")
    p.add_argument("--quick", action="store_true", help="8 clients, 3 s: checks that the script works")
    p.add_argument("--server-cpus", default="1", help="CPUs the server is pinned to (comma list, or `all`)")
    p.add_argument("--client-cpus", default="0", help="CPUs the client process is pinned to (comma list, or `all`)")
    p.add_argument("--out", type=Path, help="where to write the table (default: docs/serve-table.md; with --quick: "
                   "bench/.work/serve/serve-table-quick.md)")
    p.add_argument("--drive", metavar="URL", help=argparse.SUPPRESS)  # the client process
    p.add_argument("--server-pid", type=int, help=argparse.SUPPRESS)
    p.add_argument("--names", default=",".join(ADAPTERS), help=argparse.SUPPRESS)  # the adapters clients ask for
    args = p.parse_args()
    if args.drive:
        result = asyncio.run(drive(args.drive, args.names.split(","), args.clients, args.seconds, args.warmup,
                                   args.server_pid))
        print("RESULT " + json.dumps(result), flush=True)
        return
    if min(args.clients, args.rounds) < 1 or min(args.seconds, args.warmup) < 0:
        p.error("--clients and --rounds must be at least 1, --seconds and --warmup not negative")
    if args.quick:
        args.clients, args.seconds, args.warmup, args.rounds = 8, 3.0, 1.0, 1
    with heavy_lock():
        text = measure(args)
    out = args.out or (WORK / "serve-table-quick.md" if args.quick else TABLE)
    out.write_text(text, encoding="utf-8")
    print(text)
    print(f"written: {out}")


if __name__ == "__main__":
    main()
