"""`deltatune report RUN_DIR`: everything about one run directory on one page (report.html + report.md).

`collect` reads what the run recorded (config.yaml, summary.json, labels.json, metrics.jsonl) and computes
at report time what it did not record: the confusion matrix (classification: the saved model over the
run's validation data), sample generations (sft/causal_lm), trainable parameters by module type (the method
applied to a meta-device copy of the model, as `deltatune params` does), the token-length histogram (the
run's data rebuilt with its tokenizer) and the memory plan line. Each part that cannot be had says why in
its place; a run with files missing still gets a page.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import yaml

from deltatune.reports import plots
from deltatune.reports.page import Image, Section, Table, Text, cell, write

SAMPLE_GENERATIONS = 5
# Names peft gives the modules it wraps or adds around a layer; the layer's own name is the one before them.
PEFT_WRAPPERS = {"default", "base_layer", "modules_to_save", "original_module"}


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """metrics.jsonl as (training step records, eval records with their `time`); ([], []) when absent.

    A line cut short by a killed run is skipped: the rest of the file still tells the story."""
    path = Path(run_dir) / "metrics.jsonl"
    steps: list[dict] = []
    evals: list[dict] = []
    if not path.exists():
        return steps, evals
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record.get("eval"), dict):
            evals.append({"time": record.get("time"), **record["eval"]})
        elif "step" in record:
            steps.append(record)
    return steps, evals


def _read_json(path: Path) -> object | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _attempt(what: str, fn, *args) -> dict:
    """Run a report-time computation; a failure becomes the reason shown in its section, never a crash
    (a report is most wanted for the runs that went wrong)."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - any failure of an optional part of the page is reported on the page
        return {"not_recorded": f"{what} could not be computed: {type(e).__name__}: {e}"}


def collect(run_dir: str | Path, compute: bool = True) -> dict:
    """What the report shows, as plain data. `compute=False` skips everything that loads the model or data."""
    path = Path(run_dir)
    steps, evals = read_metrics(path)
    summary = _read_json(path / "summary.json")
    config_text = (path / "config.yaml").read_text(encoding="utf-8") if (path / "config.yaml").exists() else None
    info = {
        "run_dir": str(path.resolve()),
        "missing": [n for n in ("config.yaml", "summary.json", "labels.json", "metrics.jsonl")
                    if not (path / n).exists()],
        "config_text": config_text,
        "config": yaml.safe_load(config_text) if config_text else None,
        "summary": summary if isinstance(summary, dict) else None,
        "labels": _read_json(path / "labels.json"),
        "steps": steps,
        "evals": evals or ((summary or {}).get("evals") or [] if isinstance(summary, dict) else []),
    }
    skipped = {"not_recorded": "skipped (--quick): the report did not load the model or the data"}
    cfg = None
    if config_text and compute:
        cfg = _attempt("the run's config", lambda: {"cfg": _load_config(path)})
    if not cfg or "not_recorded" in cfg:
        why = skipped if not compute else cfg or {"not_recorded": "no config.yaml in the run directory"}
        info.update(predictions=why, parameters=why, lengths=why, plan=why)
        return info
    cfg = cfg["cfg"]
    info["parameters"] = _attempt("the parameter breakdown", _parameters, cfg, info["labels"])
    info["lengths"] = _attempt("the length histogram", _lengths, cfg, path)
    info["predictions"] = _attempt("predictions on the validation data", _predictions, path)
    info["plan"] = _attempt("the memory plan", _plan, cfg)
    return info


def _load_config(path: Path):
    from deltatune import config

    return config.load(path / "config.yaml")


def _parameters(cfg, labels) -> dict:
    """Trainable and total parameters per module type, from the model the run's config builds (meta device:
    shapes only, the method applied exactly as in training)."""
    from deltatune.plan import params

    base = params.skeleton(cfg, len(labels) if isinstance(labels, list) and labels else params.num_labels(cfg))
    model = params.apply_method(cfg, base, meta=True)
    by_type: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            counts = by_type[_module_kind(name, module)]
            counts[0] += p.numel() if p.requires_grad else 0
            counts[1] += p.numel()
    rows = sorted(([name, t, n] for name, (t, n) in by_type.items()), key=lambda r: (-r[1], -r[2]))
    return {"by_type": rows, "trainable": sum(r[1] for r in rows), "total": sum(r[2] for r in rows)}


