"""Run configuration: dataclasses, YAML loading, ``key=value`` overrides, validation.

Every key a user can write is a field below (or of a method's ``Options``); an unknown key is
refused with a one-line error that lists the known ones.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from lmdistill.errors import LmdistillError

DATA_ENV = "LMDISTILL_DATA"


@dataclass
class DataConfig:
    """Where the training and evaluation data come from."""

    train: list[str] = field(default_factory=list)  # paths (relative to data_dir) or hub dataset names
    max_examples: int | None = None  # the first N over all files (embedding: unique sentences; LM: rows); None = all
    max_length: int = 128  # tokens per sequence
    prompt_max_fraction: float = 0.5  # LM: a sequence too long keeps at most this share of max_length for its prompt
    text_column: str | None = None  # for CSV/TSV sentence files
    eval: dict[str, str] = field(default_factory=dict)  # name -> file (STS or instruction JSONL)
    eval_limit: int | None = None  # rows per evaluation file, None = all
    holdout: int = 0  # LM: N training rows (one fixed draw: the same for every seed and method) never trained on,
    #                   evaluated (bits per byte) as the set "holdout": the dev split that a search selects on
    # embedding: an explicit teacher-cache file (default: in the cache folder; the teacher always runs once).
    # LM: None = the teacher runs at every step; "auto" (a folder in the cache folder) or a folder = train
    # from the targets `lmdistill cache CONFIG` stored there, with no teacher weights in memory
    teacher_cache: str | None = None
    teacher_top_k: int | None = 64  # LM cache: span logits as the top k log-probabilities + the rest; None = all
    teacher_cache_dtype: str = "float16"  # LM cache: float16 | bfloat16 | float32 (CoMs and log-probabilities)


@dataclass
class TrainConfig:
    """The optimisation budget and the optimizer."""

    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 5e-5
    projector_lr: float = 1e-3
    projector_weight_decay: float = 0.0  # the method's projectors (0, as the authors; the student uses weight_decay)
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    scheduler: str = "linear"
    optimizer: str = "asam"  # asam | sam | adamw
    rho: float = 0.05
    eta: float = 0.01
    asam_interval: int = 1
    max_grad_norm: float = 1.0
    clip: str = "global"  # the descent gradient clipped over all parameters | per_group (each optimizer group) | none
    bf16: bool = False
    fp16: bool = False
    seed: int = 42
    logging_steps: int = 10
    save_steps: int = 200
    save_total_limit: int = 2
    max_nonfinite_steps: int = 5  # consecutive NaN/inf losses before training stops
    lora: dict[str, Any] | None = None  # LM student only: peft LoraConfig keys
    gradient_checkpointing: bool = False
    group_by_length: bool = True  # batches of similar length: far less padding (a seeded, shuffled order)
    dataloader_workers: int = 0
    report_to: list[str] = field(default_factory=list)  # as TrainingArguments.report_to: tensorboard, wandb, ...


@dataclass
class EvalConfig:
    """How the run's models are evaluated before and after training."""

    before: bool = True  # evaluate the student before training
    teacher: bool = True  # evaluate the teacher (cached)
    batch_size: int = 64
    max_new_tokens: int = 256  # LM generation
    seeds: list[int] = field(default_factory=lambda: [10])
    greedy: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    bpb: bool = True  # LM: bits per byte next to ROUGE-L
    rouge_limit: int | None = None  # LM: rows per file for ROUGE-L (generation is slow); None = data.eval_limit; 0 = none


@dataclass
class Config:
    """One distillation run."""

    task: str = "embedding"  # embedding | lm
    method: str = "talas"
    teacher: str = ""
    student: str = ""
    student_layers: list[int] | None = None  # keep only these encoder layers of the student
    output_dir: str = "runs/default"
    data_dir: str | None = None
    cache_dir: str | None = None
    trust_remote_code: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    method_args: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A plain-dict copy (for metrics.json and cache keys)."""
        return dataclasses.asdict(self)


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise LmdistillError(f"config section {where or 'top level'!r} must be a mapping, got {raw!r}")
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in known:
            name = f"{where}.{key}" if where else key
            raise LmdistillError(
                f"unknown config key {name!r}: known keys here are {', '.join(sorted(known))}"
            )
        sub = known[key].default_factory if known[key].default_factory is not dataclasses.MISSING else None
        if sub is not None and dataclasses.is_dataclass(sub):
            value = _build(sub, value or {}, f"{where}.{key}" if where else key)
        kwargs[key] = _coerce(value, known[key], f"{where}.{key}" if where else key)
    return cls(**kwargs)


def _coerce(value: Any, f: dataclasses.Field, name: str) -> Any:
    """YAML reads ``2e-4`` as a string: numbers for numeric fields, with a clear error otherwise."""
    kind = str(f.type)
    if isinstance(value, str) and (kind.startswith("float") or kind.startswith("int")):
        try:
            num = float(value)
        except ValueError:
            raise LmdistillError(f"config key {name!r} must be a number, got {value!r}") from None
        return int(num) if kind.startswith("int") and num.is_integer() else num
    if isinstance(value, int) and not isinstance(value, bool) and kind.startswith("float"):
        return float(value)
    return value


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], parsed value); the value is read as YAML."""
    if "=" not in text:
        raise LmdistillError(f"override {text!r} is not key=value: write e.g. train.max_steps=10")
    key, value = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(value) if value != "" else None


