"""Fill the "auto" values of a DeepSpeed config from the experiment config.

The files in ds_configs/ fix the strategy (ZeRO stage, offload); everything that follows from
the experiment (batch sizes, accumulation, clipping, precision, bucket sizes) is "auto" there
and resolved here, so the two can never disagree. The resolved config is saved with the run.
"""

from __future__ import annotations

import copy
import json

from train.config import Config, ConfigError, accumulation_steps


def load_ds_config(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read the DeepSpeed config {path}: {e.strerror}") from None
    except ValueError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None


def resolve_dtype(cfg: Config, cuda: bool, bf16_supported: bool) -> str:
    if cfg.model.dtype != "auto":
        if cfg.model.dtype in ("bf16", "fp16") and not cuda:
            raise ConfigError(f"model.dtype={cfg.model.dtype} needs a GPU; use fp32 (or auto) on the CPU")
        return cfg.model.dtype
    return "bf16" if cuda and bf16_supported else "fp32"


def fill_ds_config(ds: dict, cfg: Config, world_size: int, hidden_size: int, dtype: str, lr: float) -> dict:
    """A copy of `ds` with every "auto" replaced; any "auto" left over is an error naming its key."""
    ds = copy.deepcopy(ds)
    accum = accumulation_steps(cfg, world_size)
    top = {
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "train_batch_size": cfg.schedule.global_batch_size,
        "gradient_clipping": cfg.optim.grad_clip,
    }
    for key, value in top.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
        elif ds[key] != value:
            raise ConfigError(
                f"the DeepSpeed config sets {key}={ds[key]}, the experiment needs {value}; "
                'leave it "auto" in the ds_config'
            )
    for name in ("bf16", "fp16"):
        if name in ds and ds[name].get("enabled") == "auto":
            ds[name]["enabled"] = dtype == name
    if dtype in ("bf16", "fp16") and not ds.get(dtype, {}).get("enabled"):
        ds[dtype] = {"enabled": True}
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    buckets = {
        # Hugging Face's conventions for ZeRO buckets, from the hidden size.
        "reduce_bucket_size": hidden_size * hidden_size,
        "allgather_bucket_size": hidden_size * hidden_size,
        "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "stage3_param_persistence_threshold": 10 * hidden_size,
    }
    for key, value in buckets.items():
        if zero.get(key) == "auto":
            zero[key] = value
    opt = ds.get("optimizer")
    if opt is not None:
        params = opt.setdefault("params", {})
        values = {"lr": lr, "betas": cfg.optim.betas, "eps": cfg.optim.eps, "weight_decay": cfg.optim.weight_decay}
        for key, value in values.items():
            if params.get(key) == "auto":
                params[key] = value
    left = _autos(ds)
    if left:
        raise ConfigError(f'the DeepSpeed config has "auto" values this project cannot fill: {", ".join(left)}')
    return ds


def _autos(node, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in _autos(v, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if node == "auto" else []