def _module_kind(name: str, module) -> str:
    """`query (Linear)`, `lora_A (Linear)`: the module's own name with layer numbers and peft's wrapper names
    dropped, so all layers' copies of one module add up in one row (`classifier` then counts peft's untrained
    copy of the head, `original_module`, in its total, as the model holds it)."""
    parts = [p for p in name.split(".") if not p.isdigit() and p not in PEFT_WRAPPERS]
    return f"{parts[-1] if parts else 'model'} ({type(module).__name__})"


def _lengths(cfg, path: Path) -> dict:
    """Token lengths of the training rows as the run's tokenizer makes them (data rebuilt, `datasets`' cache)."""
    from deltatune import data, models

    labels = _read_json(path / "labels.json")
    tokenizer = models.load_tokenizer(cfg.model.name, cfg.model.revision, cfg.model.trust_remote_code)
    bundle = data.build(cfg.data, tokenizer, labels=labels if isinstance(labels, list) else None, task=cfg.task)
    return {"train": list(bundle.train.dataset["length"]), "max_length": cfg.data.max_length,
            "packed": bool(cfg.data.packing), "stats": bundle.stats}


def _predictions(path: Path) -> dict:
    """classification: a confusion matrix of the saved model on the validation data; sft/causal_lm: a few
    generations (validation prompts for sft, greedy, as the run's own generation metrics decode)."""
    import torch

    from deltatune import api, data
    from deltatune.data.batching import collate, eval_batches
    from deltatune.evaluation.generation import generate

    run = api.load_run(path)
    bundle = data.build(run.config.data.model_copy(), run.tokenizer, labels=run.labels, task=run.config.task)
    if bundle.validation is None:
        return {"not_recorded": "the run had no validation data: no predictions to show"}
    ds = bundle.validation.dataset
    if run.config.task == "classification":
        device = next(run.model.parameters()).device
        matrix = [[0] * len(run.labels) for _ in run.labels]
        with torch.no_grad():
            for ids in eval_batches(list(ds["length"]), run.config.eval.batch_size):
                batch = collate({"input_ids": [ds[i]["input_ids"] for i in ids]}, run.tokenizer.pad_token_id)
                pred = run.model(**{k: v.to(device) for k, v in batch.items()}).logits.argmax(-1).tolist()
                for i, p in zip(ids, pred):
                    matrix[ds[i]["labels"]][p] += 1
        return {"kind": "confusion", "labels": run.labels, "matrix": matrix}
    if "prompt_ids" not in ds.column_names:
        texts = [run.tokenizer.decode(ds[i]["input_ids"][:16], skip_special_tokens=True)
                 for i in range(min(SAMPLE_GENERATIONS, len(ds)))]
        out = api.generate(api.Generator(run.model, run.tokenizer, "raw", str(path)), texts,
                           run.config.eval.max_new_tokens)
        return {"kind": "generations", "rows": [[o["prompt"], "", o["text"]] for o in out]}
    rows = range(min(SAMPLE_GENERATIONS, len(ds)))
    prompts = [ds[i]["prompt_ids"] for i in rows]
    out = generate(run.model, run.tokenizer, prompts, run.config.eval.max_new_tokens)
    return {"kind": "generations", "rows": [[run.tokenizer.decode(prompts[i], skip_special_tokens=True),
                                             ds[i]["reference"], run.tokenizer.decode(new, skip_special_tokens=True)]
                                            for i, (new, _) in zip(rows, out)]}


def _plan(cfg) -> dict:
    from deltatune.plan import memory
    from deltatune.plan.params import quiet

    with quiet():
        return {"line": memory.start_line(memory.estimate(cfg))}


def _note(info: dict, key: str) -> Text | None:
    part = info.get(key) or {}
    return Text(part["not_recorded"], "note") if "not_recorded" in part else None


