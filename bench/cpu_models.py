"""Which from-scratch model learns to recommend on a CPU: shapes, objectives, learning rates and
item vectors, each trained as the framework trains period 0, in a plain loop on one core.

    python bench/cpu_models.py [override ...] [--epochs 8] [--data DIR] [--window 0] [--variants NAME ...]

A variant is a list of dotted overrides of the framework's config (train/common/config.py) on top
of --config (default configs/cds_study.yaml, the framework's recipe for the CDs blocks); the
command line's overrides come last. Each variant trains period 0 of that config in full, on one
window (--window) of the CDs blocks (or --data), for --epochs epochs, on one core (two variants
side by side; schedule.patience is not applied), keeps the epoch with the best validation loss,
and is scored by the framework's evaluation of that window (trie-constrained beam search,
eval.beams, on all the window's test users or a seeded sample of --users), beside the
framework's two references on the same users: the window's most popular items and the items
that followed the user's last items.

Everything measured comes from the framework: the tokenizer, item codebook and sample encoder
(train/model/vocab.py), the shape's random-weight backbone (train/model/build.py), the item-vector
input (train/model/item_vectors.py), the sequence chunks and the batches in their seeded order
(train/loop/data.py), the loss (train/loop/loss.py), AdamW with its weight-decay groups and the
warmup-then-cosine schedule (train/loop/schedule.py), the period's learning rate, epochs and
steps (train/period/plan.py), and the evaluation of a window with its references
(train/evaluation/). The bench's own part is what the framework's trainer does through a
DeepSpeed engine, here for one rank without accumulation: the optimizer step (loss over the
labelled tokens, backward, clip, step), the validation loss after each epoch, the best epoch's
weights kept in memory; and one measurement the evaluation does not make, the ranking without
the user's own items (`excluding_history`), read from the evaluation's recommendation lists.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

CDS = os.path.join(os.path.dirname(REPO), "shared", "data", "amazon-cds-blocks")
CONFIG = os.path.join(REPO, "configs", "cds_study.yaml")
TINY = ["model.shape=tiny", "optim.lr=3e-3", "optim.weight_decay=0.01"]
VARIANTS = {  # name -> overrides of --config (configs/cds_study.yaml: mini, lr 1e-3, weight decay 0.1, item vectors 64)
    "tiny, lr 3e-3 (sequence)": [*TINY, "model.item_vectors=0"],
    "tiny, lr 3e-3 (response: one sample per target)": [*TINY, "model.item_vectors=0", "data.objective=response"],
    "tiny, lr 3e-3, item vectors 64 (sequence)": TINY,
    "mini, lr 1e-3, weight decay 0.1 (sequence)": ["model.item_vectors=0"],
    "mini, lr 2e-3, weight decay 0.1 (sequence)": ["model.item_vectors=0", "optim.lr=2e-3"],
    "mini, lr 3e-3, weight decay 0.1 (sequence)": ["model.item_vectors=0", "optim.lr=3e-3"],
    "mini, lr 1e-3, weight decay 0.1, item vectors 64 (sequence): configs/cds_study.yaml": [],
}


def bench_overrides(a) -> list[str]:
    """The command line's settings as overrides, after the variant's."""
    out = [
        f"schedule.period0_epochs={a.epochs}",
        "model.period0=full",
        f"eval.max_users={a.users if a.users else 'null'}",
        "logging.progress=false",
        f"model.seed={a.seed}",
        f"data.seed={a.seed}",
    ]
    if a.beams:
        out.append(f"eval.beams={a.beams}")
    return out + list(a.overrides)


def run_variant(
    name: str, overrides: list[str], config: str, data: str, window: int, eval_epochs: list[int], work: str
) -> dict:
    sys.stdout = sys.stderr  # what this process prints (DeepSpeed's op builder does) stays off the JSON line
    import torch

    from data_tools.dataset import load_manifest
    from train.common.config import load_config
    from train.common.run_folder import RunFolder
    from train.dist.ds_config import resolve_dtype
    from train.dist.strategy import DeepSpeedStrategy
    from train.evaluation.evaluator import EvalOptions, Evaluator
    from train.loop.data import WindowData, prepare_sequence_chunks, sequence_chunks_dir
    from train.loop.loss import lm_loss
    from train.loop.schedule import make_optimizer, make_scheduler
    from train.model.build import DTYPES, build_shape_backbone, load_backbone, param_groups
    from train.model.item_vectors import attach_item_input, build_item_vectors
    from train.model.vocab import load_vocab
    from train.period.plan import PeriodPlan

    overrides = [*overrides, f"data.path={data}"]
    # One micro-batch per optimizer step: the global batch at once, as one rank without accumulation.
    batch = load_config(config, overrides).schedule.global_batch_size
    cfg = load_config(config, [*overrides, f"data.micro_batch_size={batch}"])
    strategy = DeepSpeedStrategy()  # a world of one process (no DeepSpeed engine is made)
    torch.set_num_threads(1)
    run = RunFolder(tempfile.mkdtemp(prefix="run-", dir=work))
    try:
        manifest = load_manifest(data)
        plan = PeriodPlan.make(cfg, run, 0)  # period 0 in full, from the shape's random weights
        dtype = resolve_dtype(cfg, strategy.cuda, strategy.bf16_supported)
        vocab = load_vocab(cfg, run, data, strategy)
        encoder, codebook = vocab.encoder, vocab.codebook
        build_shape_backbone(cfg, run, vocab.tokenizer, dtype, strategy)
        model = load_backbone(strategy, plan.backbone, cfg, dtype, len(vocab.tokenizer))
        if cfg.model.item_vectors:
            # The vectors of period `window` (windows 0..window), not rotated onto an earlier period's.
            tensors = build_item_vectors(data, manifest, window, codebook, cfg.model.item_vectors, None)
            attach_item_input(model, tensors, seed=cfg.model.seed + plan.period)  # as the add-on seeds it
        model.requires_grad_(True)
        chunks = None
        if cfg.data.objective == "sequence":
            chunks = sequence_chunks_dir(run.period_dir(0), cfg.data.max_history)
            prepare_sequence_chunks(data, manifest, window, cfg.data.max_history, chunks, strategy)
        windows = WindowData(
            data,
            manifest,
            window,
            settings=cfg.data,
            encoder=encoder,
            rank=0,
            world_size=1,
            accumulation=1,
            chunks=chunks,
        )
        total_steps = plan.total_steps(windows.train_epoch.steps)
        optimizer = make_optimizer(param_groups(model, cfg.optim.weight_decay), cfg.optim, plan.lr, strategy.cuda)
        scheduler = make_scheduler(optimizer, cfg.schedule, total_steps)
        evaluator = Evaluator(
            options=EvalOptions.of(cfg),
            model_folders=[],  # evaluate_window only: no finished windows kept
            strategy=strategy,
            engine=model,
            encoder=encoder,
            manifest=manifest,
            period=0,
            run=run,
            logger=None,
            dtype=DTYPES[dtype],
        )
        # per code token (EOS, which the response objective also labels, excluded), so both objectives compare
        per_code_token = encoder.response_len / codebook.levels

        def validation_loss() -> float:
            model.eval()
            total, count = 0.0, 0
            with torch.no_grad():
                for batch in windows.valid():
                    s, n = lm_loss(model, strategy.to_device(batch), cfg.method.temperature)
                    total, count = total + float(s), count + int(n)
            return total / max(count, 1) * per_code_token

        t0 = time.time()
        step, targets, best, best_state, by_epoch = 0, 0, None, None, {}
        for epoch in range(plan.epochs):
            model.train()
            for batch in windows.train(epoch):
                if step >= total_steps:
                    break
                total, count = lm_loss(model, strategy.to_device(batch), cfg.method.temperature)
                optimizer.zero_grad()
                (total / count.clamp(min=1)).backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                optimizer.step()
                scheduler.step()
                step += 1
                targets += int(count) // encoder.response_len
            val = validation_loss()
            if best is None or val < best:
                best, best_state = val, {k: v.clone() for k, v in model.state_dict().items()}
            if epoch + 1 in eval_epochs:  # does ranking follow the validation loss?
                scored = evaluator.evaluate_window(window)["overall"]
                by_epoch[epoch + 1] = {"val_loss": round(val, 4), "ndcg@10": round(scored["ndcg@10"], 4)}
        train_minutes = (time.time() - t0) / 60
        model.load_state_dict(best_state)
        model.eval()
        scored = evaluator.evaluate_window(window)
        return {
            "variant": name,
            "overrides": VARIANTS[name],
            "parameters": sum(p.numel() for p in model.parameters()),
            "vocab": len(vocab.tokenizer),
            "epochs": plan.epochs,
            "steps": step,
            "beams": cfg.eval.beams,
            "train_minutes": round(train_minutes, 1),
            "targets_trained": targets,
            "users": scored["users"],
            "best_val_loss_per_code_token": round(best, 4),
            "test_loss": round(scored["overall"]["test_loss"], 4),
            "ndcg@10": round(scored["overall"]["ndcg@10"], 4),
            "hit@10": round(scored["overall"]["hit@10"], 4),
            "excluding_history": excluding_history(scored, data, manifest, window, cfg, codebook),
            "by_epoch": by_epoch,
            "popularity_ndcg@10": round(scored["popularity"]["overall"]["ndcg@10"], 4),
            "popularity_hit@10": round(scored["popularity"]["overall"]["hit@10"], 4),
            "transitions_ndcg@10": round(scored["transitions"]["overall"]["ndcg@10"], 4),
            "transitions_hit@10": round(scored["transitions"]["overall"]["hit@10"], 4),
        }
    finally:
        strategy.close()
        shutil.rmtree(run.root, ignore_errors=True)


def excluding_history(scored: dict, data: str, manifest: dict, window: int, cfg, codebook) -> dict:
    """The evaluation's lists without the user's own items (a recommender does not offer what the
    user already has; in the CDs blocks no user reviews an item twice): NDCG@10 and Hit@10 of the
    model and of the most popular items, and how many own items the model's top 10 held."""
    from train.evaluation.ranking import rank_metrics
    from train.evaluation.references import window_references
    from train.evaluation.users import test_users

    histories = {s["user"]: s["history"] for s in test_users(data, manifest, window, cfg.eval.max_users, cfg.eval.seed)}
    popular = window_references(data, manifest, window, codebook, 40)[0]
    model, popularity, held = [], [], 0
    for row in scored["recommendations"]:
        had = {tuple(codebook.item_token_ids(item)) for item in histories[row["user"]]}
        target = tuple(codebook.item_token_ids(row["target"]))
        found = [tuple(codebook.item_token_ids(item)) for item in row["items"]]
        fresh = [code for code in found if code not in had][:10]
        mine = [code for code in popular if code not in had][:10]
        model.append(fresh.index(target) if target in fresh else None)
        popularity.append(mine.index(target) if target in mine else None)
        held += sum(code in had for code in found[:10])
    m, p = rank_metrics(model, [10]), rank_metrics(popularity, [10])
    return {
        "ndcg@10": round(m["ndcg@10"], 4),
        "hit@10": round(m["hit@10"], 4),
        "popularity_ndcg@10": round(p["ndcg@10"], 4),
        "history_items_in_top10_per_user": round(held / max(len(model), 1), 3),
    }


