"""Every file a period will read back, checked before it trains: a damaged one is one line
(data_tools/readback.py) instead of a traceback halfway through, on one rank or all of them.

`check_period_inputs` runs on every rank before any process group (train/main.py): cheap checks
of the same files on every rank (the item index and the run's items, the size of every shard the
period reads, the start adapter and the other earlier adapters, the backbone folder, the run's
tokenizer, the item vectors). `check_rank_share` runs on every rank once the process group
exists, inside one decision for all (train/period/recipe.py, `DeepSpeedStrategy.agreeing`): each
rank reads its share of those shards whole, against the sha256 the manifest records, so a
shard damaged anywhere is found before training, by one rank, and reported once.
"""

from __future__ import annotations

import glob
import os

from data_tools.dataset import ITEMS, SPLITS, check_shards, dataset_remedy, split_shards
from data_tools.index.codes import load_item_index
from data_tools.readback import DamagedFile, check_safetensors, read_json, read_jsonl, read_size
from train.common.config import Config
from train.common.run_folder import RunFolder
from train.period.plan import PeriodPlan, trains_in_full


def finished_remedy(run: RunFolder, period: int, path: str) -> str:
    """What to do about a damaged file of a period's results: a finished period never trains
    again; one under way can start over."""
    if period in run.state()["done"]:
        return (
            f"period {period} is finished and never trains again: put {path} back from a copy, "
            "or start a new run folder"
        )
    return f"add --restart-period to train period {period} from its start"


def check_adapter(folder: str, what: str, remedy: str) -> None:
    """A PEFT adapter folder as an export writes it (and its item vectors, if it has them)."""
    read_json(os.path.join(folder, "adapter_config.json"), what=f"{what}'s config", remedy=remedy)
    check_safetensors(os.path.join(folder, "adapter_model.safetensors"), what=what, remedy=remedy)
    check_safetensors(
        os.path.join(folder, "item_vectors.safetensors"), what=f"{what}'s item vectors", remedy=remedy, missing=None
    )


def check_model_folder(folder: str, what: str, remedy: str) -> None:
    """A Hugging Face model folder: its config and every safetensors file it names (or holds)."""
    read_json(os.path.join(folder, "config.json"), what=f"{what}'s config", remedy=remedy)
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.lexists(index):
        doc = read_json(index, what=f"{what}'s weight index", remedy=remedy, fields={"weight_map": dict})
        files = sorted(set(doc["weight_map"].values()))
    else:
        files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(glob.escape(folder), "*.safetensors")))
    for name in files:
        if name != "item_vectors.safetensors":
            check_safetensors(os.path.join(folder, name), what=f"{what}'s weights", remedy=remedy)
    check_safetensors(
        os.path.join(folder, "item_vectors.safetensors"), what=f"{what}'s item vectors", remedy=remedy, missing=None
    )


def check_tokenizer(folder: str, remedy: str) -> None:
    """A tokenizer folder: each of its JSON files whole, and no file of it empty."""
    for path in sorted(glob.glob(os.path.join(glob.escape(folder), "*"))):
        if path.endswith(".json"):
            read_json(path, what="the tokenizer file", remedy=remedy)
        elif os.path.isfile(path):
            read_size_nonzero(path, what="the tokenizer file", remedy=remedy)


def read_size_nonzero(path: str, *, what: str, remedy: str) -> None:
    if read_size(path, what=what, remedy=remedy) == 0:
        raise DamagedFile(path, "is empty", what=what, remedy=remedy)