def _overview(info: dict) -> list:
    s = info["summary"]
    blocks: list = []
    if info["missing"]:
        blocks.append(Text(f"Missing from the run directory: {', '.join(info['missing'])}. The sections that need "
                           f"them say so.", "note"))
    if s is None:
        blocks.append(Text("No summary.json: the run did not finish (or its summary is unreadable); the curves below "
                           "come from metrics.jsonl as far as it got.", "note"))
        return blocks
    metric = s.get("best_metric")
    best = (s.get("best_metrics") or {}).get(metric)
    rows = [["task", s.get("task")], ["model", s.get("model")], ["method", s.get("method")],
            [f"best {metric}", best], ["best step", s.get("best_step")], ["steps", s.get("steps")],
            ["epochs", s.get("epochs_done")], ["trainable parameters", s.get("trainable_params")],
            ["total parameters", s.get("total_params")], ["trainable %", s.get("trainable_percent")],
            ["artifact", f"{s.get('artifact')} ({s.get('artifact_mb')} MB)"],
            ["train seconds", s.get("train_seconds")], ["tokens/s", s.get("tokens_per_s")],
            ["peak RSS MB", s.get("peak_rss_mb")], ["stopped early", s.get("stopped_early")],
            ["skipped steps", s.get("skipped_steps")]]
    blocks.append(Table(["", "value"], [r for r in rows if r[1] is not None]))
    return blocks


def _curves(info: dict) -> list:
    steps = [r for r in info["steps"] if "loss" in r]
    if not steps:
        return [Text("No training steps in metrics.jsonl (missing or empty): no loss or learning-rate curve.",
                     "note")]
    x = [r["step"] for r in steps]
    series = [("train loss", x, [r["loss"] for r in steps])]
    evals = [e for e in info["evals"] if isinstance(e.get("loss"), (int, float))]
    if evals:
        series.append(("validation loss", [e["step"] for e in evals], [e["loss"] for e in evals]))
    blocks: list = [Image("loss", plots.lines(series, "loss", "step", "loss", markers=len(x) < 30), "loss curves")]
    lr = [r for r in steps if "lr" in r]
    if lr:
        blocks.append(Image("lr", plots.lines([("lr", [r["step"] for r in lr], [r["lr"] for r in lr])],
                                              "learning rate", "step", "lr"), "learning rate"))
    return blocks


def _evaluation(info: dict) -> list:
    evals = info["evals"]
    if not evals:
        return [Text("No evaluation recorded (no eval lines in metrics.jsonl, no evals in summary.json).", "note")]
    names = [k for k in evals[0] if k not in ("step", "epoch", "time") and isinstance(evals[0][k], (int, float))]
    bounded = [n for n in names if n != "loss" and all(0 <= (e.get(n) or 0) <= 1 for e in evals)]
    # generated_rows counts the answers a generation metric scored: in the table, not a curve.
    other = [n for n in names if n not in bounded and n not in ("loss", "generated_rows")]
    blocks: list = []
    x = [e.get("step") for e in evals]
    if bounded:
        blocks.append(Image("eval", plots.lines([(n, x, [e.get(n) for e in evals]) for n in bounded],
                                                "evaluation metrics", "step", "value", markers=True),
                            "evaluation metrics over steps"))
    for n in other:
        blocks.append(Image(f"eval-{n}", plots.lines([(n, x, [e.get(n) for e in evals])], n, "step", n,
                                                     logy=n == "perplexity", markers=True), f"{n} over steps"))
    blocks.append(Table(["step", "epoch", *names], [[e.get("step"), e.get("epoch"), *(e.get(n) for n in names)]
                                                      for e in evals]))
    return blocks


def _throughput(info: dict) -> list:
    rows = [r for r in info["steps"] if "tokens_per_s" in r and "time" in r]
    if not rows:
        return [Text("No tokens/s recorded in metrics.jsonl.", "note")]
    png = plots.lines([("tokens/s", [r["time"] for r in rows], [r["tokens_per_s"] for r in rows])],
                      "training throughput", "seconds since training started", "tokens/s", markers=len(rows) < 30)
    return [Image("throughput", png, "tokens per second over time"),
            Text("Each point is one logging window (train.log_every steps); windows with an evaluation or a "
                 "checkpoint in them run slower.")]


