"""The library's front: train a config; evaluate and predict with a saved run directory.

Every CLI command is one call into a function here.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

from deltatune import artifacts, methods, models, prediction, preflight, tasks
from deltatune import config as config_mod
from deltatune import data as data_mod
from deltatune.config import RunConfig
from deltatune.constants import IGNORE_INDEX
from deltatune.data.batching import collate, eval_batches
from deltatune.engine import checkpoints, distributed, faults, loop, precision, runlock, tracking
from deltatune.engine.artifact import artifact_dir
from deltatune.engine.artifact import recover as recover_model_save
from deltatune.engine.report import console, summary_table
from deltatune.errors import ConfigError, DeltatuneError
from deltatune.methods import lora as lora_mod
from deltatune.models import identity


def train(cfg: RunConfig, resume: str | None = None, resume_command: str | None = None) -> dict:
    """Fine-tune as `cfg` says; returns the summary also written to `<output.dir>/summary.json`.

    resume: `auto` continues from the newest complete checkpoint in output.dir (or starts fresh when
    there is none), a path continues from that checkpoint. See docs/reliability.md.
    Rank 0 holds output.dir's lock for the whole run: a second writer is refused. A failure before training
    starts leaves output.dir as it was (a directory this call created is removed); a run replaced by
    output.overwrite comes back if the new one fails before its first save. On SIGINT/SIGTERM the user is
    told where the last checkpoint is and `resume_command` (default: one naming output.dir).
    """
    # deepspeed, once installed, is imported by accelerate inside every save_pretrained: it need not guess the device.
    os.environ.setdefault("DS_ACCELERATOR", precision.default_device().type)
    run_dir = Path(cfg.output.dir)
    lock = runlock.acquire(run_dir, _command_line()) if os.environ.get("RANK", "0") == "0" else None
    progress: dict = {"started": False, "wrote": []}
    try:
        with faults.sigterm_raises():
            if lock is not None:
                runlock.settle(run_dir, checkpoints.has_saved)  # what a killed replacement of this run left
            return _train(cfg, resume, run_dir, lock, progress)
    except BaseException as e:
        rolled_back = lock is not None and _undo_failed_start(lock, progress)
        if lock is not None and isinstance(e, (KeyboardInterrupt, faults.Terminated)):
            console.print(_stopped(e, cfg, run_dir, rolled_back, resume_command), highlight=False, soft_wrap=True)
        raise
    finally:
        if lock is not None:
            lock.release()


def _command_line() -> str:
    """What the lock file says is running, for the message a second writer gets."""
    argv0 = Path(sys.argv[0]).name if sys.argv else ""
    if argv0 in ("deltatune", "__main__.py"):
        return shlex.join(["deltatune", *sys.argv[1:]])
    return shlex.join([Path(sys.executable).name, *sys.argv])


def _undo_failed_start(lock: runlock.Lock, progress: dict) -> bool:
    """After a failure: a replaced run comes back while the new one has saved nothing; before training
    started, what this call created goes. Returns whether a replaced run came back."""
    if lock.replacing:
        lock.rollback()
        return True
    if not progress["started"]:
        if lock.created:
            lock.discard = True  # removed with the lock file on release
        for path in progress["wrote"]:
            path.unlink(missing_ok=True)
    return False


def _stopped(e: BaseException, cfg: RunConfig, run_dir: Path, rolled_back: bool, command: str | None) -> str:
    """What a person needs after Ctrl-C or a SIGTERM: where the run stands and the command to go on."""
    sig = "SIGINT" if isinstance(e, KeyboardInterrupt) else "SIGTERM"
    command = command or f"deltatune train CONFIG output.dir={shlex.quote(str(run_dir))} --resume auto"
    if rolled_back:
        return (f"stopped by {sig} before this run saved anything; the run it was replacing is back in {run_dir} "
                f"as it was.")
    last = checkpoints.latest(checkpoints.checkpoints_dir(run_dir))
    if last is not None:
        return (f"stopped by {sig}; last complete checkpoint: {last} (step {checkpoints.step_of(last)}).\n"
                f"  Resume with: {command}")
    every = cfg.train.save_every
    why = (f"train.save_every={every} and the run stopped before step {every}" if every
           else "train.save_every is not set")
    return (f"stopped by {sig}; no checkpoint was saved ({why}), so this run cannot resume.\n"
            f"  Start it again with: {command}   (it starts over); set train.save_every=N (e.g. 100) to write a "
            f"resumable checkpoint every N steps.")


def _train(cfg: RunConfig, resume: str | None, run_dir: Path, lock: runlock.Lock | None, progress: dict) -> dict:
    if resume == "auto" and (run_dir / "summary.json").exists():
        console.print(f"--resume auto: {run_dir} holds a finished run; nothing to resume.", highlight=False,
                      soft_wrap=True)
        return json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    resume_from = checkpoints.resolve(cfg, resume)
    if resume == "auto" and resume_from is None:
        console.print(f"--resume auto: no complete checkpoint in {checkpoints.checkpoints_dir(run_dir)}; starting "
                      f"from the beginning.", highlight=False, soft_wrap=True)
    preflight.run(cfg, resuming=resume_from is not None)
    tracking.check(cfg.output)  # a tracker whose package is missing: refused before anything loads
    dist = distributed.setup(group=cfg.train.distributed in ("fsdp", "deepspeed"))  # these need a group of one too
    try:
        if dist.is_main:
            _prepare_run_dir(cfg, run_dir, resume_from, fresh_ok=resume == "auto", lock=lock,
                             wrote=progress["wrote"])
        dist.barrier()
        if dist.world > 1 and cfg.train.save_every and not (run_dir / "config.yaml").exists():
            raise ConfigError(f"output.dir={run_dir}: rank {dist.rank} does not see the run directory rank 0 wrote "
                              f"(config.yaml). Checkpoints are written by every rank into it: put output.dir on a "
                              f"directory shared by every node (same path), or unset train.save_every.")
        t0 = time.perf_counter()
        loop.seed_everything(cfg.train.seed)
        tokenizer = models.load_tokenizer(cfg.model.name, cfg.model.revision, cfg.model.trust_remote_code)
        bundle = data_mod.build(cfg.data, tokenizer, task=cfg.task, min_rows=cfg.train.batch_size)
        if dist.is_main:
            if not (run_dir / "labels.json").exists():
                progress["wrote"].append(run_dir / "labels.json")
            (run_dir / "labels.json").write_text(json.dumps(bundle.labels, indent=1), encoding="utf-8")
        # Seed again so the new head's initialisation does not depend on how much data work ran.
        loop.seed_everything(cfg.train.seed)
        attention = models.attention_for(cfg.model.attention, dist.device)
        model = models.load_model(cfg.task, cfg.model.name, bundle.labels, tokenizer, cfg.model.revision,
                                  cfg.model.trust_remote_code, attention, **_load_kwargs(cfg, dist.device))
        model = methods.apply(model, cfg.method, cfg.task)
        trainable, total = methods.count_parameters(model)
        if trainable == 0:
            raise ConfigError(f"method.name={cfg.method.name}: nothing in `{cfg.model.name}` would train "
                              f"(e.g. LLaMA-family layers have no bias terms for bitfit). Fix: choose another "
                              f"method, such as lora or ln_tuning.")
        if dist.is_main:
            console.print(f"[bold]{cfg.method.name}[/]: {trainable:,} of {total:,} parameters train "
                          f"({100 * trainable / total:.3f}%); {lr_line(cfg)}", highlight=False)
        setup_s = time.perf_counter() - t0
        lr_scale = methods.REGISTRY[cfg.method.name].lr_scale
        resume_step = None if resume_from is None else checkpoints.step_of(resume_from)
        with tracking.opened(cfg, run_dir, resume_step, dist.is_main) as trackers:  # output.tracking
            progress["started"] = True  # from here a failure leaves the run directory for a resume to use
            try:
                result = loop.train(model, tokenizer, bundle, cfg, run_dir, dist,
                                    lr_scale=(lambda name: lr_scale(cfg.method, name)) if lr_scale else None,
                                    resume=resume_from, trackers=trackers)
            except (RuntimeError, MemoryError) as e:
                if not faults.is_oom(e):
                    raise
                raise faults.out_of_memory(e, cfg, dist.device) from None
            saved = artifact_dir(run_dir, model)
            summary = {"run_dir": str(run_dir), "task": cfg.task, "model": cfg.model.name, "method": cfg.method.name,
                       # what `deltatune serve` checks an adapter's base against (models/identity.py)
                       "base": identity.identity(cfg.model.name, cfg.model.revision),
                       "labels": bundle.labels, "data": bundle.stats, "setup_seconds": round(setup_s, 2),
                       "trainable_percent": round(100 * trainable / total, 4), "artifact": saved.name,
                       "lr": cfg.train.lr, "lr_auto": cfg.train.lr_auto,
                       "artifact_mb": round(_weights_mb(saved), 3), **result}
            if dist.is_main:
                (run_dir / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
                console.print(summary_table(summary))
            trackers.finish(summary)
        return summary
    finally:
        distributed.teardown(dist, ok=sys.exc_info()[1] is None)  # no barrier while an exception propagates


def lr_line(cfg: RunConfig) -> str:
    """The learning rate a run trains with, and where it came from (printed at start)."""
    if cfg.train.lr_auto:
        return (f"lr {cfg.train.lr:g} (train.lr=auto: {cfg.method.name}'s measured default, docs/methods.md"
                f"#learning-rates; set train.lr to choose)")
    return f"lr {cfg.train.lr:g} (train.lr)"


# What a run directory holds; output.overwrite replaces only a directory with some of these in it.
RUN_FILES = ("config.yaml", "summary.json", "labels.json", "metrics.jsonl", "model", "adapter", checkpoints.DIRNAME)


def _prepare_run_dir(cfg: RunConfig, run_dir: Path, resume_from: Path | None, fresh_ok: bool,
                     lock: runlock.Lock | None = None, wrote: list[Path] | None = None) -> None:
    """Make output.dir ready: a resume keeps everything up to its checkpoint; a fresh start never mixes
    with (or silently deletes) what an unfinished run left there. A run being replaced is moved aside,
    and removed only once the new run has saved its first model or checkpoint (runlock)."""
    recover_model_save(run_dir)
    ckdir = checkpoints.checkpoints_dir(run_dir)
    removed = checkpoints.remove_debris(ckdir)
    if removed:
        console.print(f"removed incomplete checkpoint(s) left by a killed process: {', '.join(removed)}",
                      highlight=False, soft_wrap=True)
    held = [p.name for p in run_dir.iterdir() if p.name != runlock.LOCK] if run_dir.is_dir() else []
    if resume_from is not None:
        step = checkpoints.step_of(resume_from)
        newer = [p for p in checkpoints.complete(ckdir) if checkpoints.step_of(p) > step]
        for p in newer:  # an abandoned branch: `--resume auto` must never pick it up later
            checkpoints.delete(p)
        if newer:
            console.print(f"removed {len(newer)} checkpoint(s) newer than {resume_from.name} (the branch this "
                          f"resume abandons): {', '.join(p.name for p in newer)}", highlight=False, soft_wrap=True)
        (run_dir / "summary.json").unlink(missing_ok=True)  # finished again only when this resume finishes
        checkpoints.truncate_metrics(run_dir, step)
    elif held and cfg.output.overwrite:
        if not any(name in RUN_FILES for name in held):
            raise ConfigError(f"output.dir: {run_dir} is not a deltatune run (it holds {', '.join(sorted(held)[:5])}"
                              f"{' ...' if len(held) > 5 else ''}); output.overwrite=true replaces only a run. "
                              f"Fix: choose another output.dir.")
        _replace(lock, run_dir, "output.overwrite=true")
    elif run_dir.exists() and not (run_dir / "summary.json").exists() and (left := checkpoints.leftovers(run_dir)):
        if not fresh_ok:
            raise ConfigError(f"output.dir: {run_dir} holds an unfinished run ({', '.join(left)}). Fix: "
                              f"`deltatune train CONFIG --resume auto` to continue it from its newest checkpoint, "
                              f"output.overwrite=true to start it over, or another output.dir.")
        _replace(lock, run_dir, f"starting over in {run_dir}: replacing what the unfinished run left "
                                f"({', '.join(left)})")
    run_dir.mkdir(parents=True, exist_ok=True)
    if wrote is not None and not (run_dir / "config.yaml").exists():
        wrote.append(run_dir / "config.yaml")
    (run_dir / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    if resume_from is not None:
        with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"resume": {"from": str(resume_from), "step": checkpoints.step_of(resume_from)}}) + "\n")


def _replace(lock: runlock.Lock | None, run_dir: Path, why: str) -> None:
    if lock is None:  # a caller without the lock (not `train`): nothing to keep the old run for
        console.print(why, highlight=False, soft_wrap=True)
        shutil.rmtree(run_dir)
    else:
        lock.replace(why)


def _load_kwargs(cfg: RunConfig, device: torch.device) -> dict:
    """Method-specific loading, e.g. QLoRA's 4-bit base (computing in bf16 where that is native)."""
    method = methods.REGISTRY[cfg.method.name]
    if method.load_kwargs is None:
        return {}
    compute = precision.resolve(cfg.train.precision, device).dtype or torch.float32
    return method.load_kwargs(cfg.method, compute, device)


