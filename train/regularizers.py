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
Non-reentrant gradient checkpointing runs those hooks again during recomputation; they then
compute the same ops (so the saved-tensor counts match) but only the first, real forward adds
its terms (docs/zero3.md, "Gradient checkpointing", Fix 1).
"""

from __future__ import annotations

import contextlib
import logging
import os

import peft
import torch
import torch.nn as nn
from safetensors.torch import load_file, save

from data_tools.dataset import atomic_write_bytes
from train.plan import CUMULATIVE, PROXIMAL

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
    """Distance of the live LoRA factors to the anchor's, collected during the forward."""

    def __init__(self, model: nn.Module, anchor: dict[str, torch.Tensor], kind: str, reduce: str):
        self.kind, self.reduce = kind, reduce
        self.collecting = False
        self.terms: list[torch.Tensor] = []
        layers = lora_layers(model)
        self.n_layers = len(layers)
        self.handles = []
        missing = []
        for name, layer in layers.items():
            for which in ("lora_A", "lora_B"):
                key = f"{name}.{which}.weight"
                if key not in anchor:
                    missing.append(key)
                    continue
                ref = anchor[key].float()
                # KL needs log softmax(vec M_prev) (fixed: computed once); L2 needs M_prev.
                target = torch.log_softmax(ref.reshape(-1), 0) if kind == "kl" else ref
                self.handles.append(layer.__getattr__(which)["default"].register_forward_hook(self._hook(target)))
        if missing:
            raise ValueError(
                f"the anchor lacks {len(missing)} LoRA matrices (first: {missing[0]}); "
                "was the previous period trained with other lora.targets?"
            )

    def _hook(self, target: torch.Tensor):
        def hook(module, inputs, output):
            weight = module.weight
            if hasattr(weight, "ds_numel") and weight.numel() != weight.ds_numel:
                raise RuntimeError(
                    "a LoRA weight is partitioned inside its own forward; the proximal term would be wrong"
                )
            entries = weight.float().reshape(-1)  # vec M, in fp32
            reference = target.to(entries.device)
            if self.kind == "kl":
                logp = torch.log_softmax(entries, 0)
                distance = (logp.exp() * (logp - reference)).sum()
            else:
                distance = (entries - reference.reshape(-1)).pow(2).sum()
            if self.collecting:
                self.terms.append(distance)

        return hook

    @contextlib.contextmanager
    def collect(self):
        self.terms = []
        self.collecting = True
        try:
            yield
        finally:
            self.collecting = False

    def term(self) -> torch.Tensor:
        if not self.terms:
            raise RuntimeError("no proximal terms were collected: was the forward run inside collect()?")
        total = torch.stack(self.terms).sum()
        return total / self.n_layers if self.reduce == "mean" else total


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
        frozen = FrozenLoraSum(factors, layer.scaling["default"]).to(layer.lora_A["default"].weight.dtype)
        layer.add_module("frozen_sum", frozen)  # a child module: ZeRO-3 sees and partitions it
        layer.register_forward_hook(lambda mod, inputs, out: out + mod.frozen_sum(inputs[0]).to(out.dtype))
        count += 1
    return count


def make_regularizer(cfg, plan, run, model: nn.Module, strategy) -> ProximalTerm | None:
    """Set up the method for the period of `plan` (train/plan.py); returns the proximal term
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
    return ProximalTerm(model, anchor, "kl" if name == "peso" else "l2", cfg.method.reduce)
