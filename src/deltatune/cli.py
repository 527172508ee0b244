"""The `deltatune` command. Each subcommand is a thin call into the library (deltatune.api et al.)."""

from __future__ import annotations

import codecs
import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from deltatune.errors import DataError, DeltatuneError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune pretrained transformers, fully or with a small delta.")
out = Console()
err = Console(stderr=True)


@app.command()
def train(
    config: Annotated[Path | None, typer.Argument(help="YAML config (see configs/)")] = None,
    overrides: Annotated[list[str] | None, typer.Argument(help="section.key=value ...")] = None,
    print_config: Annotated[bool, typer.Option("--print-config", help="show the resolved config and exit")] = False,
    resume: Annotated[str | None, typer.Option("--resume", help="`auto` (newest checkpoint in output.dir, else "
                                               "start fresh) or a checkpoint directory")] = None,
    nproc: Annotated[int | None, typer.Option("--nproc", help="processes on this node; more than 1 starts them "
                                              "with torchrun (see docs/distributed.md)")] = None,
    nnodes: Annotated[int | None, typer.Option("--nnodes", help="nodes in the job (run this command on each)")]
    = None,
    node_rank: Annotated[int | None, typer.Option("--node-rank", help="this node: 0 at --rdzv-endpoint, "
                                                  "1..nnodes-1 elsewhere")] = None,
    rdzv_endpoint: Annotated[str | None, typer.Option("--rdzv-endpoint", help="HOST:PORT of node 0, reachable "
                                                      "from every node")] = None,
) -> None:
    """Fine-tune a model as CONFIG says; writes a run directory (output.dir)."""
    from deltatune import launch

    topology = launch.Topology.from_flags(nproc, nnodes, node_rank, rdzv_endpoint)
    cfg = _load_config(config, overrides)  # checked once here, before any process starts
    if print_config:
        out.print(cfg.to_yaml(), end="", markup=False, highlight=False)
        return
    args = [*([str(config)] if config else []), *(overrides or [])]
    if topology.launches:
        _launch(args, resume, topology, cfg.output.dir)
        return
    _train_here(cfg, resume, args)


def _train_here(cfg, resume: str | None, args: list[str]) -> None:
    """Train in this process: alone, or as one rank that torchrun started."""
    from deltatune import api, launch
    from deltatune.engine.faults import Terminated

    try:
        api.train(cfg, resume=resume, resume_command=launch.resume_command(args))
    except KeyboardInterrupt:  # api.train said where the run stands; exit as the shell expects (128 + signal)
        raise typer.Exit(130) from None
    except Terminated:
        raise typer.Exit(143) from None
    except DeltatuneError as e:
        launch.record_error(e)  # under torchrun: its failure summary names this rank's cause
        raise
    except RuntimeError as e:  # another rank died: one line, not gloo's traceback (the launcher names the cause)
        if launch.lost_peer(e) is None:
            raise
        err.print(f"[bold red]error:[/] rank {os.environ.get('RANK', '0')} lost its connection to another rank "
                  f"(gloo: {launch.lost_peer(e)}): another rank stopped; its message, or the launcher's, names the "
                  f"cause.", highlight=False, soft_wrap=True)
        raise typer.Exit(launch.PEER_LOST_EXIT) from None


def _launch(args: list[str], resume: str | None, topology, output_dir: str) -> None:
    """Start the ranks with torchrun and wait; a failed rank becomes one sentence and its exit code."""
    from deltatune import launch
    from deltatune.engine.faults import Terminated

    try:
        launch.run(args, resume, topology)
    except launch.RankFailed as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}\n  {escape(launch.next_step(output_dir, args, topology))}",
                  highlight=False, soft_wrap=True)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:  # the ranks got the signal too and said where the run stands
        raise typer.Exit(130) from None
    except Terminated:
        raise typer.Exit(143) from None