def _weights_mb(path: Path) -> float:
    """Size on disk of the saved weights (safetensors files), i.e. what a user ships per task."""
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20 if path.exists() else 0.0


# ---------------------------------------------------------------------------------------------
# Using a finished run


@dataclass
class LoadedRun:
    path: Path
    config: RunConfig
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    labels: list[str]


def load_run(run_dir: str | Path, device: str | None = None) -> LoadedRun:
    path = Path(run_dir)
    runlock.settle_unlocked(path, checkpoints.has_saved)  # a killed output.overwrite of this run
    recover_model_save(path)  # a save killed between its two renames left the complete old copy aside
    for needed in ("config.yaml", "labels.json"):
        if not (path / needed).exists() or not ((path / "model").exists() or (path / "adapter").exists()):
            raise DeltatuneError(f"{path}: not a finished deltatune run (missing {needed}). "
                                 f"Fix: pass the output.dir of a run that completed `deltatune train`.")
    cfg = config_mod.load(path / "config.yaml")
    if not (path / "summary.json").exists():
        console.print(f"note: {path} is a run that did not finish (no summary.json); using the best model it "
                      f"saved before it stopped.", highlight=False, soft_wrap=True)
    labels = json.loads((path / "labels.json").read_text(encoding="utf-8"))
    artifact = path / ("adapter" if (path / "adapter").exists() else "model")
    artifacts.check(path, artifact)
    target = torch.device(device or precision.default_device())
    # The attention kernel the run trained and evaluated with: eager and SDPA differ in the last bits, and
    # `deltatune eval` of a saved run should reproduce the run's own evaluation.
    attention = models.attention_for(cfg.model.attention, target)
    if artifact.name == "adapter":
        # The base comes from where the run found it; the adapter (and the trained head) from the run.
        from peft import PeftModel

        with artifacts.reading(path, artifact):
            tokenizer = AutoTokenizer.from_pretrained(artifact)
        # Seeded as in training, so even the untrained copy of the head peft keeps is reproduced.
        loop.seed_everything(cfg.train.seed)
        base = models.load_model(cfg.task, cfg.model.name, labels, tokenizer, cfg.model.revision,
                                 cfg.model.trust_remote_code, attention, **_load_kwargs(cfg, target))
        from deltatune.methods import adapter as bottleneck

        with artifacts.reading(path, artifact):
            own = bottleneck.is_saved_adapter(artifact)  # deltatune's own format; peft cannot read it
            model = bottleneck.from_pretrained(base, artifact) if own else PeftModel.from_pretrained(base, artifact)
        if not own and cfg.method.name == "prefix_tuning" and cfg.task == "classification":
            from deltatune.methods.peft_methods import prefix_through_cache

            model = prefix_through_cache(model)
    else:
        auto = AutoModelForSequenceClassification if cfg.task == "classification" else AutoModelForCausalLM
        with artifacts.reading(path, artifact):
            tokenizer = AutoTokenizer.from_pretrained(artifact)
            model = auto.from_pretrained(artifact, dtype=torch.float32, attn_implementation=attention)
    if not lora_mod.is_quantized(model):  # 4-/8-bit weights are placed by device_map and cannot move
        model.to(target)
    model.eval()
    return LoadedRun(path, cfg, model, tokenizer, labels)


