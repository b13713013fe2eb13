"""The experiment configuration: typed sections read from YAML, plus dotted overrides.

    cfg = load_config("configs/tiny.yaml", ["optim.lr=1e-4", "schedule.epochs=2"])

Unknown keys and wrong types are errors that name the key, raised before any worker trains:
a typo in a 12-hour job's config should cost seconds, not the job.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field

import yaml

from train.methods.registry import PULLS, method, method_names

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class ConfigError(ValueError):
    """A configuration problem, found before training starts."""


def setting(default=None, help: str = "", *, factory=None, resume_may_change: bool = False):
    """A config key: its default, its one-line help (shown by `train/main.py --print-config`), and
    whether it may change when a period resumes from its checkpoint (what is logged, evaluated or
    how often it is saved; everything else would silently mix two experiments in one period)."""
    metadata = {"help": help, "resume_may_change": resume_may_change}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ModelConfig:
    path: str | None = setting(None, "a local Hugging Face folder (a real backbone); or set model.shape")
    shape: str | None = setting(None, "a named shape with random weights: tiny, small, 1b, 8b (train/model/shapes.py)")
    dtype: str = setting("auto", "auto (bf16 on a GPU that has it, fp32 on the CPU), fp32, bf16 or fp16")
    attn_implementation: str = setting("sdpa", "sdpa, eager or flash_attention_2", resume_may_change=True)
    gradient_checkpointing: bool = setting(
        False, "recompute activations in the backward (always non-reentrant, docs/zero3.md)", resume_may_change=True
    )
    period0: str = setting("lora", "lora or full: a random-weight backbone must first learn the task in full")
    seed: int = setting(0, "initial weights of a shape, LoRA init")
    item_vectors: int = setting(
        0,
        "dimension of the collaborative item vectors added at each item's last code token "
        "(train/model/item_vectors.py); 0: none",
    )


@dataclass
class LoraConfig:
    r: int = setting(8, "rank of the adapters")
    alpha: int = setting(16, "LoRA scale numerator: the update is scaled by alpha / r")
    dropout: float = setting(0.05, "dropout on the adapters' input")
    targets: list[str] = setting(help="projections that get an adapter", factory=lambda: list(LORA_TARGETS))


@dataclass
class MethodConfig:
    name: str = setting(
        "single", f"{', '.join(method_names()[:-1])} or {method_names()[-1]} (train/methods/registry.py)"
    )
    lam: float = setting(0.0, "weight of the proximal term (peso, l2)")
    reduce: str = setting(
        "sum", "the proximal term over layers: sum (the paper's equation) or mean (the authors' code)"
    )
    temperature: float = setting(1.0, "cross-entropy on logits / temperature (the authors use 0.8)")
    kl_scale: str = setting(
        "none",
        "peso's KL per matrix: none (the paper's term) or entries: times twice the matrix's entries, "
        "about its squared change (a pull of one strength whatever the matrix sizes; docs/methods.md)",
    )
    pull: str = setting(
        "lora",
        "what the proximal term pulls toward period t-1: lora (the LoRA factors, the paper's) or all: "
        "also the code-token rows and the item-vector projection, everything a LoRA period trains "
        "(docs/methods.md)",
    )


@dataclass
class DataConfig:
    path: str | None = setting(
        None, "the dataset folder (python -m data_tools convert); --data overrides", resume_may_change=True
    )
    objective: str = setting(
        "response",
        "response: one sample per target (the paper's); sequence: every target of a user's chunk in one pass",
    )
    micro_batch_size: int = setting(8, "samples (or chunks) per rank and forward")
    num_workers: int = setting(
        0,
        "DataLoader workers per rank (0: in the training process); the batches do not depend on it",
        resume_may_change=True,
    )
    shuffle_buffer: int = setting(1000, "samples in each rank's seeded shuffle buffer")
    seed: int = setting(0, "seed of the training order")
    max_history: int = setting(20, "items of history in a prompt (<= what the shards hold)")
    eval_batch_size: int = setting(32, "samples per forward in validation and evaluation", resume_may_change=True)
    template: str | None = setting(
        None, 'the prompt, with one {history}; null: the paper\'s instruction; "{history}": the items only'
    )
    separator: str = setting(", ", "between history items in the prompt")


@dataclass
class OptimConfig:
    lr: float = setting(2e-4, "learning rate of period 0")
    later_lr_factor: float = setting(0.1, "periods >= 1 train at lr x this (the paper: 0.1)")
    weight_decay: float = setting(0.01, "AdamW weight decay")
    betas: list[float] = setting(help="AdamW betas", factory=lambda: [0.9, 0.999])
    eps: float = setting(1e-8, "AdamW epsilon")
    grad_clip: float = setting(1.0, "clip the gradient norm to this")
    max_nonfinite_in_a_row: int = setting(
        5, "skipped micro-batches in a row before the run stops", resume_may_change=True
    )


@dataclass
class ScheduleConfig:
    epochs: int = setting(4, "epochs per period (the cap, with patience)")
    period0_epochs: int | None = setting(
        None, "period 0's epoch cap instead (a model learning from scratch needs more); null: epochs"
    )
    patience: int | None = setting(
        None, "stop a period after this many epochs without a better validation loss; null: never"
    )
    global_batch_size: int = setting(32, "samples per optimizer step = micro_batch_size x ranks x accumulation")
    warmup_ratio: float = setting(0.01, "share of a period's steps with a linear warmup (then cosine decay)")
    max_steps: int | None = setting(None, "cap on a period's steps (smoke tests, benchmarks); null: none")


@dataclass
class CheckpointConfig:
    every_steps: int = setting(200, "steps between checkpoints (plus one at every epoch end)", resume_may_change=True)
    keep: int = setting(2, "complete checkpoints kept", resume_may_change=True)


@dataclass
class LoggingConfig:
    every_steps: int = setting(10, "steps between TensorBoard scalars", resume_may_change=True)
    progress: bool = setting(True, "a progress bar on rank 0", resume_may_change=True)
    peak_tflops: float | None = setting(
        None, "device peak used for MFU; null: the known peak of the device", resume_may_change=True
    )


@dataclass
class EvalConfig:
    beams: int = setting(20, "beams of the trie-constrained beam search (>= the largest K)", resume_may_change=True)
    ks: list[int] = setting(help="the K of Hit@K and NDCG@K", factory=lambda: [5, 10, 20], resume_may_change=True)
    every_period: bool = setting(True, "evaluate at the end of each period", resume_may_change=True)
    max_users: int | None = setting(
        None, "per window, a seeded random sample of the test users (quick runs); null: all", resume_may_change=True
    )
    seed: int = setting(0, "seed of that sample, the same for every period and method", resume_may_change=True)
    replica: str = setting(
        "auto",
        "under ZeRO-3, evaluate with a whole model per rank built from the period's export (no collective "
        "in each forward): auto (on GPUs, if it takes at most half the free memory; docs/zero3.md), always, never",
        resume_may_change=True,
    )


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(value, hint, key: str):
    """Check `value` against a field's type hint (int -> float is allowed; YAML reads 1e-4 as a string)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} is not a {hint}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if origin is list:
        if not isinstance(value, list) or not value:
            raise ConfigError(f"{key}: expected a non-empty list, got {value!r}")
        (item_hint,) = typing.get_args(hint)
        return [_coerce(item, item_hint, f"{key}[{i}]") for i, item in enumerate(value)]
    raise ConfigError(f"{key}: unsupported type {hint}")


