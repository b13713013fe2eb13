"""The proximal term of a method with an anchor (peso, l2): lambda x reduce_m over the wrapped
layers of the distance of each LoRA matrix M to M_prev, the adapter exported at the end of period
t-1 (the period's anchor, also saved as periods/<t>/anchor.safetensors). What the distance is,
is the method's (`Distance`: train/methods/peso.py, l2.py); the rest is shared and here.

Exact under ZeRO-3: a LoRA weight is only whole while its module runs, so each factor is copied
in a forward hook on every lora_A / lora_B (never read outside its forward, which is silently 0
with partitioned parameters).

The hooks only copy each factor (two operations); the distances are computed after the
forward, every matrix of one size in one batch, so the term costs tens of kernels per step, not
a score per matrix (448 matrices at 8B). Outside a training forward the hooks return at once
(validation, beam search and the recomputation of non-reentrant gradient checkpointing run them
too): the copy saves nothing for the backward, so a recomputation that skips it finds the
checkpoint's saved tensors as they were (docs/zero3.md, "Gradient checkpointing"). The anchor's
targets live on the rank's device, stacked once: no copy per step.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch
import torch.nn as nn
from safetensors.torch import save

from data_tools.atomic import atomic_write_bytes
from data_tools.readback import load_safetensors
from train.dist.params import is_partitioned
from train.methods.registry import METHODS, method
from train.model.lora import lora_factors, lora_layers

log = logging.getLogger(__name__)


class Distance:
    """How far LoRA matrices are from their anchor: a method's part of the proximal term. Every
    call gets all matrices of one size at once: `entries` [matrices, n] (fp32, the live factors,
    flattened) and `target` [matrices, n] (the anchor's)."""

    kind = ""  # its short name (ProximalTerm's `kind`, e.g. "kl")

    @classmethod
    def from_config(cls, method_cfg, anchor_dir: str | None = None) -> Distance:
        """Built from the `method` section of the config (its own keys) and the anchor's folder
        (period t-1's export: what else the previous period wrote there)."""
        return cls()

    def prepare(self, groups: dict[int, list[str]], targets: dict[int, torch.Tensor]) -> None:
        """Once, before any step: per matrix size n, the matrices' names (`groups[n]`, the row
        order of every batch) and the anchor's entries (`targets[n]`, [matrices, n], on the
        rank's device). What stays fixed is computed here."""

    def distance(self, n: int, entries: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """[matrices]: each matrix's distance (before `scale`)."""
        raise NotImplementedError

    def gradient(self, n: int, entries: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """[matrices, n]: the gradient of each matrix's `distance` with respect to its entries, in
        closed form (no backward; the trainer logs how hard the term pulls with it)."""
        raise NotImplementedError

    def scale(self, n: int) -> float:
        """A factor on the distance (and gradient) of a matrix of n entries."""
        return 1.0


def distance_of_kind(kind: str) -> Distance:
    """The distance of a registered method by its `kind` ("kl": peso's, "l2"), with its defaults."""
    for spec in METHODS.values():
        cls = spec.distance_class()
        if cls is not None and cls.kind == kind:
            return cls()
    kinds = [s.distance_class().kind for s in METHODS.values() if s.term]
    raise ValueError(f"no registered method has a distance of kind {kind!r} (known: {', '.join(kinds)})")


class ProximalTerm:
    """Distance of the live LoRA factors to the anchor's. Each factor is copied (in fp32) in a
    forward hook, where it is whole; `term()` then computes every matrix's distance at once, in
    one batch per shape, on the rank's device. `distance`: a `Distance`, or the kind of a
    registered one ("kl", "l2")."""

    def __init__(
        self,
        model: nn.Module,
        anchor: dict[str, torch.Tensor],
        distance: Distance | str,
        reduce: str,
        device: torch.device = None,
    ):
        self.measure = distance_of_kind(distance) if isinstance(distance, str) else distance
        self.kind, self.reduce = self.measure.kind, reduce
        self.collecting = False
        self.seen: dict[str, torch.Tensor] = {}  # matrix -> its entries in this forward, fp32, flat
        self.params: dict[str, nn.Parameter] = {}  # matrix -> the live LoRA weight
        layers = lora_layers(model)
        self.n_layers = len(layers)
        self.handles = []
        targets, missing = {}, []
        for name, layer in layers.items():
            for which in ("lora_A", "lora_B"):
                key = f"{name}.{which}.weight"
                if key not in anchor:
                    missing.append(key)
                    continue
                targets[key] = anchor[key].to(device or "cpu", torch.float32).reshape(-1)  # vec M_prev
                linear = layer.__getattr__(which)["default"]
                self.params[key] = linear.weight
                self.handles.append(linear.register_forward_hook(self._hook(key)))
        if missing:
            raise ValueError(
                f"the anchor lacks {len(missing)} LoRA matrices (first: {missing[0]}); "
                "was the previous period trained with other lora.targets?"
            )
        # Matrices of one size share a batch: [matrices, entries] targets, stacked once.
        self.groups: dict[int, list[str]] = {}
        for key, target in targets.items():
            self.groups.setdefault(target.numel(), []).append(key)
        self.targets = {n: torch.stack([targets[k] for k in keys]) for n, keys in self.groups.items()}
        self.measure.prepare(self.groups, self.targets)

    def _hook(self, key: str):
        def hook(module, inputs, output):
            if not self.collecting:
                return
            weight = module.weight
            if is_partitioned(weight):
                raise RuntimeError(
                    "a LoRA weight is partitioned inside its own forward; the proximal term would be wrong"
                )
            # A copy: under ZeRO-3 the gathered weight's storage is released (and reused) once the
            # module is done. Copying saves nothing for the backward, so a checkpoint's
            # recomputation, where this returns at once, finds the same saved tensors.
            self.seen[key] = weight.to(torch.float32, copy=True).reshape(-1)

        return hook

    @contextlib.contextmanager
    def collect(self):
        self.seen = {}
        self.collecting = True
        try:
            yield
        finally:
            self.collecting = False

    def _entries(self, n: int, keys: list[str]) -> torch.Tensor:
        return torch.stack([self.seen[k] for k in keys])  # [matrices, n]

    def distances(self) -> torch.Tensor:
        """[matrices]: each collected matrix's distance to its anchor, in `self.groups` order."""
        missing = [k for keys in self.groups.values() for k in keys if k not in self.seen]
        if missing:
            raise RuntimeError(
                f"{len(missing)} LoRA matrices were not seen in the forward (first: {missing[0]}): "
                "was it run inside collect()?"
            )
        out = []
        for n, keys in self.groups.items():
            out.append(self.measure.distance(n, self._entries(n, keys), self.targets[n]) * self.measure.scale(n))
        return torch.cat(out)

    def term(self) -> torch.Tensor:
        total = self.distances().sum()
        return total / self.n_layers if self.reduce == "mean" else total

    def gradients(self) -> dict[str, torch.Tensor]:
        """The gradient of `term()` on each collected matrix (flat, fp32), in closed form, without
        a backward."""
        scale = 1.0 / self.n_layers if self.reduce == "mean" else 1.0
        out = {}
        with torch.no_grad():
            for n, keys in self.groups.items():
                grad = self.measure.gradient(n, self._entries(n, keys), self.targets[n])
                out.update(zip(keys, grad * (scale * self.measure.scale(n))))
        return out


def make_term(cfg, plan, run, model: nn.Module, strategy) -> ProximalTerm | None:
    """The proximal term of the period of `plan` (train/period/plan.py), for a method that has one
    and a period that has an anchor; None otherwise. Rank 0 saves the anchor's LoRA factors as
    periods/<t>/anchor.safetensors."""
    spec = method(cfg.method.name)
    if spec.term is None:
        return None
    if plan.anchor is None:
        log.info(f"{spec.name}: no previous adapter in period {plan.period}, so no proximal term this period")
        return None
    anchor = lora_factors(
        load_safetensors(os.path.join(plan.anchor, "adapter_model.safetensors"), what="the anchor's adapter")
    )
    if strategy.is_rank0:
        atomic_write_bytes(run.anchor_path(plan.period), save(anchor))
    distance = spec.distance_class().from_config(cfg.method, plan.anchor)
    return ProximalTerm(model, anchor, distance, cfg.method.reduce, device=strategy.device)


def relative_distance(adapter: dict[str, torch.Tensor], start: dict[str, torch.Tensor]) -> float:
    """||theta - theta_start|| / ||theta_start|| over the LoRA factors of two adapter states: how
    far a period moved its adapter from where it started (peso's anchor). NaN if the start is zero."""
    keys = sorted(lora_factors(start))
    diff = sum(float((adapter[k].double() - start[k].double()).pow(2).sum()) for k in keys)
    base = sum(float(start[k].double().pow(2).sum()) for k in keys)
    return (diff / base) ** 0.5 if base > 0 else float("nan")


def pull_and_data_norms(term: ProximalTerm, lam: float, grads: dict[str, torch.Tensor]) -> tuple[float, float]:
    """How hard the proximal term pulls against the data, on the LoRA factors: (the norm of
    lam x the term's gradient, the norm of the data loss's gradient), over all factors. `grads`:
    each factor's whole gradient of the loss (flat, fp32, after the backward), from which the
    term's part is taken away. One read-back."""
    pull = term.gradients()
    squares = torch.stack(
        [torch.stack([(lam * pull[k]).pow(2).sum(), (grads[k].float() - lam * pull[k]).pow(2).sum()]) for k in pull]
    ).sum(0)
    pull_sq, data_sq = squares.tolist()
    return pull_sq**0.5, data_sq**0.5