def _predictions_section(info: dict) -> list:
    pred = info["predictions"]
    if "not_recorded" in pred:
        return [Text(pred["not_recorded"], "note")]
    if pred["kind"] == "confusion":
        matrix, labels = pred["matrix"], pred["labels"]
        total = sum(map(sum, matrix)) or 1
        right = sum(matrix[i][i] for i in range(len(labels)))
        return [Image("confusion", plots.confusion(matrix, labels), "confusion matrix"),
                Text(f"The saved model on the run's validation data, computed at report time: {right} of "
                     f"{total} right ({right / total:.4f})."),
                Table(["true \\ predicted", *labels], [[lab, *row] for lab, row in zip(labels, matrix)])]
    return [Text("Greedy generations of the saved model for the first validation prompts, computed at report time."),
            Table(["prompt", "reference", "generated"], pred["rows"])]


def _parameters_section(info: dict) -> list:
    part, s = info["parameters"], info["summary"] or {}
    if "not_recorded" in part:
        blocks: list = [Text(part["not_recorded"], "note")]
        if s.get("trainable_params") is not None:
            blocks.append(Text(f"summary.json: {cell(s['trainable_params'])} of {cell(s.get('total_params'))} "
                               f"parameters train."))
        return blocks
    rows = [[name, t, n, f"{100 * t / n:.2f}" if n else "-"] for name, t, n in part["by_type"]]
    check = ""
    if s.get("trainable_params") is not None:
        same = s["trainable_params"] == part["trainable"]
        check = (f" summary.json recorded {cell(s['trainable_params'])} trainable: "
                 + ("the same." if same else "DIFFERENT (the method's code changed since the run?)."))
    return [Text(f"The method applied to the run's model as in training (meta device, no weights): "
                 f"{part['trainable']:,} of {part['total']:,} parameters train.{check}"),
            Table(["module type", "trainable", "total", "trainable %"], rows)]


def _data_section(info: dict) -> list:
    lengths = info["lengths"]
    stats = (info["summary"] or {}).get("data") or (lengths.get("stats") if "stats" in lengths else None)
    blocks: list = []
    if not stats:
        blocks.append(Text("No data accounting recorded (no summary.json) and the data could not be rebuilt.",
                           "note"))
    else:
        rows = []
        for split in ("train", "validation"):
            d = stats.get(split)
            if isinstance(d, dict):
                problems = ", ".join(f"{k}: {v}" for k, v in (d.get("skipped_by_problem") or {}).items()) or "-"
                rows.append([split, d.get("file"), d.get("rows_read"), d.get("rows_used"), d.get("rows_skipped"),
                             problems, d.get("truncated"), d.get("truncated_percent"), d.get("unk_percent")])
        blocks.append(Table(["split", "file", "rows read", "rows used", "rows skipped", "skipped by problem",
                             "truncated", "truncated %", "unknown-token %"], rows))
        for split in ("train", "validation"):
            sample = (stats.get(split) or {}).get("skipped_sample") if isinstance(stats.get(split), dict) else None
            if sample:
                blocks.append(Text(f"{split}: first skipped rows: {json.dumps(sample)[:600]}"))
    if "not_recorded" in lengths:
        blocks.append(Text(lengths["not_recorded"], "note"))
    elif lengths["train"]:
        values = lengths["train"]
        what = "packed training rows" if lengths["packed"] else "training rows"
        blocks.append(Image("lengths", plots.histogram(values, f"token lengths of the {what}", "tokens",
                                                       lengths["max_length"]), "token length histogram"))
        ordered = sorted(values)
        blocks.append(Text(f"{len(values):,} {what}: median {ordered[len(ordered) // 2]} tokens, longest "
                           f"{ordered[-1]}, data.max_length {lengths['max_length']}."))
    return blocks


def _forgetting_section(info: dict) -> list:
    s = info["summary"]
    if s is None:
        return [Text("No summary.json: the forgetting probe's result is not recorded.", "note")]
    f = s.get("forgetting")
    if not f:
        why = ("classification runs train a new head; the probe measures a language model's general text"
               if s.get("task") == "classification" else "the probe was off (eval.forgetting) or did not run")
        return [Text(f"Not measured: {why}.")]
    return [Table(["", "value"], [["text", f.get("text")], ["tokens", f.get("tokens")],
                                  ["perplexity before training", f.get("perplexity_before")],
                                  ["perplexity after training", f.get("perplexity_after")],
                                  ["change %", f.get("change_percent")],
                                  ["measured after step", f.get("measured_after_step")]]),
            Text("Perplexity of the model on general text the run never trained on, before and after: a rise means "
                 "the run traded general ability for the task.")]


