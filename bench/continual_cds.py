"""The real-data study: the paper's Amazon CDs blocks, peso against single and cumulative LoRA.

    python bench/continual_cds.py [--seeds 0 1 2] [--work /tmp/peso-cds-study]

The tiny Llama (train/shapes.py) is trained in full on window 0 (D1) from random weights, once
(3 epochs); then, for each seed (LoRA initialization and data order), windows 1-4 (D2-D5) are
learned with peso, single and cumulative LoRA, each starting from that period 0, on two CPU
ranks (DeepSpeed ZeRO-2), through the real entry point. Items are the paper's semantic IDs
(semantic_ids.json, imported). Settings are in configs/cds_study.yaml. Evaluation: every period,
on the test users of every window so far (the first 1,000 of window 0; all of windows 1-4),
beam 10, Hit/NDCG@5/10 and the test loss (teacher-forced cross-entropy of the target's tokens).

Writes bench/continual_cds.md (tables: mean and spread over seeds) and bench/continual_cds.png,
and prints one JSON line. Resumable: finished periods are kept (`--work` holds the runs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from data_tools.convert import ConvertOptions, convert  # noqa: E402
from data_tools.windows import GROUPS  # noqa: E402
from launcher.periods import run_local, start_from_period0  # noqa: E402
from launcher.report import MAIN_METRICS, load_run, summarize  # noqa: E402

CDS = os.path.join(os.path.dirname(REPO), "shared", "data", "amazon-cds-blocks")
CONFIG = os.path.join(REPO, "configs", "cds_study.yaml")
DS = os.path.join(REPO, "ds_configs", "zero2.json")
METHODS = ("peso", "single", "cumulative")


def mean_sd(xs: list) -> tuple[float, float]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return float("nan"), float("nan")
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def fmt(xs: list) -> str:
    m, s = mean_sd(xs)
    return f"{m:.4f} ± {s:.4f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--work", default="/tmp/peso-cds-study")
    ap.add_argument("--nproc", type=int, default=2)
    a = ap.parse_args()
    if not os.path.isdir(CDS):
        raise SystemExit(f"the shared CDs blocks are not at {CDS}")
    t0 = time.time()
    data = os.path.join(a.work, "data")
    convert(ConvertOptions(format="blocks", reviews=CDS, index=os.path.join(CDS, "semantic_ids.json"), out=data, progress=False))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    runs = {}
    period0 = os.path.join(a.work, "period0")
    run_local(CONFIG, data, period0, DS, a.nproc, ["schedule.epochs=3"], env=env, upto=0)
    for seed in a.seeds:
        seed_args = [f"model.seed={seed}", f"data.seed={seed}"]
        for method in METHODS:
            start_from_period0(period0, os.path.join(a.work, f"seed{seed}", method))
        for method in METHODS:
            run = os.path.join(a.work, f"seed{seed}", method)
            run_local(CONFIG, data, run, DS, a.nproc, [*seed_args, f"method.name={method}"], env=env)
            runs[(seed, method)] = load_run(run)

    # ---- tables: mean +- sd over seeds ----------------------------------------------------------------
    sums = {key: summarize(periods, "ndcg@10") for key, periods in runs.items()}
    lines = [f"Tiny Llama (hidden 64, 2 layers, 0.35 M parameters) trained in full on window 0 for 3 epochs, then "
             f"LoRA r=8 for 2 epochs per window; history 20; {len(a.seeds)} seeds ({', '.join(map(str, a.seeds))}) "
             "of the LoRA periods; mean ± sd over seeds.", "",
             "Average over windows 1-4 (each period on its own test window):", "",
             "| method | " + " | ".join(MAIN_METRICS) + " |", "| --- | " + " | ".join("---" for _ in MAIN_METRICS) + " |"]
    result = {"bench": "continual_cds", "seeds": a.seeds, "methods": {}}
    for method in METHODS:
        per_seed = [sums[(s, method)]["average_incremental"] for s in a.seeds]
        lines.append(f"| {method} | " + " | ".join(fmt([p[k] for p in per_seed]) for k in MAIN_METRICS) + " |")
        result["methods"][method] = {k: round(mean_sd([p[k] for p in per_seed])[0], 5) for k in MAIN_METRICS}
    lines += ["", "NDCG@10 by user group (windows 1-4):", "",
              "| method | " + " | ".join(GROUPS) + " |", "| --- | " + " | ".join("---" for _ in GROUPS) + " |"]
    for method in METHODS:
        lines.append(f"| {method} | " + " | ".join(fmt([sums[(s, method)]["groups"][g]["ndcg@10"] for s in a.seeds]) for g in GROUPS) + " |")
        result["methods"][method]["groups_ndcg@10"] = {
            g: round(mean_sd([sums[(s, method)]["groups"][g]["ndcg@10"] for s in a.seeds])[0], 5) for g in GROUPS}
    lines += ["", "NDCG@10 per window (each period on its own window):", "",
              "| method | " + " | ".join(f"window {t}" for t in range(1, 5)) + " | BWT | forgetting |",
              "| --- | " + " | ".join("---" for _ in range(6)) + " |"]
    for method in METHODS:
        cells = [fmt([runs[(s, method)][t]["windows"][str(t)]["overall"]["ndcg@10"] for s in a.seeds]) for t in range(1, 5)]
        cells += [fmt([sums[(s, method)]["bwt"] for s in a.seeds]), fmt([sums[(s, method)]["forgetting"] for s in a.seeds])]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
        result["methods"][method]["bwt_ndcg@10"] = round(mean_sd([sums[(s, method)]["bwt"] for s in a.seeds])[0], 5)
    lines += ["", "Test loss (lower is better), each period on its own window, and its forgetting: the loss on window j "
              "after period 4 minus right after period j, averaged over j = 1..3:", "",
              "| method | " + " | ".join(f"window {t}" for t in range(1, 5)) + " | mean | forgetting (loss) |",
              "| --- | " + " | ".join("---" for _ in range(6)) + " |"]
    for method in METHODS:
        own = [[runs[(s, method)][t]["windows"][str(t)]["overall"]["test_loss"] for s in a.seeds] for t in range(1, 5)]
        forget = [statistics.mean(runs[(s, method)][4]["windows"][str(j)]["overall"]["test_loss"]
                                  - runs[(s, method)][j]["windows"][str(j)]["overall"]["test_loss"] for j in range(1, 4))
                  for s in a.seeds]
        mean_own = [statistics.mean(own[t][i] for t in range(4)) for i in range(len(a.seeds))]
        lines.append(f"| {method} | " + " | ".join(fmt(x) for x in own) + f" | {fmt(mean_own)} | {fmt(forget)} |")
        result["methods"][method]["test_loss"] = round(mean_sd(mean_own)[0], 5)
        result["methods"][method]["forgetting_loss"] = round(mean_sd(forget)[0], 5)
    minutes = (time.time() - t0) / 60
    lines += ["", f"Wall time {minutes:.0f} min on {platform.machine()} with {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}."]
    with open(os.path.join(REPO, "bench", "continual_cds.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    _plot(runs, a.seeds, os.path.join(REPO, "bench", "continual_cds.png"))
    result.update(minutes=round(minutes, 1), machine=f"{platform.machine()} {os.cpu_count()} cores", date=time.strftime("%Y-%m-%d"))
    print("\n".join(lines))
    print(json.dumps(result))


def _plot(runs: dict, seeds: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ["overall", *GROUPS]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4), sharey=True)
    for ax, panel in zip(axes, panels):
        for method in METHODS:
            ms, sds = [], []
            for t in range(1, 5):
                vals = []
                for s in seeds:
                    w = runs[(s, method)][t]["windows"][str(t)]
                    vals.append(w["overall"]["ndcg@10"] if panel == "overall" else w["groups"][panel]["ndcg@10"])
                m, sd = mean_sd(vals)
                ms.append(m)
                sds.append(sd)
            ax.errorbar(range(1, 5), ms, yerr=sds, marker="o", capsize=3, label=method)
        ax.set_title(panel)
        ax.set_xlabel("period (window)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("NDCG@10")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