def evaluate(run_dir: str | Path, data_file: str | None = None) -> dict:
    """Metrics of a saved run on a labelled file (default: the run's own validation data)."""
    run = load_run(run_dir)
    section = run.config.data.model_copy()
    skipped = 0
    if data_file is not None:  # read, checked and tokenized as in training (data.on_error as the run had it)
        split, skipped = data_mod.build_eval(section, run.tokenizer, run.labels, run.config.task, data_file)
    else:
        bundle = data_mod.build(section, run.tokenizer, labels=run.labels, task=run.config.task)
        if bundle.validation is None:
            raise ConfigError(f"{run.path}: the run had no validation data. Fix: pass --data FILE.")
        split = bundle.validation
    prec = precision.resolve(run.config.train.precision, next(run.model.parameters()).device)
    device = next(run.model.parameters()).device
    lm = run.config.lm
    gen = loop.generation_inputs(split, run.config, run.tokenizer) if tasks.has_prompts(run.config.task) else None
    if run.config.task == "preference":
        result = _evaluate_pairs(run, split, prec, gen)
    else:
        result = loop.evaluate(run.model, split, len(run.labels), prec, device, run.tokenizer.pad_token_id,
                               run.config.eval.batch_size, lm, gen, lm and loop.accepts_logits_mask(run.model))
    result["rows"] = split.rows
    result["rows_skipped"] = skipped
    result["truncated"] = split.truncated
    return result


