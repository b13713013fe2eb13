"""The real-data study: the paper's Amazon CDs blocks, peso against single and cumulative LoRA.

    python bench/continual_cds.py [--seeds 0 1 2] [--work /tmp/peso-cds-study]

The tiny Llama (train/shapes.py) is trained in full on window 0 (D1) from random weights, once
(3 epochs); then, for each seed (LoRA initialization and data order), windows 1-4 (D2-D5) are
learned with peso, single and cumulative LoRA, each starting from that period 0, on two CPU
ranks (DeepSpeed ZeRO-2), through the real entry point. Items are the paper's semantic IDs
(semantic_ids.json, imported). Settings are in configs/cds_study.yaml. Evaluation: every period,
on the first 1,000 test users of every window so far (of 8,494 / 1,013 / 866 / 1,078 / 1,074),
beam 10, Hit/NDCG@5/10 and the test loss (teacher-forced cross-entropy of the target's tokens);
the reference: the 10 most frequent training targets of each window, on the same users.

With --lams, peso also runs with stronger pulls on the first seed (an ablation).

Writes bench/continual_cds.md (tables: mean and spread over seeds) and bench/continual_cds.png,
and prints one JSON line. Resumable: finished periods are kept (`--work` holds the runs).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import time

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from data_tools.convert import ConvertOptions, convert  # noqa: E402
from data_tools.reader import window_split  # noqa: E402
from data_tools.windows import GROUPS  # noqa: E402
from launcher.periods import run_local, start_from_period0  # noqa: E402
from launcher.report import MAIN_METRICS, load_run, summarize  # noqa: E402
from train.evaluate import rank_metrics  # noqa: E402

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


def popularity(data: str, window: int, max_users: int) -> dict:
    """The reference a model must beat: the 10 most frequent training targets of the window,
    ranked by count, scored on the same test users the evaluation uses (the first max_users)."""
    counts: dict = {}
    for sample in window_split(data, window, "train"):
        counts[sample["target"]] = counts.get(sample["target"], 0) + 1
    top = [item for item, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:10]]
    users = list(itertools.islice(window_split(data, window, "test"), max_users))
    return rank_metrics([top.index(u["target"]) if u["target"] in top else None for u in users], [5, 10])


def loss_columns(periods: dict) -> tuple[list, float]:
    """One run's test loss on each window 1-4 right after learning it, and its forgetting: the
    loss on window j after period 4 minus right after period j, averaged over j = 1..3."""
    def loss(after: int, window: int) -> float:
        return periods[after]["windows"][str(window)]["overall"]["test_loss"]

    return [loss(t, t) for t in range(1, 5)], statistics.mean(loss(4, j) - loss(j, j) for j in range(1, 4))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--work", default="/tmp/peso-cds-study")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--lams", type=float, nargs="*", default=[100.0, 10000.0],
                    help="extra peso lambdas, first seed only: does a stronger pull change anything?")
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
    lam_runs = {}
    for lam in a.lams:
        run = os.path.join(a.work, f"seed{a.seeds[0]}", f"peso_lam{lam:g}")
        start_from_period0(period0, run)
        run_local(CONFIG, data, run, DS, a.nproc, [f"model.seed={a.seeds[0]}", f"data.seed={a.seeds[0]}",
                                                   "method.name=peso", f"method.lam={lam}"], env=env)
        lam_runs[lam] = load_run(run)

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
    with open(CONFIG) as f:
        eval_users = yaml.safe_load(f)["eval"]["max_users"]
    pop = [popularity(data, t, eval_users) for t in range(1, 5)]
    lines.append("| most popular 10 of the window's training targets (reference) | "
                 + " | ".join(f"{statistics.mean(p[k] for p in pop):.4f}" for k in MAIN_METRICS) + " |")
    result["popularity"] = {k: round(statistics.mean(p[k] for p in pop), 5) for k in MAIN_METRICS}
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
        per_seed = [loss_columns(runs[(s, method)]) for s in a.seeds]  # (own losses, forgetting) per seed
        own = [[own_s[t] for own_s, _ in per_seed] for t in range(4)]
        forget = [f for _, f in per_seed]
        mean_own = [statistics.mean(own_s) for own_s, _ in per_seed]
        lines.append(f"| {method} | " + " | ".join(fmt(x) for x in own) + f" | {fmt(mean_own)} | {fmt(forget)} |")
        result["methods"][method]["test_loss"] = round(mean_sd(mean_own)[0], 5)
        result["methods"][method]["forgetting_loss"] = round(mean_sd(forget)[0], 5)
    if a.lams:
        seed = a.seeds[0]
        lines += ["", f"A stronger pull (seed {seed} only; mean reduction): the same test-loss columns.", "",
                  "| run | " + " | ".join(f"window {t}" for t in range(1, 5)) + " | mean | forgetting (loss) |",
                  "| --- | " + " | ".join("---" for _ in range(6)) + " |"]
        rows = [("single", runs[(seed, "single")]), ("peso λ=2", runs[(seed, "peso")])]
        rows += [(f"peso λ={lam:g}", periods) for lam, periods in lam_runs.items()]
        result["lams"] = {}
        for name, periods in rows:
            own, forget = loss_columns(periods)
            lines.append(f"| {name} | " + " | ".join(f"{x:.4f}" for x in own) + f" | {statistics.mean(own):.4f} | {forget:+.4f} |")
            result["lams"][name] = {"test_loss": round(statistics.mean(own), 5), "forgetting_loss": round(forget, 5)}
    minutes = (time.time() - t0) / 60
    lines += ["", f"{time.strftime('%Y-%m-%d')}, {platform.machine()} with {os.cpu_count()} cores; this invocation took "
              f"{minutes:.0f} min (finished periods are kept, so a rerun only redoes the tables)."]
    with open(os.path.join(REPO, "bench", "continual_cds.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    _plot(runs, a.seeds, pop, os.path.join(REPO, "bench", "continual_cds.png"))
    result.update(minutes=round(minutes, 1), machine=f"{platform.machine()} {os.cpu_count()} cores", date=time.strftime("%Y-%m-%d"))
    print("\n".join(lines))
    print(json.dumps(result))


def _plot(runs: dict, seeds: list, pop: list, path: str) -> None:
    """Three panels, mean and sd over seeds: NDCG@10 on each period's own window (with the
    popularity reference), the test loss there, and the test loss on window 1 as later periods
    are learned (forgetting)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def own(method, key):
        return [[runs[(s, method)][t]["windows"][str(t)]["overall"][key] for s in seeds] for t in range(1, 5)]

    def window1(method):
        return [[runs[(s, method)][t]["windows"]["1"]["overall"]["test_loss"] for s in seeds] for t in range(1, 5)]

    panels = [("NDCG@10, own window", lambda m: own(m, "ndcg@10")),
              ("test loss, own window", lambda m: own(m, "test_loss")),
              ("test loss on window 1 (forgetting)", window1)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.4))
    for ax, (title, values) in zip(axes, panels):
        for method in METHODS:
            stats = [mean_sd(v) for v in values(method)]
            ax.errorbar(range(1, 5), [m for m, _ in stats], yerr=[sd for _, sd in stats], marker="o", capsize=3, label=method)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("period")
        ax.set_xticks(range(1, 5))
        ax.grid(alpha=0.3)
    axes[0].plot(range(1, 5), [p["ndcg@10"] for p in pop], "k--", label="popularity")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
