"""AdamW (the config's optim section) and the learning-rate schedule (its schedule section):
linear warmup, then cosine decay to zero."""

from __future__ import annotations

import math

import torch


def make_optimizer(param_groups: list[dict], optim, lr: float, cuda: bool) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups, lr=lr, betas=tuple(optim.betas), eps=optim.eps, fused=cuda or None)


def make_scheduler(optimizer: torch.optim.Optimizer, schedule, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = max(1, math.ceil(schedule.warmup_ratio * total_steps)) if schedule.warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