@app.command("eval")
def eval_(
    run_dir: Annotated[Path, typer.Argument(help="a finished run directory")],
    data: Annotated[str | None, typer.Option("--data", help="labelled file (default: the run's validation)")]
    = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """Evaluate a saved run: accuracy, precision, recall, F1, loss (classification); loss, perplexity and, for
    sft runs scored by generation, exact match / label accuracy; preference runs: loss, reward accuracy and
    margin, preference accuracy (and generation metrics as sft)."""
    from deltatune import api

    result = api.evaluate(run_dir, data)
    if as_json:
        out.print_json(json.dumps(result))
        return
    table = Table(title=f"eval {run_dir}" + (f" on {data}" if data else ""))
    table.add_column("")
    table.add_column("value", justify="right")
    for key, v in result.items():
        if not isinstance(v, (list, dict)):  # one metric a row: readable at any terminal width
            table.add_row(key, f"{v:.4f}" if isinstance(v, float) else str(v))
    out.print(table)
    for s in result.get("samples", []):  # generation-based metrics: a few answers to look at
        out.print(f"[dim]answer[/] {escape(repr(s['answer']))}  [dim]reference[/] {escape(repr(s['reference']))}",
                  highlight=False)


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="a run directory (finished or not)")],
    out_path: Annotated[Path | None, typer.Option("--out", help="the HTML file (default RUN_DIR/report.html); "
                                                   "report.md and its PNGs are written beside it")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="only what the run recorded: no model or data loading "
                                        "(no confusion matrix, generations, parameter breakdown, lengths)")] = False,
) -> None:
    """One self-contained HTML page (and a markdown copy) explaining a run: curves, metrics, predictions,
    parameters, data, forgetting, setup and config. See docs/reports.md."""
    from deltatune.reports import write_report

    written = write_report(run_dir, out_path, compute=not quick)
    out.print(f"report: {written['html']}  (markdown: {written['md']})", highlight=False, soft_wrap=True)


@app.command()
def compare(
    sources: Annotated[list[str], typer.Argument(help="CONFIG (then section.key=value overrides) to train "
                                                 "each method, or RUN_DIR RUN_DIR ... to compare finished runs")],
    methods: Annotated[str | None, typer.Option("--methods", help="with CONFIG: methods separated by commas, e.g. "
                                                "full,lora,dora,ia3,prompt_tuning,adapter,bitfit")] = None,
    lr_sweep: Annotated[bool, typer.Option("--lr-sweep", help="try a small learning-rate grid per method and keep "
                                           "the best")] = False,
    lrs: Annotated[str | None, typer.Option("--lrs", help="the grid for every method instead, e.g. 1e-4,1e-3")]
    = None,
    budget_steps: Annotated[int | None, typer.Option("--budget-steps", min=1, help="train.max_steps of every "
                                                     "run")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="output directory (default: <output.dir>-compare "
                                                 "with CONFIG, ./compare with run directories)")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="only one line per run, not the training output")] = False,
) -> None:
    """Train each method on CONFIG's data and budget, one at a time, and compare them (compare.json, .html,
    .md); finished runs are kept, not trained again. Or compare finished runs. See docs/compare.md."""
    from deltatune.compare import compare as compare_

    grid = None
    if lrs is not None:
        try:
            grid = [float(x) for x in lrs.split(",") if x.strip()]
        except ValueError:
            raise DeltatuneError(f"--lrs {lrs}: not numbers separated by commas. Fix: e.g. --lrs 1e-4,3e-4,1e-3") \
                from None
    try:
        compare_(sources, methods, lr_sweep, grid, budget_steps, out_dir, show_training=not quiet)
    except KeyboardInterrupt:  # compare said how to go on
        raise typer.Exit(130) from None


