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
    (what a model add-on puts there: train/model/addons/, `export_to`)

So `AutoModelForCausalLM.from_pretrained(out)` (merged), or `PeftModel.from_pretrained(
AutoModelForCausalLM.from_pretrained(out/base), out/adapter)`, with the saved index, computes
the model the period was evaluated with: the period's model add-ons (train/model/addons/) are
folded into the exported adapter where they can be (`fold_into_adapter`: for `cumulative` and
`cumulative_all` the frozen sum of earlier adapters, as extra rank:
train/model/addons/frozen_sum.py), and otherwise write their own files (`export_to`). A model
trained with `model.item_vectors` also needs its vectors on the input: `Recommender.from_export(out)`
(train/serve/recommender.py) attaches them; a plain `from_pretrained` alone would decode without
them. The folder appears atomically.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings

from safetensors.torch import save_file
from transformers import AutoTokenizer

from data_tools.atomic import written_aside
from data_tools.dataset import ITEM_INDEX, ITEMS
from data_tools.readback import load_safetensors, read_json
from train.common.run_folder import RunFolder
from train.model import addons as model_addons
from train.model.build import SHARD_SIZE
from train.period.inputs import check_period_export, finished_remedy
from train.period.plan import backbone_dir, trains_in_full
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


def folded_adapter(run: RunFolder, cfg, period: int, addons: list | None = None) -> tuple[dict, object]:
    """Period `period`'s adapter (tensors, LoraConfig), with its model add-ons folded in where they
    fold (the frozen sum of the cumulative methods, as extra rank). `addons`: the period's
    (`for_run`), if already made."""
    from peft import LoraConfig

    source = run.adapter_dir(period)
    state = load_safetensors(os.path.join(source, "adapter_model.safetensors"), what="the period's adapter")
    config = LoraConfig.from_pretrained(source)
    for addon in model_addons.for_run(cfg, run, period) if addons is None else addons:
        state, config = addon.fold_into_adapter(state, config)
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
    run = RunFolder(run_dir)
    period = last_done_period(run) if period is None else period
    cfg = saved_config(run, period)
    data_root = data or cfg.data.path
    for name in (ITEM_INDEX, ITEMS):
        if not os.path.isfile(os.path.join(data_root, name)):
            raise FileNotFoundError(f"the run's dataset {data_root} has no {name}; pass the dataset folder (--data)")
    if os.path.exists(out) and not os.path.isfile(os.path.join(out, EXPORT_INFO)):
        raise FileExistsError(f"{out} exists and is not an earlier export (no {EXPORT_INFO}); choose a new folder")
    check_period_export(cfg, run, period)  # every file read below, whole (one line otherwise)
    tokenizer = AutoTokenizer.from_pretrained(run.tokenizer_dir)
    full = trains_in_full(cfg, period)
    kind = "merged" if merged or full else "adapter"
    compute, device = period_compute_dtype(run, period), device or default_device()
    dtype = torch_dtype(compute)
    extras = model_addons.for_run(cfg, run, period)
    if full:  # no adapter: period 0's model is the recommender (its add-ons write their own files)
        model = load_period_model(run, cfg, period, len(tokenizer), dtype=dtype, addons=False, device=device)
    else:
        adapter = folded_adapter(run, cfg, period, extras)
        base = plain_backbone(backbone_dir(cfg, run, period), len(tokenizer), dtype, device)
    info = _export_info(run, cfg, period, kind, data_root, compute)
    with written_aside("cannot write the export", out) as tmp:
        if full:
            model.save_pretrained(tmp, max_shard_size=SHARD_SIZE)
        else:
            _write_adapter_model(tmp, adapter, base, merged, {"period": str(period), "method": cfg.method.name})
        tokenizer.save_pretrained(tmp)
        for name in (ITEM_INDEX, ITEMS):
            shutil.copyfile(os.path.join(data_root, name), os.path.join(tmp, name))
        for addon in extras:  # the item vectors and their trained projection (train/model/item_vectors.py)
            addon.export_to(tmp)
        with open(os.path.join(tmp, EXPORT_INFO), "w") as f:
            json.dump(info, f, indent=1)
    return info


def _export_info(run: RunFolder, cfg, period: int, kind: str, data_root: str, compute: str) -> dict:
    """recommender.json: what the folder holds and how to prompt and decode with it."""
    metrics = None
    if os.path.isfile(run.metrics_path(period)):
        path = run.metrics_path(period)
        remedy = finished_remedy(run, period, path)
        metrics = read_json(path, what=f"period {period}'s metrics", remedy=remedy, fields={"overall": dict})["overall"]
    return {
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


def _write_adapter_model(tmp: str, adapter: tuple, base, merged: bool, metadata: dict) -> None:
    """The adapter beside its backbone (`adapter/`, `base/`), or merged into it (the folder's top)."""
    from peft import PeftModel

    save_adapter(*adapter, os.path.join(tmp, "adapter"), metadata)
    if not merged:
        base.save_pretrained(os.path.join(tmp, "base"), max_shard_size=SHARD_SIZE)
        return
    with warnings.catch_warnings():  # see train/serve/recommender.py
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        model = PeftModel.from_pretrained(base, os.path.join(tmp, "adapter"), autocast_adapter_dtype=False)
        model = model.merge_and_unload()
    model.save_pretrained(tmp, max_shard_size=SHARD_SIZE)
    shutil.rmtree(os.path.join(tmp, "adapter"))
