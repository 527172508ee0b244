"""RunConfig: the validated description of one run, loaded from YAML plus `section.key=value` overrides.

Unknown keys, wrong types and out-of-range values are errors that name the key, the file and line
where it was set (or the override that set it), and the nearest valid key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from deltatune.errors import ConfigError, did_you_mean
from deltatune.evaluation.metrics import HIGHER_IS_BETTER
from deltatune.methods import REGISTRY, MethodConfig
from deltatune.sections import Section
from deltatune.tasks import TASKS, is_lm  # noqa: F401 - is_lm: imported from here too

EVAL_METRICS = ("auto", *HIGHER_IS_BETTER)  # every metric some task evaluates (metrics.TASK_METRICS says which)


class ModelSection(Section):
    name: str = Field("minilm-l6", description="built-in name, Hugging Face id, or local directory")
    revision: str | None = None
    trust_remote_code: bool = False
    attention: Literal["auto", "eager", "sdpa"] = Field(
        "auto", description="attention kernel; auto = eager on CPU (its backward measured ~25% faster), sdpa on GPU")
    frozen_dtype: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="dtype of the frozen base's linear weights (methods that freeze the base); auto = bf16 "
        "when the run trains in bf16 (no per-step casts, half the memory), else fp32")


class DataSection(Section):
    train: str = Field(..., description="builtin:NAME or a .csv/.tsv/.jsonl/.parquet file")
    validation: str | float | None = Field(0.1, description="a file, or a seeded fraction of train")
    text: str = "text"
    text_pair: str | None = None
    label: str = "label"
    labels: list[str] | None = Field(None, description="label names in id order (default: sorted)")
    columns: list[str] | None = Field(None, description="column names for CSV/TSV files without a header")
    max_length: int = Field(128, ge=8, le=32768)
    seed: int = 42
    sample: int | None = Field(None, ge=1, description="train on a seeded sample of this many training rows "
                               "(taken after the validation split)")
    format: Literal["auto", "text", "alpaca", "messages"] = Field(
        "auto", description="sft rows: alpaca (instruction/input/output columns) or messages (chat turns); "
        "auto picks by columns")
    template: Literal["auto", "chat", "alpaca"] = Field(
        "auto", description="how sft prompts are rendered: the tokenizer's chat template, or the Alpaca prompt; "
        "auto = chat when the tokenizer has one")
    packing: bool = Field(False, description="causal_lm/sft: pack several examples per sequence, isolated from "
                          "each other (block-diagonal attention, positions restarting at 0)")
    on_error: Literal["raise", "skip"] = Field(
        "raise", description="bad rows: raise (name file, line, problem) or skip (drop, count, report)")
    id: str | None = Field(None, description="id column checked for duplicates (default: `id` if the data has it)")
    max_chars: int | None = Field(None, ge=1, description="a text longer than this many characters is bad data "
                                  "(e.g. a broken quote swallowed the file); default 1000 x max_length")

    @field_validator("validation")
    @classmethod
    def _fraction(cls, v: str | float | None) -> str | float | None:
        if isinstance(v, float) and not 0.0 < v < 1.0:
            raise ValueError("a validation fraction must be between 0 and 1 (e.g. 0.1)")
        return v


class TrainSection(Section):
    epochs: float = Field(3, gt=0)
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    batch_size: int = Field(32, ge=1, description="micro-batch per process; step = batch x grad_accum x procs")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: float | Literal["auto"] = Field(
        "auto", description="learning rate; auto: the method's own default, chosen from measured runs "
        "(docs/methods.md#learning-rates). Once loaded it is a number (`lr_auto` says it came from auto)")
    weight_decay: float = Field(0.01, ge=0)
    warmup: float = Field(0.06, ge=0, description="fraction of steps (<1) or a number of steps (>=1)")
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    _lr_auto: bool = PrivateAttr(False)

    @field_validator("lr")
    @classmethod
    def _lr_range(cls, v: float | str) -> float | str:
        if v != "auto" and not 0.0 < v < 1.0:
            raise ValueError("must be between 0 and 1 (e.g. 1e-4), or auto (the method's measured default)")
        return v

    @property
    def lr_auto(self) -> bool:
        """Whether `lr` is the method's default because the config said `auto` (or nothing)."""
        return self._lr_auto
    max_grad_norm: float | None = Field(1.0, gt=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    seed: int = 42
    log_every: int = Field(10, ge=1)
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "adafactor"] = Field(
        "adamw", description="adamw (torch, fused); adamw_8bit / paged_adamw_8bit (bitsandbytes: 8-bit states, "
        "paged to CPU under memory pressure); adafactor (factored second moments)")
    compile: bool = False
    compile_cache: str | None = Field(None, description="directory of torch.compile's persistent kernel cache "
                                      "(default: the deltatune cache); reused by later runs")
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass: "
                                         "much less activation memory for ~30% more compute")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads (default: all cores)")
    save_every: int | None = Field(None, ge=1, description="write a resumable checkpoint every N optimizer steps")
    keep_last: int = Field(2, ge=1, description="resumable checkpoints kept (the best is always kept too)")
    max_bad_steps: int = Field(3, ge=1, description="stop after this many non-finite steps in a row")
    distributed: Literal["auto", "ddp", "fsdp", "deepspeed"] = Field(
        "auto", description="with several processes (--nproc N or torchrun): ddp replicates the model; fsdp shards "
        "it per transformer block (FSDP2); deepspeed runs DeepSpeed ZeRO; auto = ddp when more than one process")
    zero_stage: Literal[1, 2, 3] = Field(2, description="deepspeed: 1 shards optimizer state, 2 also gradients, "
                                         "3 also parameters")
    offload: Literal["none", "optimizer", "all"] = Field(
        "none", description="fsdp/deepspeed: keep optimizer state (and with `all` parameters too) in CPU memory")
    deepspeed_config: str | None = Field(None, description="deepspeed: a DeepSpeed JSON file used as it is (its "
                                         "batch sizes must agree with train.batch_size and train.grad_accum)")


