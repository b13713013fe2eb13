"""Command line: `python -m launcher {run,report,demo,recommend,export,slurm-step} ...`.

    python -m launcher run --config configs/tiny.yaml --data data/ml --run runs/ml [--nproc 2]
    python -m launcher report runs/ml-peso runs/ml-single [--png report.png]
    python -m launcher demo            (README's first command: MovieLens-100K end to end, CPU)
    python -m launcher recommend runs/ml --user 196 [--period 4] [--k 10] [--out recs.jsonl]
    python -m launcher export runs/ml --out export/ml [--merged]
    python -m launcher slurm-step      (inside slurm/continual.sh; settings from PESO_* variables)
"""

from __future__ import annotations

import argparse
import os
import sys

from launcher.files import shipped
from train.logs import configure_logging

DEFAULT_CONFIG = shipped("configs", "tiny.yaml")
DEFAULT_DS = shipped("ds_configs", "zero3.json")


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    p = argparse.ArgumentParser(prog="python -m launcher", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="train every remaining period on this machine")
    r.add_argument("--config", default=DEFAULT_CONFIG)
    r.add_argument("--data", required=True)
    r.add_argument("--run", required=True)
    r.add_argument("--ds_config", default=DEFAULT_DS)
    r.add_argument("--nproc", type=int, default=1, help="ranks on this machine (GPUs, or CPU processes)")
    r.add_argument("overrides", nargs="*", help="dotted overrides, e.g. method.lam=2")

    rep = sub.add_parser("report", help="results table (markdown) and a PNG plot of one or more runs")
    rep.add_argument("runs", nargs="+")
    rep.add_argument("--png", help="where to write the plot (default: <first run>/report.png)")
    rep.add_argument("--metric", default="ndcg@10")

    d = sub.add_parser("demo", help="MovieLens-100K end to end on this machine (CPU, two ranks)")
    d.add_argument("--workdir", default="demo", help="where data and runs go (default ./demo)")
    d.add_argument("--nproc", type=int, default=2)

    from launcher.recommend import add_parsers

    add_parsers(sub)
    sub.add_parser("slurm-step", help="inside slurm/continual.sh: train the next period, then chain")
    a = p.parse_args(argv)

    if a.command == "run":
        from launcher.periods import PeriodFailed, remaining_periods, run_local
        from launcher.report import write_report

        try:
            run_local(a.config, a.data, a.run, a.ds_config, a.nproc, a.overrides)
        except PeriodFailed as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        if not remaining_periods(a.data, a.run):
            print(write_report(a.run))
            print(f"\nreport: {a.run}/report.md and report.png")
        return 0
    if a.command == "report":
        from launcher.report import report

        png = a.png or os.path.join(a.runs[0], "report.png")
        print(report(a.runs, png, a.metric))
        print(f"\nplot: {png}")
        return 0
    if a.command == "demo":
        from launcher.demo import run_demo

        run_demo(a.workdir, a.nproc)
        return 0
    if a.command == "recommend":
        from launcher.recommend import recommend_command

        return recommend_command(a)
    if a.command == "export":
        from launcher.recommend import export_command

        return export_command(a)
    if a.command == "slurm-step":
        from launcher.slurm import slurm_step

        env = os.environ
        missing = [k for k in ("PESO_DATA", "PESO_RUN") if not env.get(k)]
        if missing:
            print(f"error: set {' and '.join(missing)} (see the header of slurm/continual.sh)", file=sys.stderr)
            return 2
        return slurm_step(env.get("PESO_CONFIG", DEFAULT_CONFIG), env["PESO_DATA"], env["PESO_RUN"],
                          env.get("PESO_DS_CONFIG", DEFAULT_DS), env.get("PESO_OVERRIDES", "").split())
    return 2


if __name__ == "__main__":
    sys.exit(main())
