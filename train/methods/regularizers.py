"""The continual methods beyond plain fine-tuning (`method.name`, docs/architecture.md "The methods").

- single: start from the previous period's adapter; no regularizer.
- peso: single + lambda * reduce_m (KL_A + KL_B), with, for each LoRA matrix M of wrapped layer m,
  KL(softmax(vec M) || softmax(vec M_prev)): one softmax over all entries of the matrix, in fp32.
- l2: the same with ||M - M_prev||^2 (an ablation).
- cumulative: the paper's cumulative LoRA ("SumLoRA latest+inherit"): the previous period's
  adapter, frozen, with A and B each divided by its Frobenius norm (plus a small epsilon, so a
  zero factor gives zero, not NaN), is added to the forward; the live adapter starts from that
  same previous adapter.
- cumulative_all: every earlier adapter frozen, normalized and summed the same way (storage and
  compute grow with the periods); the live adapter starts from the last.

M_prev is the adapter exported at the end of period t-1 (the period's anchor, also saved as
periods/<t>/anchor.safetensors). Exact under ZeRO-3: a LoRA weight is only whole while its
module runs, so the term is computed in a forward hook on every lora_A / lora_B (never by
reading the weights outside their forward, which is silently 0 with partitioned parameters).

The hooks only copy each factor (two operations); the distances are computed after the
forward, every matrix of one size in one batched softmax, so the term costs tens of kernels per
step, not a score per matrix (448 matrices at 8B). Outside a training forward the hooks return
at once (validation, beam search and the recomputation of non-reentrant gradient checkpointing
run them too): the copy saves nothing for the backward, so a recomputation that skips it finds
the checkpoint's saved tensors as they were (docs/zero3.md, "Gradient checkpointing"). The
anchor's targets live on the rank's device, stacked once: no copy per step.
"""

from __future__ import annotations

import contextlib
import logging
import os

import peft
import torch
import torch.nn as nn
from safetensors.torch import load_file, save

from data_tools.atomic import atomic_write_bytes
from train.period.plan import CUMULATIVE, PROXIMAL

log = logging.getLogger(__name__)


def lora_layers(model: nn.Module) -> dict[str, peft.tuners.lora.LoraLayer]:
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer) and "default" in m.lora_A
    }


def lora_factors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Only the LoRA A/B tensors of an adapter's state (not the new-token rows)."""
    return {k: v for k, v in state.items() if ".lora_A." in k or ".lora_B." in k}


class ProximalTerm:
    """Distance of the live LoRA factors to the anchor's. Each factor is copied (in fp32) in a
    forward hook, where it is whole; `term()` then computes every matrix's distance at once, in
    one batch per shape, on the rank's device."""

    def __init__(
        self,
        model: nn.Module,
        anchor: dict[str, torch.Tensor],
        kind: str,
        reduce: str,
        device: torch.device = None,
        kl_scale: str = "none",
    ):
        """`kl_scale` "entries" multiplies each matrix's KL by twice its number of entries N: a
        softmax over a whole LoRA matrix is nearly uniform, so the KL is about the squared change
        over 2N, and the scaled term about the squared change itself, whatever N."""
        self.kind, self.reduce, self.kl_scale = kind, reduce, kl_scale
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
        # softmax(vec M_prev), fixed: computed once
        self.anchor_probs = {n: torch.softmax(t, 1) for n, t in self.targets.items()} if kind == "kl" else {}

    def _hook(self, key: str):
        def hook(module, inputs, output):
            if not self.collecting:
                return
            weight = module.weight
            if hasattr(weight, "ds_numel") and weight.numel() != weight.ds_numel:
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

    def _kl(self, entries: torch.Tensor, n: int):
        """KL(softmax(w) || softmax(w_prev)) per row of `entries` [matrices, n], in a form that
        keeps its precision when w barely moved (the usual case: the term is about |w - w_prev|^2
        over 2n): with d = w - w_prev, p = softmax(w), q = softmax(w_prev),
        KL = E_p[d] - log E_q[exp(d)] = E_p[d] - log1p(E_q[expm1(d)]). The textbook
        sum p (log p - log q) subtracts two logs of size log n to get each term, and in fp32 that
        rounding is as large as the whole KL of a small change (20% off at n = 128).
        Returns (KL [matrices], p, d, log E_q[exp(d)] [matrices])."""
        delta = entries - self.targets[n]
        p = torch.softmax(entries, 1)
        shift = torch.log1p((self.anchor_probs[n] * torch.expm1(delta)).sum(1))
        return (p * delta).sum(1) - shift, p, delta, shift

    def _scale(self, entries: int) -> float:
        """The factor of a matrix's distance (and gradient): 2N under kl_scale entries, else 1."""
        return 2.0 * entries if self.kind == "kl" and self.kl_scale == "entries" else 1.0

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
            entries = torch.stack([self.seen[k] for k in keys])  # [matrices, n]
            if self.kind == "kl":
                out.append(self._kl(entries, n)[0] * self._scale(n))
            else:
                out.append((entries - self.targets[n]).pow(2).sum(1))
        return torch.cat(out)

    def term(self) -> torch.Tensor:
        total = self.distances().sum()
        return total / self.n_layers if self.reduce == "mean" else total

    def gradients(self) -> dict[str, torch.Tensor]:
        """The gradient of `term()` on each collected matrix (flat, fp32), in closed form, without
        a backward: for KL(p || q) with p = softmax(w) it is p * (log p - log q - KL); for the L2
        distance 2 (w - w_prev)."""
        scale = 1.0 / self.n_layers if self.reduce == "mean" else 1.0
        out = {}
        with torch.no_grad():
            for n, keys in self.groups.items():
                entries = torch.stack([self.seen[k] for k in keys])
                if self.kind == "kl":
                    kl, p, delta, shift = self._kl(entries, n)
                    # d KL / d w = p * (log p - log q - KL), and log p - log q = d - shift
                    grad = p * (delta - (shift + kl).unsqueeze(1))
                else:
                    grad = 2 * (entries - self.targets[n])
                out.update(zip(keys, grad * (scale * self._scale(n))))
        return out


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