def _evaluate_pairs(run: LoadedRun, split, prec: precision.Precision, gen) -> dict:
    """A preference run's metrics on `split`; the reference as in training (engine/preference.py)."""
    from deltatune.engine import preference as pref

    cfg, base = run.config, None
    if pref.reference_kind(cfg, run.model)[0] == "precomputed" and not pref.switches_off(cfg, run.model):
        # The initial model these methods' references were computed from is the base loaded alone.
        device = next(run.model.parameters()).device
        base = models.load_model(cfg.task, cfg.model.name, run.labels, run.tokenizer, cfg.model.revision,
                                 cfg.model.trust_remote_code, models.attention_for(cfg.model.attention, device)
                                 ).to(device)
    return pref.evaluate_saved(cfg, run.model, run.tokenizer, split, prec, loop.base_only, loop.LM_LOGITS_BUDGET,
                               base, gen)


@torch.no_grad()
def predict(run_dir: str | Path | LoadedRun, texts: list[str], batch_size: int = 64) -> list[dict]:
    """One row per text, in order: `label`, its probability `score` and every label's in `scores`;
    `tokens` kept of `tokens_total`, `truncated` when the text was longer than data.max_length; a blank
    text is not scored (label, score, scores None) and its `problem` says "empty text"."""
    run = run_dir if isinstance(run_dir, LoadedRun) else load_run(run_dir)
    if run.config.task != "classification":
        raise DeltatuneError(f"{run.path}: predict labels texts with a classification run; this is a "
                             f"{run.config.task} run. Use `deltatune eval` for its loss/perplexity.")
    keep, enc, rows = prediction.encode(run.tokenizer, texts, run.config.data.max_length)
    device = next(run.model.parameters()).device
    for ids in eval_batches([len(x) for x in enc], batch_size):
        batch = collate({"input_ids": [enc[i] for i in ids]}, run.tokenizer.pad_token_id)
        probs = run.model(**{k: v.to(device) for k, v in batch.items()}).logits.float().softmax(-1).cpu()
        for row, i in enumerate(ids):
            prediction.fill(rows[keep[i]], run.labels, probs[row])
    return rows


