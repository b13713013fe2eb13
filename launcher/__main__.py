"""Command line: `python -m launcher {run,report,demo,recommend,export,slurm-step} ...`.

    python -m launcher run --config configs/tiny.yaml --data data/ml --run runs/ml [--nproc 2]
    python -m launcher report runs/ml-peso runs/ml-single [--png report.png]
    python -m launcher demo            (README's first command: MovieLens-100K end to end, CPU)
    python -m launcher demo --fresh    (keeping a model fresh: convert, two appends, a period after each)
    python -m launcher recommend runs/ml --user 196 [--period 4] [--k 10] [--out recs.jsonl]
    python -m launcher export runs/ml --out export/ml [--merged]
    python -m launcher slurm-step      (inside slurm/continual.sh; settings from PESO_* variables)

`run` exits 0 when every period is done, 75 when a period checkpointed on a signal (SIGTERM or
SIGUSR1 to it; the same command resumes), 1 when a period failed, 2 on a usage or config error.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from data_tools.help_format import HelpFormatter
from launcher.files import shipped
from train.common.exit_codes import EXIT_REQUEUE, EXIT_USAGE
from train.common.logs import configure_logging

DEFAULT_DS = shipped("ds_configs", "zero3.json")
SLURM_REQUIRED = ("PESO_CONFIG", "PESO_DATA", "PESO_RUN")


def metric_name(text: str) -> str:
    """`--metric`: hit@K, ndcg@K (K one of the run's eval.ks) or test_loss."""
    if text == "test_loss" or re.fullmatch(r"(hit|ndcg)@[1-9]\d*", text):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not one of hit@K, ndcg@K, test_loss")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m launcher", description=__doc__, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    run_parser = sub.add_parser(
        "run", help="train every remaining period on this machine", formatter_class=HelpFormatter
    )
    run_parser.add_argument("--config", required=True, help="experiment YAML (configs/*.yaml)")
    run_parser.add_argument("--data", required=True, help="dataset folder (python -m data_tools convert, then index)")
    run_parser.add_argument("--run", required=True, help="run folder: periods, checkpoints, TensorBoard, state.json")
    run_parser.add_argument(
        "--ds_config", default=DEFAULT_DS, help="DeepSpeed config (default: ds_configs/zero3.json of this repository)"
    )
    run_parser.add_argument("--nproc", type=int, default=1, help="ranks on this machine (GPUs, or CPU processes)")
    run_parser.add_argument(
        "--restart-period",
        action="store_true",
        help="discard the checkpoints of the period that would resume and train it from its start "
        "(needed to resume with a changed config)",
    )
    run_parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. method.lam=2 (default: none)")

    report_parser = sub.add_parser(
        "report", help="results table (markdown) and a PNG plot of one or more runs", formatter_class=HelpFormatter
    )
    report_parser.add_argument("runs", nargs="+", help="run folders")
    report_parser.add_argument("--png", help="where to write the plot (default: <first run>/report.png)")
    report_parser.add_argument(
        "--metric",
        default="ndcg@10",
        type=metric_name,
        metavar="{hit@K,ndcg@K,test_loss}",
        help="the metric of the table and the plot",
    )

    demo_parser = sub.add_parser(
        "demo", help="MovieLens-100K end to end on this machine (CPU, two ranks)", formatter_class=HelpFormatter
    )
    demo_parser.add_argument("--workdir", default="demo", help="where data and runs go (default: ./demo)")
    demo_parser.add_argument("--nproc", type=int, default=2, help="ranks of period 0")
    demo_parser.add_argument(
        "--fresh",
        action="store_true",
        help="keeping a model fresh instead: the stream in three arrivals (convert, then two appends), "
        "a period after each (launcher/fresh.py)",
    )

    from launcher.recommend import add_parsers

    add_parsers(sub)
    sub.add_parser(
        "slurm-step",
        help="inside slurm/continual.sh: train the next period, then chain",
        description=f"Settings from the environment: {', '.join(SLURM_REQUIRED)} (required), "
        "PESO_DS_CONFIG, PESO_OVERRIDES (see slurm/continual.sh).",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    from data_tools.readback import DamagedFile

    configure_logging()
    args = build_parser().parse_args(argv)
    try:
        return command(args)
    except DamagedFile as e:  # a file of the dataset, the run or an export, read back damaged
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE


def command(args) -> int:
    if args.command == "run":
        return run_command(args)
    if args.command == "report":
        from launcher.report import report

        png = args.png or os.path.join(args.runs[0], "report.png")
        print(report(args.runs, png, args.metric))
        print(f"\nplot: {png}")
        return 0
    if args.command == "demo":
        if args.fresh:
            from launcher.fresh import run_fresh

            run_fresh(args.workdir, args.nproc)
            return 0
        from launcher.demo import run_demo

        run_demo(args.workdir, args.nproc)
        return 0
    if args.command == "recommend":
        from launcher.recommend import recommend_command

        return recommend_command(args)
    if args.command == "export":
        from launcher.recommend import export_command

        return export_command(args)
    if args.command == "slurm-step":
        return slurm_step_command()
    return 2


def _config_error(config: str, overrides: list[str]) -> str | None:
    """The config's first problem, found here rather than in a child that has loaded torch."""
    from train.common.config import ConfigError, load_config

    try:
        load_config(config, overrides)
    except ConfigError as e:
        return str(e)
    return None


def run_command(args) -> int:
    from launcher.periods import PeriodFailed, PeriodInterrupted, PeriodRefused, RunSettings, run_local
    from launcher.report import write_report
    from train.common.run_folder import DatasetChanged

    problem = _config_error(args.config, args.overrides)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    # Absolute paths: the run's saved config names its dataset wherever it is read from later.
    config, data, run, ds_config = (os.path.abspath(x) for x in (args.config, args.data, args.run, args.ds_config))
    try:
        run_local(RunSettings(config, data, run, ds_config, args.overrides), args.nproc, restart=args.restart_period)
    except PeriodInterrupted as e:
        print(str(e), file=sys.stderr)
        return EXIT_REQUEUE
    except PeriodRefused:  # train/main.py printed its one line
        return EXIT_USAGE
    except PeriodFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (DatasetChanged, FileNotFoundError) as e:  # a window changed under the run; no dataset
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(write_report(args.run))
    print(f"\nreport: {args.run}/report.md and report.png")
    return 0


def slurm_step_command() -> int:
    from launcher.periods import RunSettings
    from launcher.slurm import slurm_step

    env = os.environ
    missing = [k for k in SLURM_REQUIRED if not env.get(k)]
    if missing:
        print(
            f"error: set {', '.join(missing)} (see the header of slurm/continual.sh), e.g. "
            "PESO_CONFIG=configs/paper.yaml PESO_DATA=data/cds PESO_RUN=runs/cds sbatch slurm/continual.sh",
            file=sys.stderr,
        )
        return 2
    from train.common.run_folder import DatasetChanged

    try:
        return slurm_step(
            RunSettings(
                env["PESO_CONFIG"],
                env["PESO_DATA"],
                env["PESO_RUN"],
                env.get("PESO_DS_CONFIG", DEFAULT_DS),
                env.get("PESO_OVERRIDES", "").split(),
            )
        )
    except DatasetChanged as e:  # the chain stops: a window changed under a period of the run
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
