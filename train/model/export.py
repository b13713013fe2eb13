"""Hand-off between periods: the adapter (or, after a full period 0, the whole model).

Under ZeRO-3 with real partitioning, peft's `save_pretrained` writes 0-element tensors without
any error (docs/zero3.md, "Saving an adapter"). So the trainable parameters are gathered on ALL ranks
(a collective) and rank 0 writes them inside the gather; every tensor is checked non-empty
before it is written; the folder appears atomically (written aside, flushed, then renamed). The export
loads with `PeftModel.from_pretrained` onto a plain CPU model, on any number of ranks.
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import save_file

from data_tools.atomic import written_aside
from train.model import addons
from train.model.build import adapter_state_keys


def _check_nonempty(state: dict[str, torch.Tensor], what: str) -> None:
    empty = [k for k, v in state.items() if v.numel() == 0]
    if empty:
        raise RuntimeError(
            f"{what}: {len(empty)} tensors are empty after gathering (first: {empty[0]}); "
            "a ZeRO-3 partition was not gathered"
        )


def gather_adapter_state(strategy, model) -> dict[str, torch.Tensor] | None:
    """The adapter's tensors (peft key names) as whole CPU tensors on rank 0; None elsewhere."""
    live = adapter_state_keys(model)
    with strategy.gathered(list(live.values())):
        if not strategy.is_rank0:
            return None
        return {k: p.detach().to("cpu", copy=True).contiguous() for k, p in live.items()}


def export_adapter(strategy, model, out_dir: str, metadata: dict | None = None) -> None:
    """Write the adapter in PEFT format (adapter_config.json + adapter_model.safetensors), and
    what the model's add-ons save (train/model/addons/: the item vectors with their trained projection)."""
    state = gather_adapter_state(strategy, model)
    addon_states = addons.gather_states(strategy, model)
    if strategy.is_rank0:
        _check_nonempty({**state, **addons.checked_tensors(addon_states)}, out_dir)
        with written_aside("cannot export the period's adapter", out_dir) as tmp:
            model.peft_config["default"].save_pretrained(tmp)
            save_file(
                state,
                os.path.join(tmp, "adapter_model.safetensors"),
                metadata={"format": "pt", **{k: str(v) for k, v in (metadata or {}).items()}},
            )
            addons.write_states(addon_states, tmp)
    strategy.barrier()


def export_full_model(strategy, model, tokenizer, out_dir: str) -> None:
    """Write the whole model (Hugging Face format), gathering one module at a time so no rank
    holds more than one layer's parameters beyond its partition. An add-on (the item-vector input)
    has its own file (train/model/addons/): a plain `from_pretrained` would not know its keys."""
    state = {}
    for prefix, module in model.named_modules():
        params = dict(module.named_parameters(recurse=False))
        if not params or addons.owned(prefix + "."):
            continue
        with strategy.gathered(list(params.values())):
            if strategy.is_rank0:
                for name, p in params.items():
                    state[f"{prefix}.{name}" if prefix else name] = p.detach().to("cpu", copy=True)
    addon_states = addons.gather_states(strategy, model)
    if strategy.is_rank0:
        _check_nonempty({**state, **addons.checked_tensors(addon_states)}, out_dir)
        with written_aside("cannot export the period's model", out_dir) as tmp:
            model.save_pretrained(tmp, state_dict=state)
            tokenizer.save_pretrained(tmp)
            addons.write_states(addon_states, tmp)
    strategy.barrier()