class EvalSection(Section):
    every: Literal["epoch"] | int = Field("epoch", description="`epoch` or a number of optimizer steps")
    metric: Literal[EVAL_METRICS] = Field(
        "auto", description="picks the best checkpoint; auto = accuracy (classification) or loss (causal_lm, sft, "
        "preference); exact_match / label_accuracy generate answers (sft, preference: scored against the chosen "
        "answer); reward_accuracy / reward_margin / preference_accuracy (preference)")
    patience: int | None = Field(None, ge=1, description="stop after this many evals without improvement")
    batch_size: int = Field(64, ge=1)
    at_start: bool = Field(False, description="also evaluate before the first step (the base model's score, "
                           "e.g. zero-shot accuracy)")
    max_new_tokens: int = Field(16, ge=1, description="generation-based metrics: tokens generated per answer")
    generate_rows: int | None = Field(200, ge=1, description="generation-based metrics: validation rows used "
                                      "(seeded sample; null = all)")
    forgetting: bool = Field(True, description="causal_lm/sft: perplexity on general text (BBC News) before and "
                             "after training, reported in summary.json")
    forgetting_rows: int = Field(32, ge=1, description="articles (256 tokens each) in the forgetting probe")

    @field_validator("every")
    @classmethod
    def _every(cls, v: Any) -> Any:
        if isinstance(v, int) and v < 1:
            raise ValueError("eval.every must be `epoch` or a positive number of steps")
        return v