def main() -> None:
    from data_tools.help_format import HelpFormatter

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument(
        "--epochs",
        type=int,
        default=8,
        help="epochs of every variant (schedule.period0_epochs: the cosine decays over them)",
    )
    ap.add_argument(
        "--eval-epochs",
        type=int,
        nargs="*",
        default=[],
        help="also score the test users after these epochs (ranking against validation loss)",
    )
    ap.add_argument("--seed", type=int, default=0, help="initial weights and batch order (model.seed, data.seed)")
    ap.add_argument("--config", default=CONFIG, help="the experiment YAML the variants override")
    ap.add_argument("--data", help="a dataset folder with an item index (default: the CDs blocks, converted here)")
    ap.add_argument("--window", type=int, default=0, help="the window trained on and evaluated")
    ap.add_argument(
        "--users", type=int, default=None, help="eval.max_users: a seeded sample of the test users (default: all)"
    )
    ap.add_argument("--beams", type=int, default=None, help="eval.beams (default: the config's)")
    ap.add_argument(
        "--variants",
        nargs="*",
        default=list(VARIANTS),
        choices=list(VARIANTS),
        metavar="VARIANT",
        help="variants to train, by their names in VARIANTS above (default: all)",
    )
    ap.add_argument("--work", default="/tmp/peso-cpu-models", help="where the data and the runs go")
    ap.add_argument(
        "overrides", nargs="*", help="dotted config overrides for every variant, after theirs (before the options)"
    )
    a = ap.parse_args()
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # CPU models: one core each, even where there is a GPU
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    data = a.data
    if data is None:
        from data_tools.convert import convert_blocks

        data = convert_blocks(CDS, os.path.join(a.work, "cds"))
    os.makedirs(a.work, exist_ok=True)
    common = bench_overrides(a)
    # A fresh process per variant (each holds a process group of one and its own run folder).
    with ProcessPoolExecutor(2, mp_context=get_context("spawn"), max_tasks_per_child=1) as pool:
        n = len(a.variants)
        results = list(
            pool.map(
                run_variant,
                a.variants,
                [[*VARIANTS[v], *common] for v in a.variants],
                [a.config] * n,
                [data] * n,
                [a.window] * n,
                [a.eval_epochs] * n,
                [a.work] * n,
            )
        )
    print(
        json.dumps(
            {
                "bench": "cpu_models",
                "config": os.path.relpath(a.config, REPO),
                "epochs": a.epochs,
                "window": a.window,
                "seed": a.seed,
                "results": results,
                "machine": f"{platform.machine()} {os.cpu_count()} cores",
                "date": time.strftime("%Y-%m-%d"),
            }
        )
    )


if __name__ == "__main__":
    main()
