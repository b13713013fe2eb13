"""How hard peso's proximal term pulls, and what it changes, across lambda and seeds, on the demo's data.

    make demo    (once: the dataset and the shared period 0 under demo/)
    python bench/pull_sweep.py [--demo demo] [--seeds 0 1 2] [--lams 2 200 ...] [--entries-lams 0.02 ...]
                               [--all-lams 0.2 ...] [--jobs 2]

Each variant starts from the demo's finished period 0 (demo/runs/peso, copied by
`launcher.periods.start_from_period0`) and trains periods 1-4 with configs/demo.yaml on one rank,
once per seed (`model.seed`: the LoRA initialization of period 1; `data.seed`: the training
order): single (no term, the reference), peso with the faithful term (the paper's KL, mean over
modules as the authors reduce it) at each of --lams, peso with `method.kl_scale: entries` at
each of --entries-lams, and the same with `method.pull: all` (the term also on the code-token
rows and the item-vector projection) at each of --all-lams; --jobs runs at a time. From each run's report summary: NDCG@10 over
windows 1-4, by user group, the mean pull / data ratio (TensorBoard's pull/ratio) and how far each
period moved its adapter from its anchor. Per variant: the mean and standard deviation over
seeds. Writes the stability/plasticity curve (NDCG@10 overall, dormant and new users against
lambda, single's mean +- sd as a band) to --plot, and prints one JSON line. Resumable: finished
runs under --out are kept.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
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
        "token_rows_moved": {t: round(v, 4) for t, v in s["rows_moved"].items() if v is not None},
        "bwt": round(s["bwt"], 5),
        "forgetting": round(s["forgetting"], 5),
    }


def mean_sd(xs: list) -> list:
    xs = [x for x in xs if x is not None]
    if not xs:
        return [None, None]
    return [round(statistics.mean(xs), 5), round(statistics.stdev(xs), 5) if len(xs) > 1 else 0.0]


def over_seeds(runs: list[dict]) -> dict:
    """Mean and sd over seeds of what the curve plots."""
    groups = sorted({g for r in runs for g in r["groups_ndcg@10"]})
    return {
        "ndcg@10": mean_sd([r["ndcg@10"] for r in runs]),
        "groups_ndcg@10": {g: mean_sd([r["groups_ndcg@10"].get(g) for r in runs]) for g in groups},
        "pull_over_data": mean_sd([r["pull_over_data"] for r in runs]),
        "adapter_moved": mean_sd([statistics.mean(r["adapter_moved"].values()) for r in runs if r["adapter_moved"]]),
        "token_rows_moved": mean_sd(
            [statistics.mean(r["token_rows_moved"].values()) for r in runs if r.get("token_rows_moved")]
        ),
        "seeds": len(runs),
    }


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("all users", lambda v: v["ndcg@10"])] + [
        (f"{g} users", lambda v, g=g: v["groups_ndcg@10"].get(g, [None, None])) for g in ("dormant", "new")
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    single = result["curve"]["single"]
    for ax, (title, get) in zip(axes, panels):
        mean, sd = get(single)
        if mean is not None:
            ax.axhspan(mean - sd, mean + sd, color="0.85", label="single (mean +- sd)")
            ax.axhline(mean, color="0.4", lw=1)
        for form, marker in (("faithful", "o"), ("entries", "s"), ("entries, pull all", "^")):
            pts = sorted((v["lam"], *get(v)) for k, v in result["curve"].items() if v.get("form") == form)
            pts = [p for p in pts if p[1] is not None]
            if pts:
                ax.errorbar(
                    [p[0] for p in pts],
                    [p[1] for p in pts],
                    yerr=[p[2] for p in pts],
                    marker=marker,
                    capsize=3,
                    label="peso, "
                    + {"faithful": "paper's KL (mean)", "entries": "kl_scale entries"}.get(
                        form, "kl_scale entries, pull all"
                    ),
                )
        ax.set_xscale("log")
        ax.set_xlabel("lambda")
        ax.set_title(f"NDCG@10, windows {result.get('windows', '1-4')}, {title}")
    axes[0].set_ylabel("NDCG@10")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"peso's stability/plasticity curve: {result['data']} ({result['seeds']} seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    from data_tools.help_format import HelpFormatter
    from launcher.periods import RunSettings, run_local, start_from_period0

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--demo", default=os.path.join(REPO, "demo"), help="the demo's folder (make demo)")
    ap.add_argument("--out", default="/tmp/peso-pull-sweep", help="where the variants' runs go")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="model.seed and data.seed of each run")
    ap.add_argument(
        "--lams", type=float, nargs="*", default=[2, 200, 2000, 20000, 200000, 2000000], help="faithful term"
    )
    ap.add_argument(
        "--entries-lams", type=float, nargs="*", default=[0.02, 0.2, 2, 20], help="lambdas with kl_scale entries"
    )
    ap.add_argument(
        "--all-lams",
        type=float,
        nargs="*",
        default=[0.2, 2, 20],
        help="lambdas with kl_scale entries and method.pull=all",
    )
    ap.add_argument("--jobs", type=int, default=2, help="runs trained at a time (one rank each)")
    ap.add_argument("--plot", default=os.path.join(REPO, "bench", "pull_sweep.png"), help="the curve's figure")
    a = ap.parse_args()
    data, start = os.path.join(a.demo, "data", "ml-100k"), os.path.join(a.demo, "runs", "peso")
    if not os.path.isdir(start):
        raise SystemExit(f"{start} is missing: run `make demo` first")
    config, ds = os.path.join(REPO, "configs", "demo.yaml"), os.path.join(REPO, "ds_configs", "zero2.json")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    variants = {"single": dict(overrides=["method.name=single"])}
    variants |= {
        f"lam{lam:g}": dict(overrides=["method.name=peso", f"method.lam={lam}"], lam=lam, form="faithful")
        for lam in a.lams
    }
    variants |= {
        f"entries-lam{lam:g}": dict(
            overrides=["method.name=peso", "method.kl_scale=entries", f"method.lam={lam}"], lam=lam, form="entries"
        )
        for lam in a.entries_lams
    }
    variants |= {
        f"all-lam{lam:g}": dict(
            overrides=["method.name=peso", "method.kl_scale=entries", "method.pull=all", f"method.lam={lam}"],
            lam=lam,
            form="entries, pull all",
        )
        for lam in a.all_lams
    }

    def train(job: tuple[str, int]) -> tuple[tuple[str, int], dict]:
        name, seed = job
        run = os.path.join(a.out, f"{name}-seed{seed}")
        start_from_period0(start, run)
        overrides = [*variants[name]["overrides"], f"model.seed={seed}", f"data.seed={seed}"]
        t0 = time.time()
        with open(run + ".log", "a") as log:
            run_local(RunSettings(config, data, run, ds, overrides), 1, env=env, log=log)
        return job, {**summary(run), "minutes": round((time.time() - t0) / 60, 2)}

    os.makedirs(a.out, exist_ok=True)
    result = {"bench": "pull_sweep", "data": "MovieLens-100K (the demo's), windows 1-4", "seeds": len(a.seeds)}
    with ThreadPoolExecutor(a.jobs) as pool:
        runs = dict(pool.map(train, [(name, seed) for seed in a.seeds for name in variants]))
    result["curve"] = {
        name: {
            **{k: v for k, v in spec.items() if k != "overrides"},
            **over_seeds([runs[(name, s)] for s in a.seeds]),
        }
        for name, spec in variants.items()
    }
    for name in variants:  # paired with single on the same seed: the seed moves every method alike
        result["curve"][name]["vs_single"] = [
            round(runs[(name, s)]["ndcg@10"] - runs[("single", s)]["ndcg@10"], 5) for s in a.seeds
        ]
    result["runs"] = {f"{name}-seed{seed}": r for (name, seed), r in runs.items()}
    result.update(machine=f"{platform.machine()} {os.cpu_count()} cores", date=time.strftime("%Y-%m-%d"))
    plot(result, a.plot)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