class OutputSection(Section):
    dir: str = "runs/default"
    overwrite: bool = Field(False, description="replace an existing run directory")
    tracking: list[Literal["tensorboard", "mlflow"]] = Field(
        default_factory=list, description="experiment trackers that also get metrics.jsonl's records, the config "
        "and the summary: tensorboard (<output.dir>/tensorboard/), mlflow (see output.mlflow_uri); docs/tracking.md")
    mlflow_uri: str | None = Field(None, description="MLflow tracking URI (a server, sqlite:///mlflow.db, a "
                                   "directory); default: $MLFLOW_TRACKING_URI, else ./mlruns (a local file store)")
    mlflow_experiment: str | None = Field(None, description="MLflow experiment of the run; default: "
                                          "$MLFLOW_EXPERIMENT_NAME, else deltatune")

    @field_validator("tracking", mode="before")
    @classmethod
    def _tracking_list(cls, v: Any) -> Any:
        # `output.tracking=tensorboard` or `=tensorboard,mlflow` on the command line is YAML for a string.
        return [part.strip() for part in v.split(",") if part.strip()] if isinstance(v, str) else v

    @field_validator("tracking")
    @classmethod
    def _once_each(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("each tracker at most once")
        return v

    @field_validator("mlflow_uri", "mlflow_experiment")
    @classmethod
    def _mlflow_only(cls, v: str | None, info: ValidationInfo) -> str | None:
        # Set but not read would be a setting silently ignored.
        if v is not None and "mlflow" not in (info.data.get("tracking") or []):
            raise ValueError(f"read only by the mlflow tracker, and output.tracking does not list mlflow. Fix: add "
                             f"it (e.g. output.tracking=[mlflow]), or remove output.{info.field_name}")
        return v


class PreferenceSection(Section):
    """task: preference. Hyper-parameters left unset take the loss's own default (preference/losses.py); one the
    chosen loss does not have is an error."""
    loss: Literal["dpo", "ipo", "simpo", "orpo"] = Field("dpo", description="dpo | ipo | simpo | orpo")
    beta: float | None = Field(None, gt=0, description="dpo/ipo/simpo: strength (dpo 0.1, ipo 0.1, simpo 2.0)")
    label_smoothing: float | None = Field(None, ge=0, lt=0.5, description="dpo: conservative DPO's label noise")
    gamma: float | None = Field(None, ge=0, description="simpo: the target reward margin (default 1.0)")
    lambda_: float | None = Field(None, ge=0, alias="lambda", description="orpo: weight of the odds-ratio term "
                                  "(default 0.1)")
    reference: Literal["auto", "precomputed"] = Field(
        "auto", description="dpo/ipo: auto (peft adapters: the model with its adapter off, live; other methods: "
        "precomputed) | precomputed (one pass over the pairs before training, cached in the run)")
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(),
                              populate_by_name=True, serialize_by_alias=True)

    def hyper(self) -> dict[str, float]:
        """The loss's keyword arguments: what the config set, over the loss's defaults."""
        from deltatune.preference.losses import LOSSES

        return {**LOSSES[self.loss].params, **{k: v for k, v in self.model_dump(by_alias=False).items()
                                                 if k in LOSSES[self.loss].params and v is not None}}

    @model_validator(mode="after")
    def _keys_of_the_loss(self) -> PreferenceSection:
        from deltatune.preference.losses import LOSSES

        takes = LOSSES[self.loss].params
        extra = [("lambda" if k == "lambda_" else k) for k, v in self.model_dump(by_alias=False).items()
                 if k not in ("loss", "reference") and v is not None and k not in takes]
        if self.reference != "auto" and not LOSSES[self.loss].needs_reference:
            extra.append("reference")
        if extra:
            raise ValueError(f"preference.loss={self.loss} takes {', '.join(k.rstrip('_') for k in takes)}; "
                             f"{', '.join(extra)}: not a {self.loss} setting (remove it, or choose the loss it "
                             f"belongs to)")
        return self


