"""AdamW and the learning-rate schedule: linear warmup, then cosine decay to zero."""

from __future__ import annotations

import math

import torch


def make_optimizer(param_groups: list[dict], cfg, lr: float, cuda: bool) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups, lr=lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, fused=cuda or None)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = max(1, math.ceil(cfg.schedule.warmup_ratio * total_steps)) if cfg.schedule.warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