def _apply(section_obj, values: dict, prefix: str) -> None:
    hints = typing.get_type_hints(type(section_obj))
    for key, value in values.items():
        if key not in hints:
            known = ", ".join(hints)
            raise ConfigError(f"unknown key {prefix}{key} (known in {prefix.rstrip('.') or 'the top level'}: {known})")
        setattr(section_obj, key, _coerce(value, hints[key], prefix + key))


def _parse_override(text: str) -> tuple[list[str], object]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not YAML (e.g. data.separator=", " unquoted): the text as written
    return key.strip().split("."), value


def load_config(path: str | None, overrides: list[str] = ()) -> Config:
    data = {}
    if path:
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except OSError as e:
            raise ConfigError(f"cannot read the config {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for text in overrides:
        keys, value = _parse_override(text)
        if len(keys) != 2:
            raise ConfigError(f"override {text!r}: use section.key=value, e.g. optim.lr=1e-4")
        data.setdefault(keys[0], {})
        if not isinstance(data[keys[0]], dict):
            raise ConfigError(f"section {keys[0]} must be a mapping")
        data[keys[0]][keys[1]] = value
    return config_from_dict(data)


def config_from_dict(data: dict) -> Config:
    """A checked Config from sections of values (a YAML file's, or a run's saved `to_dict()`)."""
    cfg = Config()
    sections = typing.get_type_hints(Config)
    for name, values in data.items():
        if name not in sections:
            raise ConfigError(f"unknown section {name!r} (known: {', '.join(sections)})")
        if not isinstance(values, dict):
            raise ConfigError(f"section {name} must be a mapping, got {values!r}")
        _apply(getattr(cfg, name), values, name + ".")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Checks that need no other process; batch arithmetic needs the world size (accumulation_steps)."""
    m = cfg.model
    if (m.path is None) == (m.shape is None):
        raise ConfigError(
            "set exactly one of model.path (a local Hugging Face folder) and model.shape (tiny, small, 1b, 8b)"
        )
    if m.period0 not in ("lora", "full"):
        raise ConfigError(f"model.period0 must be lora or full, not {m.period0!r}")
    if m.dtype not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError(f"model.dtype must be auto, fp32, bf16 or fp16, not {m.dtype!r}")
    if m.item_vectors < 0:
        raise ConfigError(f"model.item_vectors must be 0 (off) or a dimension, got {m.item_vectors}")
    method(cfg.method.name)  # an unknown name: a ConfigError listing the registered ones
    if cfg.data.objective not in ("response", "sequence"):
        raise ConfigError(f"data.objective must be response or sequence, not {cfg.data.objective!r}")
    if cfg.method.reduce not in ("sum", "mean"):
        raise ConfigError(f"method.reduce must be sum or mean, not {cfg.method.reduce!r}")
    if cfg.method.kl_scale not in ("none", "entries"):
        raise ConfigError(f"method.kl_scale must be none or entries, not {cfg.method.kl_scale!r}")
    if cfg.method.pull not in PULLS:
        raise ConfigError(f"method.pull must be {' or '.join(PULLS)}, not {cfg.method.pull!r}")
    if cfg.method.pull != "lora" and method(cfg.method.name).term is None:
        raise ConfigError(
            f"method.pull={cfg.method.pull} extends a proximal term, and method {cfg.method.name} has none "
            f"(methods with one: {', '.join(n for n in method_names() if method(n).term)})"
        )
    if cfg.method.lam < 0 or cfg.method.temperature <= 0:
        raise ConfigError("method.lam must be >= 0 and method.temperature > 0")
    unknown = set(cfg.lora.targets) - set(LORA_TARGETS)
    if unknown:
        raise ConfigError(f"lora.targets: unknown projections {sorted(unknown)} (choose from {LORA_TARGETS})")
    for key, value in (
        ("lora.r", cfg.lora.r),
        ("data.micro_batch_size", cfg.data.micro_batch_size),
        ("schedule.epochs", cfg.schedule.epochs),
        ("schedule.global_batch_size", cfg.schedule.global_batch_size),
        ("checkpoint.every_steps", cfg.checkpoint.every_steps),
        ("checkpoint.keep", cfg.checkpoint.keep),
        ("data.max_history", cfg.data.max_history),
        ("eval.beams", cfg.eval.beams),
        ("schedule.period0_epochs", cfg.schedule.period0_epochs),
        ("schedule.patience", cfg.schedule.patience),
        ("eval.max_users", cfg.eval.max_users),
    ):
        if value is not None and value < 1:
            raise ConfigError(f"{key} must be at least 1, got {value}")
    if not 0 <= cfg.lora.dropout < 1:
        raise ConfigError(f"lora.dropout must be in [0, 1), got {cfg.lora.dropout}")
    if not 0 <= cfg.schedule.warmup_ratio < 1:
        raise ConfigError(f"schedule.warmup_ratio must be in [0, 1), got {cfg.schedule.warmup_ratio}")
    if cfg.data.template is not None and cfg.data.template.count("{history}") != 1:
        raise ConfigError("data.template needs exactly one {history} placeholder")
    if any(k < 1 for k in cfg.eval.ks):
        raise ConfigError(f"eval.ks must be positive integers, got {cfg.eval.ks}")
    if len(cfg.optim.betas) != 2 or not all(0 <= b < 1 for b in cfg.optim.betas):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {cfg.optim.betas}")
    if cfg.eval.replica not in ("auto", "always", "never"):
        raise ConfigError(f"eval.replica must be auto, always or never, not {cfg.eval.replica!r}")
    if cfg.eval.beams < max(cfg.eval.ks):
        raise ConfigError(f"eval.beams ({cfg.eval.beams}) must be >= the largest K in eval.ks ({max(cfg.eval.ks)})")


def _settings(cfg: Config):
    """(section.key, its dataclass field, its type hint, its value in `cfg`) for every key, in order."""
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        hints = typing.get_type_hints(type(values))
        for f in dataclasses.fields(values):
            yield f"{section.name}.{f.name}", f, hints[f.name], getattr(values, f.name)


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _type_name(hint) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint)


def describe(cfg: Config) -> str:
    """Every key of `cfg`: type, value, default and help, one per line (`train/main.py --print-config`);
    values and defaults as YAML/JSON would write them (null, true, "text"), so they can be pasted back."""
    rows = [("key", "type", "value", "default", "help")]
    rows += [
        (key, _type_name(hint), json.dumps(value), json.dumps(_default(f)), f.metadata["help"])
        for key, f, hint, value in _settings(cfg)
    ]
    widths = [min(max(len(row[i]) for row in rows), 30) for i in range(4)]  # a longer list overflows its row only
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[4] for row in rows)


def resume_conflicts(saved: dict, cfg: Config) -> list[str]:
    """The keys that differ between `saved` (the `to_dict()` a period started with) and `cfg`, and
    may not change when that period resumes, as "key: old -> new". A key the saved config
    predates is not a conflict."""
    conflicts = []
    for key, f, _, value in _settings(cfg):
        section, name = key.split(".")
        old = saved.get(section, {}).get(name, value)
        if not f.metadata["resume_may_change"] and old != value:
            conflicts.append(f"{key}: {json.dumps(old)} -> {json.dumps(value)}")
    return conflicts


def period_epochs(cfg: Config, period: int) -> int:
    """The epoch cap of a period."""
    if period == 0 and cfg.schedule.period0_epochs:
        return cfg.schedule.period0_epochs
    return cfg.schedule.epochs


def accumulation_steps(cfg: Config, world_size: int) -> int:
    """Gradient accumulation that makes the global batch; impossible arithmetic is an error."""
    per_step = cfg.data.micro_batch_size * world_size
    if cfg.schedule.global_batch_size % per_step:
        raise ConfigError(
            f"schedule.global_batch_size ({cfg.schedule.global_batch_size}) must be a multiple of "
            f"data.micro_batch_size ({cfg.data.micro_batch_size}) x ranks ({world_size}) = {per_step}"
        )
    return cfg.schedule.global_batch_size // per_step
