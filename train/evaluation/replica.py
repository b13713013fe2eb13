"""The evaluation's replica: under ZeRO-3 every forward of the beam search is a collective that
gathers every layer again, at each code level of every batch. Where the whole model fits the
rank's GPU (1B-8B in bf16 on today's GPUs), the evaluation runs on a plain copy of the period's
export instead, built on every rank's device (train/serve/recommender.py `load_period_model`, every
parameter in the compute dtype), with no collective inside the forward (docs/zero3.md,
"Evaluating with a replica").

`eval.replica`: `never`; `always`; `auto`: under ZeRO-3 on GPUs, when the model takes at most
REPLICA_SHARE of the free memory on every rank. Not at ZeRO-0/1/2, whose engine holds the whole
model already, and not on the CPU by `auto` (its ranks share one host's memory).
"""

from __future__ import annotations

import gc
import logging
import time

import torch

from train.dist.params import whole_numel

log = logging.getLogger(__name__)

REPLICA_SHARE = 0.5  # eval.replica auto: a replica if its bytes are at most this share of the free memory


def free_memory(strategy) -> int:
    """Bytes free on this rank's GPU, after returning PyTorch's cached blocks to it."""
    gc.collect()
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info(strategy.device)[0]


def model_bytes(engine, dtype: torch.dtype) -> int:
    """The whole model's parameters in the compute dtype, and its buffers."""
    module = getattr(engine, "module", engine)
    size = torch.empty((), dtype=dtype).element_size()
    params = sum(whole_numel(p) for p in module.parameters()) * size
    return params + sum(b.numel() * b.element_size() for b in module.buffers())


def use_replica(mode: str, strategy, engine, dtype: torch.dtype, period: int) -> bool:
    """Whether this evaluation runs on a replica: the same answer on every rank (a collective
    under `auto` on GPUs)."""
    if strategy.zero_stage != 3 or mode == "never":
        return False
    if mode == "always":
        return True
    if not strategy.cuda:
        log.info(
            f"period {period}: evaluating with the sharded engine (eval.replica auto: no replica on the "
            "CPU, whose ranks share one host's memory; eval.replica=always makes one)"
        )
        return False
    need, free = model_bytes(engine, dtype), free_memory(strategy)
    use = not strategy.any(need > REPLICA_SHARE * free)
    log.info(
        f"period {period}: the model takes {need / 2**20:,.0f} MiB, {free / 2**20:,.0f} MiB free on rank 0's "
        "GPU: evaluating with "
        + (
            "a replica on every rank"
            if use
            else "the sharded engine (a replica needs at most half the free memory on every rank)"
        )
    )
    return use


def build_replica(load, dtype: torch.dtype, period: int, strategy) -> torch.nn.Module | None:
    """The period's model from its export, whole on this rank's device, every parameter in the
    compute dtype `dtype`, loaded straight to the device (not partitioned: strategy.plain_loading),
    on every rank; None on every rank if any rank could not build it (out of memory, say): then
    the sharded engine evaluates, as without a replica (collective). `load(dtype=, device=)`
    builds it (train/serve/recommender.py `load_period_model`, its other arguments given)."""
    t0, model, error = time.perf_counter(), None, None
    try:
        with strategy.plain_loading():
            model = load(dtype=dtype, device=strategy.device)
        model.config.use_cache = False  # as the engine's: only the beam search keeps a cache
    except Exception as e:  # any failure: the engine can still evaluate
        error = repr(e)  # not the exception: its frames would keep a half-built model alive
        log.warning(f"period {period}: the evaluation replica failed on rank {strategy.rank}: {error}")
    if strategy.any(error is not None):
        log.warning(f"period {period}: no replica on some rank; evaluating with the sharded engine")
        model = None
        release_memory(strategy)
        return None
    log.info(f"period {period}: the replica is built in {time.perf_counter() - t0:.1f} s")
    return model


def release_memory(strategy) -> None:
    """Give a dropped replica's memory back (once no reference to it is left)."""
    gc.collect()
    if strategy.cuda:
        torch.cuda.empty_cache()