class RunConfig(Section):
    task: Literal[TASKS] = "classification"
    model: ModelSection = ModelSection()
    method: MethodConfig = Field(default_factory=lambda: REGISTRY["full"].Config())
    data: DataSection
    train: TrainSection = TrainSection()
    eval: EvalSection = EvalSection()
    output: OutputSection = OutputSection()
    preference: PreferenceSection = PreferenceSection()

    @model_validator(mode="after")
    def _resolve_lr(self) -> RunConfig:
        """train.lr=auto becomes the method's default here, once, so everything downstream sees a number and the
        run directory's config.yaml records the value that trained (re-running it trains the same)."""
        if self.train.lr == "auto":
            self.train.lr = REGISTRY[self.method.name].default_lr
            self.train._lr_auto = True
        return self

    @property
    def metric(self) -> str:
        """eval.metric with `auto` resolved for the task."""
        if self.eval.metric != "auto":
            return self.eval.metric
        return "loss" if self.lm else "accuracy"

    @property
    def lm(self) -> bool:
        """The task trains a language model, not a classifier (see `is_lm`)."""
        return is_lm(self.task)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Loading


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (optional), apply `section.key=value` overrides, validate."""
    raw: dict[str, Any] = {}
    lines: dict[tuple[str, ...], int] = {}
    source = "<overrides>"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        text = path.read_text(encoding="utf-8")
        try:
            raw = yaml.safe_load(text) or {}
            lines = _key_lines(yaml.compose(text), source=source)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (task:, model:, ...)")
    origin = {k: f"{source}:{line}" for k, line in lines.items()}
    overridden: set[tuple[str, ...]] = set()
    for item in overrides or []:
        keys, value = parse_override(item)
        _set(raw, keys, value, item)
        origin[keys] = f"override `{item}`"
        overridden.add(keys)
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as e:
        method = (raw.get("method") or {}).get("name", "full") if isinstance(raw.get("method"), dict) else None
        raise ConfigError(_explain(e, origin, source, method)) from None
    if ("task",) in overridden and ("eval", "metric") not in overridden:
        _metric_follows_task(cfg, origin.get(("eval", "metric"), source))
    return cfg


def _metric_follows_task(cfg: RunConfig, where: str) -> None:
    """A recipe's eval.metric that the task set on the command line does not have (quickstart's `accuracy`
    with task=causal_lm) follows the task, as `auto` would. Only then: a metric set on the command line, or
    a file that names a task and a metric that contradict each other, stay errors (preflight.run)."""
    if cfg.eval.metric == "auto":
        return
    from deltatune.evaluation.metrics import TASK_METRICS

    if cfg.eval.metric in TASK_METRICS[cfg.task]:
        return
    written = cfg.eval.metric
    cfg.eval.metric = "auto"
    from deltatune.engine.report import console

    console.print(f"note: eval.metric={written} ({where}) does not exist for task {cfg.task} (set on the command "
                  f"line); using {cfg.metric}, as eval.metric=auto would. To choose another, add "
                  f"eval.metric=... ({', '.join(TASK_METRICS[cfg.task])}).", highlight=False, soft_wrap=True)


def parse_override(item: str) -> tuple[tuple[str, ...], Any]:
    """`method.target_modules=[query,value]` -> (("method", "target_modules"), ["query", "value"])."""
    if "=" not in item:
        raise ConfigError(f"override `{item}` must look like section.key=value (e.g. train.lr=1e-4)")
    key, _, text = item.partition("=")
    keys = tuple(k for k in key.strip().split(".") if k)
    if not keys:
        raise ConfigError(f"override `{item}` has no key before `=`")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override `{item}`: value is not valid YAML: {e}") from None
    # YAML 1.1 reads 1e-4 as a string; users mean a number.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value.lower() for c in ".e") else value
        except ValueError:
            pass
    return keys, value


def _set(raw: dict[str, Any], keys: tuple[str, ...], value: Any, item: str) -> None:
    node = raw
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override `{item}`: `{k}` is a value, not a section")
        node = child
    node[keys[-1]] = value


def _key_lines(node: Any, prefix: tuple[str, ...] = (), source: str = "") -> dict[tuple[str, ...], int]:
    """Map each key path in a composed YAML document to its 1-based line number.

    A key written twice in one mapping is an error naming both lines: YAML loaders silently keep the last."""
    out: dict[tuple[str, ...], int] = {}
    if isinstance(node, yaml.MappingNode):
        here: dict[str, int] = {}
        for key_node, value_node in node.value:
            key, line = str(key_node.value), key_node.start_mark.line + 1
            path = (*prefix, key)
            if key in here:
                raise ConfigError(f"{source}:{here[key]} and {source}:{line}: `{'.'.join(path)}` is set twice (YAML "
                                  f"would silently keep the second). Fix: delete one of them, or merge the two.")
            here[key] = line
            out[path] = line
            out.update(_key_lines(value_node, path, source))
    return out


def _section_fields(path: tuple[str | int, ...], method: str | None = None) -> list[str]:
    if path == ("method",):
        return list(REGISTRY[method].Config.model_fields) if method in REGISTRY else ["name"]
    model: type[BaseModel] = RunConfig
    for part in path:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None) if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def _explain(err: ValidationError, origin: dict[tuple[str, ...], str], source: str, method: str | None) -> str:
    problems = []
    for e in err.errors():
        loc = tuple(str(p) for p in e["loc"] if not isinstance(p, int))
        # Pydantic appends the union branch / type name to the location: keep only real keys.
        loc = tuple(p for p in loc if not p.startswith(("literal[", "function-")) and p not in
                    {"str", "float", "int", "bool", "list[str]", "none"})
        if len(loc) > 1 and loc[0] == "method" and loc[1] in REGISTRY:
            loc = (loc[0], *loc[2:])  # pydantic names the method variant; users think `method.r`
        key = ".".join(loc) or "(top level)"
        where = origin.get(loc) or source
        if e["type"] in ("union_tag_invalid", "union_tag_not_found"):
            tag = (e.get("ctx") or {}).get("tag", "")
            if not tag:
                problems.append(f"{where}: `method.name` is missing: say which method the method keys are for "
                                f"(e.g. method.name=lora)")
                continue
            problems.append(f"{origin.get((*loc, 'name')) or where}: unknown method `{tag}`"
                            f"{did_you_mean(str(tag), REGISTRY)}; `deltatune methods` lists them")
        elif e["type"] == "extra_forbidden":
            prefix = ".".join(loc[:-1]) + "." if len(loc) > 1 else ""
            hint = did_you_mean(loc[-1], _section_fields(loc[:-1], method)).replace("`", "`" + prefix, 1)
            problems.append(f"{where}: unknown key `{key}`{hint}")
        elif e["type"] == "missing":
            key = "data.train" if key == "data" else key
            problems.append(f"{where}: `{key}` is required (e.g. data.train: builtin:movie-reviews)")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = e.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            problems.append(f"{where}: `{key}`: {msg}{shown}")
    # One line per problem; duplicates arise from union branches.
    return "invalid config:\n  " + "\n  ".join(dict.fromkeys(problems))
