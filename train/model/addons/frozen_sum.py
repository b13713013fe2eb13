"""The cumulative methods' frozen sum as a model add-on (`cumulative`, `cumulative_all`:
train/methods/registry.py): the paper's cumulative LoRA ("SumLoRA latest+inherit").

The earlier adapters the method names (period t-1's, or all of 0..t-1), frozen, with A and B
each divided by its Frobenius norm (plus a small epsilon, so a zero factor gives zero, not NaN),
are added to every LoRA layer's output; the live adapter starts from period t-1's, as in every
LoRA period. It saves nothing of its own (the earlier adapters are their periods' exports); a
recommender export folds it into the adapter as extra rank.
"""

from __future__ import annotations

import logging
import math
import os

import torch
import torch.nn as nn

from data_tools.readback import load_safetensors
from train.model.addons.base import LORA, ModelAddon, TrainingInputs

log = logging.getLogger(__name__)

NORM_EPS = 1e-8  # a zero factor (an adapter that never trained) normalizes to zero, not NaN
LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"


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


def _load(adapter_dir: str) -> dict[str, torch.Tensor]:
    return load_safetensors(os.path.join(adapter_dir, "adapter_model.safetensors"), what="an earlier adapter")


def attach_frozen_adapters(model: nn.Module, adapter_dirs: list[str]) -> int:
    """Add the frozen, normalized earlier adapters to every LoRA layer's output; returns how many
    layers got them."""
    from train.model.lora import lora_layers

    states = [_load(d) for d in adapter_dirs]
    count = 0
    for name, layer in lora_layers(model).items():
        factors = [(s[f"{name}.lora_A.weight"].float(), s[f"{name}.lora_B.weight"].float()) for s in states]
        live = layer.lora_A["default"].weight  # the frozen sum sits beside it: its device and dtype
        frozen = FrozenLoraSum(factors, layer.scaling["default"]).to(device=live.device, dtype=live.dtype)
        layer.add_module("frozen_sum", frozen)  # a child module: ZeRO-3 sees and partitions it
        layer.register_forward_hook(lambda mod, inputs, out: out + mod.frozen_sum(inputs[0]).to(out.dtype))
        count += 1
    return count


def frozen_periods(cfg, period: int) -> list[int]:
    from train.period.plan import frozen_adapter_periods

    return frozen_adapter_periods(cfg, cfg.method.name, period)


class FrozenSum(ModelAddon):
    name = "frozen_sum"
    stage = LORA

    def __init__(self, run, periods: list[int], announce: str | None = None):
        """The adapters of `periods` of `run`; `announce`: the method's name, to log the attach."""
        self.periods, self.adapter_dirs, self.announce = list(periods), [run.adapter_dir(t) for t in periods], announce

    @classmethod
    def used(cls, cfg, period: int) -> bool:
        from train.methods.registry import method

        return cls.name in method(cfg.method.name).addons and bool(frozen_periods(cfg, period))

    @classmethod
    def for_training(cls, inputs: TrainingInputs) -> FrozenSum:
        return cls(inputs.run, inputs.plan.frozen_periods, announce=inputs.cfg.method.name)

    @classmethod
    def for_run(cls, cfg, run, period: int) -> FrozenSum:
        return cls(run, frozen_periods(cfg, period))

    def attach(self, model: nn.Module) -> None:
        n = attach_frozen_adapters(model, self.adapter_dirs)
        if self.announce:
            log.info(
                f"{self.announce}: the adapters of periods {self.periods} frozen, normalized and summed into {n} layers"
            )

    @classmethod
    def owns(cls, param_name: str) -> bool:
        return ".frozen_sum." in f".{param_name}"

    def fold_into_adapter(self, state: dict[str, torch.Tensor], config) -> tuple[dict[str, torch.Tensor], object]:
        """A LoRA's output is scaling * B A x, and the frozen sum adds scaling * B_i' A_i' x
        (normalized factors), so the two together are one LoRA of rank r * (1 + n) with A stacked
        over the A_i' and B beside the B_i', and lora_alpha chosen to keep the same scaling."""
        frozen = [_load(d) for d in self.adapter_dirs]
        for key in [k for k in state if k.endswith(LORA_A)]:
            b_key = key[: -len(LORA_A)] + LORA_B
            a, b = state[key], state[b_key]
            state[key] = torch.cat([a] + [normalized(f[key].float()).to(a.dtype) for f in frozen], 0)
            state[b_key] = torch.cat([b] + [normalized(f[b_key].float()).to(b.dtype) for f in frozen], 1)
        scaling = config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
        config.r = config.r * (1 + len(frozen))
        config.lora_alpha = scaling * (math.sqrt(config.r) if config.use_rslora else config.r)
        return state, config
