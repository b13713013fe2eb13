"""Train one period of the continual recommender on DeepSpeed.

    deepspeed --num_gpus 8 train/main.py --ds_config ds_configs/zero3.json --config configs/tiny.yaml \\
        --data data/cds --run runs/cds-peso [--period t] [optim.lr=1e-4 ...]
    torchrun --nproc_per_node 2 train/main.py ... --run_dir RUN   (torchrun takes "--run" for its own
                                                                  --run-path); a plain `python train/main.py` also works
    python train/main.py --print-config --config configs/tiny.yaml [optim.lr=1e-4 ...]   (the resolved config)

A period that resumes from its checkpoint must keep the config it started with (the keys that may
change are marked in train/config.py); --restart-period discards its checkpoints instead.

Read top to bottom: configuration (every error before any rank trains) -> distributed set-up
-> vocabulary -> model -> data -> DeepSpeed engine -> train (resuming if a checkpoint exists)
-> export the adapter -> evaluate -> mark the period done in state.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import warnings

from data_tools.dataset import DISK_FULL, WriteError

log = logging.getLogger("train.main")  # "__main__" when run as a script: outside the configured loggers


def build_parser() -> argparse.ArgumentParser:
    from data_tools.help_format import HelpFormatter

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument(
        "--ds_config",
        help="DeepSpeed config (ds_configs/zero2.json, zero3.json, zero3_offload.json); "
        "required to train (default: none)",
    )
    p.add_argument("--config", required=True, help="experiment YAML (configs/*.yaml)")
    p.add_argument("--data", help="dataset folder (python -m data_tools convert) (default: data.path in the config)")
    # torchrun reads "--run" as an abbreviation of its own --run-path: spell it --run_dir there.
    p.add_argument(
        "--run",
        "--run_dir",
        dest="run",
        help="run folder: periods, checkpoints, TensorBoard, state.json; required to train (default: none)",
    )
    p.add_argument("--period", type=int, help="period to train (default: the next one by the run's state.json)")
    p.add_argument("--eval_only", action="store_true", help="evaluate the period's exported model again; no training")
    p.add_argument(
        "--restart-period",
        action="store_true",
        help="discard the period's checkpoints and train it from its start (to resume with a changed config)",
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print every key of the resolved config (type, value, default, help) and exit",
    )
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    p.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-4 schedule.epochs=2 (default: none)"
    )
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    missing = [flag for flag, value in (("--ds_config", args.ds_config), ("--run", args.run)) if value is None]
    if missing and not args.print_config:
        p.error(f"the following arguments are required: {', '.join(missing)}")
    if args.eval_only and args.restart_period:
        p.error("--restart-period trains the period again: it does not go with --eval_only")
    return args


def print_config(args) -> int:
    """`--print-config`: the configuration a run with these arguments would train with."""
    from train.config import ConfigError, describe, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.data:
        cfg.data.path = args.data
    print(describe(cfg))
    return 0


def check_inputs(args):
    """Everything that can be checked before a process group exists."""
    from data_tools.dataset import ITEM_INDEX, load_manifest
    from train.config import ConfigError, accumulation_steps, load_config
    from train.ds_config import load_ds_config
    from train.run_folder import RunFolder

    cfg = load_config(args.config, args.overrides)
    ds_template = load_ds_config(args.ds_config)
    data_root = args.data or cfg.data.path
    if not data_root:
        raise ConfigError("no dataset: pass --data DIR or set data.path")
    if not os.path.isdir(data_root):
        raise ConfigError(
            f"the dataset folder {data_root} does not exist; create it with `python -m data_tools convert`"
        )
    manifest = load_manifest(data_root)
    if not os.path.isfile(os.path.join(data_root, ITEM_INDEX)):
        raise ConfigError(
            f"{data_root} has no {ITEM_INDEX} (the items' codes); build it with "
            f"`python -m data_tools index {data_root}` (or --import an existing one)"
        )
    cfg.data.path = data_root
    windows = len(manifest["windows"])
    run = RunFolder(args.run)
    period = run.next_period(windows) if args.period is None else args.period
    if not 0 <= period < windows:
        raise ConfigError(f"period {period} is beyond the dataset's last window ({windows} windows: 0..{windows - 1})")
    if manifest["windows"][period]["stats"]["samples"]["train"] == 0:
        raise ConfigError(f"window {period} has no training samples (no eligible user); nothing to train")
    if cfg.model.path and not os.path.isfile(os.path.join(cfg.model.path, "config.json")):
        raise ConfigError(f"model.path {cfg.model.path} is not a Hugging Face model folder (no config.json)")
    if cfg.model.period0 == "full" and period > 0 and not os.path.isdir(run.model_dir(0)):
        raise ConfigError(f"period {period} needs period 0's model ({run.model_dir(0)}); train period 0 first")
    accumulation_steps(cfg, int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1))
    if not args.eval_only and not args.restart_period:
        check_resume(run, period, cfg)
    if args.eval_only:
        export = run.model_dir(period) if cfg.model.period0 == "full" and period == 0 else run.adapter_dir(period)
        if not os.path.isdir(export):
            raise ConfigError(f"--eval_only needs period {period}'s export ({export}); train the period first")
    return cfg, ds_template, manifest, run, period


def check_resume(run, period: int, cfg) -> None:
    """A period resumes from its checkpoint only with the config it started with (apart from the
    keys that may change, train/config.py): otherwise one period would mix two experiments."""
    from train.checkpoint import COMPLETE
    from train.config import ConfigError, resume_conflicts

    started = os.path.join(run.period_dir(period), "config.json")
    if not (os.path.isfile(os.path.join(run.ckpt_dir(period), COMPLETE)) and os.path.isfile(started)):
        return
    with open(started) as f:
        conflicts = resume_conflicts(json.load(f)["config"], cfg)
    if conflicts:
        raise ConfigError(
            f"period {period} would resume from its checkpoint in {run.ckpt_dir(period)}, but the "
            "config changed since the period started:\n  "
            + "\n  ".join(conflicts)
            + "\nrerun with the config it started with, or add --restart-period to discard its "
            "checkpoints and train it from its start"
        )


def main(argv=None) -> int:
    from train.config import ConfigError

    args = parse_args(argv)
    if args.print_config:
        return print_config(args)
    if not sys.stderr.isatty():  # a log file: no "Writing model shards" bars from transformers
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    # DeepSpeed 0.19 calls collectives that torch 2.13 renamed; the warning repeats every step.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)

    try:
        cfg, ds_template, manifest, run, period = check_inputs(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return train_period(cfg, ds_template, manifest, run, period, args.eval_only, args.restart_period)
    except WriteError as e:  # the tokenizer, a checkpoint, an export: named where it failed
        return _write_failed(str(e))
    except OSError as e:  # any other file of the run folder
        if e.errno not in DISK_FULL:
            raise
        return _write_failed(f"cannot write the run folder ({run.root}): {e.strerror}")


def _write_failed(message: str) -> int:
    """One line instead of a traceback. What was half-written is never trusted by a rerun
    (temporary names, checkpoints without COMPLETE.json), which goes on once there is room."""
    print(f"error: {message}", file=sys.stderr)
    return 2


def train_period(cfg, ds_template, manifest, run, period: int, eval_only: bool = False, restart: bool = False) -> int:
    from data_tools.dataset import atomic_write_json
    from train.checkpoint import Checkpointer
    from train.config import accumulation_steps, period_epochs
    from train.data import WindowData
    from train.ds_config import fill_ds_config, resolve_dtype
    from train.evaluate import evaluate_period
    from train.exit_codes import EXIT_REQUEUE
    from train.export import export_adapter, export_full_model
    from train.flops import FlopCounter, device_peak_flops
    from train.logs import configure_logging
    from train.metrics import MetricsLogger
    from train.model import (
        apply_lora,
        backbone_dir,
        build_shape_backbone,
        hidden_size,
        load_adapter_weights,
        load_backbone,
        load_full_weights,
        param_groups,
    )
    from train.regularizers import make_regularizer, previous_adapter
    from train.schedule import make_optimizer, make_scheduler
    from train.strategy import DeepSpeedStrategy
    from train.trainer import StopRequested, Trainer
    from train.vocab import SampleEncoder, load_vocab

    # ---- distributed set-up and vocabulary -----------------------------------------------------
    strategy = DeepSpeedStrategy()
    configure_logging(strategy.rank)
    accumulation = accumulation_steps(cfg, strategy.world_size)
    dtype = resolve_dtype(cfg, strategy.cuda, strategy.bf16_supported)
    if strategy.is_rank0 and not eval_only:
        os.makedirs(run.period_dir(period), exist_ok=True)
        run.save_state(period=period, phase="training")
    if restart:
        if strategy.is_rank0 and os.path.isdir(run.ckpt_dir(period)):
            shutil.rmtree(run.ckpt_dir(period))
            log.info(f"period {period}: --restart-period: its checkpoints are discarded; training it from its start")
        strategy.barrier()  # no rank may look for a checkpoint before they are gone
    tokenizer, codebook, template = load_vocab(cfg, run, cfg.data.path, strategy)

    # ---- model ---------------------------------------------------------------------------------
    if cfg.model.shape and period == 0:
        build_shape_backbone(cfg, run, tokenizer, dtype, strategy)
    full = cfg.model.period0 == "full" and period == 0
    source = run.model_dir(0) if eval_only and full else backbone_dir(cfg, run, period)
    lr = cfg.optim.lr * (cfg.optim.later_lr_factor if period > 0 else 1.0)
    ds_config = fill_ds_config(ds_template, cfg, strategy.world_size, hidden_size(source), dtype, lr)
    strategy.use_ds_config(ds_config)  # before from_pretrained: ZeRO-3 loads partitioned
    model = load_backbone(strategy, source, cfg, dtype, len(tokenizer))
    if full:
        model.requires_grad_(True)
    else:
        model = apply_lora(model, cfg, codebook.code_token_ids, seed=cfg.model.seed + period)
        start_from = previous_adapter(cfg, run, period)
        if start_from:
            load_adapter_weights(strategy, model, start_from)
    regularizer = make_regularizer(cfg, run, period, model, strategy)

    # ---- data and engine -----------------------------------------------------------------------
    encoder = SampleEncoder(tokenizer, codebook, template, cfg.data.max_history, cfg.data.objective)
    data = WindowData(
        cfg.data.path,
        manifest,
        period,
        cfg,
        strategy.rank,
        strategy.world_size,
        accumulation,
        encoder,
        tokenizer.pad_token_id,
    )
    epochs = period_epochs(cfg, period)
    total_steps = epochs * data.train_plan.steps
    if cfg.schedule.max_steps:
        total_steps = min(total_steps, cfg.schedule.max_steps)
    groups = param_groups(model, cfg.optim.weight_decay)
    trainable = sum(getattr(p, "ds_numel", p.numel()) for g in groups for p in g["params"])  # ds_numel: partitioned
    engine = strategy.initialize(
        model,
        groups,
        lambda g: make_optimizer(g, cfg, lr, strategy.cuda),
        lambda opt: make_scheduler(opt, cfg, total_steps),
    )

    # ---- bookkeeping -----------------------------------------------------------------------------
    step_offset = run.state().get("global_step", 0)
    checkpointer = Checkpointer(strategy, run.ckpt_dir(period), cfg.checkpoint.keep)
    # Training writes again from the step after the checkpoint it resumes from (or the period's
    # first step): whatever a killed run wrote from there on is hidden, not shown twice.
    # --eval_only writes only evaluation points, at a step that keeps its training points.
    logger = MetricsLogger(
        run.root, strategy.is_rank0, purge_step=None if eval_only else step_offset + checkpointer.latest_step() + 1
    )
    if strategy.is_rank0 and not eval_only:
        atomic_write_json(
            os.path.join(run.period_dir(period), "config.json"),
            {"config": cfg.to_dict(), "ds_config": ds_config, "world_size": strategy.world_size},
        )
        logger.text("config", {"period": period, "config": cfg.to_dict(), "ds_config": ds_config}, step_offset)
        log.info(
            f"period {period}: {'full training' if full else f'LoRA r={cfg.lora.r}'} of {source}, "
            f"{trainable:,} trainable parameters, {data.train_plan.samples:,} "
            f"{'chunks of user sequences' if cfg.data.objective == 'sequence' else 'samples'}, "
            f"{data.train_plan.steps} steps/epoch x {epochs} epochs "
            f"(capped at {total_steps}), ZeRO-{strategy.zero_stage}, {strategy.world_size} ranks, {dtype}"
        )
    flops = FlopCounter(
        engine.module.config, None if full else cfg.lora.r, cfg.lora.targets, full, cfg.model.gradient_checkpointing
    )

    def export():
        if full:
            export_full_model(strategy, engine.module, tokenizer, run.model_dir(period))
        else:
            export_adapter(strategy, engine.module, run.adapter_dir(period), {"period": period})

    trainer = Trainer(
        cfg=cfg,
        strategy=strategy,
        engine=engine,
        data=data,
        checkpointer=checkpointer,
        export=export,
        logger=logger,
        flops=flops,
        peak_flops=device_peak_flops(strategy.cuda, dtype, cfg.logging.peak_tflops),
        step_offset=step_offset,
        period=period,
        epochs=epochs,
        regularizer=regularizer,
        total_steps=total_steps,
    )
    trainer.install_signal_handlers()
    if eval_only:
        if not full:
            load_adapter_weights(strategy, engine.module, run.adapter_dir(period))
        evaluate_period(cfg, strategy, engine, encoder, manifest, period, run, logger, step_offset)
        logger.close()
        strategy.close()
        return 0

    # ---- train, evaluate, hand off -----------------------------------------------------------------
    try:
        progress = trainer.fit()
    except StopRequested:
        log.info(f"period {period}: checkpointed on a signal; rerun to resume")
        if strategy.is_rank0:
            run.save_state(phase="stopped")  # for a launcher that sees only torchrun's exit code (1)
        logger.close()
        strategy.close()
        return EXIT_REQUEUE
    # Evaluate what was exported: the best epoch's weights, not necessarily the last epoch's.
    if full:
        load_full_weights(strategy, engine.module, run.model_dir(period))
    else:
        load_adapter_weights(strategy, engine.module, run.adapter_dir(period))
    if strategy.is_rank0:
        run.save_state(phase="evaluating")
    metrics = None
    if cfg.eval.every_period:
        metrics = evaluate_period(
            cfg, strategy, engine, encoder, manifest, period, run, logger, step_offset + engine.global_steps
        )
    if strategy.is_rank0:
        summary = {
            "period": period,
            "steps": engine.global_steps,
            "samples_seen": progress.samples_seen,
            "nonfinite_skipped": progress.nonfinite_skipped,
            "best_epoch": progress.best_epoch,
            "epochs_trained": progress.epoch,
            "stopped_early": progress.stopped_early,
            "val_losses": progress.val_losses,
            "world_size": strategy.world_size,
        }
        atomic_write_json(os.path.join(run.period_dir(period), "train_summary.json"), summary)
        state = run.state()
        run.save_state(
            done=sorted(set(state["done"]) | {period}), phase="done", global_step=step_offset + engine.global_steps
        )
        logger.hparams(
            {f"{k}": v for k, v in _flat(cfg.to_dict()).items()},
            {
                "hparam/best_val_loss": progress.best_val or math.nan,
                **({f"hparam/{k}": v for k, v in metrics["overall"].items()} if metrics else {}),
            },
        )
    logger.close()
    strategy.close()
    return 0


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def console_main() -> None:
    """`python train/main.py` and the `peso-train` command."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Leave without interpreter teardown: there, now and then, a C++ thread of the CPU collectives
    # aborts the process ("terminate called without an active exception", SIGABRT; about 1 exit
    # in 45 in docs/zero3.md, after all results were written). Everything this
    # process had to write is written and closed by now.
    os._exit(code)


if __name__ == "__main__":
    console_main()