NORM_EPS = 1e-8  # a zero factor (an adapter that never trained) normalizes to zero, not NaN


def normalized(factor: torch.Tensor) -> torch.Tensor:
    return factor / (factor.norm() + NORM_EPS)


class FrozenLoraSum(nn.Module):
    """sum_i scaling * B_i A_i x over earlier adapters, each factor divided by its Frobenius norm,
    as one rank-(adapters x r) product. Its weights are frozen parameters, so ZeRO-3 partitions
    them and gathers them when this module runs, like any other layer."""

    def __init__(self, factors: list[tuple[torch.Tensor, torch.Tensor]], scaling: float):
        super().__init__()
        a = torch.cat([normalized(fa) for fa, _ in factors], 0)
        b = torch.cat([normalized(fb) for _, fb in factors], 1)
        self.A = nn.Linear(a.shape[1], a.shape[0], bias=False)
        self.B = nn.Linear(b.shape[1], b.shape[0], bias=False)
        with torch.no_grad():
            self.A.weight.copy_(a)
            self.B.weight.copy_(b)
        self.requires_grad_(False)
        self.scaling = scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.B(self.A(x.to(self.A.weight.dtype))) * self.scaling


def attach_frozen_adapters(model: nn.Module, adapter_dirs: list[str]) -> int:
    """Add the frozen, normalized earlier adapters to every LoRA layer's output."""
    states = [load_file(os.path.join(d, "adapter_model.safetensors")) for d in adapter_dirs]
    count = 0
    for name, layer in lora_layers(model).items():
        factors = [(s[f"{name}.lora_A.weight"].float(), s[f"{name}.lora_B.weight"].float()) for s in states]
        live = layer.lora_A["default"].weight  # the frozen sum sits beside it: its device and dtype
        frozen = FrozenLoraSum(factors, layer.scaling["default"]).to(device=live.device, dtype=live.dtype)
        layer.add_module("frozen_sum", frozen)  # a child module: ZeRO-3 sees and partitions it
        layer.register_forward_hook(lambda mod, inputs, out: out + mod.frozen_sum(inputs[0]).to(out.dtype))
        count += 1
    return count


def make_regularizer(cfg, plan, run, model: nn.Module, strategy) -> ProximalTerm | None:
    """Set up the method for the period of `plan` (train/period/plan.py); returns the proximal term
    (peso, l2) or None."""
    name = cfg.method.name
    if name in CUMULATIVE:
        if plan.frozen_periods:
            earlier = list(plan.frozen_periods)
            n = attach_frozen_adapters(model, [run.adapter_dir(t) for t in earlier])
            log.info(f"{name}: the adapters of periods {earlier} frozen, normalized and summed into {n} layers")
        return None
    if plan.anchor is None:
        if name in PROXIMAL:
            log.info(f"{name}: no previous adapter in period {plan.period}, so no proximal term this period")
        return None
    anchor = lora_factors(load_file(os.path.join(plan.anchor, "adapter_model.safetensors")))
    if strategy.is_rank0:
        atomic_write_bytes(run.anchor_path(plan.period), save(anchor))
    kind = "kl" if name == "peso" else "l2"
    return ProximalTerm(model, anchor, kind, cfg.method.reduce, device=strategy.device, kl_scale=cfg.method.kl_scale)
