"""peso's distance: for each LoRA matrix M of a wrapped layer, KL(softmax(vec M) || softmax(vec M_prev)),
one softmax over all entries of the matrix, in fp32 (the method: train/methods/registry.py; the
term around it: train/methods/proximal.py).

`method.kl_scale: entries` multiplies each matrix's KL by twice its number of entries N: a
softmax over a whole LoRA matrix is nearly uniform, so the KL is about the squared change over
2N, and the scaled term about the squared change itself, whatever N (docs/methods.md).
"""

from __future__ import annotations

import torch

from train.methods.proximal import Distance


class KL(Distance):
    kind = "kl"

    def __init__(self, kl_scale: str = "none"):
        self.kl_scale = kl_scale
        self.anchor_probs: dict[int, torch.Tensor] = {}

    @classmethod
    def from_config(cls, method_cfg, anchor_dir: str | None = None) -> KL:
        return cls(kl_scale=method_cfg.kl_scale)

    def prepare(self, groups: dict[int, list[str]], targets: dict[int, torch.Tensor]) -> None:
        # softmax(vec M_prev), fixed: computed once
        self.anchor_probs = {n: torch.softmax(t, 1) for n, t in targets.items()}

    def _kl(self, n: int, entries: torch.Tensor, target: torch.Tensor):
        """KL(softmax(w) || softmax(w_prev)) per row of `entries` [matrices, n], in a form that
        keeps its precision when w barely moved (the usual case: the term is about |w - w_prev|^2
        over 2n): with d = w - w_prev, p = softmax(w), q = softmax(w_prev),
        KL = E_p[d] - log E_q[exp(d)] = E_p[d] - log1p(E_q[expm1(d)]). The textbook
        sum p (log p - log q) subtracts two logs of size log n to get each term, and in fp32 that
        rounding is as large as the whole KL of a small change (20% off at n = 128).
        Returns (KL [matrices], p, d, log E_q[exp(d)] [matrices])."""
        delta = entries - target
        p = torch.softmax(entries, 1)
        shift = torch.log1p((self.anchor_probs[n] * torch.expm1(delta)).sum(1))
        return (p * delta).sum(1) - shift, p, delta, shift

    def distance(self, n: int, entries: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self._kl(n, entries, target)[0]

    def gradient(self, n: int, entries: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # d KL / d w = p * (log p - log q - KL), and log p - log q = d - shift
        kl, p, delta, shift = self._kl(n, entries, target)
        return p * (delta - (shift + kl).unsqueeze(1))

    def scale(self, n: int) -> float:
        """2N under kl_scale entries, else 1."""
        return 2.0 * n if self.kl_scale == "entries" else 1.0