# ---------------------------------------------------------------------------------------------
# Decoders: prompts, generation, looking at the training data


def prompt_template(cfg: RunConfig, tokenizer: PreTrainedTokenizerBase) -> str:
    """How prompts are rendered for this run: `chat` (the tokenizer's template), `alpaca`, or `raw`
    text (causal_lm runs continue text as it is). Preference runs render their prompts as sft does."""
    from deltatune.data import sft

    return sft.resolve_template(cfg.data.template, tokenizer) if tasks.has_prompts(cfg.task) else "raw"


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, template: str) -> list[int]:
    """Token ids that end exactly where the model's answer should begin."""
    from deltatune.data import sft

    if template == "chat":
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return sft.open_prompt(tokenizer, text, special=False)
    return sft.open_prompt(tokenizer, sft.alpaca_prompt(prompt) if template == "alpaca" else prompt)


@dataclass
class Generator:
    """A decoder ready to answer prompts: a run (full, adapter) or a plain/merged model directory."""
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    template: str
    source: str


def load_generator(path: str | Path, template: str | None = None, device: str | None = None) -> Generator:
    """`path`: a run directory (config.yaml inside), or a model directory such as `deltatune merge`'s output.
    `template` overrides how prompts are rendered (chat | alpaca | raw)."""
    path = Path(path)
    if (path / "config.yaml").exists():
        run = load_run(path, device)
        if run.config.task == "classification":
            raise DeltatuneError(f"{path}: generate needs a causal_lm, sft or preference run; this run classifies "
                                 f"texts. Use `deltatune predict`.")
        return Generator(run.model, run.tokenizer, template or prompt_template(run.config, run.tokenizer), str(path))
    if not (path / "config.json").exists():
        raise DeltatuneError(f"{path}: neither a deltatune run (config.yaml) nor a model directory (config.json). "
                             f"Fix: pass a run's output.dir or the directory `deltatune merge` wrote.")
    report = path / "merge_report.json"
    saved = json.loads(report.read_text(encoding="utf-8")).get("prompt_template") if report.exists() else None
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = model.to(device or precision.default_device()).eval()
    default = saved or ("chat" if getattr(tokenizer, "chat_template", None) else "raw")
    return Generator(model, tokenizer, template or default, str(path))