@app.command()
def predict(
    args: Annotated[list[str] | None, typer.Argument(help="RUN_DIR then texts (or only texts with --run)")] = None,
    runs: Annotated[list[Path] | None, typer.Option("--run", help="adapter runs sharing one base; repeatable")]
    = None,
    file: Annotated[Path | None, typer.Option("--file", help="one text per line ('-' for stdin)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line")] = False,
) -> None:
    """Classify texts with a saved run, or with several adapter runs over one base (--run A --run B)."""
    from deltatune import api

    items = list(args or [])
    if not runs:
        if not items:
            raise DeltatuneError("predict: give RUN_DIR and texts, or --run RUN_DIR ... and texts")
        runs = [Path(items.pop(0))]
    # Where each text came from, kept on its row: outputs line up with inputs, blank ones included.
    where = [{"arg": n} for n in range(1, len(items) + 1)]
    lines = _read_lines(file)
    items += [text for _, text in lines]
    where += [{"line": n} for n, _ in lines]
    if not items:
        raise DeltatuneError("predict: give texts as arguments or --file FILE")
    if len(runs) == 1:
        results = [{"run": str(runs[0]), **w, **r} for w, r in zip(where, api.predict(runs[0], items))]
    else:
        from deltatune.inference import MultiAdapter

        served = MultiAdapter(runs)  # the base model is loaded once for all runs
        results = [{"run": str(run), **w, **r} for run in runs for w, r in zip(where, served.predict(items, run))]
    source = "stdin" if str(file) == "-" else str(file)
    for warning in _predict_warnings(results[:len(items)], source):  # rows repeat per run; count inputs once
        err.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
    if as_json:
        for r in results:
            print(json.dumps(r, ensure_ascii=False))
        return
    _predict_table(results, multi=len(runs) > 1)


def _where(row: dict, source: str) -> str:
    return f"{source}:{row['line']}" if "line" in row else f"argument {row['arg']}"


def _predict_warnings(rows: list[dict], source: str) -> list[str]:
    """One line per kind of flagged input, with a count and where the first few are."""
    def places(flagged: list[dict]) -> str:
        shown = ", ".join(_where(r, source) + (f": {r['tokens']} of {r['tokens_total']:,} tokens kept"
                                               if r["truncated"] else "") for r in flagged[:5])
        return shown + (f" and {len(flagged) - 5} more" if len(flagged) > 5 else "")

    def count(flagged: list[dict]) -> str:
        return f"{len(flagged)} of {len(rows)} texts {'is' if len(flagged) == 1 else 'are'}"

    warnings = []
    blank = [r for r in rows if r["problem"] is not None]
    if blank:
        warnings.append(f"{count(blank)} empty or blank ({places(blank)}): not scored (kept in place, no label; "
                        f"problem \"{blank[0]['problem']}\").")
    cut = [r for r in rows if r["truncated"]]
    if cut:
        warnings.append(f"{count(cut)} longer than the run's data.max_length and truncated ({places(cut)}): the "
                        f"prediction saw only the beginning. Fix: shorten or split such texts, or train with a "
                        f"larger data.max_length.")
    return warnings


def _predict_table(results: list[dict], multi: bool) -> None:
    """Long texts shortened (--json keeps them whole); blank and truncated rows say so."""
    notes = any(r["problem"] or r["truncated"] for r in results)
    table = Table(title="predictions")
    for col in (["run"] if multi else []) + ["input", "text", "label", "score"] + (["note"] if notes else []):
        table.add_column(col, overflow="fold", justify="right" if col == "score" else "left")
    for r in results:
        text = r["text"] if len(r["text"]) <= 80 else f"{r['text'][:80]}... ({len(r['text']):,} characters)"
        note = r["problem"] or (f"truncated: {r['tokens']} of {r['tokens_total']:,} tokens" if r["truncated"] else "")
        table.add_row(*([r["run"]] if multi else []), f"line {r['line']}" if "line" in r else f"arg {r['arg']}",
                      escape(text), r["label"] or "-", "-" if r["score"] is None else f"{r['score']:.3f}",
                      *([note] if notes else []))
    out.print(table)


