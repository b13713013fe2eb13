"""How hard peso's proximal term pulls, and what it changes, across lambda, on the demo's data.

    make demo    (once: the dataset and the shared period 0 under demo/)
    python bench/pull_sweep.py [--demo demo] [--lams 2000 200000] [--entries-lams 0.02 0.2 2 20] [--jobs 2]

Each variant starts from the demo's finished period 0 (demo/runs/peso, copied by
`launcher.periods.start_from_period0`) and trains periods 1-4 with configs/demo.yaml on one rank
(peso with the faithful term at each of --lams, then with `method.kl_scale: entries` at each of
--entries-lams; --jobs variants at a time). From each run's report summary: NDCG@10 over windows
1-4, by user group, the mean pull / data ratio (TensorBoard's pull/ratio) and how far each period
moved its adapter from its anchor. The demo's own runs (peso at the authors' lambda, single) are
the reference in the same line. One seed: the spread across seeds needs bench/continual_cds.py.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def summary(run: str) -> dict:
    from launcher.report import load_run, summarize

    s = summarize(load_run(run))
    return {
        "ndcg@10": round(s["average_incremental"]["ndcg@10"], 5),
        "groups_ndcg@10": {g: round(v["ndcg@10"], 5) for g, v in s["groups"].items() if v["ndcg@10"] is not None},
        "pull_over_data": s["pull_average"] and float(f"{s['pull_average']:.3g}"),
        "adapter_moved": {t: round(v, 4) for t, v in s["moved"].items() if v is not None},
        "bwt": round(s["bwt"], 5),
        "forgetting": round(s["forgetting"], 5),
    }


def main() -> None:
    from data_tools.help_format import HelpFormatter
    from launcher.periods import run_local, start_from_period0

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--demo", default=os.path.join(REPO, "demo"), help="the demo's folder (make demo)")
    ap.add_argument("--out", default="/tmp/peso-pull-sweep", help="where the variants' runs go")
    ap.add_argument("--lams", type=float, nargs="*", default=[2000, 200000], help="lambdas of the faithful term")
    ap.add_argument(
        "--entries-lams", type=float, nargs="*", default=[0.02, 0.2, 2, 20], help="lambdas with kl_scale entries"
    )
    ap.add_argument("--jobs", type=int, default=2, help="variants trained at a time (one rank each)")
    a = ap.parse_args()
    data, start = os.path.join(a.demo, "data", "ml-100k"), os.path.join(a.demo, "runs", "peso")
    if not os.path.isdir(start):
        raise SystemExit(f"{start} is missing: run `make demo` first")
    config, ds = os.path.join(REPO, "configs", "demo.yaml"), os.path.join(REPO, "ds_configs", "zero2.json")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    variants = {f"lam{lam:g}": [f"method.lam={lam}"] for lam in a.lams}
    variants |= {f"entries-lam{lam:g}": ["method.kl_scale=entries", f"method.lam={lam}"] for lam in a.entries_lams}

    def train(name: str) -> tuple[str, dict]:
        run = os.path.join(a.out, name)
        start_from_period0(start, run)
        t0 = time.time()
        with open(run + ".log", "a") as log:
            run_local(config, data, run, ds, 1, ["method.name=peso", *variants[name]], env=env, log=log)
        return name, {**summary(run), "minutes": round((time.time() - t0) / 60, 2)}

    os.makedirs(a.out, exist_ok=True)
    result = {"bench": "pull_sweep", "data": "MovieLens-100K (the demo's), windows 1-4, one seed"}
    result["reference"] = {
        name: summary(os.path.join(a.demo, "runs", name))
        for name in ("peso", "single")
        if os.path.isdir(os.path.join(a.demo, "runs", name))
    }
    with ThreadPoolExecutor(a.jobs) as pool:
        result["variants"] = dict(pool.map(train, variants))
    result.update(machine=f"{platform.machine()} {os.cpu_count()} cores", date=time.strftime("%Y-%m-%d"))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