def _route(keys: list[str]) -> list[str]:
    """``max_steps`` -> ``train.max_steps``: a bare key that names a field of exactly one section."""
    top = {f.name for f in fields(Config)}
    if len(keys) != 1 or keys[0] in top:
        return keys
    homes = [sec for sec, cls in (("data", DataConfig), ("train", TrainConfig), ("eval", EvalConfig))
             if keys[0] in {f.name for f in fields(cls)}]
    return [homes[0], keys[0]] if len(homes) == 1 else keys


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config, apply ``key=value`` overrides, validate, and return a :class:`Config`."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise LmdistillError(f"config file {str(p)!r} not found: give the path of a YAML config")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise LmdistillError(f"config file {str(p)!r} is not valid YAML: {exc}".replace("\n", " ")) from exc
    for ov in overrides:
        keys, value = parse_override(ov)
        keys = _route(keys)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise LmdistillError(f"override {ov!r}: {k!r} is not a section")
        node[keys[-1]] = value
    cfg = _build(Config, raw, "")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Checks that need more than the key names."""
    if cfg.task not in ("embedding", "lm"):
        raise LmdistillError(f"task must be 'embedding' or 'lm', got {cfg.task!r}")
    if cfg.data.teacher_cache_dtype not in ("float16", "bfloat16", "float32"):
        raise LmdistillError(f"data.teacher_cache_dtype must be float16, bfloat16 or float32, got "
                             f"{cfg.data.teacher_cache_dtype!r}")
    if cfg.data.teacher_top_k is not None and cfg.data.teacher_top_k < 1:
        raise LmdistillError(f"data.teacher_top_k must be a positive number or null (all), got {cfg.data.teacher_top_k}")
    if cfg.train.clip not in ("global", "per_group", "none"):
        raise LmdistillError(f"train.clip must be global, per_group or none, got {cfg.train.clip!r}")
    if cfg.train.optimizer not in ("asam", "sam", "adamw"):
        raise LmdistillError(f"train.optimizer must be asam, sam or adamw, got {cfg.train.optimizer!r}")
    if cfg.train.bf16 and cfg.train.fp16:
        raise LmdistillError("train.bf16 and train.fp16 are both set: choose one")
    if cfg.train.batch_size < 1 or cfg.train.grad_accum < 1:
        raise LmdistillError("train.batch_size and train.grad_accum must be at least 1")
    if not isinstance(cfg.method_args, dict):
        raise LmdistillError("method_args must be a mapping of the method's options")
    # keys that belong to one task only are refused in the other, never silently ignored
    if cfg.task == "embedding" and cfg.train.lora:
        raise LmdistillError("train.lora applies to LM students only: remove it (embedding students train in full)")
    if cfg.task == "lm" and str(cfg.data.teacher_cache or "").endswith(".safetensors"):
        raise LmdistillError("an LM teacher cache is a folder (or auto), not a .safetensors file: set "
                             "data.teacher_cache=auto, or a folder, and build it with `lmdistill cache CONFIG`")
    if cfg.train.asam_interval < 1:
        raise LmdistillError(f"train.asam_interval must be at least 1, got {cfg.train.asam_interval}")
    if cfg.train.rho < 0:
        raise LmdistillError(f"train.rho must be 0 or more, got {cfg.train.rho}")
    if not 0 <= cfg.train.warmup_ratio < 1:
        raise LmdistillError(f"train.warmup_ratio is a share of the steps, in [0, 1): got {cfg.train.warmup_ratio}")
    if not 0 < cfg.data.prompt_max_fraction <= 1:
        raise LmdistillError(f"data.prompt_max_fraction must be in (0, 1], got {cfg.data.prompt_max_fraction}")


def build_options(options_cls: type, raw: dict[str, Any], method: str) -> Any:
    """A method's ``Options`` from ``method_args``, refusing unknown keys."""
    known = {f.name: f for f in fields(options_cls)}
    for key in raw:
        if key not in known:
            raise LmdistillError(
                f"unknown option {key!r} for method {method!r}: known options are {', '.join(sorted(known))}"
            )
    # the same numeric reading as top-level keys (YAML reads 2e0 as a string)
    return options_cls(**{k: _coerce(v, known[k], f"method_args.{k}") for k, v in raw.items()})


def data_dir(cfg: Config | None = None) -> Path | None:
    """The data folder: config ``data_dir``, else $LMDISTILL_DATA, else ../shared/data if present."""
    if cfg is not None and cfg.data_dir:
        return Path(cfg.data_dir).expanduser()
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    repo_root = Path(__file__).resolve().parents[2]
    for cand in (Path.cwd() / ".." / "shared" / "data", repo_root / ".." / "shared" / "data"):
        if cand.is_dir():
            return cand.resolve()
    return None


def resolve_data_path(name: str, cfg: Config | None = None) -> Path | str:
    """A data file: an existing path, else relative to the data folder, else returned as a hub name."""
    p = Path(name).expanduser()
    if p.exists():
        return p
    root = data_dir(cfg)
    if root is not None and (root / name).exists():
        return root / name
    if p.suffix or name.startswith((".", "/")):
        where = f" (data folder: {root})" if root else " (no data folder: set data_dir or $LMDISTILL_DATA)"
        raise LmdistillError(f"data file {name!r} not found{where}: check the path")
    return name  # a hub dataset name
