"""Every tensor of the model on the rank's device after `deepspeed.initialize`.

DeepSpeed moves a model to the rank's device, except one built under `zero.Init` (ZeRO-3 with
`HfDeepSpeedConfig`, train/dist/strategy.py): there it only partitions and places the parameters
(deepspeed/runtime/engine.py, `_configure_distributed_model`: "zero.Init() handles device
placement of model"). Buffers and modules added after `from_pretrained` stay where they were
made, on the CPU: the item-vector input's lookup tables (train/model/item_vectors.py) would then be
indexed with CUDA ids on the first forward. `move_to` moves the buffers left behind; `misplaced`
lists whatever is not where it should be (the strategy refuses to train with any).
"""

from __future__ import annotations

import torch


def _partition(param: torch.nn.Parameter) -> torch.Tensor:
    """Where a parameter's values live: its ZeRO-3 partition, or the tensor itself."""
    return param.ds_tensor if getattr(param, "ds_tensor", None) is not None else param.data


def move_to(module: torch.nn.Module, device: torch.device) -> None:
    """Every buffer onto `device` (in place). Parameters are DeepSpeed's to place: it partitions
    (ZeRO-3) or moves (ZeRO-0/1/2) all of them, and its optimizer holds them by then; one that is
    not on the device is an error that `misplaced` names."""
    for sub in module.modules():
        for name, buf in sub.named_buffers(recurse=False):
            if buf is not None and buf.device != device:
                sub._buffers[name] = buf.to(device)


def misplaced(module: torch.nn.Module, device: torch.device, *, offloaded_params: bool = False) -> list[str]:
    """Names of the buffers and parameters that are not on `device` (parameters partitioned by
    ZeRO-3 by their partition; with `offloaded_params` those partitions live on the CPU)."""
    out = [name for name, buf in module.named_buffers() if buf.device != device]
    for name, param in module.named_parameters():
        home = torch.device("cpu") if offloaded_params and hasattr(param, "ds_id") else device
        if _partition(param).device != home:
            out.append(name)
    return out
