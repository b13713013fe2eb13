"""The LoRA layers of a peft model and the LoRA factors of an adapter's state: what the
continual methods (train/methods/) and the frozen sum (train/model/addons/frozen_sum.py) work on."""

from __future__ import annotations

import peft
import torch
import torch.nn as nn


def lora_layers(model: nn.Module) -> dict[str, peft.tuners.lora.LoraLayer]:
    """Module name -> every LoRA layer of the live adapter ("default")."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer) and "default" in m.lora_A
    }


def lora_factors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Only the LoRA A/B tensors of an adapter's state (not the new-token rows)."""
    return {k: v for k, v in state.items() if ".lora_A." in k or ".lora_B." in k}
