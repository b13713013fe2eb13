"""A self-contained folder of one period's recommender, for use outside the framework:

    <out>/recommender.json        what the folder is: period, method, prompt settings, beams, metrics
    <out>/tokenizer*.json ...     the run's tokenizer, code tokens included
    <out>/item_index.json         the items' codes; items.jsonl: source ids and titles
    merged (--merged, and a full period 0):
    <out>/config.json, model.safetensors    a plain Hugging Face model, the adapter merged in
    adapter (the default):
    <out>/base/                   the backbone (code-token rows included)
    <out>/adapter/                the period's adapter (PEFT format)
    <out>/item_vectors.safetensors  with `model.item_vectors`: the item vectors and their trained
                                  projection (train/model/item_vectors.py)

So `AutoModelForCausalLM.from_pretrained(out)` (merged), or `PeftModel.from_pretrained(
AutoModelForCausalLM.from_pretrained(out/base), out/adapter)`, with the saved index, computes
the model the period was evaluated with: for `cumulative` and `cumulative_all` the frozen sum
of earlier adapters is folded into the exported adapter. A LoRA's output is
scaling * B A x, and the frozen sum adds scaling * B_i' A_i' x (normalized factors), so the
two together are one LoRA of rank r * (1 + n) with A stacked over the A_i' and B beside the B_i',
and lora_alpha chosen to keep the same scaling. A model trained with `model.item_vectors` also
needs its vectors on the input: `Recommender.from_export(out)` (train/serve/recommender.py) attaches
them (`attach_item_input`); a plain `from_pretrained` alone would decode without them. The folder
appears atomically.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from data_tools.atomic import written_aside
from data_tools.dataset import ITEM_INDEX, ITEMS
from train.common.run_folder import RunFolder
from train.methods.regularizers import normalized
from train.model.build import SHARD_SIZE
from train.model.item_vectors import FILE as ITEM_VECTORS
from train.period.plan import backbone_dir, export_dir, frozen_adapter_periods, trains_in_full
from train.serve.recommender import (
    EXPORT_INFO,
    default_device,
    last_done_period,
    load_period_model,
    period_compute_dtype,
    plain_backbone,
    saved_config,
    torch_dtype,
)

LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"


def folded_adapter(run: RunFolder, cfg, period: int) -> tuple[dict, object]:
    """Period `period`'s adapter (tensors, LoraConfig), with the frozen sum of the cumulative
    methods folded in as extra rank."""
    from peft import LoraConfig

    source = run.adapter_dir(period)
    state = load_file(os.path.join(source, "adapter_model.safetensors"))
    config = LoraConfig.from_pretrained(source)
    earlier = frozen_adapter_periods(cfg, cfg.method.name, period)
    if earlier:
        frozen = [load_file(os.path.join(run.adapter_dir(t), "adapter_model.safetensors")) for t in earlier]
        for key in [k for k in state if k.endswith(LORA_A)]:
            b_key = key[: -len(LORA_A)] + LORA_B
            a, b = state[key], state[b_key]
            state[key] = torch.cat([a] + [normalized(f[key].float()).to(a.dtype) for f in frozen], 0)
            state[b_key] = torch.cat([b] + [normalized(f[b_key].float()).to(b.dtype) for f in frozen], 1)
        scaling = config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
        config.r = config.r * (1 + len(earlier))
        config.lora_alpha = scaling * (math.sqrt(config.r) if config.use_rslora else config.r)
    return state, config


def save_adapter(state: dict, config, out_dir: str, metadata: dict) -> None:
    """Write an adapter in PEFT format (adapter_config.json + adapter_model.safetensors)."""
    os.makedirs(out_dir, exist_ok=True)
    config.save_pretrained(out_dir)
    save_file(
        {k: v.contiguous() for k, v in state.items()},
        os.path.join(out_dir, "adapter_model.safetensors"),
        metadata={"format": "pt", **metadata},
    )


def export_recommender(
    run_dir: str,
    out: str,
    period: int | None = None,
    merged: bool = False,
    data: str | None = None,
    device: str | None = None,
) -> dict:
    """Write the folder (see the module doc) and return its recommender.json. Everything is read
    from the run first, so an OSError while writing is the export's (a full disk), reported as a
    WriteError naming `out`. The model is loaded onto `device` (default: cuda if there is one;
    "auto": spread over the GPUs there are), merged there, and written in shards of SHARD_SIZE,
    so the host never holds more of it than one shard; in the dtype the period computed in."""
    from peft import PeftModel

    run = RunFolder(run_dir)
    period = last_done_period(run) if period is None else period
    cfg = saved_config(run, period)
    data_root = data or cfg.data.path
    for name in (ITEM_INDEX, ITEMS):
        if not os.path.isfile(os.path.join(data_root, name)):
            raise FileNotFoundError(f"the run's dataset {data_root} has no {name}; pass the dataset folder (--data)")
    if os.path.exists(out) and not os.path.isfile(os.path.join(out, EXPORT_INFO)):
        raise FileExistsError(f"{out} exists and is not an earlier export (no {EXPORT_INFO}); choose a new folder")
    tokenizer = AutoTokenizer.from_pretrained(run.tokenizer_dir)
    full = trains_in_full(cfg, period)
    kind = "merged" if merged or full else "adapter"
    compute, device = period_compute_dtype(run, period), device or default_device()
    dtype = torch_dtype(compute)
    if full:  # no adapter: period 0's model is the recommender
        model = load_period_model(run, cfg, period, len(tokenizer), dtype=dtype, item_vectors=False, device=device)
    else:
        adapter = folded_adapter(run, cfg, period)
        base = plain_backbone(backbone_dir(cfg, run, period), len(tokenizer), dtype, device)
    metrics = None
    if os.path.isfile(run.metrics_path(period)):
        with open(run.metrics_path(period)) as f:
            metrics = json.load(f)["overall"]
    info = {
        "format_version": 1,
        "kind": kind,
        "period": period,
        "method": cfg.method.name,
        "run": run.root,
        "data": os.path.abspath(data_root),
        "prompt": {
            "template": cfg.data.template,
            "separator": cfg.data.separator,
            "max_history": cfg.data.max_history,
            "objective": cfg.data.objective,
        },
        "beams": cfg.eval.beams,
        "dtype": compute,  # the dtype the period computed in, which Recommender.from_export loads it in
        "metrics": metrics,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with written_aside("cannot write the export", out) as tmp:
        if full:
            model.save_pretrained(tmp, max_shard_size=SHARD_SIZE)
        else:
            save_adapter(*adapter, os.path.join(tmp, "adapter"), {"period": str(period), "method": cfg.method.name})
            if merged:
                with warnings.catch_warnings():  # see train/serve/recommender.py
                    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
                    model = PeftModel.from_pretrained(
                        base, os.path.join(tmp, "adapter"), autocast_adapter_dtype=False
                    ).merge_and_unload()
                model.save_pretrained(tmp, max_shard_size=SHARD_SIZE)
                shutil.rmtree(os.path.join(tmp, "adapter"))
            else:
                base.save_pretrained(os.path.join(tmp, "base"), max_shard_size=SHARD_SIZE)
        tokenizer.save_pretrained(tmp)
        for name in (ITEM_INDEX, ITEMS):
            shutil.copyfile(os.path.join(data_root, name), os.path.join(tmp, name))
        if cfg.model.item_vectors:  # the vectors and their trained projection (train/model/item_vectors.py)
            shutil.copyfile(os.path.join(export_dir(cfg, run, period), ITEM_VECTORS), os.path.join(tmp, ITEM_VECTORS))
        with open(os.path.join(tmp, EXPORT_INFO), "w") as f:
            json.dump(info, f, indent=1)
    return info