def check_period_inputs(
    cfg: Config, run: RunFolder, manifest: dict, period: int, *, eval_only: bool = False, restart: bool = False
) -> PeriodPlan:
    """Before any process group, on every rank: the files period `period` will read, each whole
    as far as a cheap look tells (a DamagedFile otherwise); returns the period's plan."""
    data = cfg.data.path
    load_item_index(data)
    check_shards(data, manifest, range(period + 1))
    plan = PeriodPlan.make(cfg, run, period, eval_only=eval_only, restart=restart)
    if cfg.model.shape and not os.path.isfile(os.path.join(run.tokenizer_dir, "tokenizer_config.json")):
        read_jsonl(os.path.join(data, ITEMS), what="the dataset's items", remedy=dataset_remedy(data))
    if os.path.isdir(run.tokenizer_dir):
        check_tokenizer(run.tokenizer_dir, remedy=_run_file_remedy(run, run.tokenizer_dir))
    backbone = plan.backbone
    if backbone == run.base_dir:
        if os.path.isdir(backbone):
            check_model_folder(backbone, "the run's backbone", _run_file_remedy(run, backbone))
    elif backbone == run.model_dir(0) and trains_in_full(cfg, 0):
        check_model_folder(backbone, "period 0's model", finished_remedy(run, 0, backbone))
    elif os.path.isdir(backbone):
        check_model_folder(backbone, "the backbone (model.path)", "put the model folder back whole")
    if plan.start_adapter:
        t = period - 1
        check_adapter(plan.start_adapter, f"period {t}'s adapter", finished_remedy(run, t, plan.start_adapter))
    for t in plan.frozen_periods:
        check_adapter(run.adapter_dir(t), f"period {t}'s adapter", finished_remedy(run, t, run.adapter_dir(t)))
    export = plan.export_dir
    if os.path.isdir(export):  # a better epoch's export, read back for the evaluation
        if plan.full:
            check_model_folder(export, f"period {period}'s model", finished_remedy(run, period, export))
        else:
            check_adapter(export, f"period {period}'s adapter", finished_remedy(run, period, export))
    if cfg.model.item_vectors:
        from train.model.item_vectors import vectors_path

        mine, previous = vectors_path(run, period), vectors_path(run, period - 1)
        remedy = (
            finished_remedy(run, period, mine)
            if period in run.state()["done"]
            else f"delete it: it is built again from the dataset as period {period} starts"
        )
        check_safetensors(mine, what=f"period {period}'s item vectors", remedy=remedy, missing=None)
        if period > 0 and not os.path.exists(mine):
            check_safetensors(
                previous, what=f"period {period - 1}'s item vectors", remedy=finished_remedy(run, period - 1, previous)
            )
    return plan


def _run_file_remedy(run: RunFolder, path: str) -> str:
    """A file made once per run (the tokenizer, the random backbone): made again while no
    period has finished on it, else part of every later period's model."""
    if run.state()["done"]:
        return f"put {path} back from a copy: the run's finished periods were trained with it"
    return f"delete {path}: it is made again as the period starts"


def check_rank_share(root: str, manifest: dict, period: int, rank: int, world_size: int) -> None:
    """This rank's share of the shards of windows 0..`period` (every `world_size`-th one), each
    read whole against the sha256 the manifest records: together the ranks read each shard once."""
    paths = [path for t in range(period + 1) for split in SPLITS for path, _ in split_shards(root, manifest, t, split)]
    check_shards(root, manifest, range(period + 1), full=True, only=set(paths[rank::world_size]))


def check_period_export(cfg: Config, run: RunFolder, period: int) -> None:
    """A finished period as a recommender or an export reads it: the run's tokenizer, the model
    folder it was evaluated with, its adapter and the earlier adapters its method adds, whole."""
    from train.model import addons
    from train.period.plan import evaluated_model_dir

    check_tokenizer(run.tokenizer_dir, remedy=_run_file_remedy(run, run.tokenizer_dir))
    source = evaluated_model_dir(cfg, run, period)
    owner = next((t for t in (period, 0) if source == run.model_dir(t)), None)
    if owner is not None:
        check_model_folder(source, f"period {owner}'s model", finished_remedy(run, owner, source))
    elif source == run.base_dir:
        check_model_folder(source, "the run's backbone", _run_file_remedy(run, source))
    if not trains_in_full(cfg, period):
        adapter = run.adapter_dir(period)
        if os.path.isdir(adapter):  # a missing one is the caller's plain "no exported adapter"
            check_adapter(adapter, f"period {period}'s adapter", finished_remedy(run, period, adapter))
    for addon in addons.for_run(cfg, run, period):
        for t in getattr(addon, "periods", ()):
            check_adapter(run.adapter_dir(t), f"period {t}'s adapter", finished_remedy(run, t, run.adapter_dir(t)))