@app.command()
def merge(
    run_dir: Annotated[Path, typer.Argument(help="a finished adapter run (lora, ia3, ...)")],
    out_dir: Annotated[Path, typer.Argument(help="where to write the merged Hugging Face model")],
    tolerance: Annotated[float, typer.Option(help="largest allowed |merged - unmerged| output difference, relative "
                                             "to the largest logit magnitude where that exceeds 1")] = 1e-4,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace OUT_DIR if it holds a previous merge "
                                            "(never anything else)")] = False,
) -> None:
    """Merge a run's adapter into its base model, verified on sample inputs; writes a plain HF model.
    OUT_DIR must be new or empty, or a previous merge with --overwrite."""
    from deltatune.export.merge import merge as do_merge

    report = do_merge(run_dir, out_dir, tolerance, overwrite=overwrite)
    out.print(f"merged {report['method']} adapter into {out_dir}: max |merged - unmerged| = "
              f"{report['max_abs_diff']:.3g} ({report['max_diff']:.3g} relative to the largest logit) over "
              f"{report['samples']} samples (tolerance {tolerance:g})",
              soft_wrap=True)
    if report.get("quantized_kernel_max_abs_diff") is not None:
        out.print(f"  merged into a {report['into']}; the quantized CPU/GPU kernel itself "
                  f"differs from that exact product by up to {report['quantized_kernel_max_abs_diff']:.3g}",
                  soft_wrap=True)


@app.command()
def generate(
    run_dir: Annotated[Path, typer.Argument(help="a causal_lm/sft run, or a model directory (e.g. merged)")],
    prompts: Annotated[list[str] | None, typer.Option("--prompt", "-p", help="a prompt; repeatable")] = None,
    file: Annotated[Path | None, typer.Option("--file", help="one prompt per line ('-' for stdin)")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 64,
    sample: Annotated[bool, typer.Option("--sample", help="sample instead of greedy decoding")] = False,
    temperature: Annotated[float, typer.Option("--temperature", min=0.01)] = 0.7,
    top_p: Annotated[float, typer.Option("--top-p", min=0.01, max=1.0)] = 0.9,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    template: Annotated[str | None, typer.Option("--template", help="chat | alpaca | raw (default: as trained)")]
    = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line")] = False,
) -> None:
    """Generate answers with a decoder run (full or adapter) or a merged model; stops at EOS."""
    from deltatune import api

    if template not in (None, "chat", "alpaca", "raw"):
        raise DeltatuneError(f"--template {template}: use chat, alpaca or raw")
    texts = list(prompts or []) + [line for _, line in _read_lines(file) if line.strip()]
    if not texts:
        raise DeltatuneError("no prompts: pass --prompt TEXT (repeatable) or --file FILE")
    results = api.generate(run_dir, texts, max_new_tokens, sample, temperature, top_p, seed, template)
    for r in results:
        if as_json:
            print(json.dumps(r, ensure_ascii=False))
        else:
            end = "" if r["stopped_at_eos"] else f"  [dim](stopped at {max_new_tokens} tokens)[/]"
            out.print(f"[bold]>[/] {escape(r['prompt'])}\n{escape(r['text'])}{end}\n", highlight=False)


LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's


@app.command()
def serve(
    base: Annotated[str | None, typer.Option("--base", help="the base model the adapters were trained on "
                                             "(built-in name, local directory or Hugging Face id)")] = None,
    adapter: Annotated[list[str] | None, typer.Option("--adapter", help="NAME=RUN_DIR; repeatable")] = None,
    run: Annotated[list[str] | None, typer.Option("--run", help="a full, merged or adapter run, served under its "
                                                  "directory's name; repeatable")] = None,
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port")] = 8000,
    allowed_root: Annotated[Path, typer.Option("--allowed-root", help="run directories load only from under "
                                               "this directory")] = Path("."),
    base_revision: Annotated[str | None, typer.Option("--base-revision")] = None,
    admin_token: Annotated[str | None, typer.Option("--admin-token", envvar="DELTATUNE_ADMIN_TOKEN",
                                                    help="enables POST/DELETE /v1/adapters/NAME")] = None,
    max_input_tokens: Annotated[int, typer.Option("--max-input-tokens", min=1)] = 2048,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 512,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1)] = 32,
    max_queue: Annotated[int, typer.Option("--max-queue", min=1)] = 256,
    timeout: Annotated[float, typer.Option("--timeout", min=0.1, help="seconds before a request is stopped (504)")]
    = 60.0,
    merge: Annotated[list[str] | None, typer.Option("--merge", help="NAME of a LoRA/IA3 adapter to serve merged "
                                                    "into its own copy of the weights it changes (a hot adapter: "
                                                    "no adapter work per token); repeatable")] = None,
    log_level: Annotated[str, typer.Option("--log-level", help="uvicorn's: critical, error, warning, info, "
                                           "debug, trace")] = "info",
) -> None:
    """Serve runs over HTTP: /v1/classify and OpenAI-compatible completions, many adapters over one base
    (docs/serve.md)."""
    from deltatune.serve.app import Settings
    from deltatune.serve.command import parse_adapters
    from deltatune.serve.command import serve as serve_http

    settings = Settings(max_input_tokens=max_input_tokens, max_new_tokens=max_new_tokens, max_batch=max_batch,
                        max_queue=max_queue, timeout_s=timeout, admin_token=admin_token)
    if log_level not in LOG_LEVELS:
        raise typer.BadParameter(f"{log_level}; use one of {', '.join(LOG_LEVELS)}", param_hint="--log-level")
    serve_http(base, parse_adapters(adapter or []), run or [], host, port, allowed_root, base_revision, settings,
               log_level=log_level, merge=merge or [])


