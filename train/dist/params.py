"""What the rest of train/ may ask about a parameter that ZeRO-3 may have partitioned.

DeepSpeed marks each parameter it manages under ZeRO-3 with attributes of its own (`ds_id`,
`ds_numel`, `ds_shape`); outside a gather such a parameter's `.data` is an empty placeholder
(docs/zero3.md). Only train/dist/ knows those attributes: every other module asks these helpers.

    whole_numel(p), whole_shape(p)     its size as a whole tensor, partitioned or not
    is_zero3(p)                        ZeRO-3 manages it (a gather is needed to see its values)
    is_partitioned(p)                  right now it is not whole (outside its module's forward or a gather)
    with rank0_writes(strategy, params) as writes: ...
                                       the "gather, then copy on rank 0" idiom (collective)
"""

from __future__ import annotations

import contextlib

import torch


def whole_numel(p: torch.Tensor) -> int:
    """Entries of the whole parameter (its partition on this rank may hold fewer, or none)."""
    return getattr(p, "ds_numel", p.numel())


def whole_shape(p: torch.Tensor) -> tuple[int, ...]:
    """Shape of the whole parameter."""
    return tuple(getattr(p, "ds_shape", p.shape))


def is_zero3(p: torch.Tensor) -> bool:
    """Whether ZeRO-3 manages `p` (after `deepspeed.initialize`, or built under `zero.Init`)."""
    return hasattr(p, "ds_id")


def is_partitioned(p: torch.Tensor) -> bool:
    """Whether `p` is not whole right now: a ZeRO-3 parameter outside its module's forward and
    outside a gather (reading it then is silently wrong)."""
    return hasattr(p, "ds_numel") and p.numel() != p.ds_numel


@contextlib.contextmanager
def rank0_writes(strategy, params):
    """Gather `params` whole, and say whether this rank writes into them: rank 0 under ZeRO-3
    (its values are scattered back to every partition on exit), every rank otherwise (each holds
    its own whole copy). Collective under ZeRO-3: every rank must enter it.

        with rank0_writes(strategy, params) as writes:
            if writes:
                with torch.no_grad():
                    p.copy_(...)
    """
    params = list(params)
    partitioned = any(is_zero3(p) for p in params)
    with strategy.gathered(params, modify=True):
        yield strategy.is_rank0 or not partitioned
