"""The experiment configuration: typed sections read from YAML, plus dotted overrides.

    cfg = load_config("configs/tiny.yaml", ["optim.lr=1e-4", "schedule.epochs=2"])

Unknown keys and wrong types are errors that name the key, raised before any worker trains:
a typo in a 12-hour job's config should cost seconds, not the job.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field

import yaml

METHODS = ("single", "peso", "l2", "cumulative", "cumulative_all")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class ConfigError(ValueError):
    """A configuration problem, found before training starts."""


@dataclass
class ModelConfig:
    path: str | None = None  # a local Hugging Face folder (a real backbone) ...
    shape: str | None = None  # ... or a named shape with random weights: tiny, small, 1b, 8b (train/shapes.py)
    dtype: str = "auto"  # auto = bf16 on a GPU that has it, fp32 on the CPU
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2
    gradient_checkpointing: bool = False  # always non-reentrant (see docs/zero3.md)
    period0: str = "lora"  # lora | full: a random-weight backbone must first learn the task in full
    seed: int = 0  # initial weights of a shape, LoRA init


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    targets: list = field(default_factory=lambda: list(LORA_TARGETS))


@dataclass
class MethodConfig:
    name: str = "single"  # single | peso | l2 | cumulative | cumulative_all (train/regularizers.py)
    lam: float = 0.0  # weight of the proximal term
    reduce: str = "sum"  # sum (the paper's equation) | mean over layers (the authors' code)
    temperature: float = 1.0  # cross-entropy on logits / temperature (the authors use 0.8)


@dataclass
class DataConfig:
    path: str | None = None  # the dataset folder (data_tools convert); --data overrides
    objective: str = "response"  # response: one sample per target (the paper's) | sequence: every target of a user's chunk in one pass
    micro_batch_size: int = 8  # per rank
    num_workers: int = 0  # DataLoader workers per rank (0: in the training process)
    shuffle_buffer: int = 1000
    seed: int = 0
    max_history: int = 20  # items of history in a prompt (<= what the shards hold)
    eval_batch_size: int = 32
    template: str | None = None  # the prompt, with one {history}; None: the paper's instruction; "{history}": items only
    separator: str = ", "  # between history items in the prompt


@dataclass
class OptimConfig:
    lr: float = 2e-4  # period 0
    later_lr_factor: float = 0.1  # periods >= 1 train at lr * this (the paper: 0.1)
    weight_decay: float = 0.01
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float = 1.0
    max_nonfinite_in_a_row: int = 5  # skipped micro-batches in a row before the run stops


@dataclass
class ScheduleConfig:
    epochs: int = 4  # per period (the cap, with patience)
    period0_epochs: int | None = None  # period 0's cap instead (a model learning from scratch needs more); None: epochs
    patience: int | None = None  # stop a period after this many epochs without a better validation loss; None: never
    global_batch_size: int = 32  # = micro_batch_size x ranks x accumulation
    warmup_ratio: float = 0.01
    max_steps: int | None = None  # cap per period (smoke tests, benchmarks)


@dataclass
class CheckpointConfig:
    every_steps: int = 200  # plus one at every epoch end
    keep: int = 2


@dataclass
class LoggingConfig:
    every_steps: int = 10
    progress: bool = True
    peak_tflops: float | None = None  # override the device peak used for MFU


@dataclass
class EvalConfig:
    beams: int = 20  # >= the largest K
    ks: list = field(default_factory=lambda: [5, 10, 20])
    every_period: bool = True  # evaluate at the end of each period
    max_users: int | None = None  # per window: a seeded random sample of the test users (quick runs); None: all
    seed: int = 0  # of that sample, the same for every period and method


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
    if hint is list or origin is list:
        if isinstance(value, list):
            return value
        raise ConfigError(f"{key}: expected a list, got {value!r}")
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
    """Checks that need no other process; batch arithmetic needs the world size (check_batch)."""
    m = cfg.model
    if (m.path is None) == (m.shape is None):
        raise ConfigError("set exactly one of model.path (a local Hugging Face folder) and model.shape (tiny, small, 1b, 8b)")
    if m.period0 not in ("lora", "full"):
        raise ConfigError(f"model.period0 must be lora or full, not {m.period0!r}")
    if m.dtype not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError(f"model.dtype must be auto, fp32, bf16 or fp16, not {m.dtype!r}")
    if cfg.method.name not in METHODS:
        raise ConfigError(f"method.name must be one of {', '.join(METHODS)}, not {cfg.method.name!r}")
    if cfg.data.objective not in ("response", "sequence"):
        raise ConfigError(f"data.objective must be response or sequence, not {cfg.data.objective!r}")
    if cfg.method.reduce not in ("sum", "mean"):
        raise ConfigError(f"method.reduce must be sum or mean, not {cfg.method.reduce!r}")
    if cfg.method.lam < 0 or cfg.method.temperature <= 0:
        raise ConfigError("method.lam must be >= 0 and method.temperature > 0")
    unknown = set(cfg.lora.targets) - set(LORA_TARGETS)
    if unknown:
        raise ConfigError(f"lora.targets: unknown projections {sorted(unknown)} (choose from {LORA_TARGETS})")
    for key, value in (("lora.r", cfg.lora.r), ("data.micro_batch_size", cfg.data.micro_batch_size),
                       ("schedule.epochs", cfg.schedule.epochs), ("schedule.global_batch_size", cfg.schedule.global_batch_size),
                       ("checkpoint.every_steps", cfg.checkpoint.every_steps), ("checkpoint.keep", cfg.checkpoint.keep),
                       ("data.max_history", cfg.data.max_history), ("eval.beams", cfg.eval.beams),
                       ("schedule.period0_epochs", cfg.schedule.period0_epochs), ("schedule.patience", cfg.schedule.patience),
                       ("eval.max_users", cfg.eval.max_users)):
        if value is not None and value < 1:
            raise ConfigError(f"{key} must be at least 1, got {value}")
    if not 0 <= cfg.lora.dropout < 1:
        raise ConfigError(f"lora.dropout must be in [0, 1), got {cfg.lora.dropout}")
    if not 0 <= cfg.schedule.warmup_ratio < 1:
        raise ConfigError(f"schedule.warmup_ratio must be in [0, 1), got {cfg.schedule.warmup_ratio}")
    if cfg.data.template is not None and cfg.data.template.count("{history}") != 1:
        raise ConfigError("data.template needs exactly one {history} placeholder")
    if cfg.eval.beams < max(cfg.eval.ks):
        raise ConfigError(f"eval.beams ({cfg.eval.beams}) must be >= the largest K in eval.ks ({max(cfg.eval.ks)})")


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
            f"data.micro_batch_size ({cfg.data.micro_batch_size}) x ranks ({world_size}) = {per_step}")
    return cfg.schedule.global_batch_size // per_step
