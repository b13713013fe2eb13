"""Train one period of the continual recommender on DeepSpeed.

    deepspeed --num_gpus 8 train/main.py --ds_config ds_configs/zero3.json --config configs/tiny.yaml \\
        --data data/cds --run runs/cds-peso [--period t] [optim.lr=1e-4 ...]
    torchrun --nproc_per_node 2 train/main.py ... --run_dir RUN   (torchrun takes "--run" for its own
                                                                  --run-path); a plain `python train/main.py` also works
    python train/main.py --print-config --config configs/tiny.yaml [optim.lr=1e-4 ...]   (the resolved config)

A period that resumes from its checkpoint must keep the config it started with (the keys that may
change are marked in train/common/config.py); --restart-period discards its checkpoints instead.

Read top to bottom: configuration (every error before any rank trains) -> the period's plan
(train/period/plan.py) -> the period's recipe (train/period/recipe.py): distributed set-up -> vocabulary ->
model -> data -> DeepSpeed engine -> train (resuming if a checkpoint exists) -> export the
adapter -> evaluate -> mark the period done in state.json.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings

from data_tools.atomic import DISK_FULL, WriteError


def build_parser() -> argparse.ArgumentParser:
    from data_tools.help_format import HelpFormatter

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument(
        "--ds_config",
        help="DeepSpeed config (ds_configs/zero2.json, zero3.json, zero3_offload.json); "
        "required to train (default: none)",
    )
    parser.add_argument("--config", required=True, help="experiment YAML (configs/*.yaml)")
    parser.add_argument(
        "--data", help="dataset folder (python -m data_tools convert) (default: data.path in the config)"
    )
    # torchrun reads "--run" as an abbreviation of its own --run-path: spell it --run_dir there.
    parser.add_argument(
        "--run",
        "--run_dir",
        dest="run",
        help="run folder: periods, checkpoints, TensorBoard, state.json; required to train (default: none)",
    )
    parser.add_argument("--period", type=int, help="period to train (default: the next one by the run's state.json)")
    parser.add_argument(
        "--eval_only", action="store_true", help="evaluate the period's exported model again; no training"
    )
    parser.add_argument(
        "--restart-period",
        action="store_true",
        help="discard the period's checkpoints and train it from its start (to resume with a changed config)",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print every key of the resolved config (type, value, default, help) and exit",
    )
    # passed by the deepspeed launcher
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-4 schedule.epochs=2 (default: none)"
    )
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    missing = [flag for flag, value in (("--ds_config", args.ds_config), ("--run", args.run)) if value is None]
    if missing and not args.print_config:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    if args.eval_only and args.restart_period:
        parser.error("--restart-period trains the period again: it does not go with --eval_only")
    return args


def print_config(args) -> int:
    """`--print-config`: the configuration a run with these arguments would train with."""
    from train.common.config import ConfigError, describe, load_config

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
    """Everything that can be checked before a process group exists; returns the config, the
    DeepSpeed config template, the manifest, the run folder and the period's plan."""
    from data_tools.dataset import ITEM_INDEX, load_manifest
    from train.common.config import ConfigError, accumulation_steps, load_config
    from train.common.run_folder import RunFolder
    from train.dist.ds_config import load_ds_config
    from train.period.plan import export_dir, trains_in_full

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
    # A window that a period trained on must still be the same (run_folder.py, DatasetChanged).
    run.check_windows(manifest, data_root, restart=args.restart_period)
    period = run.next_period(windows) if args.period is None else args.period
    if not 0 <= period < windows:
        raise ConfigError(f"period {period} is beyond the dataset's last window ({windows} windows: 0..{windows - 1})")
    if manifest["windows"][period]["stats"]["samples"]["train"] == 0:
        raise ConfigError(f"window {period} has no training samples (no eligible user); nothing to train")
    if cfg.model.path and not os.path.isfile(os.path.join(cfg.model.path, "config.json")):
        raise ConfigError(f"model.path {cfg.model.path} is not a Hugging Face model folder (no config.json)")
    if period > 0 and trains_in_full(cfg, 0) and not os.path.isdir(run.model_dir(0)):
        raise ConfigError(f"period {period} needs period 0's model ({run.model_dir(0)}); train period 0 first")
    from train.model.addons import check_addons

    check_addons(cfg, run, period)  # what the period's model add-ons need (train/model/addons/)
    from train.common.launch_env import launch_rank_and_world

    accumulation_steps(cfg, launch_rank_and_world()[1])
    check_device(run, period)
    if not args.eval_only and not args.restart_period:
        check_resume(run, period, cfg)
    if args.eval_only:
        export = export_dir(cfg, run, period)
        if not os.path.isdir(export):
            raise ConfigError(f"--eval_only needs period {period}'s export ({export}); train the period first")
    from train.period.inputs import check_period_inputs

    # every file the period reads back, whole (a DamagedFile: one line, data_tools/readback.py)
    plan = check_period_inputs(cfg, run, manifest, period, eval_only=args.eval_only, restart=args.restart_period)
    return cfg, ds_template, manifest, run, plan


ALLOW_CPU = "PESO_ALLOW_CPU"  # set to 1 to train on the CPU although GPUs were given or used before


def gpus_given(environ=os.environ) -> str | None:
    """The GPUs this process was given by its launcher or by SLURM, as they were named (None: none)."""
    visible = environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible and visible not in ("-1", "NoDevFiles"):
        return f"CUDA_VISIBLE_DEVICES={visible}"
    for key in ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "SLURM_GPUS_ON_NODE"):
        if environ.get(key, "").strip() not in ("", "0"):
            return f"{key}={environ[key]}"
    return None


