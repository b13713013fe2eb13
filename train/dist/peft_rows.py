"""peft's gather of the code-token rows under ZeRO-3, on the weight's own device."""

from __future__ import annotations

import torch


def patch_peft_token_rows_gather() -> None:
    """peft gathers the rows of new tokens under ZeRO-3 into a receive buffer it puts on
    `cuda` unconditionally (https://github.com/huggingface/peft/pull/2605, "right now, only CUDA
    is implemented"), which fails on CPU ranks. The buffer belongs on the weight's own device,
    which is `cuda` on GPUs, so this keeps GPU behaviour and fixes the CPU. (It replaces peft's
    own method, collectives included, which is why it lives in train/dist/.)"""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    if getattr(TrainableTokensLayer, "_peso_patched", False):
        return

    def collect(self, weight, rows, embed_dim):
        import deepspeed
        import torch.distributed as dist

        with deepspeed.zero.GatheredParameters([weight], modifier_rank=None):
            if dist.get_rank() == 0:
                values = weight[rows].clone()
            else:
                values = torch.empty((len(rows), embed_dim), dtype=weight.dtype, device=weight.device)
        dist.broadcast(values, src=0)
        return values

    TrainableTokensLayer._collect_token_weights = collect
    TrainableTokensLayer._peso_patched = True