def _setup_section(info: dict) -> list:
    s = info["summary"] or {}
    blocks: list = []
    if s:
        dist = s.get("distributed") or {}
        rows = [["precision", f"{s.get('precision')} ({s.get('precision_reason')})"],
                ["frozen base", f"{s.get('frozen_dtype')} ({s.get('frozen_dtype_reason')})"],
                ["distributed", ", ".join(f"{k} {v}" for k, v in dist.items()) if dist else None],
                ["optimizer", f"{s.get('optimizer')} (state {s.get('optimizer_state_mb')} MB)"],
                ["attention", s.get("attention")], ["gradient checkpointing", s.get("gradient_checkpointing")],
                ["compile", (s.get("compile") or {}).get("enabled")], ["global batch", s.get("global_batch")],
                ["resumed from", s.get("resumed_from")]]
        blocks.append(Table(["", "value"], [r for r in rows if r[1] is not None]))
        mem = s.get("memory_per_rank") or []
        if mem:
            blocks.append(Table(["rank", "measured", "loaded MB", "peak MB", "increase MB", "planned increase MB"],
                                [[i, m.get("measured"), m.get("loaded_mb"), m.get("peak_mb"), m.get("peak_increase_mb"),
                                  m.get("planned_increase_mb")] for i, m in enumerate(mem)]))
    else:
        blocks.append(Text("No summary.json: precision, distribution and measured memory are not recorded.", "note"))
    plan = info["plan"]
    blocks.append(Text(plan["not_recorded"], "note") if "not_recorded" in plan else
                  Text(f"Planner, recomputed now from config.yaml for this machine: {plan['line']}"))
    return blocks


def _config_section(info: dict) -> list:
    return [Text(info["config_text"], "pre") if info["config_text"] else
            Text("No config.yaml in the run directory.", "note")]


def _guarded(build, info: dict) -> list:
    """A section whose files hold something unexpected (an older deltatune wrote them, a hand edit) says so
    in its place; the rest of the page still renders."""
    try:
        return build(info)
    except Exception as e:  # noqa: BLE001 - one odd file must not cost the whole report
        return [Text(f"This section could not be drawn from the run's files: {type(e).__name__}: {e}", "note")]


def sections(info: dict) -> list[Section]:
    summary, config = info["summary"] or {}, info["config"] if isinstance(info["config"], dict) else {}
    task = summary.get("task") or config.get("task")
    parts = [("overview", "Overview", _overview), ("curves", "Loss and learning rate", _curves),
             ("evaluation", "Evaluation metrics", _evaluation), ("throughput", "Tokens per second", _throughput),
             ("predictions", "Confusion matrix" if task == "classification" else "Sample generations",
              _predictions_section),
             ("parameters", "Parameters by module type", _parameters_section),
             ("data", "Data accounting", _data_section), ("forgetting", "Forgetting probe", _forgetting_section),
             ("setup", "Precision, distribution, memory plan", _setup_section),
             ("config", "Resolved config", _config_section)]
    return [Section(id_, title, _guarded(build, info)) for id_, title, build in parts]


def write_report(run_dir: str | Path, out: str | Path | None = None, compute: bool = True) -> dict[str, Path]:
    """Write report.html (self-contained; default inside the run directory) and report.md with its PNGs next to
    it. Returns the written paths (`html`, `md`, `png:<name>`)."""
    path = Path(run_dir)
    if not path.is_dir():
        from deltatune.errors import DeltatuneError

        raise DeltatuneError(f"{path}: no such run directory. Fix: pass the output.dir of a deltatune run.")
    info = collect(path, compute)
    s = info["summary"] or {}
    title = f"deltatune run: {path.resolve().name}"
    subtitle = " · ".join(str(v) for v in (s.get("task"), s.get("model"), s.get("method"), info["run_dir"]) if v)
    return write(title, subtitle, sections(info), Path(out) if out else path / "report.html")