@app.command("inspect-data")
def inspect_data(
    config: Annotated[Path | None, typer.Argument(help="YAML config")] = None,
    overrides: Annotated[list[str] | None, typer.Argument(help="section.key=value ...")] = None,
    rows: Annotated[int, typer.Option("--rows", min=1)] = 3,
    split: Annotated[str, typer.Option("--split", help="train | validation")] = "train",
) -> None:
    """Show a few examples as the model sees them; tokens that carry loss are highlighted."""
    from deltatune import api

    cfg = _load_config(config, overrides)
    if cfg.task == "preference":
        _show_pairs(api.inspect_pairs(cfg, rows, split), split)
        return
    for i, tokens in enumerate(api.inspect_data(cfg, rows, split)):
        shown = _marked(tokens)
        n = sum(loss for _, loss in tokens)
        out.print(f"[bold]{split} example {i}[/] ({len(tokens)} tokens, {n} carry loss)", highlight=False)
        out.print(shown, highlight=False, soft_wrap=True)
        out.print()
    out.print("[black on green]highlighted[/] tokens carry loss; the rest are context only.")


def _marked(tokens: list[tuple[str, bool]]) -> str:
    return "".join(f"[black on green]{escape(t)}[/]" if loss else escape(t) for t, loss in tokens)


def _show_pairs(views: list, split: str) -> None:
    for i, view in enumerate(views):
        out.print(f"[bold]{split} pair {i}[/]: prompt ({len(view.prompt)} tokens, no loss)", highlight=False)
        out.print("".join(escape(t) for t, _ in view.prompt), highlight=False, soft_wrap=True)
        for side in ("chosen", "rejected"):
            tokens = getattr(view, side)
            out.print(f"[bold]{side}[/] ({len(tokens)} tokens, {sum(loss for _, loss in tokens)} carry loss)",
                      highlight=False)
            out.print(_marked(tokens), highlight=False, soft_wrap=True)
        out.print()
    out.print("[black on green]highlighted[/] tokens carry loss; the rest are context only.")


def _plan_config(config: Path | None, overrides: list[str] | None):
    """CONFIG plus overrides for commands that need no data (params, plan)."""
    overrides = list(overrides or [])
    if not any(o.startswith("data.train=") for o in overrides):
        overrides.append("data.train=unused")  # counting and planning read no data
    return _load_config(config, overrides)