def check_device(run, period: int) -> None:
    """A GPU run never goes on silently on the CPU (fp32 and gloo, a thousand times slower): not
    when this process was given GPUs that torch cannot use (a CPU build of torch, no driver),
    and not when an earlier period of the run trained on GPUs (a resubmitted job that lost its
    GPUs). PESO_ALLOW_CPU=1 allows it."""
    from train.common.config import ConfigError

    if os.environ.get(ALLOW_CPU) == "1":
        return
    import torch

    if torch.cuda.is_available():
        return
    fix = f"; to train on the CPU anyway, set {ALLOW_CPU}=1"
    given = gpus_given()
    if given:
        build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU build"
        raise ConfigError(
            f"this process was given GPUs ({given}) but torch {torch.__version__} ({build}) sees none: "
            f"install a CUDA build of torch, or check the driver (nvidia-smi){fix}"
        )
    from data_tools.readback import read_json
    from train.period.inputs import finished_remedy

    for t in range(period + 1):
        path = os.path.join(run.period_dir(t), "config.json")
        recorded = read_json(path, what=f"period {t}'s config", remedy=finished_remedy(run, t, path), missing={})
        if recorded.get("device") == "cuda":
            raise ConfigError(
                f"period {t} of {run.root} trained on GPUs, and this process sees none: a job without "
                f"its GPUs (a resubmission that did not ask for them?) would go on on the CPU; run "
                f"period {period} where the GPUs are{fix}"
            )


def check_resume(run, period: int, cfg) -> None:
    """A period resumes from its checkpoint only with the config it started with (apart from the
    keys that may change, train/common/config.py): otherwise one period would mix two experiments."""
    from data_tools.readback import read_json
    from train.common.config import ConfigError, resume_conflicts
    from train.dist.checkpoint import has_checkpoint

    started = os.path.join(run.period_dir(period), "config.json")
    if not (has_checkpoint(run.ckpt_dir(period)) and os.path.isfile(started)):
        return
    recorded = read_json(
        started,
        what=f"period {period}'s config",
        remedy=f"add --restart-period to train period {period} from its start",
        fields={"config": dict},
    )
    conflicts = resume_conflicts(recorded["config"], cfg)
    if conflicts:
        raise ConfigError(
            f"period {period} would resume from its checkpoint in {run.ckpt_dir(period)}, but the "
            "config changed since the period started:\n  "
            + "\n  ".join(conflicts)
            + "\nrerun with the config it started with, or add --restart-period to discard its "
            "checkpoints and train it from its start"
        )


def main(argv=None) -> int:
    from train.common.config import ConfigError

    args = parse_args(argv)
    if args.print_config:
        return print_config(args)
    if not sys.stderr.isatty():  # a log file: no "Writing model shards" bars from transformers
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    # DeepSpeed 0.19 calls collectives that torch 2.13 renamed; the warning repeats every step.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)

    try:
        cfg, ds_template, manifest, run, plan = check_inputs(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:  # a damaged file too (DamagedFile)
        return refuse(str(e))
    from data_tools.readback import DamagedFile
    from train.common.exit_codes import EXIT_USAGE, Refused

    try:
        return train_period(cfg, ds_template, manifest, run, plan)
    except Refused:  # the ranks agreed on an input error; its one line is out (DeepSpeedStrategy.agree)
        return EXIT_USAGE
    except DamagedFile as e:  # a file that changed while the period ran, met by this rank alone
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except WriteError as e:  # the tokenizer, a checkpoint, an export: named where it failed
        return _write_failed(str(e))
    except OSError as e:  # any other file of the run folder
        if e.errno not in DISK_FULL:
            raise
        return _write_failed(f"cannot write the run folder ({run.root}): {e.strerror}")


def refuse(line: str) -> int:
    """A usage, config or input error found before any process group, printed once: by this
    process alone, or among several ranks (each of which found it, or not) by rank 0, once they
    have joined the process group and agreed (`DeepSpeedStrategy.agree`; the ranks without an
    error meet them there, train/period/recipe.py): the line is out before a launcher stops the
    ranks, and no rank waits forever for one that left."""
    from train.common.exit_codes import EXIT_USAGE, Refused
    from train.common.launch_env import launch_rank_and_world

    if launch_rank_and_world()[1] <= 1:
        print(f"error: {line}", file=sys.stderr)
        return EXIT_USAGE
    from train.dist.strategy import DeepSpeedStrategy

    with contextlib.suppress(Refused):  # raised on every rank once the line is out
        DeepSpeedStrategy().agree(line)
    return EXIT_USAGE


def _write_failed(message: str) -> int:
    """One line instead of a traceback. What was half-written is never trusted by a rerun
    (temporary names, checkpoints without COMPLETE.json), which goes on once there is room."""
    print(f"error: {message}", file=sys.stderr)
    return 2


def train_period(cfg, ds_template, manifest, run, plan) -> int:
    """Run the planned period (train/period/recipe.py); returns the exit code."""
    from train.common.launch_env import launch_rank_and_world
    from train.period.recipe import PeriodRecipe

    if not plan.eval_only and launch_rank_and_world()[0] == 0:
        # what the period trains on: checked by later reruns
        run.record_window(plan.period, manifest, cfg.data.path)
    return PeriodRecipe(cfg, ds_template, manifest, run, plan).run()


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
