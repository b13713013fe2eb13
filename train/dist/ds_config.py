"""Fill the "auto" values of a DeepSpeed config from the experiment config.

The files in ds_configs/ fix the strategy (ZeRO stage, offload); everything that follows from
the experiment (batch sizes, accumulation, clipping, precision, bucket sizes) is "auto" there
and resolved here, so the two can never disagree. The resolved config is saved with the run.
"""

from __future__ import annotations

import copy
import json

from train.common.config import Config, ConfigError, accumulation_steps


def load_ds_config(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read the DeepSpeed config {path}: {e.strerror}") from None
    except ValueError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None


def resolve_dtype(cfg: Config, cuda: bool, bf16_supported: bool) -> str:
    """The compute dtype: `model.dtype`, or with auto bf16 on a GPU that has it, else fp32. bf16
    also runs on CPU ranks (DeepSpeed's CPU accelerator has it; slow, but the tests use it to
    check the GPU's precision path); fp16 needs a GPU."""
    if cfg.model.dtype != "auto":
        if cfg.model.dtype == "fp16" and not cuda:
            raise ConfigError("model.dtype=fp16 needs a GPU; use fp32, bf16 (or auto) on the CPU")
        if cfg.model.dtype == "bf16" and cuda and not bf16_supported:
            raise ConfigError("model.dtype=bf16: this GPU has no bf16; use fp16 or fp32")
        return cfg.model.dtype
    return "bf16" if cuda and bf16_supported else "fp32"


def fill_ds_config(
    ds: dict,
    cfg: Config,
    world_size: int,
    hidden_size: int,
    dtype: str,
    lr: float,
    *,
    lora_matrix: int = 0,
    ranks_per_node: int | None = None,
) -> dict:
    """A copy of `ds` with every "auto" replaced; any "auto" left over is an error naming its key.

    `lora_matrix`: the entries of the largest LoRA matrix of a LoRA period (0 in a full one);
    `ranks_per_node`: the ranks on one node (default: all of them on one). Why the ZeRO-3 values
    are what they are: docs/zero3.md, "ds_configs/zero3.json"."""
    ds = copy.deepcopy(ds)
    _fill_batch(ds, cfg, world_size)
    _fill_precision(ds, dtype)
    _fill_zero(ds, hidden_size, lora_matrix, world_size, ranks_per_node or world_size)
    _fill_optimizer(ds, cfg.optim, lr)
    left = _autos(ds)
    if left:
        raise ConfigError(f'the DeepSpeed config has "auto" values this project cannot fill: {", ".join(left)}')
    return ds


def _fill_batch(ds: dict, cfg: Config, world_size: int) -> None:
    """The batch sizes and the clipping: "auto", or equal to the experiment's."""
    top = {
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch_size,
        "gradient_accumulation_steps": accumulation_steps(cfg, world_size),
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


def _fill_precision(ds: dict, dtype: str) -> None:
    for name in ("bf16", "fp16"):
        if name in ds and ds[name].get("enabled") == "auto":
            ds[name]["enabled"] = dtype == name
    if dtype in ("bf16", "fp16") and not ds.get(dtype, {}).get("enabled"):
        ds[dtype] = {"enabled": True}


def _fill_zero(ds: dict, hidden_size: int, lora_matrix: int, world_size: int, per_node: int) -> None:
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    buckets = {
        # Hugging Face's conventions for ZeRO buckets, from the hidden size.
        "reduce_bucket_size": hidden_size * hidden_size,
        "allgather_bucket_size": hidden_size * hidden_size,
        "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        # Norms stay whole on every rank (HF's 10 x hidden), and in a LoRA period the LoRA
        # factors too: a few MB that would otherwise cost two small all-gathers each per step.
        "stage3_param_persistence_threshold": max(10 * hidden_size, lora_matrix),
        # ZeRO++ hierarchical partitioning: on several nodes, a second copy of each parameter
        # partitioned within the node, so the backward's all-gathers stay on the node's links.
        "zero_hpz_partition_size": per_node if world_size > per_node else 1,
    }
    for key, value in buckets.items():
        if zero.get(key) == "auto":
            zero[key] = value


def _fill_optimizer(ds: dict, optim, lr: float) -> None:
    """A DeepSpeed optimizer's "auto" hyperparameters, from the config's optim section."""
    opt = ds.get("optimizer")
    if opt is None:
        return
    params = opt.setdefault("params", {})
    values = {"lr": lr, "betas": optim.betas, "eps": optim.eps, "weight_decay": optim.weight_decay}
    for key, value in values.items():
        if params.get(key) == "auto":
            params[key] = value


def _autos(node, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in _autos(v, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if node == "auto" else []
