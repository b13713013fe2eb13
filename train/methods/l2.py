"""l2's distance (an ablation of peso): ||M - M_prev||^2 for each LoRA matrix M (the method:
train/methods/registry.py; the term around it: train/methods/proximal.py)."""

from __future__ import annotations

import torch

from train.methods.proximal import Distance


class L2(Distance):
    kind = "l2"

    def distance(self, n: int, entries: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (entries - target).pow(2).sum(1)

    def gradient(self, n: int, entries: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return 2 * (entries - target)