def generate(source: str | Path | Generator, prompts: list[str], max_new_tokens: int = 64, sample: bool = False,
             temperature: float = 0.7, top_p: float = 0.9, seed: int = 0, template: str | None = None) -> list[dict]:
    """Answer each prompt: greedy by default, or sampled (temperature, top_p, seeded). Stops at EOS."""
    from deltatune.evaluation.generation import generate as generate_ids

    gen = source if isinstance(source, Generator) else load_generator(source, template)
    chosen = template or gen.template
    ids = [encode_prompt(gen.tokenizer, p, chosen) for p in prompts]
    torch.manual_seed(seed)
    out = generate_ids(gen.model, gen.tokenizer, ids, max_new_tokens, do_sample=sample, temperature=temperature,
                       top_p=top_p)
    return [{"prompt": p, "text": gen.tokenizer.decode(new, skip_special_tokens=True), "new_tokens": len(new),
             "stopped_at_eos": stopped, "template": chosen} for p, (new, stopped) in zip(prompts, out)]


def _first_rows(cfg: RunConfig, rows: int, split: str):
    """The tokenizer and the first `rows` tokenized rows of a split, as training builds them."""
    tokenizer = models.load_tokenizer(cfg.model.name, cfg.model.revision, cfg.model.trust_remote_code)
    bundle = data_mod.build(cfg.data, tokenizer, task=cfg.task)
    part = bundle.train if split == "train" else bundle.validation
    if part is None:
        raise ConfigError("inspect-data: this config has no validation split")
    return tokenizer, part.dataset.select(range(min(rows, len(part.dataset))))


def inspect_data(cfg: RunConfig, rows: int = 3, split: str = "train") -> list[list[tuple[str, bool]]]:
    """The first few training examples as the model sees them: (token, carries loss) pairs."""
    from deltatune.data import sft

    tokenizer, ds = _first_rows(cfg, rows, split)
    out = []
    for r in range(len(ds)):
        ids = ds[r]["input_ids"]
        if "labels" in ds.column_names and cfg.lm:
            labels = ds[r]["labels"]
        elif not cfg.lm:
            labels = [IGNORE_INDEX] * len(ids)  # the loss is on the label, not on tokens
        else:
            labels = [IGNORE_INDEX] + ids[1:]  # plain causal LM: every token after the first is a target
        out.append(sft.show(tokenizer, ids, labels))
    return out


def inspect_pairs(cfg: RunConfig, rows: int = 3, split: str = "train") -> list:
    """The first few preference pairs as the model sees them (data.preference.PairView: the prompt once, then
    each answer's (token, carries loss) pairs)."""
    from deltatune.data import preference

    tokenizer, ds = _first_rows(cfg, rows, split)
    return [preference.show_pair(tokenizer, ds[r]) for r in range(len(ds))]