@app.command()
def params(
    config: Annotated[Path | None, typer.Argument(help="YAML config")] = None,
    overrides: Annotated[list[str] | None, typer.Argument(help="section.key=value ...")] = None,
) -> None:
    """Count parameters of CONFIG's model and method from the model config alone (no weights loaded)."""
    from deltatune.plan.params import count

    result = count(_plan_config(config, overrides))
    table = Table(title=f"{result['method']} on {result['model']} ({result['architecture']}; meta device: no "
                  f"weights loaded)")
    table.add_column("")
    table.add_column("parameters", justify="right")
    head = f"task head ({result['num_labels']} labels)" if result["num_labels"] else "task head"
    for key, label in (("base_params", "base model"), ("trainable_params", "trainable"),
                       ("method_params", "method (excluding head)"), ("head_params", head),
                       ("added_params", "added by the method")):
        table.add_row(label, f"{result[key]:,}")
    table.add_row("trainable %", f"{result['trainable_percent']:.4f}")
    table.add_row("artifact (fp32)", f"{result['artifact_mb']:,.2f} MB")
    out.print(table)


@app.command()
def plan(
    config: Annotated[Path | None, typer.Argument(help="YAML config")] = None,
    overrides: Annotated[list[str] | None, typer.Argument(help="section.key=value ...")] = None,
    memory: Annotated[float | None, typer.Option("--memory", help="memory per device in GiB (default: this "
                                                 "machine's free memory)")] = None,
    devices: Annotated[int, typer.Option("--devices", min=1, help="devices (processes) the run spreads over")] = 1,
    device: Annotated[str | None, typer.Option("--device", help="cpu | cuda (default: this machine's)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """Predict peak training memory per device from the model config alone (no weights loaded): the breakdown,
    whether it fits, and the largest micro-batch that does."""
    import torch

    from deltatune.plan import memory as planner

    if device not in (None, "cpu", "cuda"):
        raise DeltatuneError(f"--device {device}: use cpu or cuda")
    est = planner.estimate(_plan_config(config, overrides), devices=devices, device=device)
    budget = int(memory * planner.GiB) if memory else planner.free_memory_bytes(
        torch.device(est.device) if est.device == "cpu" or torch.cuda.is_available() else "cpu")
    best = est.largest_micro_batch(budget)
    verdict = {"memory_bytes": budget, "fits": est.fits(budget),
               "largest_micro_batch": best[0] if best else None, "grad_accum_for_it": best[1] if best else None,
               "refusal": None if best else planner.refusal(est, budget)}
    if as_json:
        out.print_json(json.dumps({**est.to_dict(), **verdict}))
        if not best:
            raise typer.Exit(1)
        return
    table = Table(title=f"peak training memory per device: {est.mode} x{est.devices} {est.device}, {est.precision}, "
                  f"micro-batch {est.micro_batch} x {est.seq_len} tokens (no weights loaded)")
    table.add_column("")
    table.add_column("memory", justify="right")
    table.add_column("grows with batch", justify="center")
    for key, value in est.breakdown.items():
        table.add_row(key, planner.gib(value), "yes" if key in est.scales else "")
    table.add_row("[bold]peak[/]", f"[bold]{planner.gib(est.total)}[/]", "")
    table.add_row("increase over the loaded model", planner.gib(est.increase), "")
    if est.cpu_offloaded:
        table.add_row("offloaded to CPU memory", planner.gib(est.cpu_offloaded), "")
    out.print(table)
    for note in est.notes:
        out.print(f"[dim]note: {escape(note)}[/]", highlight=False)
    source = f"--memory {memory:g} GiB" if memory else f"{planner.gib(budget)} free on this {est.device}"
    if not best:
        err.print(f"[bold red]does not fit:[/] {escape(verdict['refusal'])}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    fits = "[green]fits[/]" if verdict["fits"] else "[red]does not fit[/]"
    out.print(f"{fits} in {source}; largest micro-batch that fits: {best[0]} (train.batch_size={best[0]} "
              f"train.grad_accum={best[1]} keeps the global batch of {est.micro_batch * est.grad_accum} per "
              f"device)", highlight=False, soft_wrap=True)


@app.command()
def models() -> None:
    """List built-in models (weights shipped by installable packages; no hub needed)."""
    from deltatune.models.catalogue import BUILTIN_MODELS

    table = Table(title="built-in models")
    table.add_column("name", no_wrap=True)
    for col in ("architecture", "params", "package", "description"):
        table.add_column(col)
    for m in BUILTIN_MODELS.values():
        table.add_row(m.name, m.architecture, m.params, m.package, m.description)
    out.print(table)


@app.command("methods")
def methods_() -> None:
    """List fine-tuning methods (use as method.name=NAME) and their options."""
    from deltatune.methods import REGISTRY

    table = Table(title="methods")
    table.add_column("name", no_wrap=True)
    for col in ("what trains", "saved as", "merge", "options"):
        table.add_column(col)
    for m in REGISTRY.values():
        merge = {True: "yes", False: "no", None: "n/a (full model)"}[m.mergeable]
        table.add_row(m.name, m.description, m.saves, merge, method_options(m))
    out.print(table)


def method_options(method) -> str:
    """`key=default, ...` of a method's options; options without a default value (unset, empty) are left out.
    Defaults made by a factory (`patterns: []`) are built, not shown as pydantic's `PydanticUndefined`."""
    shown = []
    for key, field in method.Config.model_fields.items():
        if key == "name" or field.is_required():
            continue
        value = field.get_default(call_default_factory=True)
        if value is not None and value != [] and value != {}:
            shown.append(f"{key}={value!r}")
    return ", ".join(shown) or "-"


@app.command()
def datasets(
    prepare: Annotated[bool, typer.Option("--prepare", help="extract every built-in into the local cache now")]
    = False,
) -> None:
    """List built-in data sets (use as data.train=builtin:NAME)."""
    from deltatune.data.builtin import BUILTIN_DATASETS

    table = Table(title="built-in data sets")
    table.add_column("name", no_wrap=True)
    for col in ("rows", "labels", "package", "description", "cached"):
        table.add_column(col)
    for d in BUILTIN_DATASETS.values():
        cached = d.path() if prepare else None
        table.add_row(f"builtin:{d.name}", f"{d.rows:,}", ", ".join(d.labels), d.package, d.description,
                      str(cached or ""))
    out.print(table)


def _load_config(config: Path | None, overrides: list[str] | None):
    """CONFIG plus overrides. `deltatune train a=b` (no file) is allowed: typer hands the first
    override in as CONFIG."""
    from deltatune import config as config_mod

    if config is not None and "=" in str(config) and not config.exists():
        overrides, config = [str(config), *(overrides or [])], None
    return config_mod.load(config, list(overrides or []))


def _read_lines(file: Path | None) -> list[tuple[int, str]]:
    """(line number, text) for every line of FILE ('-' reads stdin), blank ones included so callers can
    say which line a result answers; none without a file. UTF-8, with or without a byte-order mark."""
    if file is None:
        return []
    name = "stdin" if str(file) == "-" else str(file)
    try:
        data = sys.stdin.buffer.read() if str(file) == "-" else file.read_bytes()
    except OSError as e:
        raise DataError(f"--file {file}: cannot read it: {(e.strerror or str(e)).lower()}. Fix: check the path "
                        f"('-' reads standard input).") from None
    skip = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0  # Excel/Notepad "UTF-8 with BOM"
    try:
        text = data[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = skip + e.start
        line = data.count(b"\n", 0, at) + 1
        column = at - (data.rfind(b"\n", 0, at) + 1) + 1
        raise DataError(f"{name}: line {line} is not UTF-8 text (byte {column} of the line is 0x{data[at]:02x}). "
                        f"Fix: re-save the file as UTF-8 (your editor's \"save "
                        f"with encoding\", or e.g. `iconv -f latin1 -t utf-8 {name} > fixed.txt` for Latin-1)."
                        ) from None
    # Split on newlines only (str.splitlines also splits on form feeds and other separators, so its
    # line numbers would not be the ones an editor shows); a final newline ends the last line.
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [(n, line.removesuffix("\r")) for n, line in enumerate(lines, start=1)]


def main() -> None:
    try:
        app()
    except DeltatuneError as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
